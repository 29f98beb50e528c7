"""Unit tests of the query matcher: MongoDB's semantics operator by operator, and validation.

Expected results follow MongoDB's documented behaviour; several tables reproduce the cases of
MongoDB's own test suite (null semantics, numeric path components).
"""

from __future__ import annotations

import datetime
import re
import warnings
from typing import Any

import pytest
from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex
from bson.timestamp import Timestamp

from engine.query import (
    ALLOWED_OPERATORS,
    MAX_QUERY_DEPTH,
    MAX_REGEX_LENGTH,
    PLACEHOLDER_PATTERN,
    Matcher,
    QueryError,
    compile_query,
    conjunction,
    matches,
    placeholders_in,
    substitute_placeholders,
    validate_query,
)

Query = dict[str, Any]

OID_1 = ObjectId("65a000000000000000000001")
OID_2 = ObjectId("65a000000000000000000002")
JAN = datetime.datetime(2024, 1, 1)
JUN = datetime.datetime(2024, 6, 1)


def ids(query: Query, docs: dict[str, Any]) -> set[str]:
    """The names of the documents (given as name -> value of field "a") the query matches."""
    matcher = compile_query(query)
    return {name for name, value in docs.items() if matcher(_doc(value))}


def _doc(value: Any) -> dict[str, Any]:
    return {} if value is _NO_A else {"a": value}


_NO_A = object()


# --------------------------------------------------------------------------------------------
# Equality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "document", "expected"),
    [
        ({"a": 1}, {"a": 1}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": 1}, {"a": Int64(1)}, True),
        ({"a": 1}, {"a": Decimal128("1.00")}, True),
        ({"a": 2.5}, {"a": Decimal128("2.5")}, True),
        ({"a": 1}, {"a": True}, False),
        ({"a": True}, {"a": 1}, False),
        ({"a": 0}, {"a": False}, False),
        ({"a": "1"}, {"a": 1}, False),
        ({"a": 1}, {"a": [3, 1]}, True),
        ({"a": 1}, {"a": [[1]]}, False),
        ({"a": [1]}, {"a": [[1]]}, True),
        ({"a": [1, 2]}, {"a": [1, 2]}, True),
        ({"a": [1, 2]}, {"a": [2, 1]}, False),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),
        ({"a": []}, {"a": []}, True),
        ({"a": []}, {"a": [[]]}, True),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 2}}, True),
        ({"a": {"b": 1, "c": 2}}, {"a": {"c": 2, "b": 1}}, False),
        ({"a": {"b": 1}}, {"a": {"b": 1.0}}, True),
        ({"a": {"b": 1}}, {"a": {"b": True}}, False),
        ({"a": {"b": 1}}, {"a": [{"b": 1}, 2]}, True),
        ({"a": OID_1}, {"a": OID_1}, True),
        ({"a": OID_1}, {"a": str(OID_1)}, False),
        ({"a": JAN}, {"a": JAN.replace(tzinfo=datetime.UTC)}, True),
        ({"a": JAN}, {"a": JAN + datetime.timedelta(microseconds=999)}, True),
        ({"a": float("nan")}, {"a": float("nan")}, True),
        ({"a": float("nan")}, {"a": Decimal128("NaN")}, True),
        ({"a": float("nan")}, {"a": 1}, False),
        ({"a": 0.0}, {"a": -0.0}, True),
        ({"a": b"xy"}, {"a": Binary(b"xy", 0)}, True),
        ({"a": b"xy"}, {"a": Binary(b"xy", 5)}, False),
        ({"a": Timestamp(5, 1)}, {"a": Timestamp(5, 1)}, True),
        ({"a": Code("f()")}, {"a": "f()"}, False),
        ({"a": MinKey()}, {"a": MinKey()}, True),
        ({"a": "a"}, {"b": "a"}, False),
        ({"a": {"$eq": 1}}, {"a": [0, 1]}, True),
        ({"a": {"$eq": {"$gt": 1}}}, {"a": {"$gt": 1}}, True),
        ({"a": {"$eq": Regex("^x")}}, {"a": "xy"}, False),
        ({"a": {"$eq": Regex("^x")}}, {"a": Regex("^x")}, True),
        ({"a": {"$eq": re.compile("^x", re.I)}}, {"a": Regex("^x", "iu")}, True),
    ],
)
def test_equality(query: Query, document: dict[str, Any], expected: bool) -> None:
    assert matches(query, document) is expected


def test_dbref_values_compare_as_documents() -> None:
    ref = DBRef("users", OID_1)
    assert matches({"owner": ref}, {"owner": DBRef("users", OID_1)})
    assert not matches({"owner": ref}, {"owner": DBRef("users", OID_2)})
    assert matches({"owner.$id": OID_1}, {"owner": ref})
    assert matches({"owner": {"$ref": "users", "$id": OID_1}}, {"owner": ref})


# MongoDB's null semantics (jstests/core/query/null_query_semantics.js), documents without and
# with arrays. The keys name the value of field "a"; _NO_A means the field is missing.
NULL_DOCS: dict[str, Any] = {
    "a_empty_subobject": {},
    "a_null": None,
    "a_number": 4,
    "a_subobject_b_not_null": {"b": "hi"},
    "a_subobject_b_null": {"b": None},
    "no_a": _NO_A,
    "a_double_array": [[]],
    "a_empty_array": [],
    "a_object_array_b_mix_null_missing": [{"b": None}, {"b": None}, {}],
    "a_object_array_no_b_nulls": [{"b": 1}, {"b": 3}, {"b": "string"}],
    "a_object_array_some_b_nulls": [{"b": None}, {"b": 3}, {"b": None}],
    "a_object_array_some_b_missing": [{"b": 3}, {}],
    "a_value_array_all_nulls": [None, None],
    "a_value_array_no_nulls": [1, "string", 4],
    "a_value_array_with_null": [1, "string", None, 4],
}
ALL_NULL_DOCS = set(NULL_DOCS)
EQ_NULL = {"a_null", "no_a", "a_value_array_all_nulls", "a_value_array_with_null"}
DOTTED_EQ_NULL = {
    "a_empty_subobject",
    "a_null",
    "a_number",
    "a_subobject_b_null",
    "no_a",
    "a_object_array_b_mix_null_missing",
    "a_object_array_some_b_nulls",
    "a_object_array_some_b_missing",
}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"a": None}, EQ_NULL),
        ({"a": {"$eq": None}}, EQ_NULL),
        ({"a": {"$ne": None}}, ALL_NULL_DOCS - EQ_NULL),
        ({"a": {"$gte": None}}, EQ_NULL),
        ({"a": {"$lte": None}}, EQ_NULL),
        ({"a": {"$gt": None}}, set()),
        ({"a": {"$lt": None}}, set()),
        ({"a": {"$not": {"$gte": None}}}, ALL_NULL_DOCS - EQ_NULL),
        ({"a": {"$in": [None, 75]}}, EQ_NULL),
        ({"a": {"$nin": [None, 75]}}, ALL_NULL_DOCS - EQ_NULL),
        (
            {"a": {"$nin": [None, []]}},
            ALL_NULL_DOCS - EQ_NULL - {"a_double_array", "a_empty_array"},
        ),
        ({"a": {"$exists": False}}, {"no_a"}),
        ({"a.b": None}, DOTTED_EQ_NULL),
        ({"a.b": {"$in": [None, 75]}}, DOTTED_EQ_NULL),
        ({"a.b": {"$ne": None}}, ALL_NULL_DOCS - DOTTED_EQ_NULL),
        ({"a.b": {"$nin": [None, 75]}}, ALL_NULL_DOCS - DOTTED_EQ_NULL),
        (
            {"a.b": {"$exists": False}},
            {
                "no_a",
                "a_empty_subobject",
                "a_null",
                "a_number",
                "a_double_array",
                "a_empty_array",
                "a_value_array_all_nulls",
                "a_value_array_no_nulls",
                "a_value_array_with_null",
            },
        ),
        (
            {"a": {"$elemMatch": {"$eq": None}}},
            {"a_value_array_all_nulls", "a_value_array_with_null"},
        ),
        (
            {"a": {"$elemMatch": {"$ne": None}}},
            {
                "a_double_array",
                "a_object_array_b_mix_null_missing",
                "a_object_array_no_b_nulls",
                "a_object_array_some_b_nulls",
                "a_object_array_some_b_missing",
                "a_value_array_no_nulls",
                "a_value_array_with_null",
            },
        ),
        (
            {"a": {"$elemMatch": {"b": None}}},
            {
                "a_double_array",
                "a_object_array_b_mix_null_missing",
                "a_object_array_some_b_nulls",
                "a_object_array_some_b_missing",
            },
        ),
        ({"a.b": {"$elemMatch": {"$eq": None}}}, set()),
    ],
)
def test_null_and_missing(query: Query, expected: set[str]) -> None:
    assert ids(query, NULL_DOCS) == expected


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

# MongoDB's numeric path components (jstests/core/match_numeric_components.js).
NUMERIC_DOCS: list[Any] = [
    42,
    [42],
    {"0": 42},
    [[42]],
    [{"0": 42}],
    {"0": [42]},
    {"0": {"0": 42}},
    [[[42]]],
    [[{"0": 42}]],
    [{"0": [42]}],
    [{"0": {"0": 42}}],
    {"0": [[42]]},
    {"0": [{"0": 42}]},
    {"0": {"0": [42]}},
    {"0": {"0": {"0": 42}}},
    [[[[42]]]],
    [[[{"0": 42}]]],
    [[{"0": [42]}]],
    [[{"0": {"0": 42}}]],
    [{"0": [[42]]}],
    [{"0": [{"0": 42}]}],
    [{"0": {"0": [42]}}],
    [{"0": {"0": {"0": 42}}}],
    {"0": [[[42]]]},
    {"0": [[{"0": 42}]]},
    {"0": [{"0": [42]}]},
    {"0": [{"0": {"0": 42}}]},
    {"0": {"0": [[42]]}},
    {"0": {"0": [{"0": 42}]}},
    {"0": {"0": {"0": [42]}}},
    {"0": {"0": {"0": {"0": 42}}}},
]
A0_IS_42 = {1, 2, 4, 5, 9}
EVERY_NUMERIC_DOC = set(range(len(NUMERIC_DOCS)))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"a.0": 42}, A0_IS_42),
        ({"a.0": {"$ne": 42}}, EVERY_NUMERIC_DOC - A0_IS_42),
        ({"a.0.0": 42}, {3, 4, 5, 6, 8, 9, 10, 12, 13, 17, 20, 21, 25}),
        ({"a.0": {"$gt": 41}}, A0_IS_42),
        ({"a.0": {"$in": [41, 42, 43]}}, A0_IS_42),
        ({"a.0": {"$nin": [41, 42, 43]}}, EVERY_NUMERIC_DOC - A0_IS_42),
        ({"a.0": {"$all": [42]}}, A0_IS_42),
        (
            {"a.0": {"$all": [{"$elemMatch": {"0": 42}}]}},
            {7, 8, 11, 12, 15, 17, 19, 20, 23, 25},
        ),
        ({"$or": [{"a.0": 42}, {"notARealField": 123}]}, A0_IS_42),
    ],
)
def test_numeric_path_components(query: Query, expected: set[int]) -> None:
    matcher = compile_query(query)
    assert {i for i, a in enumerate(NUMERIC_DOCS) if matcher({"a": a})} == expected


@pytest.mark.parametrize(
    ("query", "document", "expected"),
    [
        ({"a.b": 1}, {"a": {"b": 1}}, True),
        ({"a.b.c": 1}, {"a": {"b": {"c": 1}}}, True),
        ({"a.b": 1}, {"a": [{"b": 2}, {"b": 1}]}, True),
        ({"a.b": 1}, {"a": [{"b": [0, 1]}]}, True),
        ({"a.b": 1}, {"a": [[{"b": 1}]]}, False),
        ({"a.b.c": 1}, {"a": [{"b": [{"c": 1}]}]}, True),
        ({"a.b": [0, 1]}, {"a": [{"b": [0, 1]}]}, True),
        ({"a.b": 1}, {"a": 5}, False),
        ({"a.1": 7}, {"a": [5, 7, 3]}, True),
        ({"a.1": 5}, {"a": [5, 7, 3]}, False),
        ({"a.1.b": 4}, {"a": [5, [{"b": 4}], 3]}, True),
        ({"a.1": 4}, {"a": [5, {"1": 4}, 3]}, True),
        ({"a.01": 7}, {"a": [5, 7]}, False),
        ({"a.01": 7}, {"a": {"01": 7}}, True),
        ({"a.5": None}, {"a": [1, 2]}, False),
        ({"a.5": {"$exists": False}}, {"a": [1, 2]}, True),
        ({"a.0.b": None}, {"a": [1]}, False),
        ({"a.b": None}, {"a": [1, 2]}, False),
        ({"a.b": {"$ne": None}}, {"a": [1, 2]}, True),
    ],
)
def test_dotted_paths(query: Query, document: dict[str, Any], expected: bool) -> None:
    assert matches(query, document) is expected


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "value", "expected"),
    [
        ({"$gt": 1}, 2, True),
        ({"$gt": 1}, 1, False),
        ({"$gte": 1}, 1.0, True),
        ({"$lt": 1}, Decimal128("0.5"), True),
        ({"$lt": Decimal128("0.5")}, 0.25, True),
        ({"$gt": 1}, "2", False),
        ({"$lt": "b"}, 1, False),
        ({"$lt": "b"}, "a", True),
        ({"$lt": "b"}, "B", True),
        ({"$gt": "a"}, "ab", True),
        ({"$gt": 0}, True, False),
        ({"$gt": False}, True, True),
        ({"$lt": True}, 0, False),
        ({"$gt": JAN}, JUN, True),
        ({"$gt": JAN}, 5, False),
        ({"$lt": JUN}, JAN.replace(tzinfo=datetime.UTC), True),
        ({"$gt": OID_1}, OID_2, True),
        ({"$gt": OID_1}, "zzz", False),
        ({"$gt": 5}, [1, 10], True),
        ({"$gt": 5}, [1, 2], False),
        ({"$gt": [1]}, [2], True),
        ({"$gt": [1]}, [1], False),
        ({"$gte": [1]}, [[1]], True),
        ({"$gt": {"b": 1}}, {"b": 2}, True),
        ({"$gt": {"b": 1}}, {"c": 0}, True),
        ({"$lt": {"b": 1}}, {"b": "x"}, False),
        ({"$gt": 5, "$lt": 10}, [1, 20], True),
        ({"$gt": float("nan")}, float("nan"), False),
        ({"$gte": float("nan")}, float("nan"), True),
        ({"$lte": 5}, float("nan"), False),
        ({"$gt": MinKey()}, "anything", True),
        ({"$lt": MaxKey()}, None, True),
        ({"$gte": MinKey()}, MinKey(), True),
        ({"$gt": b"a"}, b"aa", True),
        ({"$gt": b"b"}, b"aa", True),
        ({"$gt": Timestamp(1, 1)}, Timestamp(1, 2), True),
    ],
)
def test_comparisons(query: Query, value: Any, expected: bool) -> None:
    assert matches({"a": query}, {"a": value}) is expected


def test_key_bounds_match_missing_fields() -> None:
    assert matches({"a": {"$gt": MinKey()}}, {})
    assert not matches({"a": {"$lt": MinKey()}}, {})
    assert matches({"a": {"$lt": MaxKey()}}, {})


# --------------------------------------------------------------------------------------------
# Membership, existence, size, $all
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "document", "expected"),
    [
        ({"a": {"$in": [1, "x"]}}, {"a": 1.0}, True),
        ({"a": {"$in": [1, "x"]}}, {"a": True}, False),
        ({"a": {"$in": [1, "x"]}}, {"a": ["y", "x"]}, True),
        ({"a": {"$in": [[1, 2]]}}, {"a": [1, 2]}, True),
        ({"a": {"$in": [[1, 2]]}}, {"a": [[1, 2], 3]}, True),
        ({"a": {"$in": [{"b": 1}]}}, {"a": {"b": 1}}, True),
        ({"a": {"$in": [Regex("^x"), 5]}}, {"a": "xyz"}, True),
        ({"a": {"$in": [re.compile("^X", re.I)]}}, {"a": ["y", "xa"]}, True),
        ({"a": {"$in": [Regex("^5")]}}, {"a": 5}, False),
        ({"a": {"$in": []}}, {"a": 1}, False),
        ({"a": {"$in": [Decimal128("NaN")]}}, {"a": float("nan")}, True),
        ({"a": {"$nin": [1, 2]}}, {"a": 3}, True),
        ({"a": {"$nin": [1, 2]}}, {"a": [3, 2]}, False),
        ({"a": {"$nin": [1, 2]}}, {}, True),
        ({"a": {"$nin": []}}, {}, True),
        ({"a": {"$nin": [Regex("^x")]}}, {"a": "xy"}, False),
        ({"a": {"$ne": 1}}, {"a": [1, 2]}, False),
        ({"a": {"$ne": 1}}, {"a": [2, 3]}, True),
        ({"a": {"$ne": 1}}, {}, True),
        ({"a": {"$ne": [1, 2]}}, {"a": [1, 2]}, False),
        ({"a": {"$exists": True}}, {"a": None}, True),
        ({"a": {"$exists": True}}, {}, False),
        ({"a": {"$exists": True}}, {"a": []}, True),
        ({"a.b": {"$exists": True}}, {"a": [{"c": 1}, {"b": 1}]}, True),
        ({"a.b": {"$exists": False}}, {"a": [{"c": 1}, {"b": 1}]}, False),
        ({"a": {"$exists": 1}}, {"a": 0}, True),
        ({"a": {"$exists": 0}}, {"a": 0}, False),
        ({"a": {"$exists": "false"}}, {"a": 0}, True),
        ({"a": {"$exists": None}}, {}, True),
        ({"a": {"$exists": Decimal128("0")}}, {}, True),
        ({"a": {"$size": 2}}, {"a": [1, [2, 3]]}, True),
        ({"a": {"$size": 2}}, {"a": [[1, 2]]}, False),
        ({"a": {"$size": 0}}, {"a": []}, True),
        ({"a": {"$size": 0}}, {}, False),
        ({"a": {"$size": 1}}, {"a": "x"}, False),
        ({"a": {"$size": 2.0}}, {"a": [1, 2]}, True),
        ({"a.b": {"$size": 2}}, {"a": [{"b": [1]}, {"b": [1, 2]}]}, True),
        ({"a": {"$all": [1, 2]}}, {"a": [2, 3, 1]}, True),
        ({"a": {"$all": [1, 2]}}, {"a": [2, 3]}, False),
        ({"a": {"$all": [1]}}, {"a": 1}, True),
        ({"a": {"$all": []}}, {"a": []}, False),
        ({"a": {"$all": [[1, 2]]}}, {"a": [1, 2]}, True),
        ({"a": {"$all": [[1, 2]]}}, {"a": [[1, 2], 3]}, True),
        ({"a": {"$all": [Regex("^a"), "bc"]}}, {"a": ["ab", "bc"]}, True),
        ({"a": {"$all": [None]}}, {}, True),
        (
            {"a": {"$all": [{"$elemMatch": {"b": 1}}, {"$elemMatch": {"c": {"$gt": 1}}}]}},
            {"a": [{"b": 1}, {"c": 5}]},
            True,
        ),
        (
            {"a": {"$all": [{"$elemMatch": {"$gt": 1, "$lt": 3}}]}},
            {"a": [0, 5]},
            False,
        ),
    ],
)
def test_membership_existence_size_all(
    query: Query, document: dict[str, Any], expected: bool
) -> None:
    assert matches(query, document) is expected


# --------------------------------------------------------------------------------------------
# $elemMatch, $not, logical operators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "document", "expected"),
    [
        ({"a": {"$elemMatch": {"$gt": 1, "$lt": 3}}}, {"a": [0, 2]}, True),
        ({"a": {"$elemMatch": {"$gt": 1, "$lt": 3}}}, {"a": [0, 5]}, False),
        ({"a": {"$elemMatch": {"$gt": 1}}}, {"a": [[5]]}, False),
        ({"a": {"$elemMatch": {"$gt": 1}}}, {"a": 5}, False),
        ({"a": {"$elemMatch": {"$not": {"$gt": 1}}}}, {"a": [5, 0]}, True),
        ({"a": {"$elemMatch": {"$regex": "^x"}}}, {"a": ["ax", "xa"]}, True),
        ({"a": {"$elemMatch": {"$elemMatch": {"$eq": 1}}}}, {"a": [[0, 1]]}, True),
        ({"a": {"$elemMatch": {"b": 1, "c": 2}}}, {"a": [{"b": 1}, {"c": 2}]}, False),
        ({"a": {"$elemMatch": {"b": 1, "c": 2}}}, {"a": [{"b": 1, "c": 2}]}, True),
        ({"a": {"$elemMatch": {"b": {"$gt": 1}}}}, {"a": [{"b": [0, 5]}]}, True),
        ({"a": {"$elemMatch": {"b.c": 1}}}, {"a": [{"b": {"c": 1}}]}, True),
        ({"a": {"$elemMatch": {"$or": [{"b": 1}, {"c": 1}]}}}, {"a": [{"c": 1}]}, True),
        ({"a": {"$elemMatch": {}}}, {"a": [1, {}]}, True),
        ({"a": {"$elemMatch": {}}}, {"a": [1, 2]}, False),
        ({"a": {"$elemMatch": {}}}, {"a": [[]]}, True),
        ({"a": {"$elemMatch": {"0": 1}}}, {"a": [[1, 2]]}, True),
        ({"a": {"$elemMatch": {"b": 1}}}, {"a": {"b": 1}}, False),
        ({"a.b": {"$elemMatch": {"c": 1}}}, {"a": [{"b": [{"c": 1}]}]}, True),
        ({"a": {"$not": {"$gt": 5}}}, {"a": [1, 10]}, False),
        ({"a": {"$not": {"$gt": 5}}}, {"a": [1, 2]}, True),
        ({"a": {"$not": {"$gt": 5}}}, {}, True),
        ({"a": {"$not": {"$gt": 5}}}, {"a": "x"}, True),
        ({"a": {"$not": {"$gt": 1, "$lt": 5}}}, {"a": 3}, False),
        ({"a": {"$not": {"$gt": 1, "$lt": 5}}}, {"a": 7}, True),
        ({"a": {"$not": Regex("^x")}}, {"a": "xy"}, False),
        ({"a": {"$not": re.compile("^x")}}, {"a": "yx"}, True),
        ({"a": {"$not": {"$regex": "^X", "$options": "i"}}}, {"a": "xy"}, False),
        ({"a": {"$not": {"$not": {"$eq": 1}}}}, {"a": 1}, True),
        ({"$and": [{"a": 1}, {"b": 2}]}, {"a": 1, "b": 2}, True),
        ({"$and": [{"a": 1}, {"b": 2}]}, {"a": 1}, False),
        ({"$or": [{"a": 1}, {"b": 2}]}, {"b": 2}, True),
        ({"$or": [{"a": 1}, {"b": 2}]}, {"b": 3}, False),
        ({"$nor": [{"a": 1}, {"b": 2}]}, {"b": 3}, True),
        ({"$nor": [{"a": 1}, {"b": 2}]}, {"a": 1}, False),
        ({"$and": [{}]}, {}, True),
        ({"$or": [{"a": {"$exists": False}}, {"$and": [{"a": 1}, {"b": 1}]}]}, {"b": 1}, True),
        ({"a": 1, "$or": [{"b": 1}, {"c": 1}]}, {"a": 1, "c": 1}, True),
    ],
)
def test_elem_match_not_and_logic(query: Query, document: dict[str, Any], expected: bool) -> None:
    assert matches(query, document) is expected


# --------------------------------------------------------------------------------------------
# Regular expressions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"$regex": "^ab"}, "abc", True),
        ({"$regex": "b"}, "abc", True),
        ({"$regex": "^b"}, "abc", False),
        ({"$regex": "^A"}, "abc", False),
        ({"$regex": "^A", "$options": "i"}, "abc", True),
        ({"$options": "i", "$regex": "^A"}, "abc", True),
        ({"$regex": "^b"}, "a\nb", False),
        ({"$regex": "^b", "$options": "m"}, "a\nb", True),
        ({"$regex": "a.b"}, "a\nb", False),
        ({"$regex": "a.b", "$options": "s"}, "a\nb", True),
        ({"$regex": "a b # comment", "$options": "x"}, "ab", True),
        ({"$regex": re.compile("^A", re.I)}, "abc", True),
        ({"$regex": Regex("^A", "i")}, "abc", True),
        ({"$regex": Regex("^A"), "$options": "i"}, "abc", True),
        ({"$regex": "^1"}, 1, False),
        ({"$regex": "^a"}, ["x", "ay"], True),
        ({"$regex": "^a"}, [["ay"]], False),
        ({"$regex": "^a"}, {"b": "a"}, False),
        ({"$regex": "^a"}, Code("a()"), False),
        ({"$regex": "^a"}, Regex("^a"), True),
        ({"$regex": "^a", "$options": "i"}, Regex("^a"), False),
        ({"$regex": "^a", "$options": "i"}, Regex("^a", "i"), True),
    ],
)
def test_regex(spec: dict[str, Any], value: Any, expected: bool) -> None:
    assert matches({"a": spec}, {"a": value}) is expected


@pytest.mark.parametrize("pattern", [Regex("^x", "i"), re.compile("^x", re.IGNORECASE)])
def test_regex_values_as_implicit_match(pattern: Any) -> None:
    assert matches({"a": pattern}, {"a": "XY"})
    assert not matches({"a": pattern}, {"a": "yx"})


# --------------------------------------------------------------------------------------------
# Compilation, the Matcher and the convenience function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [None, {}])
def test_empty_query_matches_everything(query: Query | None) -> None:
    matcher = compile_query(query)
    assert isinstance(matcher, Matcher)
    assert matcher.matches_everything
    assert matcher({}) and matcher({"a": 1})


def test_matcher_is_reusable_and_returns_bools() -> None:
    matcher = compile_query({"status": {"$in": ["open", "review"]}, "archived": {"$ne": True}})
    assert not matcher.matches_everything
    results = [matcher(doc) for doc in ({"status": "open"}, {"status": "done"})]
    assert results == [True, False]
    assert all(type(result) is bool for result in results)
    assert matcher({"status": "review", "archived": False}) is True
    assert "status" in repr(matcher)


def test_compile_takes_placeholder_like_values_literally() -> None:
    assert matches({"owner": "$user.id"}, {"owner": "$user.id"})


def test_raw_bson_and_son_documents() -> None:
    from bson import SON, encode
    from bson.raw_bson import RawBSONDocument

    raw = RawBSONDocument(encode({"a": {"b": [1, 2]}, "c": "x"}))
    assert matches({"a.b": 2, "c": "x"}, raw)
    assert matches({"a": {"b": 1}}, SON([("a", SON([("b", 1)]))]))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_allowed_operators_are_exactly_the_whitelist() -> None:
    whitelist = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"}
    whitelist |= {"$and", "$or", "$nor", "$not", "$all", "$size", "$elemMatch", "$regex"}
    assert whitelist == ALLOWED_OPERATORS


def _error(query: Any, **options: Any) -> QueryError:
    with pytest.raises(QueryError) as caught:
        validate_query(query, **options)
    return caught.value


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ({"$where": "this.a == 1"}, "$where"),
        ({"$expr": {"$eq": ["$a", 1]}}, "$expr"),
        ({"$function": {}}, "$function"),
        ({"$text": {"$search": "x"}}, "$text"),
        ({"$comment": "hi"}, "$comment"),
        ({"$jsonSchema": {}}, "$jsonSchema"),
        ({"status": {"$where": "1"}}, "status.$where"),
        ({"a": {"$function": {"body": "", "args": [], "lang": "js"}}}, "a.$function"),
        ({"a": {"$type": "string"}}, "a.$type"),
        ({"a": {"$mod": [2, 0]}}, "a.$mod"),
        ({"$or": [{"a": 1}, {"age": {"$gt": 1, "$expr": 1}}]}, "$or[1].age.$expr"),
        ({"$and": [{"$nor": [{"$text": {}}]}]}, "$and[0].$nor[0].$text"),
        ({"a": {"$elemMatch": {"$where": "1"}}}, "a.$elemMatch.$where"),
        ({"a": {"$elemMatch": {"b": {"$expr": 1}}}}, "a.$elemMatch.b.$expr"),
        ({"a": {"$not": {"$where": "1"}}}, "a.$not.$where"),
        ({"a": {"$all": [{"$elemMatch": {"$function": 1}}]}}, "a.$all[0].$elemMatch.$function"),
    ],
)
def test_forbidden_operators(query: Query, path: str) -> None:
    error = _error(query)
    operator = path.rsplit(".", 1)[-1]
    assert error.path == path
    assert error.message.startswith(f"operator {operator} is not allowed (allowed: $eq, $ne")
    assert str(error) == f"{path}: {error.message}"
    with pytest.raises(QueryError):
        compile_query(query)


@pytest.mark.parametrize(
    ("query", "path", "fragment"),
    [
        ([], "", "a query must be an object"),
        ("a", "", "a query must be an object"),
        ({1: 2}, "1", "field names must be strings"),
        ({"$gt": 1}, "$gt", "must be applied to a field"),
        ({"$options": "i"}, "$options", "must be applied to a field"),
        ({"$and": []}, "$and", "non-empty array"),
        ({"$or": {"a": 1}}, "$or", "non-empty array"),
        ({"$nor": [1]}, "$nor[0]", "must be a query object"),
        ({"a": {"$and": [{"b": 1}]}}, "a.$and", "top level"),
        ({"a": {"$gt": 1, "b": 2}}, "a.b", "cannot mix operators"),
        ({"a": {"b": 2, "$gt": 1}}, "a.$gt", "cannot appear inside a value"),
        ({"a": {"b": {"$gt": 1}}}, "a.b.$gt", "dotted path"),
        ({"a": [{"$gt": 1}]}, "a[0].$gt", "cannot appear inside a value"),
        ({"a..b": 1}, "a..b", "empty part"),
        ({"a": {"$in": 1}}, "a.$in", "$in needs an array"),
        ({"a": {"$nin": "x"}}, "a.$nin", "$nin needs an array"),
        ({"a": {"$in": [1, {"$gt": 1}]}}, "a.$in[1].$gt", "cannot appear inside a value"),
        ({"a": {"$all": 1}}, "a.$all", "$all needs an array"),
        ({"a": {"$all": [{"$elemMatch": {}}, 1]}}, "a.$all[1]", "only values"),
        ({"a": {"$all": [1, {"$elemMatch": {}}]}}, "a.$all[1]", "only values"),
        ({"a": {"$all": [{"$gt": 1}]}}, "a.$all[0]", "not operators"),
        ({"a": {"$size": -1}}, "a.$size", "non-negative whole number"),
        ({"a": {"$size": 1.5}}, "a.$size", "non-negative whole number"),
        ({"a": {"$size": "2"}}, "a.$size", "non-negative whole number"),
        ({"a": {"$size": True}}, "a.$size", "non-negative whole number"),
        ({"a": {"$elemMatch": 1}}, "a.$elemMatch", "needs an object"),
        ({"a": {"$elemMatch": {"$gt": 1, "b": 1}}}, "a.$elemMatch.b", "cannot mix"),
        ({"a": {"$not": 1}}, "a.$not", "operator object or a regular expression"),
        ({"a": {"$not": {"b": 1}}}, "a.$not", "operator object or a regular expression"),
        ({"a": {"$not": {}}}, "a.$not", "cannot be empty"),
        ({"a": {"$ne": Regex("x")}}, "a.$ne", "$ne cannot take a regular expression"),
        ({"a": {"$gt": re.compile("x")}}, "a.$gt", "cannot take a regular expression"),
        ({"a": {"$regex": 1}}, "a.$regex", "$regex needs a string"),
        ({"a": {"$regex": "x", "$options": "q"}}, "a.$options", "i, m, s and x"),
        ({"a": {"$regex": "x", "$options": 1}}, "a.$options", "i, m, s and x"),
        ({"a": {"$regex": Regex("x", "i"), "$options": "m"}}, "a.$options", "both"),
        ({"a": {"$options": "i"}}, "a.$options", "only valid beside $regex"),
        ({"a": {"$regex": "("}}, "a.$regex", "invalid regular expression"),
        ({"a": {"$regex": "a\0"}}, "a.$regex", "null character"),
        ({"a": Regex("(")}, "a", "invalid regular expression"),
        ({"a": {"$in": [Regex("[")]}}, "a.$in[0]", "invalid regular expression"),
        ({"a": {"$not": Regex("(a+)+")}}, "a.$not", "exponential"),
        ({"a": {"$regex": "x" * (MAX_REGEX_LENGTH + 1)}}, "a.$regex", "longer than 1000"),
        ({"a": {"$regex": re.compile("x", re.ASCII)}}, "a.$regex", "flags"),
        ({"a": {1, 2}}, "a", "cannot be used in a query"),
        ({"a": {"$eq": datetime.date(2024, 1, 1)}}, "a.$eq", "cannot be used in a query"),
    ],
)
def test_malformed_queries(query: Any, path: str, fragment: str) -> None:
    error = _error(query)
    assert error.path == path
    assert fragment in error.message
    assert str(error) == (f"{path}: {error.message}" if path else error.message)


@pytest.mark.parametrize(
    "pattern",
    [
        "(a+)+",
        "(a*)*",
        "(a|a)*",
        "(a|ab)*",
        "(a|b|ab)*",
        r"(\w+\s?)*$",
        "(x+x+)+y",
        "((ab)*)+",
        "(a+){2,5}",
        "(?:a|a)+b",
    ],
)
def test_catastrophic_patterns_are_refused(pattern: str) -> None:
    assert "exponential" in _error({"a": {"$regex": pattern}}).message


@pytest.mark.parametrize(
    "pattern",
    [
        "^abc",
        "a+b+c*",
        "(ab)+",
        "(foo|bar)+",
        "(?:a|b)*",
        "[a-z]+@[a-z]+\\.com$",
        "(a{2})+",
        "^(\\d{3})-(\\d{4})$",
        "x" * MAX_REGEX_LENGTH,
    ],
)
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    validate_query({"a": {"$regex": pattern}})


@pytest.mark.parametrize(
    "pattern", [r"\z", "(?<name>x)", "a{99999999999999}", "(" * 500 + ")" * 500]
)
def test_patterns_python_cannot_compile_are_refused(pattern: str) -> None:
    error = _error({"a": {"$regex": pattern}})
    assert error.message.startswith("invalid regular expression")


def test_pattern_warnings_are_not_raised() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert matches({"a": {"$regex": "[[a]"}}, {"a": "a"})


def test_deeply_nested_queries_are_refused() -> None:
    query: Query = {"a": 1}
    for _ in range(MAX_QUERY_DEPTH):
        query = {"$and": [query]}
    error = _error(query)
    assert (error.path, error.message) == ("", "query is nested more than 100 levels deep")
    with pytest.raises(QueryError):
        compile_query(query)
    with pytest.raises(QueryError):
        substitute_placeholders(query, {})


def test_queries_with_thousands_of_clauses() -> None:
    matcher = compile_query({"$or": [{"a": index} for index in range(5000)]})
    assert matcher({"a": 4999})
    assert not matcher({"a": -1})
    nested: Query = {"a": 1}
    for _ in range(40):
        nested = {"$and": [nested, {"b": {"$ne": 2}}]}
    assert compile_query(nested)({"a": 1})


def test_valid_queries_pass_validation() -> None:
    validate_query(None)
    validate_query({})
    validate_query(
        {
            "status": {"$in": ["open", re.compile("^re")]},
            "archived": {"$ne": True},
            "tags": {"$all": ["x"], "$size": 2},
            "items": {"$elemMatch": {"qty": {"$gt": 1}, "$or": [{"sku": "a"}, {"sku": "b"}]}},
            "owner": {"$ref": "users", "$id": OID_1},
            "$nor": [
                {"a.b.0": {"$exists": True}},
                {"c": {"$not": {"$regex": "x", "$options": "i"}}},
            ],
            "meta": {"$eq": {"$literal": 1}},
        }
    )


# --------------------------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("$user.id", True),
        ("$user.email", True),
        ("$claims.team", True),
        ("$claims.org-id.v2_x", True),
        ("$user.name", False),
        ("$user.id.x", False),
        ("$claims.", False),
        ("$claims.a b", False),
        ("$user", False),
    ],
)
def test_placeholder_pattern(text: str, valid: bool) -> None:
    assert (PLACEHOLDER_PATTERN.match(text) is not None) is valid


def test_placeholders_are_allowed_only_when_asked() -> None:
    scope = {"owner_id": "$user.id", "team": {"$in": ["$claims.team", "public"]}}
    validate_query(scope, allow_placeholders=True)
    error = _error(scope)
    assert error.path == "owner_id"
    assert "placeholder $user.id is not allowed here" in error.message


@pytest.mark.parametrize(
    ("query", "path", "fragment"),
    [
        ({"owner": "$user.name"}, "owner", "$user.name is not a placeholder"),
        ({"a": {"$in": ["$claims."]}}, "a.$in[0]", "is not a placeholder"),
        ({"a": ["$user.idx"]}, "a[0]", "is not a placeholder"),
        ({"a": {"$regex": "$user.id"}}, "a.$regex", "placeholders cannot be used in $regex"),
        ({"a": {"$exists": "$user.id"}}, "a.$exists", "placeholders cannot be used in $exists"),
    ],
)
def test_placeholder_errors(query: Query, path: str, fragment: str) -> None:
    error = _error(query, allow_placeholders=True)
    assert error.path == path
    assert fragment in error.message


def test_ordinary_dollar_strings_are_values() -> None:
    validate_query({"price": "$5", "who": "$user"}, allow_placeholders=True)
    validate_query({"price": "$5"})


NESTED_SCOPE: Query = {
    "owner_id": "$user.id",
    "$or": [{"team": {"$in": ["$claims.team", "all"]}}, {"editors": "$user.email"}],
    "grants": {"$elemMatch": {"user": "$user.id", "level": {"$gte": "$claims.level"}}},
    "pattern": {"$regex": "^x"},
    "meta": {"$not": {"$eq": "$claims.team"}},
    "literal": {"by": "$user.id"},
}


def test_placeholders_in() -> None:
    assert placeholders_in(NESTED_SCOPE) == {
        "$user.id",
        "$user.email",
        "$claims.team",
        "$claims.level",
    }
    assert placeholders_in({"a": 1}) == set()


def test_substitute_placeholders() -> None:
    values = {"$user.id": "u1", "$user.email": "u@x", "$claims.team": "red", "$claims.level": 3}
    substituted = substitute_placeholders(NESTED_SCOPE, values)
    assert substituted == {
        "owner_id": "u1",
        "$or": [{"team": {"$in": ["red", "all"]}}, {"editors": "u@x"}],
        "grants": {"$elemMatch": {"user": "u1", "level": {"$gte": 3}}},
        "pattern": {"$regex": "^x"},
        "meta": {"$not": {"$eq": "red"}},
        "literal": {"by": "u1"},
    }
    assert NESTED_SCOPE["owner_id"] == "$user.id"
    matcher = compile_query(substituted)
    assert matcher(
        {
            "owner_id": "u1",
            "team": "red",
            "grants": [{"user": "u1", "level": 5}],
            "pattern": "xy",
            "meta": "blue",
            "literal": {"by": "u1"},
        }
    )


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"$user.id": None},
        {"$user.id": "u1"},
    ],
)
def test_substitute_without_a_value_gives_none(values: dict[str, Any]) -> None:
    assert substitute_placeholders({"a": "$user.id", "b": "$claims.team"}, values) is None


def test_substituted_documents_stay_data() -> None:
    substituted = substitute_placeholders({"team": "$claims.team"}, {"$claims.team": {"$ne": 0}})
    assert substituted == {"team": {"$eq": {"$ne": 0}}}
    assert not compile_query(substituted)({"team": 5})
    assert compile_query(substituted)({"team": {"$ne": 0}})
    listed = substitute_placeholders({"team": "$claims.teams"}, {"$claims.teams": ["a", "b"]})
    assert listed == {"team": ["a", "b"]}


# -- conjunction: one query for several (snapshots and windows ask the database with it) -------


def test_conjunction_puts_distinct_fields_side_by_side() -> None:
    assert conjunction([{"a": 1}, {}, {"b": {"$gt": 2}}]) == {"a": 1, "b": {"$gt": 2}}
    assert conjunction([]) == {}
    assert conjunction([{"a": 1}, {"a": {"$gt": 0}}, {"$or": [{"x": 1}]}, {"$or": [{"y": 1}]}]) == {
        "a": 1,
        "$or": [{"x": 1}],
        "$and": [{"a": {"$gt": 0}}, {"$or": [{"y": 1}]}],
    }
