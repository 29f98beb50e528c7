"""Fuzzing the query language clients and manifests control (engine.query), without a server.

Every subscribe filter a client sends is compiled by `compile_query` and then evaluated on every
change event of its collection, inside the routing loop that serves every connection of the
endpoint. So, for any input:

- compiling either gives a Matcher or raises QueryError (the client then gets
  `forbidden_filter`), never another exception;
- a compiled matcher answers True or False on any document the database can hold (every BSON
  type, nested arrays and documents), never raises: a matcher that raised while routing would
  cost the connections after it that event;
- `$where`, `$function`, `$expr` and every other operator outside the whitelist are refused
  wherever they appear.

The strategies here (filters with every operator, right and wrong argument types, documents
with every BSON type) are shared by the other fuzz modules.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.query import (
    ALLOWED_OPERATORS,
    Matcher,
    QueryError,
    compile_query,
    conjunction,
    substitute_placeholders,
    validate_query,
)

Strategy = st.SearchStrategy

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- values a client can send (JSON as orjson decodes it) ---------------------------------------

# Field parts kept few, so that filters and documents meet.
PARTS = ["a", "b", "c", "0", "1", "tags", "owner_id"]
FIELD_PATHS = st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map(".".join)

json_scalars: Strategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "a", "ab", "B", "$user.id", "$claims.team", "$x", "x\x00y", "é"]),
    st.text(max_size=6),
)
json_values: Strategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from([*PARTS, "$eq", "$gt", "$bad", ""]), children, max_size=3),
    ),
    max_leaves=6,
)

# Patterns a client might send: plain, anchored, classes, alternations, bad syntax.
SAFE_REGEXES = [
    "^a",
    "b$",
    "a.c",
    "[a-c]+",
    "^(ab|cd)$",
    "x?y*",
    "\\d{2,4}",
    "(?i)abc",
    "",
    "(",
    "[",
    "a{2}",
    "\\",
    "(?P<n>a)(?P=n)",
]
regex_strings: Strategy[str] = st.one_of(st.sampled_from(SAFE_REGEXES), st.text(max_size=6))

COMPARISONS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]
FORBIDDEN_OPERATORS = [
    "$where",
    "$function",
    "$expr",
    "$text",
    "$jsonSchema",
    "$mod",
    "$type",
    "$near",
    "$geoWithin",
    "$accumulator",
    "$comment",
    "$bitsAllSet",
    "$sampleRate",
    "$search",
    "$lookup",
]


def _operator_documents(queries: Strategy[dict[str, Any]]) -> Strategy[dict[str, Any]]:
    """{"$op": argument} for every allowed field operator, with right and wrong argument types."""
    arrays = st.lists(json_values, max_size=4)
    return st.one_of(
        st.builds(lambda op, v: {op: v}, st.sampled_from(COMPARISONS), json_values),
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$in", "$nin"]), arrays | json_values),
        st.builds(lambda v: {"$exists": v}, json_values),
        st.builds(lambda v: {"$size": v}, st.integers(-2, 5) | json_values),
        st.builds(lambda v: {"$all": v}, arrays | json_values),
        st.builds(lambda q: {"$elemMatch": q}, queries | json_values),
        st.builds(lambda v: {"$not": v}, json_values),
        st.builds(
            lambda pattern, options: {"$regex": pattern, **options},
            regex_strings | json_values,
            st.one_of(
                st.just({}),
                st.builds(lambda o: {"$options": o}, st.text(alphabet="imsxulq$", max_size=3)),
            ),
        ),
        st.builds(lambda op, v: {op: v}, st.sampled_from(FORBIDDEN_OPERATORS), json_values),
    )


def _query_strategy() -> Strategy[dict[str, Any]]:
    def extend(queries: Strategy[dict[str, Any]]) -> Strategy[dict[str, Any]]:
        clause_value = st.one_of(json_values, _operator_documents(queries))
        field_query = st.dictionaries(FIELD_PATHS, clause_value, min_size=1, max_size=3)
        logical = st.builds(
            lambda op, items: {op: items},
            st.sampled_from(["$and", "$or", "$nor"]),
            st.lists(queries, max_size=3) | json_values,
        )
        forbidden = st.builds(
            lambda op, v: {op: v}, st.sampled_from(FORBIDDEN_OPERATORS), json_values
        )
        return st.one_of(field_query, logical, forbidden)

    base = st.dictionaries(FIELD_PATHS, json_scalars, max_size=2)
    return st.recursive(base, extend, max_leaves=10)


# A subscribe `filter`: mostly query-shaped, sometimes any JSON at all.
filters: Strategy[Any] = st.one_of(_query_strategy(), _query_strategy(), json_values)

# -- documents as change events carry them (BSON decoded by PyMongo) ----------------------------

bson_scalars: Strategy[Any] = st.one_of(
    json_scalars,
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            Decimal128("1"),
            Decimal128("NaN"),
            Decimal128("-Infinity"),
            Decimal128("1E+6144"),
            ObjectId("65a000000000000000000001"),
            datetime.datetime(2024, 1, 1),
            datetime.datetime(1, 1, 1),
            datetime.datetime(9999, 12, 31, 23, 59, 59),
            b"\x00\xff",
            Binary(b"ab", 5),
            Binary(uuid.UUID(int=7).bytes, 4),
            Regex("^a", "i"),
            Regex("(", ""),
            Timestamp(5, 1),
            MinKey(),
            MaxKey(),
            Code("a"),
            Code("a", {"x": 1}),
            DBRef("c", 1),
            uuid.UUID(int=7),
        ]
    ),
)
documents: Strategy[dict[str, Any]] = st.dictionaries(
    st.sampled_from(PARTS),
    st.recursive(
        bson_scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.sampled_from(PARTS), children, max_size=3),
        ),
        max_leaves=8,
    ),
    max_size=4,
)


def compile_or_none(query: Any) -> Matcher | None:
    """The matcher, or None when the query is refused (only QueryError may refuse it)."""
    try:
        return compile_query(query)
    except QueryError:
        return None


# -- properties ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(query=filters)
def test_any_filter_compiles_or_is_refused_with_query_error(query: Any) -> None:
    compile_or_none(query)
    for allow in (False, True):
        try:
            validate_query(query, allow_placeholders=allow)
        except QueryError as error:
            assert str(error), "a refusal says why"


@settings(FUZZ, max_examples=300)
@given(query=filters, docs=st.lists(documents, min_size=1, max_size=4))
def test_compiled_filters_never_raise_on_any_document(query: Any, docs: list[Any]) -> None:
    matcher = compile_or_none(query)
    if matcher is None:
        return
    for document in docs:
        assert matcher(document) in (True, False)


def _inject(query: Any, forbidden: dict[str, Any], where: int) -> dict[str, Any]:
    """`query` with a forbidden clause placed at one of several depths."""
    if where == 0:
        return {**forbidden, "a": 1}
    if where == 1:
        return {"$and": [{"a": 1}, forbidden]}
    if where == 2:
        return {"a": {"$elemMatch": forbidden}}
    if where == 3:
        return {"$or": [{"$nor": [forbidden]}]}
    if where == 4:  # as a field operator
        (op, value), *_ = forbidden.items()
        return {"a": {"$gt": 1, op: value}}
    if where == 5:
        (op, value), *_ = forbidden.items()
        return {"a": {"$not": {op: value}}}
    return {"$and": [query, forbidden]} if isinstance(query, dict) else forbidden


@settings(FUZZ, max_examples=150)
@given(
    query=_query_strategy(),
    op=st.sampled_from(FORBIDDEN_OPERATORS),
    argument=json_values,
    where=st.integers(0, 6),
)
def test_forbidden_operators_are_refused_wherever_they_appear(
    query: Any, op: str, argument: Any, where: int
) -> None:
    hostile = _inject(query, {op: argument}, where)
    try:
        compile_query(hostile)
    except QueryError as error:
        assert op in str(error) or "$" in str(error)
    else:
        raise AssertionError(f"{hostile!r} was accepted")
    assert op not in ALLOWED_OPERATORS


def test_where_and_function_refusals_name_the_operator() -> None:
    for hostile in (
        {"$where": "sleep(10000) || true"},
        {"a": {"$function": {"body": "function() {return true}", "args": [], "lang": "js"}}},
        {"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}},
        {"$or": [{"a": 1}, {"$where": "true"}]},
    ):
        try:
            compile_query(hostile)
        except QueryError as error:
            assert any(op in str(error) for op in ("$where", "$function", "$expr"))
        else:
            raise AssertionError(f"{hostile!r} was accepted")


scalar_claims: Strategy[Any] = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.sampled_from(PARTS), json_scalars, max_size=2),
)


@settings(FUZZ, max_examples=200)
@given(
    team=scalar_claims,
    user=st.text(max_size=8),
    docs=st.lists(documents, min_size=1, max_size=3),
)
def test_scopes_compile_with_any_plain_claim_value(team: Any, user: str, docs: list[Any]) -> None:
    """Claims are the token issuer's data; plain JSON values of any shape become literals."""
    scope = {"owner_id": "$user.id", "$or": [{"team": "$claims.team"}, {"tags": {"$in": ["x"]}}]}
    bound = substitute_placeholders(scope, {"$user.id": user, "$claims.team": team})
    if bound is None:
        return
    matcher = compile_query(bound)
    for document in docs:
        assert matcher(document) in (True, False)


def _compiles(query: Any) -> bool:
    try:
        compile_query(query)
    except (QueryError, TypeError, ValueError):
        return False
    return isinstance(query, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries=st.lists(filters.filter(_compiles), max_size=4), document=documents)
def test_conjunction_matches_what_every_query_matches(
    queries: list[dict[str, Any]], document: dict[str, Any]
) -> None:
    """Fields side by side mean the same as `$and` of the queries (SPEC 3 semantics)."""
    expected = all(compile_query(query)(document) for query in queries)
    assert compile_query(conjunction(queries))(document) is expected
