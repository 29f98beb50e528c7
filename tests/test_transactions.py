"""Transactions arrive whole (SPEC 13): one frame per connection with the parts it may see,
and no resume position inside a transaction is ever handed out."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from websockets.asyncio.client import ClientConnection

from tests.conftest import RunningApp
from tests.support import connect, receive_json
from tests.test_resume import open_ws, url


async def data_frame(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """The next `change` or `transaction` frame (pings answered)."""
    while True:
        message = await receive_json(ws, timeout)
        if message["type"] in ("change", "transaction"):
            return message
        if message["type"] == "ping":
            await ws.send('{"type": "pong"}')


async def nothing_more(ws: ClientConnection, within: float = 0.7) -> None:
    try:
        message = await data_frame(ws, within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame: {message}")


async def transfer(
    db: AsyncDatabase[dict[str, Any]], source: str, target: str, amount: int
) -> None:
    orders = db["shop_orders"]
    async with db.client.start_session() as session, await session.start_transaction():
        await orders.update_one({"_id": source}, {"$inc": {"qty": -amount}}, session=session)
        await orders.update_one({"_id": target}, {"$inc": {"qty": amount}}, session=session)


async def admin_ws(app: RunningApp) -> ClientConnection:
    ws = await connect(url(app, path="/shop/admin", user="root"), max_size=None)
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def test_a_transfer_reaches_each_client_in_one_frame_with_only_what_it_may_see(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    orders = db["shop_orders"]
    admin = await admin_ws(change_app)
    ann = await open_ws(change_app)
    bob = await open_ws(change_app, user="bob")
    await orders.insert_many(
        [
            {"_id": "tx-ann-1", "owner_id": "ann", "item": "a", "qty": 10},
            {"_id": "tx-ann-2", "owner_id": "ann", "item": "b", "qty": 0},
            {"_id": "tx-bob-1", "owner_id": "bob", "item": "c", "qty": 0},
        ]
    )
    for ws, inserts in ((admin, 3), (ann, 2), (bob, 1)):
        for _ in range(inserts):
            assert (await data_frame(ws))["operation"] == "insert"
    try:
        # Both sides are ann's: she gets the whole transfer in one frame, in commit order.
        await transfer(db, "tx-ann-1", "tx-ann-2", 3)
        whole = await data_frame(ann)
        assert whole["type"] == "transaction"
        assert [(c["document_id"], c["document"]["qty"]) for c in whole["changes"]] == [
            ("tx-ann-1", 7),
            ("tx-ann-2", 3),
        ]
        assert all(c["id"] == whole["id"] for c in whole["changes"])
        seen_by_admin = await data_frame(admin)
        assert seen_by_admin["type"] == "transaction"
        assert seen_by_admin["id"] == whole["id"]
        await nothing_more(bob)

        # Across two owners: the admin sees both sides at once, each owner only their side,
        # as a plain change whose id is the transaction's position.
        await transfer(db, "tx-ann-1", "tx-bob-1", 2)
        both = await data_frame(admin)
        assert both["type"] == "transaction"
        assert [(c["document_id"], c["document"]["qty"]) for c in both["changes"]] == [
            ("tx-ann-1", 5),
            ("tx-bob-1", 2),
        ]
        ann_side, bob_side = await data_frame(ann), await data_frame(bob)
        assert (ann_side["type"], ann_side["document_id"], ann_side["id"]) == (
            "change",
            "tx-ann-1",
            both["id"],
        )
        assert (bob_side["type"], bob_side["document_id"], bob_side["id"]) == (
            "change",
            "tx-bob-1",
            both["id"],
        )
        assert "owner_id" in ann_side["document"] and "item" in ann_side["document"]
        await nothing_more(ann)
        await nothing_more(bob)
    finally:
        for ws in (admin, ann, bob):
            await ws.close()


async def _raw_ids_of_next(
    db: AsyncDatabase[dict[str, Any]], count: int, write: Any
) -> tuple[list[str], Any]:
    """The resume positions of the next `count` raw events, read from our own change stream."""
    async with await db["shop_orders"].watch() as stream:
        result = await write()
        ids: list[str] = []
        while len(ids) < count:
            raw = await stream.try_next()
            if raw is not None:
                ids.append(raw["_id"]["_data"])
    return ids, result


async def test_a_resume_position_inside_a_transaction_is_never_handed_out(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    orders = db["shop_orders"]
    ann = await open_ws(change_app)
    await orders.insert_many(
        [
            {"_id": "rs-ann-1", "owner_id": "ann", "item": "a", "qty": 10},
            {"_id": "rs-ann-2", "owner_id": "ann", "item": "b", "qty": 0},
        ]
    )
    try:
        for _ in range(2):
            assert (await data_frame(ann))["operation"] == "insert"
        await orders.update_one({"_id": "rs-ann-1"}, {"$set": {"item": "before"}})
        before = await data_frame(ann)
        assert before["operation"] == "update"
        raw_ids, _ = await _raw_ids_of_next(db, 3, lambda: _three_in_one(db))
        whole = await data_frame(ann)
        assert whole["type"] == "transaction" and len(whole["changes"]) == 3
        assert whole["id"] == raw_ids[-1]
        inner = set(raw_ids[:-1])
        handed_out = {whole["id"], *(c["id"] for c in whole["changes"])}
        assert not handed_out & inner
    finally:
        await ann.close()

    # Resuming from just before the transaction replays it whole, once.
    resumed = await open_ws(change_app, last_event_id=before["id"])
    try:
        replay = await data_frame(resumed)
        assert replay["type"] == "transaction"
        assert replay["id"] == whole["id"]
        assert replay["changes"] == whole["changes"]
        await nothing_more(resumed)
    finally:
        await resumed.close()

    # A snapshot taken now starts at a unit boundary, never inside the transaction.
    snap = await open_ws(change_app)
    try:
        await snap.send(
            '{"type": "subscribe", "id": "s", "collection": "orders", "snapshot": true}'
        )
        while (message := await receive_json(snap, 10))["type"] != "snapshot":
            pass
        assert message["event_id"] not in inner
    finally:
        await snap.close()


async def _three_in_one(db: AsyncDatabase[dict[str, Any]]) -> None:
    orders = db["shop_orders"]
    async with db.client.start_session() as session, await session.start_transaction():
        await orders.update_one({"_id": "rs-ann-1"}, {"$inc": {"qty": -1}}, session=session)
        await orders.update_one({"_id": "rs-ann-2"}, {"$inc": {"qty": 1}}, session=session)
        await orders.insert_one(
            {"_id": "rs-ann-3", "owner_id": "ann", "item": "c", "qty": 0}, session=session
        )
    await asyncio.sleep(0)
