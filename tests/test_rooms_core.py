"""The pure core of rooms: patterns, join rules, presence state and batching, manifests."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bson import ObjectId

from engine.auth import ANONYMOUS, Principal
from engine.changes import ChangeEvent
from engine.manifest import ManifestError, RoomConfig, parse_manifest
from engine.rooms.documents import (
    NOBODY,
    member_of,
    presence_fields,
    room_message_fields,
    room_message_of,
)
from engine.rooms.patterns import PatternError, parse_pattern, valid_room_name
from engine.rooms.presence import JOIN, LEAVE, Member, PresenceBatch, RoomPresence
from engine.rooms.rules import (
    JoinRule,
    membership_queries,
    parse_join_rule,
    query_rule_allows,
)
from engine.settings import EngineSettings

ANN = Principal(user_id="ann", email="ann@example.com", claims={"team": "red", "teams": ["a"]})


def test_patterns_match_their_shape_only() -> None:
    pattern = parse_pattern("team:{team}")
    assert pattern.params == ("team",)
    assert pattern.match("team:red") == {"team": "red"}
    assert pattern.match("team:") is None
    assert pattern.match("team:red:x") is None
    assert pattern.match("xteam:red") is None
    two = parse_pattern("org.{org}/doc-{doc}")
    assert two.match("org.acme/doc-42") == {"org": "acme", "doc": "42"}
    assert parse_pattern("lobby").match("lobby") == {}
    assert parse_pattern("a+b").match("aab") is None  # literal text is literal


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must not be empty"),
        ("a:{x}{y}", "must be separated"),
        ("a:{x}:{x}", "appears twice"),
        ("a:{1x}", "names are letters"),
        ("a:{}", "names are letters"),
        ("a b", "whitespace"),
        ("a:{x", "unpaired"),
        ("x" * 300, "at most 256"),
    ],
)
def test_bad_patterns_say_why(text: str, problem: str) -> None:
    with pytest.raises(PatternError, match=problem):
        parse_pattern(text)


def test_room_names() -> None:
    assert valid_room_name("a")
    assert not valid_room_name("")
    assert not valid_room_name(3)
    assert not valid_room_name("x" * 257)


def test_query_rules_compare_claims_user_and_room() -> None:
    rule = parse_join_rule({"claims.team": "$room.team"})
    assert query_rule_allows(rule, ANN, {"team": "red"})
    assert not query_rule_allows(rule, ANN, {"team": "blue"})
    assert not query_rule_allows(rule, Principal(user_id="bob"), {"team": "red"})  # no claim
    by_user = parse_join_rule({"user.id": "$room.owner"})
    assert query_rule_allows(by_user, ANN, {"owner": "ann"})
    assert not query_rule_allows(by_user, ANN, {"owner": "bob"})
    listed = parse_join_rule({"claims.teams": "$room.team"})  # arrays match as in MongoDB
    assert query_rule_allows(listed, ANN, {"team": "a"})
    with_operator = parse_join_rule(
        {"$or": [{"claims.role": "admin"}, {"user.email": "$user.email"}]}
    )
    assert query_rule_allows(with_operator, ANN, {})


def test_anonymous_never_joins_and_no_rule_means_authenticated() -> None:
    assert query_rule_allows(JoinRule(), ANN, {})
    assert not query_rule_allows(JoinRule(), ANONYMOUS, {})
    assert not query_rule_allows(parse_join_rule({"room.x": "$room.x"}), ANONYMOUS, {"x": "1"})


def test_a_claim_is_data_never_an_operator() -> None:
    sneaky = Principal(user_id="eve", claims={"team": {"$ne": "nothing"}})
    rule = parse_join_rule({"claims.team": "$room.team"})
    assert not query_rule_allows(rule, sneaky, {"team": "red"})


def test_membership_rules_become_database_queries() -> None:
    rule = parse_join_rule(
        {"collection": "docs", "match": {"_id": "$room.doc_id", "members": "$user.id"}}
    )
    assert rule.needs_database and rule.collection == "docs"
    same_app = {"$or": [{"app_id": {"$exists": False}}, {"app_id": "hall"}]}
    assert membership_queries(rule, ANN, {"doc_id": "plan"}, "hall") == [
        {"$and": [{"_id": "plan", "members": "ann"}, same_app]}
    ]
    oid = ObjectId()
    queries = membership_queries(rule, ANN, {"doc_id": str(oid)}, "hall")
    assert [q["$and"][0]["_id"] for q in queries] == [str(oid), oid]
    assert membership_queries(rule, Principal(user_id="x", email=None), {"doc_id": "p"}, "h")
    by_email = parse_join_rule({"collection": "docs", "match": {"email": "$user.email"}})
    assert membership_queries(by_email, Principal(user_id="x"), {}, "h") == []  # no email


def manifest_with_rooms(rooms: Any) -> dict[str, Any]:
    return {"slug": "s", "name": "S", "websockets": {"rt": {"path": "/ws", "rooms": rooms}}}


def problems_of(rooms: Any) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with_rooms(rooms))
    return [(p.path, p.message) for p in caught.value.problems]


def test_rooms_defaults_in_the_manifest() -> None:
    manifest = parse_manifest(manifest_with_rooms({"lobby": {}}))
    assert manifest.websockets["rt"].rooms["lobby"] == RoomConfig()
    shown = manifest.to_document()["websockets"]["rt"]["rooms"]
    assert shown == {"lobby": {"join": None, "publish": False, "presence": False, "history": 0}}


@pytest.mark.parametrize(
    ("rooms", "path", "message"),
    [
        ({"a:{x}{y}": {}}, "websockets.rt.rooms.a:{x}{y}", "must be separated"),
        (
            {"t:{team}": {"join": {"claims.team": "$room.tem"}}},
            "websockets.rt.rooms.t:{team}.join",
            "$room.tem is not a parameter of this pattern (parameters: team)",
        ),
        (
            {"t:{team}": {"join": {"claims.team": {"$where": "1"}}}},
            "websockets.rt.rooms.t:{team}.join.claims.team.$where",
            "not allowed",
        ),
        (
            {"t": {"join": {"claims.x": "$user.name"}}},
            "websockets.rt.rooms.t.join.claims.x",
            "is not a placeholder",
        ),
        (
            {"d:{id}": {"join": {"collection": "docs"}}},
            "websockets.rt.rooms.d:{id}.join.match",
            "must be a non-empty query",
        ),
        (
            {"d:{id}": {"join": {"collection": "$x", "match": {"_id": "$room.id"}}}},
            "websockets.rt.rooms.d:{id}.join.collection",
            "not a valid collection name",
        ),
        (
            {"d:{id}": {"join": {"collection": "docs", "match": {"_id": "$room.id"}, "x": 1}}},
            "websockets.rt.rooms.d:{id}.join.x",
            "unknown key",
        ),
        (
            {"d:{id}": {"join": {"collection": "docs", "match": {"_id": "$room.nope"}}}},
            "websockets.rt.rooms.d:{id}.join.match",
            "$room.nope is not a parameter",
        ),
        ({"l": {"history": 1001}}, "websockets.rt.rooms.l.history", "between 0 and 1000"),
        ({"l": {"history": -1}}, "websockets.rt.rooms.l.history", "between 0 and 1000"),
        ({"l": {"publish": "yes"}}, "websockets.rt.rooms.l.publish", "must be true or false"),
        ({"l": {"presense": True}}, "websockets.rt.rooms.l.presense", "did you mean 'presence'"),
        ({"l": {"join": []}}, "websockets.rt.rooms.l.join", "must be an object"),
    ],
)
def test_bad_rooms_are_load_errors_with_their_path(rooms: Any, path: str, message: str) -> None:
    problems = problems_of(rooms)
    assert any(p == path and message in m for p, m in problems), problems


def test_room_placeholders_stay_out_of_watch_scopes() -> None:
    data = {
        "slug": "s",
        "name": "S",
        "websockets": {"rt": {"path": "/ws", "watch": {"c": {"scope": {"t": "$room.t"}}}}},
    }
    parse_manifest(data)  # "$room.t" is plain data in a scope: no room there
    assert json.dumps(data)


def member(n: int, origin: str = "p1") -> Member:
    return Member(f"c{n}", f"u{n}", {"n": n}, origin)


def test_presence_copy_merges_a_read_with_events_that_arrived_meanwhile() -> None:
    presence = RoomPresence()
    assert presence.join(member(1))  # arrived during the read
    presence.leave("c2")  # c2 left during the read, but the read still saw it
    added = presence.loaded([member(2), member(3), member(1)])
    assert added == [member(3)]
    assert set(presence.members) == {"c1", "c3"}
    assert not presence.join(member(3))  # nothing new
    presence.leave("c3")
    assert presence.loaded([]) == [] and set(presence.members) == {"c1"}


def test_presence_copy_drops_a_process_that_is_gone() -> None:
    presence = RoomPresence(loading=False)
    for n in range(4):
        presence.join(member(n, "p1" if n % 2 else "p2"))
    gone = presence.drop_origin("p2")
    assert {m.connection_id for m in gone} == {"c0", "c2"}
    assert presence.origins() == {"p1"}
    assert presence.listing() == [m.to_json() for m in (member(1), member(3))]


def test_presence_frames_single_event_keeps_spec_shape_many_are_batched() -> None:
    batch = PresenceBatch()
    assert batch.take_frame("r") is None
    batch.add(JOIN, member(1))
    assert json.loads(batch.take_frame("r") or "") == {
        "type": "presence",
        "room": "r",
        "event": "join",
        "member": {"user_id": "u1", "connection_id": "c1", "info": {"n": 1}},
    }
    for n in range(500):
        batch.add(JOIN, member(n))
    batch.add(LEAVE, member(7))
    frame = json.loads(batch.take_frame("r") or "")
    assert frame["type"] == "presence" and frame["room"] == "r" and "event" not in frame
    assert len(frame["events"]) == 501
    assert frame["events"][-1] == {"event": "leave", "member": member(7).to_json()}
    assert batch.take_frame("r") is None


def test_presence_settings() -> None:
    settings = EngineSettings.from_env({})
    assert settings.presence_timing.heartbeat_seconds == 5.0
    # The defaults meet SPEC 11: a killed process is gone within timeout + one heartbeat.
    assert (
        settings.presence_timing.timeout_seconds + settings.presence_timing.heartbeat_seconds <= 30
    )
    assert settings.presence_batch_seconds == 0.2
    custom = EngineSettings.from_env(
        {
            "MDB_REALTIME_PRESENCE_HEARTBEAT_SECONDS": "0.5",
            "MDB_REALTIME_PRESENCE_TIMEOUT_SECONDS": "2",
            "MDB_REALTIME_PRESENCE_BATCH_MS": "50",
        }
    )
    assert custom.presence_timing.timeout_seconds == 2.0
    assert custom.presence_batch_seconds == 0.05
    with pytest.raises(ValueError, match="longer than the heartbeat"):
        EngineSettings.from_env({"MDB_REALTIME_PRESENCE_TIMEOUT_SECONDS": "1"})
    with pytest.raises(ValueError, match="must be a number"):
        EngineSettings.from_env({"MDB_REALTIME_PRESENCE_BATCH_MS": "soon"})


def bus_event(document: dict[str, Any], collection: str = "_mdb_realtime_bus") -> ChangeEvent:
    return ChangeEvent(
        event_id="E1",
        resume_token={"_data": "E1"},
        operation="insert",
        database="db",
        collection=collection,
        document_id=document["_id"],
        document=document,
        before=None,
        updated_fields=None,
        removed_fields=None,
        cluster_time=None,
        timestamp="2026-01-01T00:00:00Z",
    )


def test_room_documents_round_trip_any_json_and_stay_apart_from_broadcasts() -> None:
    data = {"$odd key": 1, "a.b": [2**60], "nested": {"x": None}}
    document = {"_id": ObjectId(), "app": "hall", **room_message_fields("r", NOBODY, data)}
    assert "message" not in document  # never read as an app broadcast by the router
    message = room_message_of(bus_event(document), "hall", "r")
    assert message is not None
    assert message["data"] == data and message["id"] == "E1"
    assert message["from"] == {"user_id": None, "connection_id": None}
    assert room_message_of(bus_event(document), "hall", "other") is None
    assert room_message_of(bus_event(document), "other", "r") is None
    assert room_message_of(bus_event(document, "hall_docs"), "hall", "r") is None
    fields = presence_fields("r", JOIN, member(1))
    assert member_of(fields["member"], "p9") == Member("c1", "u1", {"n": 1}, "p9")
    assert member_of({"user_id": "x"}, "p") is None  # no connection id: ignored
