"""Change streams drive the clients: bindings, scope, filter, fields, subscriptions (SPEC 3, 5)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase
from websockets.asyncio.client import ClientConnection

from engine.auth import issue_token
from tests.conftest import RunningApp
from tests.support import TEST_SECRET, connect, receive_json, receive_until


async def client_for(
    app: RunningApp, path: str = "/shop/ws", user: str | None = "ann", **claims: Any
) -> ClientConnection:
    slug = path.split("/")[1]
    query = {}
    if user is not None:
        query["token"] = issue_token(TEST_SECRET, app_slug=slug, user_id=user, claims=claims)
    ws = await connect(app.server.ws_url(path, **query))
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def changes(ws: ClientConnection, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    received = []
    while len(received) < count:
        received.append(await receive_until(ws, "change", timeout, answer_pings=True))
    return received


async def no_change(ws: ClientConnection, within: float = 0.7) -> None:
    try:
        message = await receive_until(ws, "change", within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected change: {message}")


async def test_every_operation_on_an_unrestricted_binding(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    ws = await client_for(change_app)
    try:
        news = db["shop_news"]
        oid = ObjectId()
        await news.insert_one({"_id": oid, "title": "hello", "n": 1})
        await news.update_one({"_id": oid}, {"$set": {"n": 2}, "$unset": {"title": ""}})
        await news.replace_one({"_id": oid}, {"title": "replaced"})
        await news.delete_one({"_id": oid})
        insert, update, replace, delete = await changes(ws, 4)
    finally:
        await ws.close()
    assert insert["operation"] == "insert" and insert["collection"] == "news"
    assert (insert["app_slug"], insert["endpoint"]) == ("shop", "live")
    assert insert["document_id"] == str(oid)
    assert insert["document"] == {"_id": str(oid), "title": "hello", "n": 1}
    assert insert["update"] is None and insert["timestamp"].endswith("Z")
    assert update["operation"] == "update"
    assert update["document"] == {"_id": str(oid), "n": 2}
    assert update["update"] == {"updated_fields": {"n": 2}, "removed_fields": ["title"]}
    assert replace["operation"] == "replace"
    assert replace["document"] == {"_id": str(oid), "title": "replaced"}
    assert delete["operation"] == "delete" and delete["document"] is None
    ids = [m["id"] for m in (insert, update, replace, delete)]
    assert len(set(ids)) == 4 and all(isinstance(i, str) and i for i in ids)


async def test_scope_filter_fields_and_moving_between_users(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    ann, bob, admin = (
        await client_for(change_app, user="ann"),
        await client_for(change_app, user="bob"),
        await client_for(change_app, "/shop/admin", user="root"),
    )
    try:
        orders = db["shop_orders"]
        oid = ObjectId()
        await orders.insert_one(
            {"_id": oid, "owner_id": "ann", "item": "pen", "qty": 1, "secret": "x"}
        )
        (inserted,) = await changes(ann, 1)
        assert inserted["document"] == {"_id": str(oid), "item": "pen", "qty": 1, "owner_id": "ann"}
        assert (await changes(admin, 1))[0]["document"]["secret"] == "x"  # no fields there
        await no_change(bob)

        await orders.update_one({"_id": oid}, {"$set": {"qty": 2, "secret": "y"}})
        (updated,) = await changes(ann, 1)
        assert updated["update"] == {"updated_fields": {"qty": 2}, "removed_fields": []}
        assert "secret" not in updated["document"]

        await orders.update_one({"_id": oid}, {"$set": {"owner_id": "bob"}})
        (left,) = await changes(ann, 1)
        assert (left["operation"], left["reason"], left["document"]) == (
            "delete",
            "left_scope",
            None,
        )
        (arrived,) = await changes(bob, 1)
        assert arrived["operation"] == "update"
        assert arrived["document"] == {"_id": str(oid), "item": "pen", "qty": 2, "owner_id": "bob"}

        await orders.update_one({"_id": oid}, {"$set": {"status": "hidden"}})
        (hidden,) = await changes(bob, 1)
        assert hidden["reason"] == "left_scope"
        await orders.update_one({"_id": oid}, {"$set": {"qty": 3}})  # invisible to both now
        await orders.delete_one({"_id": oid})
        await no_change(bob)
        await no_change(ann)
        admin_ops = [m["operation"] for m in await changes(admin, 5)]
        assert admin_ops == ["update", "update", "update", "update", "delete"]
    finally:
        for ws in (ann, bob, admin):
            await ws.close()


async def test_deletes_reach_only_who_could_see_the_document(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    ann, bob = await client_for(change_app, user="ann"), await client_for(change_app, user="bob")
    try:
        orders = db["shop_orders"]
        await orders.insert_one({"_id": "o-del", "owner_id": "ann", "item": "ink"})
        await changes(ann, 1)
        await orders.delete_one({"_id": "o-del"})
        (deleted,) = await changes(ann, 1)
        assert (deleted["operation"], deleted["document_id"]) == ("delete", "o-del")
        assert "reason" not in deleted
        await no_change(bob)
    finally:
        await ann.close()
        await bob.close()


async def test_deletes_without_pre_images_use_what_was_sent(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    """Where the collection records no pre-images, a delete goes to whoever was sent the doc."""
    await db.command("collMod", "shop_plain", changeStreamPreAndPostImages={"enabled": False})
    ann, bob = await client_for(change_app, user="ann"), await client_for(change_app, user="bob")
    try:
        plain = db["shop_plain"]
        await plain.insert_one({"_id": 1, "owner_id": "ann"})
        await changes(ann, 1)
        await plain.update_one({"_id": 1}, {"$set": {"owner_id": "bob"}})
        assert (await changes(ann, 1))[0]["reason"] == "left_scope"
        assert (await changes(bob, 1))[0]["operation"] == "update"
        await plain.delete_one({"_id": 1})
        assert (await changes(bob, 1))[0]["operation"] == "delete"
        await no_change(ann)
    finally:
        await ann.close()
        await bob.close()


async def test_operations_app_id_claims_and_anonymous(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    red = await client_for(change_app, user="r1", team="red")
    blue = await client_for(change_app, user="b1", team="blue")
    anonymous = await client_for(change_app, "/shop/public", user=None)
    try:
        items = db["shop_items"]
        await items.insert_one({"_id": "i1", "v": 1})
        await items.update_one({"_id": "i1"}, {"$set": {"v": 2}})  # not a bound operation
        await items.delete_one({"_id": "i1"})
        assert [m["operation"] for m in await changes(red, 2)] == ["insert", "delete"]

        news = db["shop_news"]
        await news.insert_one({"_id": "n-other", "app_id": "blog"})  # another app's write
        await news.insert_one({"_id": "n-mine", "app_id": "shop"})
        blue_changes = await changes(blue, 3)
        assert [m["document_id"] for m in blue_changes] == ["i1", "i1", "n-mine"]
        assert (await changes(anonymous, 1))[0]["document_id"] == "n-mine"

        team_docs = db["shop_team_docs"]
        await team_docs.insert_one({"_id": "t1", "team": "red"})
        await team_docs.insert_one({"_id": "t2", "team": "blue"})
        await db["shop_orders"].insert_one({"_id": "anon-check", "owner_id": None})
        assert [m["document_id"] for m in await changes(red, 2)] == ["n-mine", "t1"]
        assert [m["document_id"] for m in await changes(blue, 1)] == ["t2"]
        # A scoped binding never matches an anonymous connection, not even `owner_id: null`.
        await no_change(anonymous)
    finally:
        for ws in (red, blue, anonymous):
            await ws.close()


async def test_collection_prefix_and_app_isolation(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    blog = await client_for(change_app, "/blog/ws", user="writer")
    shop = await client_for(change_app, user="ann")
    try:
        await db["blogdata_posts"].insert_one({"_id": "p1", "title": "first"})
        await db["blog_posts"].insert_one({"_id": "p2"})  # not blog's: it has a prefix
        await db["shop_news"].insert_one({"_id": "shop-only"})
        (post,) = await changes(blog, 1)
        assert (post["collection"], post["document_id"]) == ("posts", "p1")
        assert (await changes(shop, 1))[0]["document_id"] == "shop-only"
        await no_change(blog)
        await db["blogdata_news"].insert_one({"_id": "blog-news"})
        assert (await changes(blog, 1))[0]["document_id"] == "blog-news"
        await no_change(shop)
    finally:
        await blog.close()
        await shop.close()


async def test_subscribe_narrows_and_unsubscribe_restores(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    ws = await client_for(change_app, user="ann")
    try:
        await ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "id": "s1",
                    "collection": "orders",
                    "filter": {"qty": {"$gte": 5}},
                    "fields": ["item", "secret"],
                }
            )
        )
        assert await receive_until(ws, "subscribed") == {"type": "subscribed", "id": "s1"}
        orders = db["shop_orders"]
        await orders.insert_one({"_id": "small", "owner_id": "ann", "qty": 1, "item": "a"})
        await orders.insert_one(
            {"_id": "big", "owner_id": "ann", "qty": 9, "item": "b", "secret": "s"}
        )
        await orders.insert_one({"_id": "theirs", "owner_id": "bob", "qty": 9, "item": "c"})
        (big,) = await changes(ws, 1)
        # Narrowed to `item`; `secret` is outside the manifest's fields and stays out.
        assert big["document"] == {"_id": "big", "item": "b"}
        await orders.update_one({"_id": "big"}, {"$set": {"qty": 2}})
        (gone,) = await changes(ws, 1)
        assert (gone["document_id"], gone["reason"]) == ("big", "left_scope")
        await no_change(ws)

        await ws.send(json.dumps({"type": "unsubscribe", "id": "s1"}))
        assert await receive_until(ws, "unsubscribed") == {"type": "unsubscribed", "id": "s1"}
        await orders.update_one({"_id": "small"}, {"$set": {"qty": 0}})
        (small,) = await changes(ws, 1)
        assert small["document"]["qty"] == 0 and small["document"]["owner_id"] == "ann"
    finally:
        await ws.close()


@pytest.mark.parametrize(
    ("request_body", "code", "text"),
    [
        ({"collection": "orders", "filter": {"$where": "1"}}, "forbidden_filter", "$where"),
        ({"collection": "orders", "filter": {"a": {"$expr": 1}}}, "forbidden_filter", "$expr"),
        ({"collection": "orders", "filter": "x"}, "forbidden_filter", "object"),
        ({"collection": "nope"}, "bad_message", "not watched"),
        ({"collection": "orders", "fields": ["$bad"]}, "bad_message", "fields"),
    ],
)
async def test_bad_subscriptions_are_answered(
    change_app: RunningApp, request_body: dict[str, Any], code: str, text: str
) -> None:
    ws = await client_for(change_app, user="ann")
    try:
        await ws.send(json.dumps({"type": "subscribe", "id": 7, **request_body}))
        error = await receive_until(ws, "error")
        assert (error["code"], error["ref"]) == (code, 7)
        assert text in error["message"]
        await ws.send(json.dumps({"type": "unsubscribe", "id": "unknown"}))
        assert (await receive_until(ws, "error"))["code"] == "bad_message"
    finally:
        await ws.close()


async def test_readyz_reports_running_watchers(change_app: RunningApp) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=change_app.server.url) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200, response.text
