"""Unit tests of engine.delivery: what each connection sees of each change (SPEC 3, 5).

No database and no sockets: bindings come from inline manifests through `Router.add_app`,
events are built in memory, and connections record the frames queued for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from bson import ObjectId, Timestamp

from engine import codec
from engine.auth import ANONYMOUS, Principal
from engine.bus import BUS_COLLECTION
from engine.changes import ChangeEvent, cluster_time_iso
from engine.delivery.router import Router
from engine.delivery.view import LEFT_SCOPE, Subscription, View
from engine.hub import QueueLimits, WebSocketConnection
from engine.manifest import parse_manifest

Doc = dict[str, Any]


def decide3(view: View, event: Any) -> tuple[str, str | None, Any] | None:
    """operation, reason and fields of a decision (describe_update is tested on its own)."""
    decision = view.decide(event)
    return None if decision is None else tuple(decision[:3])  # type: ignore[return-value]


def test_update_description_only_where_it_cannot_show_an_unseen_state() -> None:
    scoped, open_view = view_of("orders"), view_of("news")
    exact = change("update", order(1), updated={"qty": 1})
    lookup = dataclasses.replace(exact, exact=False)
    assert scoped.decide(exact).describe_update is True
    assert scoped.decide(lookup).describe_update is False
    assert open_view.decide(dataclasses.replace(lookup, collection="shop_news")).describe_update


ORDER_FIELDS = ("item", "qty", "owner_id", "status")

SHOP: Doc = {
    "slug": "shop",
    "name": "Shop",
    "websockets": {
        "live": {
            "path": "/ws",
            "watch": {
                "orders": {
                    "filter": {"status": {"$ne": "hidden"}},
                    "fields": list(ORDER_FIELDS),
                    "scope": {"owner_id": "$user.id"},
                },
                "news": {},
                "items": {"operations": ["insert", "delete"]},
                "team_docs": {"scope": {"team": "$claims.team"}},
                "public_docs": {"scope": {"public": True}},
                "catalog": {"filter": {"visible": True}},
                "mail": {"scope": {"to": "$user.email"}},
            },
        },
        "admin": {"path": "/admin", "watch": {"orders": {}, "news": {"fields": ["title"]}}},
    },
}

BLOG: Doc = {
    "slug": "blog",
    "name": "Blog",
    "websockets": {"live": {"path": "/ws", "watch": {"news": {}, "posts": {}}}},
}

ELSEWHERE: Doc = {
    "slug": "elsewhere",
    "name": "Elsewhere",
    "data": {"database": "otherdb", "collection_prefix": "x_"},
    "websockets": {"live": {"path": "/ws", "watch": {"news": {}}}},
}

ANN = Principal(user_id="ann", email="ann@example.com", claims={"sub": "ann", "team": "red"})
BOB = Principal(user_id="bob", email="bob@example.com", claims={"sub": "bob", "team": "blue"})
NO_TEAM = Principal(user_id="cid", claims={"sub": "cid"})


@dataclass(eq=False)
class RecordingConnection(WebSocketConnection):
    """A connection whose queued frames are kept in a list instead of written to a socket."""

    frames: list[str] = field(default_factory=list)
    accept: bool = True

    def send(self, frame: str) -> bool:
        if self.closing or not self.accept:
            return False
        self.frames.append(frame)
        return True

    def messages(self) -> list[Doc]:
        return [codec.loads(frame) for frame in self.frames]


def make_router(*manifests: Doc, known_ids_limit: int | None = None) -> Router:
    router = Router() if known_ids_limit is None else Router(known_ids_limit=known_ids_limit)
    for manifest in manifests:
        router.add_app(parse_manifest(manifest), "db")
    return router


def connect(
    router: Router,
    principal: Principal = ANN,
    *,
    app_slug: str = "shop",
    endpoint: str = "live",
) -> RecordingConnection:
    connection = RecordingConnection(
        websocket=object(),
        app_slug=app_slug,
        user_id=principal.user_id,
        user_email=principal.email,
        endpoint=endpoint,
        principal=principal,
    )
    router.attach(connection)
    return connection


def view_of(
    collection: str, principal: Principal = ANN, *, known_ids_limit: int | None = None
) -> View:
    connection = connect(make_router(SHOP, known_ids_limit=known_ids_limit), principal)
    view = connection.views[collection]
    assert isinstance(view, View)
    return view


_sequence = itertools.count(1)


def change(
    operation: str,
    document: Doc | None = None,
    *,
    before: Doc | None = None,
    doc_id: Any = None,
    updated: Doc | None = None,
    removed: list[str] | None = None,
    collection: str = "shop_orders",
    database: str = "db",
) -> ChangeEvent:
    number = next(_sequence)
    if doc_id is None:
        doc_id = (document or before or {}).get("_id")
    cluster_time = Timestamp(1_700_000_000 + number, 1)
    is_update = operation == "update"
    return ChangeEvent(
        event_id=f"event-{number}",
        resume_token={"_data": f"event-{number}"},
        operation=operation,
        database=database,
        collection=collection,
        document_id=doc_id,
        document=None if operation == "delete" else document,
        before=before,
        updated_fields=(updated if updated is not None else {}) if is_update else None,
        removed_fields=(removed if removed is not None else []) if is_update else None,
        cluster_time=cluster_time,
        timestamp=cluster_time_iso(cluster_time),
    )


def order(number: int, owner: str = "ann", status: str = "open", **extra: Any) -> Doc:
    return {
        "_id": number,
        "item": f"item-{number}",
        "qty": number,
        "owner_id": owner,
        "status": status,
        "secret": "internal",
        **extra,
    }


# -- View.decide: a scoped, filtered, projected binding ----------------------------------------


def test_insert_visible() -> None:
    view = view_of("orders")
    assert decide3(view, change("insert", order(1))) == ("insert", None, ORDER_FIELDS)


@pytest.mark.parametrize("document", [order(1, owner="bob"), order(1, status="hidden"), {"_id": 1}])
def test_insert_invisible(document: Doc) -> None:
    view = view_of("orders")
    assert decide3(view, change("insert", document)) is None


def test_update_staying_in_view() -> None:
    view = view_of("orders")
    event = change("update", order(1, qty=5), before=order(1), updated={"qty": 5})
    assert decide3(view, event) == ("update", None, ORDER_FIELDS)


def test_update_staying_in_view_without_pre_image() -> None:
    view = view_of("orders")
    assert decide3(view, change("update", order(1), updated={"qty": 1})) == (
        "update",
        None,
        ORDER_FIELDS,
    )


@pytest.mark.parametrize("before", [order(1, status="hidden"), order(1, owner="bob"), None])
def test_update_moving_in_is_an_update_with_the_full_document(before: Doc | None) -> None:
    view = view_of("orders")
    event = change("update", order(1), before=before, updated={"status": "open"})
    assert decide3(view, event) == ("update", None, ORDER_FIELDS)


@pytest.mark.parametrize("after", [order(1, status="hidden"), order(1, owner="bob")])
def test_update_moving_out_with_pre_image_is_left_scope(after: Doc) -> None:
    view = view_of("orders")
    event = change("update", after, before=order(1), updated={"status": after["status"]})
    assert decide3(view, event) == ("delete", LEFT_SCOPE, None)


def test_update_moving_out_without_pre_image_relies_on_delivered_ids() -> None:
    view = view_of("orders")
    assert decide3(view, change("insert", order(1))) is not None
    moved_out = change("update", order(1, status="hidden"), updated={"status": "hidden"})
    assert decide3(view, moved_out) == ("delete", LEFT_SCOPE, None)
    # The id is forgotten: a further update outside the view is not a second delete.
    again = change("update", order(1, status="hidden", qty=9), updated={"qty": 9})
    assert decide3(view, again) is None


def test_update_outside_without_pre_image_of_an_unknown_id_is_nothing() -> None:
    view = view_of("orders")
    event = change("update", order(1, owner="bob"), updated={"qty": 2})
    assert decide3(view, event) is None


@pytest.mark.parametrize("before", [order(1, owner="bob"), order(1, status="hidden"), None])
def test_update_staying_out(before: Doc | None) -> None:
    view = view_of("orders")
    event = change("update", order(1, owner="bob", qty=3), before=before, updated={"qty": 3})
    assert decide3(view, event) is None


def test_update_whose_document_is_gone_is_nothing() -> None:
    # fullDocument null: the document was deleted just after; its delete event follows.
    view = view_of("orders")
    decide3(view, change("insert", order(1)))
    assert decide3(view, change("update", None, doc_id=1, updated={"qty": 2})) is None
    assert decide3(view, change("delete", doc_id=1)) == ("delete", None, None)


def test_replace_staying_in_view() -> None:
    view = view_of("orders")
    event = change("replace", order(1, qty=7), before=order(1))
    assert decide3(view, event) == ("replace", None, ORDER_FIELDS)


@pytest.mark.parametrize("before", [order(1, owner="bob"), None])
def test_replace_moving_in(before: Doc | None) -> None:
    # The full document goes out (SPEC: clients upsert on replace as on update).
    view = view_of("orders")
    assert decide3(view, change("replace", order(1), before=before)) == (
        "replace",
        None,
        ORDER_FIELDS,
    )


def test_replace_moving_out_with_pre_image() -> None:
    view = view_of("orders")
    event = change("replace", order(1, owner="bob"), before=order(1))
    assert decide3(view, event) == ("delete", LEFT_SCOPE, None)


def test_replace_moving_out_without_pre_image() -> None:
    view = view_of("orders")
    decide3(view, change("insert", order(1)))
    assert decide3(view, change("replace", order(1, status="hidden"))) == (
        "delete",
        LEFT_SCOPE,
        None,
    )


@pytest.mark.parametrize("before", [order(1, owner="bob"), None])
def test_replace_staying_out(before: Doc | None) -> None:
    view = view_of("orders")
    assert decide3(view, change("replace", order(1, owner="bob"), before=before)) is None


def test_delete_with_visible_pre_image() -> None:
    view = view_of("orders")
    assert decide3(view, change("delete", before=order(1))) == ("delete", None, None)


@pytest.mark.parametrize("before", [order(1, owner="bob"), order(1, status="hidden")])
def test_delete_with_invisible_pre_image(before: Doc) -> None:
    view = view_of("orders")
    assert decide3(view, change("delete", before=before)) is None


def test_update_out_of_view_then_delete_is_not_lost() -> None:
    # updateLookup reads the post-image when the event is read. Ann sees order 1; it is given
    # to Bob and deleted right after. The update arrives with fullDocument null and a pre-image
    # Ann could see; the delete's pre-image is Bob's order. Ann must still learn that order 1 is
    # gone from her view (a delete, with or without left_scope), or she keeps it forever.
    view = view_of("orders")
    decisions = [
        decide3(view, change("insert", order(1))),
        decide3(
            view, change("update", None, before=order(1), doc_id=1, updated={"owner_id": "bob"})
        ),
        decide3(view, change("delete", before=order(1, owner="bob"))),
    ]
    assert decisions[0] == ("insert", None, ORDER_FIELDS)
    later = [decision for decision in decisions[1:] if decision is not None]
    assert later, "Ann was never told that order 1 left her view"
    assert all(decision[0] == "delete" for decision in later)


def test_delete_without_pre_image_of_a_delivered_id() -> None:
    view = view_of("orders")
    decide3(view, change("insert", order(1)))
    assert decide3(view, change("delete", doc_id=1)) == ("delete", None, None)
    assert decide3(view, change("delete", doc_id=1)) is None  # forgotten after the delete


def test_delete_without_pre_image_of_an_unknown_id_never_leaks() -> None:
    view = view_of("orders")
    decide3(view, change("insert", order(2, owner="bob")))
    assert decide3(view, change("delete", doc_id=2)) is None
    assert decide3(view, change("delete", doc_id=99)) is None


def test_delete_of_an_id_delivered_by_update() -> None:
    view = view_of("orders")
    decide3(view, change("update", order(1), updated={"qty": 1}))
    assert decide3(view, change("delete", doc_id=1)) == ("delete", None, None)


@pytest.mark.parametrize(
    "doc_id", [ObjectId("65a000000000000000000001"), "text", 7, 7.5, {"k": 1, "j": [1, 2]}, [1, 2]]
)
def test_delivered_ids_of_any_bson_type(doc_id: Any) -> None:
    view = view_of("orders")
    decide3(view, change("insert", {**order(0), "_id": doc_id}, doc_id=doc_id))
    assert decide3(view, change("delete", doc_id=doc_id)) == ("delete", None, None)


def test_delivered_ids_of_different_bson_types_are_not_confused() -> None:
    # MongoDB keeps _id true and _id 1 apart (bool is not a number); Python's set does not.
    view = view_of("orders")
    decide3(view, change("insert", {**order(0), "_id": True}, doc_id=True))
    assert decide3(view, change("delete", doc_id=1)) is None
    decide3(view, change("insert", {**order(0), "_id": 0}, doc_id=0))
    assert decide3(view, change("delete", doc_id=False)) is None


def test_known_ids_are_bounded_and_the_oldest_is_evicted() -> None:
    view = view_of("orders", known_ids_limit=3)
    for number in range(1, 5):
        decide3(view, change("insert", order(number)))
    assert len(view.known_ids) == 3
    # Evicted: its delete cannot be proven visible, so it is not sent (never a leak).
    assert decide3(view, change("delete", doc_id=1)) is None
    for number in (2, 3, 4):
        assert decide3(view, change("delete", doc_id=number)) == ("delete", None, None)
    assert len(view.known_ids) == 0


def test_known_ids_eviction_is_least_recently_delivered() -> None:
    view = view_of("orders", known_ids_limit=3)
    for number in (1, 2, 3):
        decide3(view, change("insert", order(number)))
    decide3(view, change("update", order(1, qty=10), updated={"qty": 10}))  # 1 is fresh again
    decide3(view, change("insert", order(4)))
    assert list(view.known_ids) == [3, 1, 4]
    assert decide3(view, change("delete", doc_id=2)) is None
    assert decide3(view, change("delete", doc_id=1)) == ("delete", None, None)


def test_router_known_ids_limit_reaches_views() -> None:
    assert view_of("orders", known_ids_limit=5).known_ids_limit == 5
    assert view_of("orders").known_ids_limit == 10_000


def test_invisible_documents_are_not_remembered() -> None:
    view = view_of("orders")
    decide3(view, change("insert", order(1, owner="bob")))
    decide3(view, change("update", order(2, status="hidden"), updated={}))
    assert len(view.known_ids) == 0


# -- unrestricted bindings ---------------------------------------------------------------------


def test_unrestricted_binding_sees_every_operation_in_full() -> None:
    view = view_of("news")
    assert view.unrestricted
    document = {"_id": 1, "title": "t", "body": "b"}
    assert decide3(view, change("insert", document, collection="shop_news")) == (
        "insert",
        None,
        None,
    )
    assert decide3(view, change("update", document, collection="shop_news")) == (
        "update",
        None,
        None,
    )
    assert decide3(view, change("replace", document, collection="shop_news")) == (
        "replace",
        None,
        None,
    )


def test_unrestricted_binding_delete_without_pre_image_is_sent() -> None:
    view = view_of("news")
    assert decide3(view, change("delete", doc_id=42, collection="shop_news")) == (
        "delete",
        None,
        None,
    )


def test_unrestricted_binding_does_not_track_ids() -> None:
    view = view_of("news")
    for number in range(50):
        decide3(view, change("insert", {"_id": number}, collection="shop_news"))
    assert len(view.known_ids) == 0


def test_a_filter_makes_a_binding_restricted() -> None:
    view = view_of("catalog")
    assert not view.unrestricted
    assert decide3(view, change("insert", {"_id": 1, "visible": True})) == ("insert", None, None)
    assert decide3(view, change("delete", doc_id=2)) is None
    assert decide3(view, change("update", {"_id": 1, "visible": False})) == (
        "delete",
        LEFT_SCOPE,
        None,
    )


def test_a_scope_makes_a_binding_restricted() -> None:
    assert not view_of("team_docs").unrestricted
    assert not view_of("orders").unrestricted


# -- scopes and principals ---------------------------------------------------------------------


@pytest.mark.parametrize("collection", ["orders", "team_docs", "mail", "public_docs"])
def test_anonymous_on_a_scoped_binding_never_sees_anything(collection: str) -> None:
    view = view_of(collection, ANONYMOUS)
    assert view.never
    # Documents that would match the scope with missing values, or with none at all.
    for document in (
        {"_id": 1, "owner_id": None, "team": None, "to": None, "public": True, "status": "open"},
        {"_id": 2, "public": True},
        {"_id": 3},
    ):
        assert decide3(view, change("insert", document)) is None
        assert decide3(view, change("update", document, before=document)) is None
        assert decide3(view, change("replace", document, before=document)) is None
        assert decide3(view, change("delete", before=document)) is None
        assert decide3(view, change("delete", doc_id=document["_id"])) is None


def test_anonymous_on_an_unscoped_binding_sees_it() -> None:
    view = view_of("news", ANONYMOUS)
    assert not view.never
    assert decide3(view, change("insert", {"_id": 1}, collection="shop_news")) == (
        "insert",
        None,
        None,
    )


def test_scope_by_claim() -> None:
    red = view_of("team_docs", ANN)
    blue = view_of("team_docs", BOB)
    document = {"_id": 1, "team": "red"}
    assert decide3(red, change("insert", document)) == ("insert", None, None)
    assert decide3(blue, change("insert", document)) is None


def test_user_without_the_scope_claim_never_sees_anything() -> None:
    view = view_of("team_docs", NO_TEAM)
    assert view.never
    assert decide3(view, change("insert", {"_id": 1})) is None
    assert decide3(view, change("insert", {"_id": 2, "team": None})) is None


def test_scope_by_email() -> None:
    assert view_of("mail", ANN).decide(change("insert", {"_id": 1, "to": "ann@example.com"}))
    assert (
        view_of("mail", BOB).decide(change("insert", {"_id": 1, "to": "ann@example.com"})) is None
    )
    assert view_of("mail", NO_TEAM).never  # no email


def test_scope_values_are_data_not_operators() -> None:
    # A user id that looks like an operator document is compared as a value.
    sneaky = Principal(user_id="$ne", claims={"sub": "$ne"})
    view = view_of("orders", sneaky)
    assert decide3(view, change("insert", order(1))) is None
    assert decide3(view, change("insert", order(2, owner="$ne"))) == ("insert", None, ORDER_FIELDS)


# -- subscriptions -----------------------------------------------------------------------------


def subscribed(
    collection: str, *subscriptions: Doc, principal: Principal = ANN
) -> tuple[RecordingConnection, View]:
    router = make_router(SHOP)
    connection = connect(router, principal)
    for number, message in enumerate(subscriptions):
        router.subscribe(
            connection,
            {"type": "subscribe", "id": f"s{number}", "collection": collection, **message},
        )
    assert [m["type"] for m in connection.messages()] == ["subscribed"] * len(subscriptions)
    view = connection.views[collection]
    assert isinstance(view, View)
    return connection, view


def test_subscription_filter_narrows() -> None:
    _, view = subscribed("orders", {"filter": {"qty": {"$gte": 2}}})
    assert decide3(view, change("insert", order(1))) is None
    assert decide3(view, change("insert", order(2))) == ("insert", None, ORDER_FIELDS)


def test_subscription_filter_never_widens_filter_or_scope() -> None:
    _, view = subscribed("orders", {"filter": {"$or": [{"status": "hidden"}, {"owner_id": "bob"}]}})
    assert decide3(view, change("insert", order(1, status="hidden"))) is None
    assert decide3(view, change("insert", order(2, owner="bob"))) is None


def test_subscription_fields_narrow() -> None:
    _, view = subscribed("orders", {"fields": ["item", "secret", "status.x"]})
    assert decide3(view, change("insert", order(1))) == ("insert", None, ("item", "status.x"))


def test_subscription_fields_never_widen_the_manifest_fields() -> None:
    _, view = subscribed("orders", {"fields": ["secret"]})
    assert decide3(view, change("insert", order(1))) == ("insert", None, ())


def test_subscription_fields_on_an_unprojected_binding() -> None:
    _, view = subscribed("news", {"fields": ["title"]})
    assert decide3(view, change("insert", {"_id": 1, "title": "t"})) == ("insert", None, ("title",))


def test_multiple_subscriptions_union_of_matching_fields() -> None:
    _, view = subscribed(
        "orders",
        {"filter": {"qty": {"$gte": 2}}, "fields": ["item"]},
        {"filter": {"qty": {"$gte": 3}}, "fields": ["qty", "item"]},
        {"filter": {"qty": 100}, "fields": ["status"]},
    )
    assert decide3(view, change("insert", order(1))) is None
    assert decide3(view, change("insert", order(2))) == ("insert", None, ("item",))
    assert decide3(view, change("insert", order(3))) == ("insert", None, ("item", "qty"))


def test_subscription_without_fields_takes_the_manifest_fields() -> None:
    _, view = subscribed(
        "orders", {"filter": {"qty": 1}}, {"filter": {"qty": 1}, "fields": ["item"]}
    )
    assert decide3(view, change("insert", order(1))) == ("insert", None, ORDER_FIELDS)


def test_update_leaving_a_subscription_is_left_scope() -> None:
    _, view = subscribed("orders", {"filter": {"qty": 1}})
    decide3(view, change("insert", order(1)))
    event = change("update", order(1, qty=2), before=order(1), updated={"qty": 2})
    assert decide3(view, event) == ("delete", LEFT_SCOPE, None)


def test_update_entering_a_subscription() -> None:
    _, view = subscribed("orders", {"filter": {"qty": 2}})
    event = change("update", order(1, qty=2), before=order(1), updated={"qty": 2})
    assert decide3(view, event) == ("update", None, ORDER_FIELDS)


def test_delete_outside_a_subscription_with_pre_image_is_not_sent() -> None:
    _, view = subscribed("orders", {"filter": {"qty": 2}})
    assert decide3(view, change("delete", before=order(1))) is None
    assert decide3(view, change("delete", before=order(2))) == ("delete", None, None)


def test_unrestricted_binding_with_subscription_may_send_extra_deletes() -> None:
    # Documented trade-off: an unrestricted binding keeps no ids, so a document that leaves (or
    # never entered) a subscription gets a left_scope delete; a delete nobody holds is harmless.
    _, view = subscribed("news", {"filter": {"tag": "a"}})
    event = change("update", {"_id": 1, "tag": "b"}, updated={"tag": "b"}, collection="shop_news")
    assert decide3(view, event) == ("delete", LEFT_SCOPE, None)
    assert decide3(view, change("delete", doc_id=2, collection="shop_news")) == (
        "delete",
        None,
        None,
    )


def test_subscription_on_one_collection_leaves_others_alone() -> None:
    connection, _ = subscribed("orders", {"filter": {"qty": 2}})
    news = connection.views["news"]
    assert not news.subscriptions
    assert decide3(news, change("insert", {"_id": 1}, collection="shop_news")) is not None


# -- Router: bindings --------------------------------------------------------------------------


def test_add_app_resolves_physical_namespaces() -> None:
    router = Router()
    bindings = router.add_app(parse_manifest(SHOP), "db")
    assert {(b.endpoint, b.collection, b.database, b.physical) for b in bindings} >= {
        ("live", "orders", "db", "shop_orders"),
        ("admin", "orders", "db", "shop_orders"),
        ("live", "news", "db", "shop_news"),
    }
    items = router.bindings_of("shop", "live")["items"]
    assert items.operations == frozenset({"insert", "delete"})
    assert router.bindings_of("shop", "live")["orders"].fields == ORDER_FIELDS
    assert router.bindings_of("shop", "live")["news"].fields is None
    assert router.bindings_of("shop", "nope") == {}


def test_namespaces_union_operations_per_physical_collection() -> None:
    router = make_router(SHOP, BLOG, ELSEWHERE)
    namespaces = router.namespaces()
    all_ops = frozenset({"insert", "update", "replace", "delete"})
    assert namespaces["db"]["shop_items"] == frozenset({"insert", "delete"})
    assert namespaces["db"]["shop_orders"] == all_ops
    assert namespaces["db"]["blog_posts"] == all_ops
    # Every app database also carries the broadcast bus, inserts only.
    assert namespaces["otherdb"] == {"x_news": all_ops, BUS_COLLECTION: frozenset({"insert"})}
    assert namespaces["db"][BUS_COLLECTION] == frozenset({"insert"})


def test_events_reach_only_the_app_of_their_namespace() -> None:
    router = make_router(SHOP, BLOG, ELSEWHERE)
    shop = connect(router, ANN)
    blog = connect(router, ANN, app_slug="blog")
    other = connect(router, ANN, app_slug="elsewhere")
    assert router.route(change("insert", {"_id": 1}, collection="blog_news")) == 1
    assert [m["app_slug"] for m in blog.messages()] == ["blog"]
    assert shop.frames == [] and other.frames == []
    assert router.route(change("insert", {"_id": 2}, collection="x_news", database="otherdb")) == 1
    assert other.messages()[0]["collection"] == "news"
    # Same physical name in another database, or an unbound collection: nobody.
    assert router.route(change("insert", {"_id": 3}, collection="x_news")) == 0
    assert router.route(change("insert", {"_id": 4}, collection="shop_news", database="x")) == 0
    assert router.route(change("insert", {"_id": 5}, collection="shop_unbound")) == 0
    assert len(shop.frames) == 0 and len(blog.frames) == 1 and len(other.frames) == 1


def test_events_reach_every_endpoint_bound_to_the_collection() -> None:
    router = make_router(SHOP)
    live = connect(router, ANN)
    admin = connect(router, ANN, endpoint="admin")
    assert router.route(change("insert", order(1))) == 2
    live_message, admin_message = live.messages()[0], admin.messages()[0]
    assert live_message["endpoint"] == "live"
    assert live_message["document"] == {"_id": 1, **{k: order(1)[k] for k in ORDER_FIELDS}}
    assert admin_message["endpoint"] == "admin"
    assert admin_message["document"] == order(1)


@pytest.mark.parametrize(
    ("operation", "routed"), [("insert", 1), ("update", 0), ("replace", 0), ("delete", 1)]
)
def test_operations_filter(operation: str, routed: int) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    document = {"_id": 1, "name": "n"}
    event = change(operation, document, before=document, collection="shop_items")
    assert router.route(event) == routed
    assert len(connection.frames) == routed


@pytest.mark.parametrize(
    ("document", "before", "routed"),
    [
        ({"_id": 1, "app_id": "shop"}, None, 1),
        ({"_id": 1}, None, 1),
        ({"_id": 1, "app_id": "blog"}, None, 0),
        ({"_id": 1, "app_id": None}, None, 0),
        ({"_id": 1, "app_id": "blog"}, {"_id": 1, "app_id": "shop"}, 0),
        (None, {"_id": 1, "app_id": "blog"}, 0),
        (None, {"_id": 1, "app_id": "shop"}, 1),
    ],
)
def test_app_id_must_be_the_slug(document: Doc | None, before: Doc | None, routed: int) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    operation = "insert" if document is not None else "delete"
    event = change(operation, document, before=before, doc_id=1, collection="shop_news")
    assert router.route(event) == routed
    assert len(connection.frames) == routed


def test_app_id_of_the_post_image_decides_an_update() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    event = change(
        "update",
        {"_id": 1, "app_id": "shop"},
        before={"_id": 1, "app_id": "blog"},
        collection="shop_news",
    )
    assert router.route(event) == 1
    assert connection.messages()[0]["operation"] == "update"


# -- Router: connections and frames ------------------------------------------------------------


def test_change_message_content() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    oid = ObjectId("65a000000000000000000001")
    event = change(
        "update",
        {**order(0), "_id": oid},
        updated={"qty": 3, "secret": "s2"},
        removed=["note", "item"],
    )
    assert router.route(event) == 1
    (message,) = connection.messages()
    assert message == {
        "type": "change",
        "id": event.event_id,
        "app_slug": "shop",
        "endpoint": "live",
        "collection": "orders",
        "operation": "update",
        "document_id": str(oid),
        "document": {
            "_id": str(oid),
            "item": "item-0",
            "qty": 0,
            "owner_id": "ann",
            "status": "open",
        },
        "update": {"updated_fields": {"qty": 3}, "removed_fields": ["item"]},
        "timestamp": event.timestamp,
    }


def test_left_scope_message() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    event = change(
        "update", order(1, status="hidden"), before=order(1), updated={"status": "hidden"}
    )
    router.route(event)
    (message,) = connection.messages()
    assert message["operation"] == "delete"
    assert message["reason"] == LEFT_SCOPE
    assert message["document"] is None
    assert message["update"] is None
    assert message["document_id"] == 1


def test_frames_are_shared_between_connections_that_see_the_same_thing() -> None:
    router = make_router(SHOP)
    first, second = connect(router, ANN), connect(router, ANN)
    bob, anonymous = connect(router, BOB), connect(router, ANONYMOUS)
    assert router.route(change("insert", {"_id": 1, "title": "t"}, collection="shop_news")) == 4
    frame = first.frames[0]
    assert all(c.frames[0] is frame for c in (second, bob, anonymous))
    assert router.route(change("insert", order(1))) == 2
    assert second.frames[1] is first.frames[1]
    assert len(bob.frames) == 1 and len(anonymous.frames) == 1


def test_frames_differ_when_projections_differ() -> None:
    router = make_router(SHOP)
    whole, narrow, same_narrow = connect(router), connect(router), connect(router)
    for connection in (narrow, same_narrow):
        router.subscribe(
            connection, {"type": "subscribe", "id": 1, "collection": "orders", "fields": ["item"]}
        )
        connection.frames.clear()
    assert router.route(change("insert", order(1))) == 3
    assert whole.frames[0] is not narrow.frames[0]
    assert narrow.frames[0] is same_narrow.frames[0]
    assert codec.loads(narrow.frames[0])["document"] == {"_id": 1, "item": "item-1"}
    assert set(codec.loads(whole.frames[0])["document"]) == {"_id", *ORDER_FIELDS}


def test_closing_and_detached_connections_get_nothing() -> None:
    router = make_router(SHOP)
    open_, closing, detached = connect(router), connect(router), connect(router)
    closing.closing = True
    router.detach(detached)
    router.detach(detached)  # twice is harmless
    assert router.route(change("insert", {"_id": 1}, collection="shop_news")) == 1
    assert len(open_.frames) == 1
    assert closing.frames == [] and detached.frames == []


def test_closing_connection_view_is_not_updated() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    connection.closing = True
    router.route(change("insert", order(1)))
    assert len(connection.views["orders"].known_ids) == 0


def test_a_full_queue_is_not_counted() -> None:
    router = make_router(SHOP)
    full, fine = connect(router), connect(router)
    full.accept = False
    assert router.route(change("insert", {"_id": 1}, collection="shop_news")) == 1
    assert len(fine.frames) == 1


def test_connection_of_an_unknown_endpoint_has_no_views() -> None:
    router = make_router(SHOP)
    connection = connect(router, endpoint="ghost")
    assert connection.views == {}
    assert router.route(change("insert", {"_id": 1}, collection="shop_news")) == 0


def test_each_connection_has_its_own_views() -> None:
    router = make_router(SHOP)
    ann, bob = connect(router, ANN), connect(router, BOB)
    assert ann.views["orders"] is not bob.views["orders"]
    router.route(change("insert", order(1)))
    router.route(change("insert", order(2, owner="bob")))
    assert list(ann.views["orders"].known_ids) == [1]
    assert list(bob.views["orders"].known_ids) == [2]
    router.route(change("delete", doc_id=2))
    assert [m["operation"] for m in ann.messages()] == ["insert"]
    assert [m["operation"] for m in bob.messages()] == ["insert", "delete"]


def test_per_user_isolation_across_a_sequence_of_events() -> None:
    router = make_router(SHOP)
    ann, bob, anonymous = connect(router, ANN), connect(router, BOB), connect(router, ANONYMOUS)
    events = [
        change("insert", order(1)),
        change("insert", order(2, owner="bob")),
        change("update", order(1, owner="bob"), updated={"owner_id": "bob"}),
        change("update", order(2, owner="bob", qty=5), updated={"qty": 5}),
        change("delete", doc_id=1),
        change("delete", doc_id=2),
    ]
    for event in events:
        router.route(event)

    def seen(connection: RecordingConnection) -> list[tuple[str, Any, str | None]]:
        return [(m["operation"], m["document_id"], m.get("reason")) for m in connection.messages()]

    assert seen(ann) == [("insert", 1, None), ("delete", 1, LEFT_SCOPE)]
    # Bob gets doc 1 as an update when it moves into his scope.
    assert seen(bob) == [
        ("insert", 2, None),
        ("update", 1, None),
        ("update", 2, None),
        ("delete", 1, None),
        ("delete", 2, None),
    ]
    assert anonymous.frames == []


async def test_route_through_real_connection_writers() -> None:
    router = make_router(SHOP)
    written: dict[str, list[str]] = {"a": [], "b": []}
    connections = []
    for name in written:

        async def send_text(frame: str, sink: list[str] = written[name]) -> None:
            sink.append(frame)

        async def close(code: int, reason: str) -> None:
            return None

        connection = WebSocketConnection(
            websocket=object(), app_slug="shop", endpoint="live", principal=ANN, user_id="ann"
        )
        connection.start(send_text, close, QueueLimits())
        router.attach(connection)
        connections.append(connection)
    try:
        assert router.route(change("insert", order(1))) == 2
        assert router.route(change("insert", order(2, owner="bob"))) == 0
        for _ in range(20):  # let the writer tasks run
            await asyncio.sleep(0)
        assert len(written["a"]) == 1 and len(written["b"]) == 1
        assert written["a"][0] is written["b"][0]
        assert codec.loads(written["a"][0])["document_id"] == 1
    finally:
        for connection in connections:
            connection.stop()


# -- Router: subscribe / unsubscribe -----------------------------------------------------------


def subscribe(router: Router, connection: RecordingConnection, **message: Any) -> Doc:
    connection.frames.clear()
    router.subscribe(connection, {"type": "subscribe", **message})
    (reply,) = connection.messages()
    return reply


def unsubscribe(router: Router, connection: RecordingConnection, **message: Any) -> Doc:
    connection.frames.clear()
    router.unsubscribe(connection, {"type": "unsubscribe", **message})
    (reply,) = connection.messages()
    return reply


def test_protocol_handlers() -> None:
    router = Router()
    handlers = router.protocol_handlers()
    assert set(handlers) == {"subscribe", "unsubscribe"}


@pytest.mark.parametrize("sub_id", ["s1", 1, 2.5])
def test_subscribe_and_unsubscribe_replies(sub_id: Any) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert subscribe(router, connection, id=sub_id, collection="orders") == {
        "type": "subscribed",
        "id": sub_id,
    }
    assert sub_id in connection.views["orders"].subscriptions
    assert unsubscribe(router, connection, id=sub_id) == {"type": "unsubscribed", "id": sub_id}
    assert connection.views["orders"].subscriptions == {}


def test_after_unsubscribe_everything_visible_comes_again() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    subscribe(router, connection, id="s", collection="orders", filter={"qty": 100})
    connection.frames.clear()
    router.route(change("insert", order(1)))
    assert connection.frames == []
    unsubscribe(router, connection, id="s")
    connection.frames.clear()
    router.route(change("insert", order(2)))
    assert [m["document_id"] for m in connection.messages()] == [2]


def test_subscribe_again_with_the_same_id_replaces() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    subscribe(router, connection, id="s", collection="orders", filter={"qty": 1})
    subscribe(router, connection, id="s", collection="orders", filter={"qty": 2})
    view = connection.views["orders"]
    assert list(view.subscriptions) == ["s"]
    assert decide3(view, change("insert", order(1))) is None
    assert decide3(view, change("insert", order(2))) is not None


def test_subscribe_same_id_on_another_collection_moves_it() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    subscribe(router, connection, id="s", collection="orders")
    subscribe(router, connection, id="s", collection="news")
    assert connection.views["orders"].subscriptions == {}
    assert list(connection.views["news"].subscriptions) == ["s"]


def assert_error(reply: Doc, code: str, ref: Any) -> None:
    assert reply["type"] == "error"
    assert reply["code"] == code
    assert reply["ref"] == ref
    assert isinstance(reply["message"], str) and reply["message"]
    assert set(reply) == {"type", "code", "message", "ref"}


@pytest.mark.parametrize("message", [{}, {"id": None}, {"id": True}, {"id": [1]}, {"id": {"a": 1}}])
def test_subscribe_without_a_valid_id(message: Doc) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert_error(subscribe(router, connection, collection="orders", **message), "bad_message", None)
    assert connection.views["orders"].subscriptions == {}


@pytest.mark.parametrize("collection", ["ghost", None, 5, "shop_orders"])
def test_subscribe_to_an_unwatched_collection(collection: Any) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    reply = subscribe(router, connection, id="s", collection=collection)
    assert_error(reply, "bad_message", "s")
    assert "orders" in reply["message"]  # says what is watched


def test_subscribe_without_collection() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert_error(subscribe(router, connection, id=3), "bad_message", 3)


@pytest.mark.parametrize(
    "query",
    [
        {"$where": "this.owner_id == 'bob'"},
        {"$expr": {"$eq": ["$owner_id", "bob"]}},
        {"a": {"$function": {}}},
        {"owner_id": {"$regex": "(", "$options": ""}},
        {"$or": "not a list"},
        ["not", "an", "object"],
        "text",
    ],
)
def test_subscribe_with_a_forbidden_filter(query: Any) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert_error(
        subscribe(router, connection, id="s", collection="orders", filter=query),
        "forbidden_filter",
        "s",
    )
    assert connection.views["orders"].subscriptions == {}


def test_subscribe_filter_with_placeholders_is_taken_literally() -> None:
    # Placeholders belong to manifest scopes; in a client filter "$user.id" is just a string.
    router = make_router(SHOP)
    connection = connect(router)
    reply = subscribe(
        router, connection, id="s", collection="orders", filter={"owner_id": "$user.id"}
    )
    assert reply == {"type": "subscribed", "id": "s"}
    assert connection.views["orders"].decide(change("insert", order(1))) is None


@pytest.mark.parametrize(
    "fields", ["item", [1], [""], ["$item"], ["a..b"], ["a."], [".a"], [None], {"item": 1}]
)
def test_subscribe_with_bad_fields(fields: Any) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert_error(
        subscribe(router, connection, id="s", collection="orders", fields=fields),
        "bad_message",
        "s",
    )
    assert connection.views["orders"].subscriptions == {}


def test_subscribe_with_empty_fields_shows_only_ids() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert (
        subscribe(router, connection, id="s", collection="orders", fields=[])["type"]
        == "subscribed"
    )
    connection.frames.clear()
    router.route(change("insert", order(1)))
    assert connection.messages()[0]["document"] == {"_id": 1}


def test_subscribe_snapshot_is_handed_to_the_snapshot_handler() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    handed: list[tuple[View, Subscription]] = []

    async def take_snapshot(_connection: Any, view: View, subscription: Subscription) -> None:
        handed.append((view, subscription))

    router.snapshots = take_snapshot
    outcome = router.subscribe(
        connection, {"type": "subscribe", "id": "s", "collection": "orders", "snapshot": True}
    )
    assert outcome is not None
    outcome.close()  # type: ignore[attr-defined]  # a coroutine, not run in this sync test
    # The handler registers the subscription itself, once the live events are held back.
    assert connection.views["orders"].subscriptions == {}
    assert connection.messages() == []


def test_subscribe_snapshot_must_be_a_boolean() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    assert_error(
        subscribe(router, connection, id="s", collection="orders", snapshot="yes"),
        "bad_message",
        "s",
    )
    assert connection.views["orders"].subscriptions == {}


def test_failed_subscribe_keeps_the_previous_subscription() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    subscribe(router, connection, id="s", collection="orders", filter={"qty": 1})
    subscribe(router, connection, id="s", collection="orders", filter={"$where": "1"})
    assert list(connection.views["orders"].subscriptions) == ["s"]


@pytest.mark.parametrize("message", [{"id": "nope"}, {}, {"id": True}, {"id": None}])
def test_unsubscribe_unknown_or_invalid_id(message: Doc) -> None:
    router = make_router(SHOP)
    connection = connect(router)
    ref = message.get("id")
    expected_ref = ref if isinstance(ref, str) else None
    assert_error(unsubscribe(router, connection, **message), "bad_message", expected_ref)


def test_unsubscribe_twice() -> None:
    router = make_router(SHOP)
    connection = connect(router)
    subscribe(router, connection, id="s", collection="orders")
    assert unsubscribe(router, connection, id="s")["type"] == "unsubscribed"
    assert_error(unsubscribe(router, connection, id="s"), "bad_message", "s")
