"""Unit tests of engine.changes: change documents, projections and change messages (SPEC 5).

Pure functions only: no database, no sockets. Raw change documents are written the way MongoDB
emits them (resume token, clusterTime, wallTime, ns, documentKey, updateDescription with
truncatedArrays, pre-images). The projection table reproduces cases of MongoDB's own
`jstests/core/projection_semantics.js`, where find() and $project agree.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from bson import Decimal128, ObjectId, Timestamp
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine import codec
from engine.changes import (
    DATA_OPERATIONS,
    LIFECYCLE_OPERATIONS,
    ChangeEvent,
    Fields,
    change_message,
    cluster_time_iso,
    event_id_of,
    narrow_fields,
    normalize,
    project,
    project_update,
    union_fields,
)

Doc = dict[str, Any]

OID = ObjectId("65a000000000000000000001")
TOKEN = {"_data": "8265A1B2C3000000012B042C0100296E5A1004ABCDEF"}
CLUSTER = Timestamp(1_700_000_000, 3)
CLUSTER_ISO = "2023-11-14T22:13:20Z"
WALL = dt.datetime(2023, 11, 14, 22, 13, 20, 123000)
NS = {"db": "appdb", "coll": "shop_orders"}
AFTER: Doc = {"_id": OID, "item": "pen", "qty": 2, "owner_id": "ann", "secret": "s"}
BEFORE: Doc = {"_id": OID, "item": "pen", "qty": 1, "owner_id": "ann", "secret": "s"}


def raw(operation: str, **extra: Any) -> Doc:
    """A change document with the keys every data event carries, as MongoDB emits it."""
    document: Doc = {
        "_id": dict(TOKEN),
        "operationType": operation,
        "clusterTime": CLUSTER,
        "wallTime": WALL,
        "ns": dict(NS),
        "documentKey": {"_id": OID},
    }
    document.update(extra)
    return document


def update_description(
    updated: Mapping[str, Any], removed: Sequence[str] = (), truncated: Sequence[Doc] = ()
) -> Doc:
    return {
        "updatedFields": dict(updated),
        "removedFields": list(removed),
        "truncatedArrays": list(truncated),
    }


# -- normalize ---------------------------------------------------------------------------------


def test_operation_sets() -> None:
    assert frozenset({"insert", "update", "replace", "delete"}) == DATA_OPERATIONS
    assert frozenset({"drop", "rename", "dropDatabase", "invalidate"}) == LIFECYCLE_OPERATIONS


def test_normalize_insert() -> None:
    event = normalize(raw("insert", fullDocument=AFTER))
    assert event == ChangeEvent(
        event_id=TOKEN["_data"],
        resume_token=TOKEN,
        operation="insert",
        database="appdb",
        collection="shop_orders",
        document_id=OID,
        document=AFTER,
        before=None,
        updated_fields=None,
        removed_fields=None,
        cluster_time=CLUSTER,
        timestamp=CLUSTER_ISO,
    )


def test_normalize_update_with_post_image_and_description() -> None:
    description = update_description({"qty": 2, "tags.1": "x"}, ["note"], [])
    event = normalize(raw("update", updateDescription=description, fullDocument=AFTER))
    assert event is not None
    assert event.operation == "update"
    assert event.document == AFTER
    assert event.updated_fields == {"qty": 2, "tags.1": "x"}
    assert event.removed_fields == ["note"]
    assert event.before is None
    assert event.document_id == OID
    assert event.timestamp == CLUSTER_ISO


def test_normalize_update_without_update_lookup_has_no_document() -> None:
    event = normalize(raw("update", updateDescription=update_description({"qty": 2})))
    assert event is not None
    assert event.document is None
    assert event.updated_fields == {"qty": 2}
    assert event.removed_fields == []


def test_normalize_update_whose_document_was_deleted_after() -> None:
    # updateLookup reads the document when the event is read: gone by then -> null.
    event = normalize(
        raw("update", updateDescription=update_description({"qty": 2}), fullDocument=None)
    )
    assert event is not None
    assert event.document is None


def test_normalize_update_with_pre_image() -> None:
    event = normalize(
        raw(
            "update",
            updateDescription=update_description({"qty": 2}),
            fullDocument=AFTER,
            fullDocumentBeforeChange=BEFORE,
        )
    )
    assert event is not None
    assert event.before == BEFORE
    assert event.document == AFTER


def test_normalize_update_with_empty_description_keys() -> None:
    event = normalize(raw("update", updateDescription={}, fullDocument=AFTER))
    assert event is not None
    assert event.updated_fields is None
    assert event.removed_fields is None


@pytest.mark.parametrize("with_before", [False, True])
def test_normalize_replace(with_before: bool) -> None:
    extra: Doc = {"fullDocument": AFTER}
    if with_before:
        extra["fullDocumentBeforeChange"] = BEFORE
    event = normalize(raw("replace", **extra))
    assert event is not None
    assert event.operation == "replace"
    assert event.document == AFTER
    assert event.before == (BEFORE if with_before else None)
    # A replace has no update description, even if one were present.
    assert event.updated_fields is None
    assert event.removed_fields is None


def test_normalize_replace_ignores_a_stray_update_description() -> None:
    event = normalize(
        raw("replace", fullDocument=AFTER, updateDescription=update_description({"x": 1}))
    )
    assert event is not None
    assert event.updated_fields is None
    assert event.removed_fields is None


def test_normalize_delete_without_pre_image() -> None:
    event = normalize(raw("delete"))
    assert event is not None
    assert event.operation == "delete"
    assert event.document is None
    assert event.before is None
    assert event.document_id == OID
    assert event.updated_fields is None


def test_normalize_delete_with_pre_image() -> None:
    event = normalize(raw("delete", fullDocumentBeforeChange=BEFORE))
    assert event is not None
    assert event.document is None
    assert event.before == BEFORE


def test_normalize_delete_never_carries_a_document() -> None:
    event = normalize(raw("delete", fullDocument=AFTER))
    assert event is not None
    assert event.document is None


def test_normalize_insert_with_null_pre_image_field() -> None:
    # whenAvailable: MongoDB may send fullDocumentBeforeChange: null.
    event = normalize(raw("insert", fullDocument=AFTER, fullDocumentBeforeChange=None))
    assert event is not None
    assert event.before is None


def test_normalize_sharded_document_key_keeps_only_the_id() -> None:
    event = normalize(raw("insert", fullDocument=AFTER, documentKey={"region": "eu", "_id": OID}))
    assert event is not None
    assert event.document_id == OID


@pytest.mark.parametrize(
    "document_id", [OID, "text-id", 42, {"a": 1, "b": 2}, Decimal128("1.5"), None]
)
def test_normalize_document_id_of_any_type(document_id: Any) -> None:
    event = normalize(raw("delete", documentKey={"_id": document_id}))
    assert event is not None
    assert event.document_id == document_id


def test_normalize_without_cluster_time_uses_now() -> None:
    document = raw("insert", fullDocument=AFTER)
    del document["clusterTime"]
    before = dt.datetime.now(dt.UTC)
    event = normalize(document)
    assert event is not None
    assert event.cluster_time is None
    moment = dt.datetime.fromisoformat(event.timestamp.replace("Z", "+00:00"))
    assert event.timestamp.endswith("Z")
    assert before - dt.timedelta(seconds=1) <= moment <= dt.datetime.now(dt.UTC)


LIFECYCLE_DOCUMENTS: list[Doc] = [
    {"_id": TOKEN, "operationType": "drop", "clusterTime": CLUSTER, "wallTime": WALL, "ns": NS},
    {
        "_id": TOKEN,
        "operationType": "rename",
        "clusterTime": CLUSTER,
        "wallTime": WALL,
        "ns": NS,
        "to": {"db": "appdb", "coll": "shop_orders_old"},
    },
    {
        "_id": TOKEN,
        "operationType": "dropDatabase",
        "clusterTime": CLUSTER,
        "wallTime": WALL,
        "ns": {"db": "appdb"},
    },
    {"_id": TOKEN, "operationType": "invalidate", "clusterTime": CLUSTER, "wallTime": WALL},
    # Expanded events (showExpandedEvents) and anything unknown are not data changes either.
    {"_id": TOKEN, "operationType": "create", "clusterTime": CLUSTER, "ns": NS},
    {"_id": TOKEN, "operationType": "createIndexes", "clusterTime": CLUSTER, "ns": NS},
    {"_id": TOKEN, "operationType": "modify", "clusterTime": CLUSTER, "ns": NS},
    {"_id": TOKEN, "operationType": "shardCollection", "clusterTime": CLUSTER, "ns": NS},
    {"_id": TOKEN, "clusterTime": CLUSTER, "ns": NS},
]


@pytest.mark.parametrize(
    "document", LIFECYCLE_DOCUMENTS, ids=[str(d.get("operationType")) for d in LIFECYCLE_DOCUMENTS]
)
def test_normalize_non_data_events_are_none(document: Doc) -> None:
    assert normalize(document) is None


def test_event_id_of() -> None:
    assert event_id_of({"_data": "82ABC"}) == "82ABC"
    assert event_id_of({"_data": 123}) == "123"


# -- cluster_time_iso --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster_time", "expected"),
    [
        (Timestamp(1_700_000_000, 1), "2023-11-14T22:13:20Z"),
        (Timestamp(1_700_000_000, 99), "2023-11-14T22:13:20Z"),  # increment is not time
        (Timestamp(0, 1), "1970-01-01T00:00:00Z"),
        (Timestamp(1_709_251_199, 1), "2024-02-29T23:59:59Z"),
    ],
)
def test_cluster_time_iso(cluster_time: Timestamp, expected: str) -> None:
    assert cluster_time_iso(cluster_time) == expected


def test_cluster_time_iso_none_is_now_in_utc() -> None:
    text = cluster_time_iso(None)
    assert text.endswith("Z")
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 2


# -- project -----------------------------------------------------------------------------------


def test_project_none_is_the_whole_document_copy() -> None:
    projected = project(AFTER, None)
    assert projected == AFTER
    assert projected is not AFTER


def test_project_top_level_fields_and_id() -> None:
    assert project(AFTER, ("item", "qty")) == {"_id": OID, "item": "pen", "qty": 2}


def test_project_id_is_always_kept_and_first() -> None:
    document = {"a": 1, "_id": OID, "b": 2}
    projected = project(document, ("b",))
    assert projected == {"_id": OID, "b": 2}
    assert next(iter(projected)) == "_id"


def test_project_no_fields_keeps_only_id() -> None:
    assert project(AFTER, ()) == {"_id": OID}


def test_project_document_without_id() -> None:
    assert project({"a": 1, "b": 2}, ("a",)) == {"a": 1}


def test_project_missing_fields_are_absent() -> None:
    assert project({"_id": 1, "a": 1}, ("b", "c.d")) == {"_id": 1}


def test_project_id_listed_explicitly() -> None:
    assert project({"_id": 1, "a": 1}, ("_id",)) == {"_id": 1}


def test_project_does_not_mutate_the_document() -> None:
    document = {"_id": 1, "a": {"b": 1, "c": 2}, "l": [{"b": 1, "c": 2}, 3]}
    snapshot = copy.deepcopy(document)
    project(document, ("a.b", "l.b"))
    assert document == snapshot


def test_project_field_names_are_not_prefixes() -> None:
    assert project({"_id": 1, "a": 1, "ab": 2, "a_b": 3}, ("a",)) == {"_id": 1, "a": 1}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (("a", "a.b"), {"_id": 1, "a": {"b": 1, "c": 2}}),
        (("a.b", "a"), {"_id": 1, "a": {"b": 1, "c": 2}}),
        (("a.b.x", "a.b"), {"_id": 1, "a": {"b": 1}}),
        (("a.b", "a.b.x"), {"_id": 1, "a": {"b": 1}}),
        (("a.c", "a.b", "a"), {"_id": 1, "a": {"b": 1, "c": 2}}),
    ],
)
def test_project_shorter_path_wins(fields: tuple[str, ...], expected: Doc) -> None:
    assert project({"_id": 1, "a": {"b": 1, "c": 2}, "z": 0}, fields) == expected


# (fields, input without _id, expected without _id): MongoDB's inclusion projection.
MONGODB_INCLUSION_CASES: list[tuple[tuple[str, ...], Doc, Doc]] = [
    # top level: any value is kept as it is
    (("a",), {"a": "demo", "b": "other"}, {"a": "demo"}),
    (("a",), {"a": "demo", "aWSuffix": "other", "a.b": "extra"}, {"a": "demo"}),
    (("a",), {"a": None, "b": 1}, {"a": None}),
    (("a",), {"b": "other"}, {}),
    (("a",), {"a": {}}, {"a": {}}),
    (("a",), {"a": []}, {"a": []}),
    (("a",), {"a": [[1, 2], [{}], 2]}, {"a": [[1, 2], [{}], 2]}),
    (("a",), {"a": [1, {}, 2]}, {"a": [1, {}, 2]}),
    # one dot
    (("a.b",), {"a": {"b": "demo", "y": "extra"}, "x": 1}, {"a": {"b": "demo"}}),
    (("a.b",), {"a": {"b": "demo"}, "a.b": "extra"}, {"a": {"b": "demo"}}),
    (("a.b",), {"a": {"b": "demo", "_id": "extra"}}, {"a": {"b": "demo"}}),
    (("a.b",), {"a": [{"b": 1, "c": 1}, {"b": 2, "c": 2}]}, {"a": [{"b": 1}, {"b": 2}]}),
    (("a.b",), {"a": [{"b": 1, "c": 1}, {"c": 2}]}, {"a": [{"b": 1}, {}]}),
    (("a.b",), {"b": "other"}, {}),
    (("a.b",), {"a": {}}, {"a": {}}),
    (("a.b",), {"a": "scalar"}, {}),
    (("a.b",), {"a": None}, {}),
    (("a.b",), {"a": []}, {"a": []}),
    (("a.b",), {"a": [{}, {}]}, {"a": [{}, {}]}),
    (("a.b",), {"a": ["scalar", "scalar"]}, {"a": []}),
    (("a.b",), {"a": [None]}, {"a": []}),
    (("a.b",), {"a": ["scalar", {}, "scalar", {"c": 1}]}, {"a": [{}, {}]}),
    (("a.b",), {"a": [[]]}, {"a": [[]]}),
    (("a.b",), {"a": [[1, 2, 3]]}, {"a": [[]]}),
    (("a.b",), {"a": [[1, {"b": 1}, {"b": 2, "c": 2}, "s"]]}, {"a": [[{"b": 1}, {"b": 2}]]}),
    (
        ("a.b",),
        {"a": [["x", {"b": 1}, {"b": 2, "c": 2}, "x"], [[{"b": 1}]], [{"b": 1}, [{"b": 2}]]]},
        {"a": [[{"b": 1}, {"b": 2}], [[{"b": 1}]], [{"b": 1}, [{"b": 2}]]]},
    ),
    (
        ("a.b",),
        {"a": [[], [[], [], [1], [{"c": 1}]], {"b": 1}]},
        {"a": [[], [[], [], [], [{}]], {"b": 1}]},
    ),
    # two paths through one parent
    (("a.b", "a.c"), {"a": {"b": 1, "c": 2, "d": 3}}, {"a": {"b": 1, "c": 2}}),
    (
        ("a.b", "a.c"),
        {"a": [{"b": 1, "c": 2, "d": 3}, {"b": 3, "d": 4}]},
        {"a": [{"b": 1, "c": 2}, {"b": 3}]},
    ),
    (
        ("a.b", "a.c"),
        {"a": [{"b": 1, "c": 2}, "extra", {"b": 3}]},
        {"a": [{"b": 1, "c": 2}, {"b": 3}]},
    ),
    (("a.b", "a.c"), {"a": {"d": "extra"}}, {"a": {}}),
    # two dots
    (("a.b.c",), {"a": {"b": {"c": "demo", "z": 1}, "y": 1}, "x": 1}, {"a": {"b": {"c": "demo"}}}),
    (
        ("a.b.c",),
        {"a": [{"b": {"c": 1, "d": 1}}, {"b": {"c": 2, "d": 2}}]},
        {"a": [{"b": {"c": 1}}, {"b": {"c": 2}}]},
    ),
    (
        ("a.b.c",),
        {"a": {"b": [{"c": 1, "d": 1}, {"c": 2, "d": 2}]}},
        {"a": {"b": [{"c": 1}, {"c": 2}]}},
    ),
    (
        ("a.b.c",),
        {
            "a": [
                {"bPrime": [{"c": "x"}]},
                {"b": [{"cPrime": "x"}, {"c": 3, "d": 3}]},
                {"bPrime": {"s": 1}},
            ]
        },
        {"a": [{}, {"b": [{}, {"c": 3}]}, {}]},
    ),
    (("a.b.c",), {}, {}),
    (("a.b.c",), {"a": "scalar"}, {}),
    (("a.b.c",), {"a": None}, {}),
    (("a.b.c",), {"a": {}}, {"a": {}}),
    (("a.b.c",), {"a": {"bPrime": {"c": 1}}}, {"a": {}}),
    (("a.b.c",), {"a": {"b": "scalar"}}, {"a": {}}),
    (("a.b.c",), {"a": {"b": {"x": 1, "y": 1}}}, {"a": {"b": {}}}),
    (("a.b.c",), {"a": {"b": ["scalar"]}}, {"a": {"b": []}}),
    (("a.b.c",), {"a": [{"b": "scalar"}]}, {"a": [{}]}),
    (("a.b.c",), {"a": [{"b": [[]]}]}, {"a": [{"b": [[]]}]}),
    (("a.b.c",), {"a": [[1, {"b": 1}, {"b": 2, "c": 2}, "s"]]}, {"a": [[{}, {}]]}),
    (("a.b.c",), {"a": [1, {"b": [[1, 2], [{}], 2]}, 2]}, {"a": [{"b": [[], [{}]]}]}),
    (
        ("a.b.c",),
        {"a": [[1, 2], [{"b": [[1, 2], [{"c": [[1, 2], [{}], 2]}], 2]}], 2]},
        {"a": [[], [{"b": [[], [{"c": [[1, 2], [{}], 2]}]]}]]},
    ),
    (("a.b.c",), {"a": [1, {"b": {"c": {"x": 1}}}, 2]}, {"a": [{"b": {"c": {"x": 1}}}]}),
    (("a.b.c",), {"a": {"b": {"c": [[1, 2], [{}], 2]}}}, {"a": {"b": {"c": [[1, 2], [{}], 2]}}}),
    (("a.b.c",), {"a": [1, {"b": {"c": [1, {}, 2]}}, 2]}, {"a": [{"b": {"c": [1, {}, 2]}}]}),
]


@pytest.mark.parametrize(("fields", "document", "expected"), MONGODB_INCLUSION_CASES)
def test_project_matches_mongodb_inclusion_projection(
    fields: tuple[str, ...], document: Doc, expected: Doc
) -> None:
    assert project({"_id": 7, **document}, fields) == {"_id": 7, **expected}


def test_project_keeps_bson_values_untouched() -> None:
    moment = dt.datetime(2024, 1, 1)
    document = {"_id": OID, "when": moment, "price": Decimal128("9.99"), "x": 1}
    assert project(document, ("when", "price")) == {
        "_id": OID,
        "when": moment,
        "price": Decimal128("9.99"),
    }


# -- project_update ----------------------------------------------------------------------------


def test_project_update_without_fields_is_everything() -> None:
    assert project_update({"a": 1, "b.c": 2}, ["d"], None) == {
        "updated_fields": {"a": 1, "b.c": 2},
        "removed_fields": ["d"],
    }


def test_project_update_paths_inside_the_fields() -> None:
    fields = ("a", "b.c")
    updated = {"a": 1, "a.x": 2, "b.c": 3, "b.c.d": 4}
    assert project_update(updated, [], fields) == {"updated_fields": updated, "removed_fields": []}


def test_project_update_paths_outside_the_fields_are_dropped() -> None:
    fields = ("a", "b.c")
    updated = {"secret": 1, "ab": 2, "b.x": 3, "b.cd": 4, "bc": 5}
    assert project_update(updated, ["secret", "b.x", "ab"], fields) == {
        "updated_fields": {},
        "removed_fields": [],
    }


def test_project_update_path_above_the_fields_is_projected() -> None:
    fields = ("a.b", "a.c.d")
    updated = {"a": {"b": 1, "c": {"d": 2, "e": 3}, "secret": 4}}
    assert project_update(updated, [], fields)["updated_fields"] == {"a": {"b": 1, "c": {"d": 2}}}


def test_project_update_path_above_with_array_value_is_projected() -> None:
    fields = ("a.b",)
    updated = {"a": [{"b": 1, "c": 2}, 3, {"c": 4}]}
    assert project_update(updated, [], fields)["updated_fields"] == {"a": [{"b": 1}, {}]}


def test_project_update_nested_path_above_the_fields() -> None:
    fields = ("a.b.c", "x")
    updated = {"a.b": {"c": 1, "d": 2}}
    assert project_update(updated, [], fields)["updated_fields"] == {"a.b": {"c": 1}}


def test_project_update_removed_fields() -> None:
    fields = ("a", "b.c")
    removed = ["a", "a.x", "b", "b.c", "b.c.d", "b.d", "secret", "bc"]
    assert project_update({}, removed, fields)["removed_fields"] == [
        "a",
        "a.x",
        "b",
        "b.c",
        "b.c.d",
    ]


def test_project_update_no_fields_drops_everything() -> None:
    assert project_update({"a": 1}, ["b"], ()) == {"updated_fields": {}, "removed_fields": []}


def test_project_update_does_not_share_input_containers() -> None:
    updated = {"a": 1}
    removed = ["b"]
    result = project_update(updated, removed, None)
    assert result["updated_fields"] is not updated
    assert result["removed_fields"] is not removed


def update_message(document: Doc, updated: Doc, fields: Fields) -> Doc:
    event = normalize(
        raw("update", fullDocument=document, updateDescription=update_description(updated))
    )
    assert event is not None
    return change_message(
        event,
        app_slug="shop",
        endpoint="live",
        collection="orders",
        operation="update",
        fields=fields,
    )


def test_update_of_an_array_element_inside_a_projected_field() -> None:
    # $set {"a.0.b": 5, "a.0.c": 6} on {a: [{b: 1, c: 2}]}. The message's document shows a[0].b
    # (projection a.b), so its update must show the change to a.0.b, and never a.0.c.
    message = update_message(
        {"_id": 1, "a": [{"b": 5, "c": 6}]}, {"a.0.b": 5, "a.0.c": 6}, ("a.b",)
    )
    assert message["document"] == {"_id": 1, "a": [{"b": 5}]}
    assert message["update"]["updated_fields"] == {"a.0.b": 5}


def test_update_of_an_array_element_replaced_above_a_projected_field() -> None:
    # $set {"a.1": {...}} (or a $push): MongoDB names the element; projected, it shows only b.
    message = update_message(
        {"_id": 1, "a": [{"b": 1}, {"b": 2, "c": 3}]}, {"a.1": {"b": 2, "c": 3}}, ("a.b",)
    )
    assert message["update"]["updated_fields"] == {"a.1": {"b": 2}}


def test_update_of_a_numeric_key_in_a_subdocument_stays_hidden() -> None:
    # Same paths, but "a" is a subdocument whose key "0" is not under the projection a.b.
    message = update_message({"_id": 1, "a": {"0": {"b": 5, "c": 6}}}, {"a.0.b": 5}, ("a.b",))
    assert message["document"] == {"_id": 1, "a": {}}
    assert message["update"]["updated_fields"] == {}


def test_project_update_above_path_set_to_a_scalar_removes_the_projected_value() -> None:
    # {a: {b: 1, c: 2}} --$set a: 5--> {a: 5}. Projected on a.b: {a: {b: 1}} becomes {}; the
    # projected update applied to the client's copy must give the new projected document.
    old = {"_id": 1, "a": {"b": 1, "c": 2}}
    new = {"_id": 1, "a": 5}
    fields = ("a.b",)
    result = project_update({"a": 5}, [], fields)
    assert apply_update(project(old, fields), result) == project(new, fields)


# -- project_update agrees with project (property) ----------------------------------------------

KEYS = ("a", "b", "c")


def apply_update(document: Doc, update: Mapping[str, Any]) -> Doc:
    """$set each updated path and $unset each removed one (paths through subdocuments only)."""
    result = copy.deepcopy(document)
    for path, value in update["updated_fields"].items():
        node = result
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = copy.deepcopy(value)
    for path in update["removed_fields"]:
        node = result
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                break
            node = child
        else:
            node.pop(leaf, None)
    return result


scalars = st.one_of(st.integers(-3, 3), st.sampled_from(["s", None, True]))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children, max_size=3)
    ),
    max_leaves=8,
)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=3)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)
field_sets: st.SearchStrategy[Fields] = st.one_of(
    st.none(), st.lists(paths, max_size=4, unique=True).map(tuple)
)
# Documents of subdocuments only: update paths then mean the same for the update and the document.
plain_values = st.recursive(
    scalars,
    lambda children: st.dictionaries(st.sampled_from(KEYS), children, max_size=3),
    max_leaves=6,
)
plain_documents = st.dictionaries(st.sampled_from(KEYS), plain_values, max_size=3)


def _settable(document: Doc, path: str) -> bool:
    """Every parent of `path` is an existing subdocument (a $set creates no parent)."""
    node: Any = document
    for part in path.split(".")[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict)


def _independent(chosen: list[str]) -> bool:
    return not any(p != q and q.startswith(p + ".") for p in chosen for q in chosen)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    old=plain_documents,
    updates=st.dictionaries(paths, plain_values, max_size=3),
    removals=st.lists(paths, max_size=2, unique=True),
    fields=field_sets,
)
@example(old={"a": {"b": 1}}, updates={"a": 5}, removals=[], fields=("a.b",))
@example(old={"a": {"b": {"c": 1}}}, updates={"a.b": 5}, removals=[], fields=("a.b.c",))
@example(old={"a": {"b": 1}}, updates={"a": {"b": 2, "c": 3}}, removals=["x"], fields=("a.b",))
def test_projected_update_applied_to_projected_document_gives_projected_result(
    old: Doc, updates: dict[str, Any], removals: list[str], fields: Fields
) -> None:
    removals = [p for p in removals if p not in updates]
    assume(_independent([*updates, *removals]))
    assume(all(_settable(old, p) for p in updates))
    old = {"_id": 1, **old}
    description = {"updated_fields": updates, "removed_fields": removals}
    new = apply_update(old, description)
    projected = project_update(updates, removals, fields)
    assert apply_update(project(old, fields), projected) == project(new, fields)


# -- narrow_fields / union_fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        (None, None, None),
        (("a",), None, ("a",)),
        (None, ("a", "b.c"), ("a", "b.c")),
        (("a", "b"), ("a",), ("a",)),
        (("a",), ("a.b",), ("a.b",)),
        (("a.b",), ("a",), ("a.b",)),
        (("a.b", "c"), ("a",), ("a.b",)),
        (("a",), ("x",), ()),
        (("a",), (), ()),
        (("a", "b"), ("b", "a"), ("b", "a")),
        (("a",), ("ab",), ()),
        (("ab",), ("a",), ()),
        (("a.b", "a.c"), ("a", "a.b.x"), ("a.b.x", "a.b", "a.c")),
    ],
)
def test_narrow_fields(allowed: Fields, requested: Fields, expected: Fields) -> None:
    assert narrow_fields(allowed, requested) == expected


@settings(max_examples=150, deadline=None)
@given(document=documents, allowed=field_sets, requested=field_sets)
def test_narrow_fields_never_widens(document: Doc, allowed: Fields, requested: Fields) -> None:
    document = {"_id": 1, **document}
    narrowed = narrow_fields(allowed, requested)
    # Whatever the narrowed projection shows is already in what the manifest allows.
    assert project(project(document, allowed), narrowed) == project(document, narrowed)
    if requested is not None and allowed is not None:
        assert narrowed is not None
        # ... and no more than what the client asked for.
        assert project(project(document, requested), narrowed) == project(document, narrowed)


@pytest.mark.parametrize(
    ("field_sets_in", "expected"),
    [
        ([], ()),
        ([("a",)], ("a",)),
        ([("a", "b"), ("b", "c")], ("a", "b", "c")),
        ([("a",), None], None),
        ([None, ("a",)], None),
        ([(), ("a",)], ("a",)),
        ([("a",), ("a.b",)], ("a", "a.b")),
    ],
)
def test_union_fields(field_sets_in: list[Fields], expected: Fields) -> None:
    assert union_fields(field_sets_in) == expected


def test_union_fields_accepts_a_generator() -> None:
    assert union_fields(f for f in [("a",), ("b",)]) == ("a", "b")


@settings(max_examples=100, deadline=None)
@given(document=documents, sets=st.lists(field_sets, min_size=1, max_size=3))
def test_union_fields_shows_everything_each_set_shows(document: Doc, sets: list[Fields]) -> None:
    document = {"_id": 1, **document}
    union = union_fields(sets)
    for fields in sets:
        assert project(project(document, union), fields) == project(document, fields)


# -- change_message ----------------------------------------------------------------------------

MESSAGE_KEYS = {
    "type",
    "id",
    "app_slug",
    "endpoint",
    "collection",
    "operation",
    "document_id",
    "document",
    "update",
    "timestamp",
}


def event_of(document: Doc) -> ChangeEvent:
    event = normalize(document)
    assert event is not None
    return event


def message(event: ChangeEvent, operation: str, fields: Fields, reason: str | None = None) -> Doc:
    return change_message(
        event,
        app_slug="shop",
        endpoint="live",
        collection="orders",
        operation=operation,
        fields=fields,
        reason=reason,
    )


def test_change_message_insert() -> None:
    event = event_of(raw("insert", fullDocument=AFTER))
    assert message(event, "insert", ("item",)) == {
        "type": "change",
        "id": TOKEN["_data"],
        "app_slug": "shop",
        "endpoint": "live",
        "collection": "orders",
        "operation": "insert",
        "document_id": OID,
        "document": {"_id": OID, "item": "pen"},
        "update": None,
        "timestamp": CLUSTER_ISO,
    }


def test_change_message_update_has_projected_document_and_update() -> None:
    event = event_of(
        raw(
            "update",
            fullDocument=AFTER,
            updateDescription=update_description({"qty": 2, "secret": "t"}, ["note", "item"]),
        )
    )
    result = message(event, "update", ("item", "qty"))
    assert set(result) == MESSAGE_KEYS
    assert result["document"] == {"_id": OID, "item": "pen", "qty": 2}
    assert result["update"] == {"updated_fields": {"qty": 2}, "removed_fields": ["item"]}


def test_change_message_update_without_description_has_no_update() -> None:
    event = event_of(raw("update", fullDocument=AFTER))
    assert message(event, "update", None)["update"] is None


def test_change_message_update_whose_document_is_unknown() -> None:
    event = event_of(raw("update", updateDescription=update_description({"qty": 2})))
    result = message(event, "update", None)
    assert result["document"] is None
    assert result["update"] is None


def test_change_message_replace() -> None:
    event = event_of(raw("replace", fullDocument=AFTER))
    result = message(event, "replace", ("qty",))
    assert result["operation"] == "replace"
    assert result["document"] == {"_id": OID, "qty": 2}
    assert result["update"] is None
    assert "reason" not in result


def test_change_message_delete() -> None:
    event = event_of(raw("delete", fullDocumentBeforeChange=BEFORE))
    result = message(event, "delete", None)
    assert set(result) == MESSAGE_KEYS
    assert result["operation"] == "delete"
    assert result["document"] is None
    assert result["update"] is None
    assert result["document_id"] == OID


def test_change_message_left_scope_is_a_delete_without_document() -> None:
    event = event_of(
        raw("update", fullDocument=AFTER, updateDescription=update_description({"qty": 2}))
    )
    result = message(event, "delete", None, reason="left_scope")
    assert set(result) == {*MESSAGE_KEYS, "reason"}
    assert result["operation"] == "delete"
    assert result["reason"] == "left_scope"
    assert result["document"] is None
    assert result["update"] is None


def test_change_message_encodes_to_plain_json() -> None:
    event = event_of(
        raw("update", fullDocument=AFTER, updateDescription=update_description({"qty": 2}))
    )
    decoded = codec.loads(codec.dumps(message(event, "update", ("qty",))))
    assert decoded["document_id"] == str(OID)
    assert decoded["document"] == {"_id": str(OID), "qty": 2}
    assert decoded["update"] == {"updated_fields": {"qty": 2}, "removed_fields": []}
    assert decoded["timestamp"] == CLUSTER_ISO
