"""Broadcasts between engine processes, carried by MongoDB itself.

`broadcast_to_app` delivers to this process's connections at once and publishes the message
to a collection of the app's database; every process tails that collection in the same
change stream as the app's data, delivers messages published elsewhere, and skips its own.
Publishing is batched and runs beside the caller, so a broadcast never waits for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

logger = logging.getLogger("engine.bus")

BUS_COLLECTION = "_mdb_realtime_bus"
DEFAULT_BUS_TTL_SECONDS = 3600  # how long published messages stay for resumes elsewhere
DEFAULT_MAX_PENDING = 100_000
BATCH_SIZE = 1000
RETRY_SECONDS = 1.0
DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class BusMessage:
    """A broadcast as another process reads it from the bus."""

    app_slug: str
    user_id: str | None
    message: Mapping[str, Any]
    origin: str


def parse_bus_document(document: Mapping[str, Any]) -> BusMessage | None:
    message = document.get("message")
    app = document.get("app")
    if not isinstance(message, Mapping) or not isinstance(app, str):
        return None
    user_id = document.get("user_id")
    return BusMessage(
        app_slug=app,
        user_id=str(user_id) if user_id is not None else None,
        message=message,
        origin=str(document.get("origin", "")),
    )


class Bus:
    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        database_of: Callable[[str], str | None],
        origin: str,
        ttl_seconds: int = DEFAULT_BUS_TTL_SECONDS,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.client = client
        self.database_of = database_of
        self.origin = origin
        self.ttl_seconds = ttl_seconds
        self._pending: deque[tuple[str, dict[str, Any]]] = deque(maxlen=max_pending)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0

    async def start(self, databases: set[str]) -> None:
        for database in databases:
            with contextlib.suppress(PyMongoError):
                await self.client[database][BUS_COLLECTION].create_index(
                    "at", expireAfterSeconds=self.ttl_seconds
                )
        self._task = asyncio.create_task(self._run(), name="bus-publisher")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Publish what is still pending (briefly), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), flush_timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _drained(self) -> None:
        while self._pending:
            await asyncio.sleep(0.01)

    def publish(self, app_slug: str, message: Mapping[str, Any], user_id: str | None) -> bool:
        """Queue a broadcast for the other processes; False for an app not served here."""
        fields = {"user_id": user_id, "message": dict(message)}
        return self.publish_document(app_slug, fields) is not None

    def publish_document(self, app_slug: str, fields: Mapping[str, Any]) -> ObjectId | None:
        """Queue any bus document of an app (rooms use their own kinds); its `_id`, or None
        for an app not served here. Documents without `message` are not app broadcasts."""
        database = self.database_of(app_slug)
        if database is None:
            return None
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
            logger.error("bus backlog full: the oldest unpublished broadcast is dropped")
        document_id = ObjectId()  # fixed before the first try, so a retry cannot publish twice
        document = {
            "_id": document_id,
            "app": app_slug,
            **fields,
            "origin": self.origin,
            "at": dt.datetime.now(dt.UTC),
        }
        self._pending.append((database, document))
        self._wakeup.set()
        return document_id

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._pending[i] for i in range(min(BATCH_SIZE, len(self._pending)))]
            try:
                await self._insert(batch)
            except PyMongoError as error:
                logger.warning("publishing broadcasts failed (%s); retrying", error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for _ in batch:
                self._pending.popleft()
            self.published += len(batch)

    async def _insert(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        by_database: dict[str, list[dict[str, Any]]] = {}
        for database, document in batch:
            by_database.setdefault(database, []).append(document)
        for database, documents in by_database.items():
            try:
                await self.client[database][BUS_COLLECTION].insert_many(documents, ordered=False)
            except BulkWriteError as error:
                # A retried batch: what was inserted before has the same _id; that is fine.
                codes = {e.get("code") for e in error.details.get("writeErrors", [])}
                if codes - {DUPLICATE_KEY}:
                    raise
