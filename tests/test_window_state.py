"""`WindowState` against a brute-force model: after every change (and every refill it asks
for), a client applying its messages holds the first `limit` matching documents in order.

The state is pure (no I/O), so this runs thousands of sequences quickly; the order itself is
checked against the real database's `.sort()` in tests/test_windows_property.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.changes import ChangeEvent
from engine.delivery.view import id_key
from engine.delivery.windows import MAX_RESERVE, WindowChange, WindowState, sort_key
from engine.settings import EngineSettings

SLOTS = 14
SORTS = [(("k", 1), ("_id", 1)), (("k", -1), ("_id", 1)), (("j", -1), ("k", 1), ("_id", 1))]
VALUES = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", None]))

fields = st.fixed_dictionaries({"k": VALUES, "j": VALUES, "grp": st.integers(0, 2)})
operation = st.one_of(
    st.tuples(st.just("put"), st.integers(0, SLOTS - 1), fields),
    st.tuples(st.just("delete"), st.integers(0, SLOTS - 1), st.none()),
)


def matches(document: Any) -> bool:
    return document["grp"] != 0


def event(operation: str, document_id: int, document: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent(
        event_id="e",
        resume_token={},
        operation=operation,
        database="d",
        collection="c",
        document_id=document_id,
        document=document,
        before=None,
        updated_fields=None,
        removed_fields=None,
        cluster_time=None,
        timestamp="",
    )


def first_matching(
    database: dict[int, dict[str, Any]], state: WindowState, count: int, leave_out: Any = ()
) -> list[dict[str, Any]]:
    """What `find(...).sort(spec).limit(count)` returns: the model's answer."""
    left_out = {id_key(i) for i in leave_out}
    found = [d for d in database.values() if matches(d) and id_key(d["_id"]) not in left_out]
    return sorted(found, key=sort_key(state.spec))[:count]


def apply_to_client(client: dict[Any, Any], changes: list[WindowChange]) -> None:
    for change in changes:
        if change.operation == "delete":
            assert change.document_id in client, change
            del client[change.document_id]
        elif change.operation == "insert":
            assert change.document_id not in client, change
            client[change.document_id] = change.document
        else:
            assert change.document_id in client, change
            client[change.document_id] = change.document


@settings(max_examples=1500, deadline=None)
@given(
    initial=st.lists(fields, max_size=SLOTS),
    spec=st.sampled_from(SORTS),
    limit=st.integers(1, 5),
    reserve=st.integers(0, 3),
    operations=st.lists(operation, max_size=40),
)
def test_the_window_is_always_the_first_matching_documents(
    initial: list[dict[str, Any]],
    spec: Any,
    limit: int,
    reserve: int,
    operations: list[tuple[str, int, Any]],
) -> None:
    database = {n: {"_id": n, **f} for n, f in enumerate(initial)}
    state = WindowState(spec, limit, matches, reserve=reserve)
    state.load(first_matching(database, state, state.load_size()))
    client = {d["_id"]: d for d in state.ordered()}
    key = sort_key(spec)
    for kind, slot, new_fields in operations:
        if kind == "put":
            operation = "update" if slot in database else "insert"
            database[slot] = {"_id": slot, **new_fields}
            changes = state.apply(event(operation, slot, database[slot]))
        elif slot in database:
            del database[slot]
            changes = state.apply(event("delete", slot, None))
        else:
            continue
        if state.needs_refill:
            answer = first_matching(database, state, state.refill_size(), state.known_ids())
            changes += state.refilled(answer)
        apply_to_client(client, changes)
        want = first_matching(database, state, limit)
        assert sorted(client.values(), key=key) == want, (kind, slot, changes)
        # What the state knows is always a prefix of the answer, window then reserve.
        assert [state.documents[k] for _, k in state.entries] == first_matching(
            database, state, len(state.entries)
        )
        assert len(state.entries) <= limit + reserve


def test_a_reserve_saves_the_queries_of_departures() -> None:
    """Ten documents leave a window of 3 with a reserve of 3: two refills, not ten."""
    database = {n: {"_id": n, "k": n, "j": 0, "grp": 1} for n in range(20)}
    state = WindowState((("k", 1), ("_id", 1)), 3, matches, reserve=3)
    state.load(first_matching(database, state, state.load_size()))
    assert [d["_id"] for d in state.ordered()] == [0, 1, 2]
    refills = 0
    for n in range(10):
        del database[n]
        changes = state.apply(event("delete", n, None))
        if state.needs_refill:
            refills += 1
            changes += state.refilled(
                first_matching(database, state, state.refill_size(), state.known_ids())
            )
        assert changes[0] == WindowChange("delete", None, n, None)
        assert [d["_id"] for d in state.ordered()] == [n + 1, n + 2, n + 3]
    assert refills == 2  # the 4th and 8th departures leave the window short
    assert state.departures == 10
    # Moving inside the window is no departure; moving past its end is one, and the
    # document pushed out by one that enters is none either (its place is taken at once).
    database[11]["k"] = 10.5
    state.apply(event("update", 11, database[11]))
    database[12]["k"] = 99
    state.apply(event("update", 12, database[12]))
    database[15]["k"] = -1
    state.apply(event("update", 15, database[15]))
    assert [d["_id"] for d in state.ordered()] == [15, 10, 11]
    assert state.departures == 11


def test_the_reserve_is_a_setting_and_a_bad_one_is_a_clear_error() -> None:
    assert EngineSettings.from_env({}).window_reserve == MAX_RESERVE
    assert EngineSettings.from_env({"MDB_REALTIME_WINDOW_RESERVE": "0"}).window_reserve == 0
    with pytest.raises(ValueError, match="MDB_REALTIME_WINDOW_RESERVE must be 0 or more"):
        EngineSettings.from_env({"MDB_REALTIME_WINDOW_RESERVE": "-1"})
    with pytest.raises(ValueError, match="MDB_REALTIME_WINDOW_RESERVE must be an integer"):
        EngineSettings.from_env({"MDB_REALTIME_WINDOW_RESERVE": "many"})
