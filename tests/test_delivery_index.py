"""The recipient index: which equalities a query implies, and which views a change asks (SPEC 10).

What gets delivered is proven equal to the brute-force reference in
test_delivery_differential.py; these tests pin down that the index really narrows: a change
for one user among many asks that user's views and no others.
"""

from __future__ import annotations

from typing import Any

import pytest
from bson import ObjectId

from engine.auth import Principal
from engine.delivery.keys import equality_keys
from engine.delivery.members import Members
from engine.delivery.router import Router
from engine.delivery.view import View
from engine.hub import WebSocketConnectionManager
from engine.manifest import parse_manifest
from engine.query import value_key
from tests.test_core_router import RecordingConnection, change

Doc = dict[str, Any]


def key(path: str, value: Any) -> tuple[str, Any]:
    return (path, value_key(value))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"owner": "ann"}, {key("owner", "ann")}),
        ({"owner": {"$eq": "ann"}}, {key("owner", "ann")}),
        ({"n": 1}, {key("n", 1.0)}),  # numbers meet across types, as in MongoDB
        ({"team": {"$in": ["red", "blue"]}}, {key("team", "red"), key("team", "blue")}),
        ({"team": {"$in": []}}, set()),  # matches nothing: filed nowhere
        ({"a.b": "x"}, {key("a.b", "x")}),
        ({"tags": {"$all": ["x", "y"]}}, {key("tags", "x")}),
        ({"owner": "ann", "team": {"$in": ["r", "b"]}}, {key("owner", "ann")}),
        ({"$and": [{"n": {"$gt": 1}}, {"owner": "ann"}]}, {key("owner", "ann")}),
        ({"$or": [{"owner": "ann"}, {"public": True}]}, {key("owner", "ann"), key("public", True)}),
        ({"owner": "ann", "n": {"$gte": 3}}, {key("owner", "ann")}),
        (
            {"_id": ObjectId("0123456789ab0123456789ab")},
            {key("_id", ObjectId("0123456789ab0123456789ab"))},
        ),
    ],
)
def test_equalities_a_query_implies(query: Doc, expected: set[Any]) -> None:
    assert equality_keys(query) == frozenset(expected)


@pytest.mark.parametrize(
    "query",
    [
        None,
        {},
        {"n": {"$gt": 1}},
        {"owner": {"$ne": "ann"}},
        {"owner": {"$regex": "^a"}},
        {"owner": None},  # also matches a missing field
        {"owner": {"$in": ["ann", None]}},
        {"tags": ["x", "y"]},  # a whole array
        {"meta": {"org": "o1"}},  # a whole document
        {"$or": [{"owner": "ann"}, {"n": {"$gt": 1}}]},  # one branch without equality
        {"$nor": [{"owner": "ann"}]},
        {"owner": {"$exists": True}},
        {"items": {"$elemMatch": {"sku": "s1"}}},
        {"owner": {"$not": {"$eq": "ann"}}},
    ],
)
def test_queries_without_equalities_are_not_indexed(query: Doc | None) -> None:
    assert equality_keys(query) is None


SCOPED: Doc = {
    "slug": "shop",
    "name": "Shop",
    "websockets": {
        "live": {
            "path": "/ws",
            "watch": {
                "orders": {"scope": {"owner_id": "$user.id"}},
                "team_docs": {"scope": {"team": {"$in": ["$claims.team", "all"]}}},
                "nested": {"scope": {"acl.members": "$user.id"}},
                "ranked": {"scope": {"level": {"$lte": "$claims.level"}}},
                "news": {},
            },
        }
    },
}


def crowd(count: int) -> tuple[Router, list[RecordingConnection]]:
    router = Router()
    router.add_app(parse_manifest(SCOPED), "db")
    connections = []
    for number in range(count):
        user = f"user-{number}"
        principal = Principal(
            user_id=user, claims={"sub": user, "team": f"team-{number % 10}", "level": 1}
        )
        connection = RecordingConnection(
            websocket=object(), app_slug="shop", user_id=user, endpoint="live", principal=principal
        )
        router.attach(connection)
        connections.append(connection)
    return router, connections


def owners(views: Any) -> set[str | None]:
    return {view.owner.user_id for view in views}


def test_a_change_for_one_user_asks_only_that_users_view() -> None:
    router, connections = crowd(1000)
    views = [c.views["orders"] for c in connections]
    index = views[0].index
    assert index is not None
    event = change("insert", {"_id": 1, "owner_id": "user-7"})
    assert owners(index.candidates(event)) == {"user-7"}
    assert router.route(event) == 1
    assert len(connections[7].frames) == 1


def test_a_move_between_users_asks_both_and_no_one_else() -> None:
    router, connections = crowd(500)
    index = connections[0].views["orders"].index
    assert index is not None
    moved = change(
        "update",
        {"_id": 1, "owner_id": "user-2"},
        before={"_id": 1, "owner_id": "user-1"},
        updated={"owner_id": "user-2"},
    )
    assert owners(index.candidates(moved)) == {"user-1", "user-2"}
    assert router.route(moved) == 2
    assert connections[1].messages()[0]["reason"] == "left_scope"
    assert connections[2].messages()[0]["operation"] == "update"


def test_in_scopes_and_array_fields_are_indexed_element_by_element() -> None:
    router, connections = crowd(100)
    team_index = connections[0].views["team_docs"].index
    assert team_index is not None
    event = change("insert", {"_id": 1, "team": ["team-3", "x"]}, collection="shop_team_docs")
    assert owners(team_index.candidates(event)) == {f"user-{n}" for n in range(3, 100, 10)}
    everyone = change("insert", {"_id": 2, "team": "all"}, collection="shop_team_docs")
    assert len(list(team_index.candidates(everyone))) == 100
    nested_index = connections[0].views["nested"].index
    assert nested_index is not None
    document = {"_id": 3, "acl": [{"members": ["user-4", "user-5"]}, {"members": "user-9"}]}
    event = change("insert", document, collection="shop_nested")
    assert owners(nested_index.candidates(event)) == {"user-4", "user-5", "user-9"}
    assert router.route(event) == 3


def test_unindexable_scopes_are_asked_every_time_and_open_bindings_share_a_group() -> None:
    _router, connections = crowd(50)
    ranked = connections[0].views["ranked"].index
    news = connections[0].views["news"].index
    assert ranked is not None and news is not None
    assert len(ranked.unindexed) == 50
    assert len(news.everyone) == 50
    assert list(news.candidates(change("insert", {"_id": 1}, collection="shop_news"))) == []


def test_subscriptions_refile_a_view() -> None:
    router, connections = crowd(20)
    news = connections[0].views["news"]
    assert news.index is not None
    message = {"type": "subscribe", "id": 1, "collection": "news", "filter": {"topic": "a"}}
    router.subscribe(connections[0], message)
    assert news not in news.index.everyone
    topic_b = change("insert", {"_id": 1, "topic": "b"}, collection="shop_news")
    assert news not in set(news.index.candidates(topic_b))
    topic_a = change("insert", {"_id": 2, "topic": "a"}, collection="shop_news")
    assert news in set(news.index.candidates(topic_a))
    router.unsubscribe(connections[0], {"type": "unsubscribe", "id": 1})
    assert news in news.index.everyone


def test_delivered_ids_find_views_when_there_is_no_pre_image() -> None:
    router, connections = crowd(30)
    view = connections[4].views["orders"]
    assert view.index is not None
    router.route(change("insert", {"_id": 9, "owner_id": "user-4"}))
    gone = change("delete", doc_id=9)
    assert owners(view.index.candidates(gone)) == {"user-4"}
    assert router.route(gone) == 1
    assert list(view.index.candidates(change("delete", doc_id=9))) == []


def test_detached_views_leave_the_index() -> None:
    router, connections = crowd(10)
    view: View = connections[3].views["orders"]
    index = view.index
    assert index is not None
    router.route(change("insert", {"_id": 5, "owner_id": "user-3"}))
    router.detach(connections[3])
    assert view.index is None
    assert index.size() == 9
    assert list(index.candidates(change("delete", doc_id=5))) == []
    assert list(index.candidates(change("insert", {"_id": 6, "owner_id": "user-3"}))) == []


def test_broadcasts_to_one_user_reach_only_that_user() -> None:
    manager = WebSocketConnectionManager("shop")
    connections = [
        RecordingConnection(websocket=object(), app_slug="shop", user_id=f"u{n % 100}")
        for n in range(1000)
    ]
    for connection in connections:
        manager.add(connection)
    assert manager.broadcast_now({"type": "x"}, filter_by_user="u42") == 10
    assert {c.user_id for c in connections if c.frames} == {"u42"}
    assert manager.get_connection_count_by_user("u42") == 10
    manager.remove(connections[42])
    assert manager.get_connection_count_by_user("u42") == 9
    assert manager.get_connection_count() == 999


def test_members_by_user() -> None:
    members = Members()
    first = RecordingConnection(websocket=object(), app_slug="a", user_id="ann")
    second = RecordingConnection(websocket=object(), app_slug="a", user_id="ann")
    anonymous = RecordingConnection(websocket=object(), app_slug="a")
    for number, connection in enumerate((first, second, anonymous)):
        members.add(number, connection)
    assert members.of_user("ann") == [first, second]
    assert members.all() == [first, second, anonymous]
    assert members.remove(0) is first
    assert members.remove(0) is None
    assert members.of_user("ann") == [second]
    members.remove(1)
    assert members.of_user("ann") == [] and len(members) == 1
