"""Bringing a connection up to date: resume from `last_event_id`, and snapshots.

Both hold the connection's live events back, send what it missed (history) or what exists
(snapshot), then release the held events, skipping any already sent: nothing lost between
the two, nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from engine import codec
from engine.changes import project
from engine.delivery.router import Router
from engine.delivery.view import Binding, Subscription, View
from engine.delivery.window_groups import Windows
from engine.delivery.windows import MAX_RESERVE, SortSpec
from engine.history import History
from engine.hub import WebSocketConnection
from engine.protocol import ErrorCode, error_message
from engine.query import conjunction, substitute_placeholders
from engine.transactions import Unit
from engine.watcher import Watcher

logger = logging.getLogger("engine.recovery")

DEFAULT_SNAPSHOT_LIMIT = 10_000
# How long a replay may wait for the database to show an event the engine already routed.
CATCH_UP_IDLE_POLLS = 10

HISTORY_LOST_CODE = 286


def resync_required(reason: str) -> dict[str, Any]:
    return {"type": "resync_required", "reason": reason}


def _send_resync(connection: WebSocketConnection, reason: str) -> None:
    if connection.stats is not None:
        connection.stats.resyncs += 1
    connection.send_message(resync_required(reason))


def _count_resume(connection: WebSocketConnection) -> None:
    if connection.stats is not None:
        connection.stats.resumes += 1


class Recovery:
    def __init__(
        self,
        router: Router,
        histories: Mapping[str, History],
        watchers: Mapping[str, Watcher],
        collection_of: Callable[[Binding], AsyncCollection[dict[str, Any]]],
        snapshot_limit: int = DEFAULT_SNAPSHOT_LIMIT,
        window_reserve: int = MAX_RESERVE,
        on_resume: Callable[[str], None] | None = None,
    ) -> None:
        self.router = router
        self.histories = histories
        self.watchers = watchers
        self.collection_of = collection_of
        self.snapshot_limit = snapshot_limit
        self.on_resume = on_resume or (lambda _source: None)
        self.windows = router.windows = Windows(
            self._window_documents, self._position_of, window_reserve
        )

    def _position_of(self, binding: Binding) -> str | None:
        watcher = self.watchers.get(binding.database)
        return watcher.position if watcher is not None else None

    async def _window_documents(
        self,
        binding: Binding,
        query: Mapping[str, Any],
        sort: SortSpec,
        count: int,
        leave_out: Sequence[Any],
    ) -> list[dict[str, Any]]:
        return await find_window(self.collection_of(binding), query, sort, count, leave_out)

    # -- resume ------------------------------------------------------------------------------

    def on_connect(self, connection: WebSocketConnection) -> Awaitable[None] | None:
        """Attach a new connection; with `last_event_id`, first send what it missed."""
        self.router.attach(connection)
        last_event_id = connection.websocket.query_params.get("last_event_id")
        database = _database_of(connection)
        if not last_event_id or database is None:
            return None
        # Held from the same tick as attach: no live event falls between replay and live.
        self.router.hold(connection)
        history = self.histories.get(database)
        missed = history.after(last_event_id) if history is not None else None
        if missed is not None:
            return self._replay_memory(connection, missed)
        watcher = self.watchers.get(database)
        if watcher is None:
            _send_resync(connection, "unknown_position")
            return self.release(connection)
        target = history.last_id if history is not None else None
        return self._replay_database(connection, watcher, last_event_id, target)

    async def _send_paced(self, connection: WebSocketConnection, event: Unit) -> None:
        for frame in self.router.frames_for(connection, event):
            await connection.send_paced(frame)

    async def _replay_memory(self, connection: WebSocketConnection, missed: list[Unit]) -> None:
        try:
            for event in missed:  # changes and whole transactions
                await self._send_paced(connection, event)
            _count_resume(connection)
            self.on_resume("memory")
        finally:
            await self.release(connection)

    async def _replay_database(
        self,
        connection: WebSocketConnection,
        watcher: Watcher,
        last_event_id: str,
        target: str | None,
    ) -> None:
        """Send the database's history after `last_event_id` up to the live stream."""
        sent: set[str] = set()
        try:
            idle_polls = 0
            async for event in watcher.read_after(last_event_id):
                if event is None:
                    idle_polls += 1
                    if target is None or idle_polls >= CATCH_UP_IDLE_POLLS:
                        break
                    continue
                idle_polls = 0
                held = connection.pending
                if held is not None and event.event_id in held.ids:
                    break  # caught up with the held live events
                await self._send_paced(connection, event)
                sent.add(event.event_id)
                if event.event_id == target:
                    break
            _count_resume(connection)
            self.on_resume("database")
        except OperationFailure as error:
            reason = "history_lost" if error.code == HISTORY_LOST_CODE else "unknown_position"
            logger.info("resume of %s failed: %s", connection.connection_id, error)
            _send_resync(connection, reason)
        except PyMongoError as error:
            logger.warning("resume of %s failed: %s", connection.connection_id, error)
            _send_resync(connection, "history_unavailable")
        finally:
            await self.release(connection, sent)

    async def release(
        self, connection: WebSocketConnection, already_sent: set[str] | None = None
    ) -> None:
        """Send the held live events in order, paced, then let live events flow directly."""
        while connection.pending is not None:
            held = connection.pending
            if not held.items:
                connection.pending = None  # same tick as the check: nothing slips past
                return
            items, held.items = held.items, []
            for binding, event in items:
                if isinstance(event, str):  # a window's frame, decided already
                    frame: str | None = event
                elif already_sent is not None and event.event_id in already_sent:
                    continue
                else:
                    frame = self.router.frame_for(connection, binding, event)
                if frame is not None and not await connection.send_paced(frame):
                    connection.pending = None
                    return

    # -- snapshots ---------------------------------------------------------------------------

    async def snapshot(
        self, connection: WebSocketConnection, view: View, subscription: Subscription
    ) -> None:
        """The matching documents now, then every change after them."""
        if connection.catch_up is not None:
            await asyncio.shield(connection.catch_up)
        binding = view.binding
        self.router.hold(connection)
        view.add_subscription(subscription)
        watcher = self.watchers.get(binding.database)
        position = watcher.position if watcher is not None else None
        try:
            documents, truncated = await self._matching_documents(connection, view, subscription)
        except PyMongoError as error:
            logger.warning("snapshot for %s failed: %s", connection.connection_id, error)
            connection.send_message(
                error_message(
                    ErrorCode.BAD_MESSAGE, "the snapshot could not be read", subscription.id
                )
            )
            await self.release(connection)
            return
        message: dict[str, Any] = {
            "type": "snapshot",
            "id": subscription.id,
            "collection": binding.collection,
            "documents": documents,
            "event_id": position,
        }
        if truncated:
            message["truncated"] = True
        await connection.send_paced(codec.dumps(message))
        connection.send_message({"type": "subscribed", "id": subscription.id})
        await self.release(connection)

    async def _matching_documents(
        self, connection: WebSocketConnection, view: View, subscription: Subscription
    ) -> tuple[list[dict[str, Any]], bool]:
        query = self._snapshot_query(connection, view, subscription)
        if query is None:
            return [], False
        binding = view.binding
        cursor = (
            self.collection_of(binding).find(query).sort("_id", 1).limit(self.snapshot_limit + 1)
        )
        documents = []
        async for document in cursor:
            if "app_id" in document and document["app_id"] != binding.app_slug:
                continue
            documents.append(document)
        truncated = len(documents) > self.snapshot_limit
        documents = documents[: self.snapshot_limit]
        for document in documents:
            view.remember(document["_id"])
        return [project(d, subscription.fields) for d in documents], truncated

    @staticmethod
    def _snapshot_query(
        connection: WebSocketConnection, view: View, subscription: Subscription
    ) -> dict[str, Any] | None:
        """Binding filter, scope and subscription filter together; None matches nothing."""
        binding = view.binding
        clauses: list[Mapping[str, Any]] = []
        if binding.filter.query:
            clauses.append(binding.filter.query)
        if binding.scope is not None:
            if view.never:
                return None
            scope = substitute_placeholders(
                binding.scope, connection.principal.placeholder_values()
            )
            if scope is None:
                return None
            clauses.append(scope)
        if subscription.filter.query:
            clauses.append(subscription.filter.query)
        return conjunction(clauses)


def _database_of(connection: WebSocketConnection) -> str | None:
    for view in connection.views.values():
        database: str = view.binding.database
        return database
    return None


async def find_window(
    collection: AsyncCollection[dict[str, Any]],
    query: Mapping[str, Any],
    sort: SortSpec,
    count: int,
    leave_out: Sequence[Any],
) -> list[dict[str, Any]]:
    """One bounded query: the first `count` matching documents in order, without the ones
    a window already knows (their fields side by side: see `query.conjunction`)."""
    if leave_out:
        query = conjunction([query, {"_id": {"$nin": list(leave_out)}}])
    cursor = collection.find(query).sort(list(sort)).limit(count)
    return [document async for document in cursor]
