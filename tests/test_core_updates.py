"""Rebuilding the state an update left from its pre-image (so scope checks use that state)."""

from __future__ import annotations

from typing import Any

import pytest
from bson import Timestamp

from engine.changes import apply_update_description, normalize


@pytest.mark.parametrize(
    ("before", "description", "after"),
    [
        ({"_id": 1, "a": 1}, {"updatedFields": {"a": 2}}, {"_id": 1, "a": 2}),
        ({"_id": 1}, {"updatedFields": {"a.b.c": 1}}, {"_id": 1, "a": {"b": {"c": 1}}}),
        ({"_id": 1, "a": {"b": 1, "c": 2}}, {"removedFields": ["a.c"]}, {"_id": 1, "a": {"b": 1}}),
        ({"_id": 1, "l": [1, 2, 3]}, {"updatedFields": {"l.1": 9}}, {"_id": 1, "l": [1, 9, 3]}),
        ({"_id": 1, "l": [1]}, {"updatedFields": {"l.2": 5}}, {"_id": 1, "l": [1, None, 5]}),
        (
            {"_id": 1, "l": [{"x": 1}, {"x": 2}]},
            {"updatedFields": {"l.1.x": 7}},
            {"_id": 1, "l": [{"x": 1}, {"x": 7}]},
        ),
        (
            {"_id": 1, "l": [1, 2, 3, 4]},
            {"truncatedArrays": [{"field": "l", "newSize": 2}], "updatedFields": {"l.0": 0}},
            {"_id": 1, "l": [0, 2]},
        ),
        ({"_id": 1, "l": [1, 2]}, {"removedFields": ["l.0"]}, {"_id": 1, "l": [None, 2]}),
        ({"_id": 1, "a": 5}, {"updatedFields": {"a": {"b": 1}}}, {"_id": 1, "a": {"b": 1}}),
    ],
)
def test_apply_update_description(
    before: dict[str, Any], description: dict[str, Any], after: dict[str, Any]
) -> None:
    original = repr(before)
    assert apply_update_description(before, description) == after
    assert repr(before) == original  # the pre-image is not modified


def raw_update(before: dict[str, Any] | None, full: dict[str, Any] | None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "_id": {"_data": "01"},
        "operationType": "update",
        "clusterTime": Timestamp(1_700_000_000, 1),
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": 1},
        "fullDocument": full,
        "updateDescription": {"updatedFields": {"owner": "bob"}, "removedFields": []},
    }
    if before is not None:
        raw["fullDocumentBeforeChange"] = before
    return raw


def test_an_update_with_a_pre_image_carries_the_state_it_left() -> None:
    # The lookup already shows a later write (owner ann); the update itself left owner bob.
    event = normalize(raw_update({"_id": 1, "owner": "cy"}, {"_id": 1, "owner": "ann"}))
    assert event is not None and event.exact
    assert event.document == {"_id": 1, "owner": "bob"}


def test_an_update_without_a_pre_image_is_a_lookup() -> None:
    event = normalize(raw_update(None, {"_id": 1, "owner": "ann"}))
    assert event is not None and not event.exact
    assert event.document == {"_id": 1, "owner": "ann"}
    gone = normalize(raw_update({"_id": 1, "owner": "cy"}, None))
    assert gone is not None and gone.document == {"_id": 1, "owner": "bob"}
