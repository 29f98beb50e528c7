"""The in-process matcher against the database's own find(), on random documents and filters.

Documents and filters are drawn from small pools so that filters actually match. Each example
stores the documents, reads them back (so the matcher sees BSON-decoded values, as it does on
change events) and compares, filter by filter, the _ids find() returns with those the matcher
accepts.

Two narrow cases are kept out of the generators because the embedded database (SecantusDB
0.7.0b3) answers them differently from MongoDB; the matcher follows MongoDB (see the unit tests
in test_query.py, which pin MongoDB's documented results):

- NULL_ON_POSITIONAL_PATHS: SecantusDB treats a positional path part that selects no element
  ({"a.1": null} on {a: [5]}, {"a.0.b": null} on {a: [1]}, {"a.0": null} on {a: []}) as a
  missing field, so null equality ($eq/$gte/$lte null, $in/$nin with null) matches there.
  MongoDB's path iterator yields no value at all for such a path, so null does not match.
  Filters on paths with a numeric part therefore never compare with a top-level null.
- ELEM_MATCH_ON_NESTED_ARRAYS: SecantusDB's query-form $elemMatch ({"a": {"$elemMatch":
  {"b": null}}}) never matches an array element that is itself an array unless the sub-query is
  empty. MongoDB reads such an element as a document keyed "0", "1", ... (so [[]] matches
  {"$elemMatch": {"b": null}}, and [[[42]]] matches {"$elemMatch": {"0": 42}} through "a.0").
  Query-form $elemMatch is therefore only tested on documents without arrays directly inside
  arrays.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex
from bson.timestamp import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient
from pymongo.collection import Collection

from engine.query import compile_query

# Hundreds of database round trips: slow on a loaded machine, never stuck.
pytestmark = pytest.mark.timeout(600)

Document = dict[str, Any]
Strategy = st.SearchStrategy

SCALARS: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    2,
    -1,
    1.0,
    2.5,
    float("nan"),
    Int64(2),
    Decimal128("1"),
    Decimal128("2.5"),
    "",
    "a",
    "ab",
    "abc",
    "b",
    "B",
    "a\nb",
    ObjectId("65a000000000000000000001"),
    ObjectId("65a000000000000000000002"),
    datetime.datetime(2024, 1, 1),
    datetime.datetime(2024, 6, 1, 12, 30, 0, 250000),
    b"ab",
    Binary(b"ab", 5),
    Timestamp(5, 1),
    MinKey(),
    MaxKey(),
    Code("a"),
]
# Regular expressions stored as values; filters get theirs from `regexes` (a regex argument to
# $ne or $gt is an error, not a value).
STORED_REGEXES = [Regex("^a"), Regex("^a", "i")]
KEYS = ["a", "b", "c"]
FLAT_PATHS = ["a", "b", "c", "a.0", "b.1"]
NESTED_PATHS = ["a", "b", "a.b", "a.c", "b.a", "a.0", "a.1", "a.b.c", "a.0.b", "a.b.0", "a.0.0"]
PATTERNS = ["^a", "b$", "a.c", "^$", "[bc]", "B", "^A", "a$"]
OPTIONS = ["", "i", "m", "s", "x", "im"]

# Half the draws come from a few common values, so that filters and documents meet often.
COMMON = [None, 1, 2, "a", "ab", True]
scalars = st.sampled_from(COMMON) | st.sampled_from(SCALARS)
stored_scalars = scalars | st.sampled_from(STORED_REGEXES)
regexes = st.builds(Regex, st.sampled_from(PATTERNS), st.sampled_from(OPTIONS))


def _subdocuments(children: Strategy[Any]) -> Strategy[Any]:
    return st.dictionaries(st.sampled_from(KEYS), children, max_size=3)


def _containers(children: Strategy[Any]) -> Strategy[Any]:
    return st.lists(children, max_size=3) | _subdocuments(children)


def _no_array_in_array(children: Strategy[Any]) -> Strategy[Any]:
    # ELEM_MATCH_ON_NESTED_ARRAYS: array elements are scalars or subdocuments.
    element = stored_scalars | _subdocuments(children)
    return st.lists(element, max_size=3) | _subdocuments(children)


nested_values = st.recursive(stored_scalars, _containers, max_leaves=6)
flat_values = stored_scalars | st.lists(stored_scalars, max_size=3)
flat_arguments = scalars | st.lists(scalars, max_size=3)
no_array_in_array_values = st.recursive(stored_scalars, _no_array_in_array, max_leaves=6)
# Filter arguments: smaller than documents, so equality with whole arrays and subdocuments hits.
nested_arguments = st.recursive(scalars, _containers, max_leaves=2)


def _documents(values: Strategy[Any]) -> Strategy[Document]:
    return st.dictionaries(st.sampled_from(KEYS), values, max_size=3)


def _single(op: str, argument: Strategy[Any]) -> Strategy[dict[str, Any]]:
    return argument.map(lambda value: {op: value})


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def _regex_operator(pattern: str, options: str) -> dict[str, Any]:
    return {"$regex": pattern, "$options": options} if options else {"$regex": pattern}


regex_operators = st.builds(_regex_operator, st.sampled_from(PATTERNS), st.sampled_from(OPTIONS))


class FilterGrammar:
    """Random filters over given paths and values, from the whitelisted operators."""

    def __init__(self, values: Strategy[Any], paths: list[str], *, elem_match_queries: bool):
        self.values = values
        # NULL_ON_POSITIONAL_PATHS: no top-level null compared on a path with a numeric part.
        self.non_null_values = values.filter(lambda value: value is not None)
        self.paths = paths
        self.elem_match_queries = elem_match_queries

    def queries(self) -> Strategy[Document]:
        return st.recursive(self._field_clauses(None), self._logical, max_leaves=5)

    def _logical(self, children: Strategy[Document]) -> Strategy[Document]:
        ops = st.sampled_from(["$and", "$or", "$nor"])
        combined = st.tuples(ops, st.lists(children, min_size=1, max_size=3))
        nested = children if self.elem_match_queries else None
        return combined.map(lambda pair: {pair[0]: pair[1]}) | self._field_clauses(nested)

    def _field_clauses(self, queries: Strategy[Document] | None) -> Strategy[Document]:
        clause = st.sampled_from(self.paths).flatmap(
            lambda path: self._spec(path, queries).map(lambda spec: (path, spec))
        )
        return st.lists(clause, min_size=1, max_size=2).map(dict)

    def _spec(self, path: str, queries: Strategy[Document] | None) -> Strategy[Any]:
        positional = any(part.isdigit() for part in path.split("."))
        values = self.non_null_values if positional else self.values
        return values | regexes | self._operator_documents(values, queries)

    def _operator_documents(
        self, values: Strategy[Any], queries: Strategy[Document] | None
    ) -> Strategy[dict[str, Any]]:
        """An operator document for a field, with $not and $elemMatch nested inside."""

        def extend(inner: Strategy[dict[str, Any]]) -> Strategy[dict[str, Any]]:
            nested = [
                _single("$not", inner | regexes),
                _single("$elemMatch", inner),
                _single("$all", st.lists(_single("$elemMatch", inner), min_size=1, max_size=2)),
            ]
            if queries is not None:
                nested.append(_single("$elemMatch", queries))
            return st.lists(st.one_of(inner, *nested), min_size=1, max_size=2).map(_merge)

        base = st.lists(self._value_operators(values), min_size=1, max_size=2).map(_merge)
        return st.recursive(base, extend, max_leaves=4)

    @staticmethod
    def _value_operators(values: Strategy[Any]) -> Strategy[dict[str, Any]]:
        comparisons = [_single(op, values) for op in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")]
        members = st.lists(values | regexes, max_size=3)
        return st.one_of(
            *comparisons,
            _single("$in", members),
            _single("$nin", members),
            _single("$exists", st.booleans()),
            _single("$size", st.integers(0, 3)),
            _single("$all", members),
            regex_operators,
        )


@pytest.fixture
def collection(mongo_uri: str, db_name: str) -> Iterator[Collection[Document]]:
    client: MongoClient[Document] = MongoClient(mongo_uri)
    try:
        yield client[db_name]["documents"]
    finally:
        client.drop_database(db_name)
        client.close()


def _assert_same_matches(
    collection: Collection[Document], docs: list[Document], filters: list[Document]
) -> None:
    collection.delete_many({})
    collection.insert_many([{"_id": index, **doc} for index, doc in enumerate(docs)])
    stored = list(collection.find({}))
    for query in filters:
        expected = {doc["_id"] for doc in collection.find(query, {"_id": 1})}
        matcher = compile_query(query)
        actual = {doc["_id"] for doc in stored if matcher(doc)}
        assert actual == expected, f"query {query!r} on {stored!r}"


SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

flat_filters = FilterGrammar(flat_arguments, FLAT_PATHS, elem_match_queries=False).queries()
nested_filters = FilterGrammar(nested_arguments, NESTED_PATHS, elem_match_queries=False).queries()
elem_match_filters = FilterGrammar(
    nested_arguments, NESTED_PATHS, elem_match_queries=True
).queries()


@settings(SETTINGS, max_examples=120)
@given(
    docs=st.lists(_documents(flat_values), min_size=1, max_size=8),
    filters=st.lists(flat_filters, min_size=1, max_size=6),
)
def test_operators_on_flat_documents(
    collection: Collection[Document], docs: list[Document], filters: list[Document]
) -> None:
    _assert_same_matches(collection, docs, filters)


@settings(SETTINGS, max_examples=120)
@given(
    docs=st.lists(_documents(nested_values), min_size=1, max_size=8),
    filters=st.lists(nested_filters, min_size=1, max_size=6),
)
def test_dotted_paths_through_arrays_and_subdocuments(
    collection: Collection[Document], docs: list[Document], filters: list[Document]
) -> None:
    _assert_same_matches(collection, docs, filters)


@settings(SETTINGS, max_examples=80)
@given(
    docs=st.lists(_documents(no_array_in_array_values), min_size=1, max_size=8),
    filters=st.lists(elem_match_filters, min_size=1, max_size=6),
)
def test_elem_match_with_queries_and_logical_operators(
    collection: Collection[Document], docs: list[Document], filters: list[Document]
) -> None:
    _assert_same_matches(collection, docs, filters)
