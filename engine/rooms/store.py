"""Presence state in MongoDB: who is in which room on which process, with heartbeats.

Each membership of a room with `presence` is one document of `_mdb_realtime_presence` in the
app's database. Writes are queued and batched (`insert_many` / `delete_many`), in order, and
only once a write is done does the process publish the presence event on the bus, so another
process that reads the room never misses a member whose event it had not yet seen.

Each process refreshes `at` on its own documents and on its entry in
`_mdb_realtime_processes` every `heartbeat_seconds`. A process whose entry is older than
`timeout_seconds` is gone (killed): the others drop its members and delete its documents.
A TTL index on `at` removes leftovers on MongoDB as well; readers never rely on it (its
sweep runs once a minute on MongoDB), they skip documents older than the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

logger = logging.getLogger("engine.rooms.store")

PRESENCE_COLLECTION = "_mdb_realtime_presence"
PROCESSES_COLLECTION = "_mdb_realtime_processes"
DEFAULT_HEARTBEAT_SECONDS = 5.0
DEFAULT_TIMEOUT_SECONDS = 15.0  # with the heartbeat: a killed process is gone within 20 s
RETRY_SECONDS = 1.0
DUPLICATE_KEY = 11000
INSERT, DELETE = "insert", "delete"


@dataclass(frozen=True)
class PresenceTiming:
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS


@dataclass
class _Write:
    database: str
    kind: str  # INSERT or DELETE
    document: dict[str, Any]  # the document to insert; for a delete, {"_id": ...}
    done: Callable[[], None]  # runs once the write is in the database


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PresenceStore:
    """Batched presence writes, heartbeats and reads for one process."""

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        origin: str,
        timing: PresenceTiming,
        on_heartbeat: Callable[[], Any] | None = None,
    ) -> None:
        self.client = client
        self.origin = origin
        self.timing = timing
        self.on_heartbeat = on_heartbeat  # called after each heartbeat (the sweep for the dead)
        self.databases: set[str] = set()
        self._writes: list[_Write] = []
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, databases: set[str]) -> None:
        await self.add_databases(databases)
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="presence-writer"),
            asyncio.create_task(self._heartbeat_loop(), name="presence-heartbeat"),
        ]

    async def add_databases(self, databases: set[str]) -> None:
        """Keep presence in these databases too (apps registered later may use new ones)."""
        new = set(databases) - self.databases
        expire = max(1, math.ceil(self.timing.timeout_seconds))
        for database in new:
            with contextlib.suppress(PyMongoError):
                presence = self.client[database][PRESENCE_COLLECTION]
                await presence.create_index([("app", 1), ("room", 1)])
                await presence.create_index("origin")
                await presence.create_index("at", expireAfterSeconds=expire)
                processes = self.client[database][PROCESSES_COLLECTION]
                await processes.create_index("at", expireAfterSeconds=expire)
        self.databases |= new
        if new:
            await self._heartbeat_once()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Write what is pending (briefly), then stop; this process's entry is removed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), flush_timeout)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for database in self.databases:
            with contextlib.suppress(PyMongoError):
                await self.client[database][PRESENCE_COLLECTION].delete_many(
                    {"origin": self.origin}
                )
                await self.client[database][PROCESSES_COLLECTION].delete_one({"_id": self.origin})

    async def _drained(self) -> None:
        while self._writes:
            await asyncio.sleep(0.01)

    # -- writes ----------------------------------------------------------------------------

    def insert(self, database: str, document: dict[str, Any], done: Callable[[], None]) -> None:
        document = {**document, "origin": self.origin, "at": _now()}
        self._queue(_Write(database, INSERT, document, done))

    def delete(self, database: str, document_id: ObjectId, done: Callable[[], None]) -> None:
        self._queue(_Write(database, DELETE, {"_id": document_id}, done))

    def _queue(self, write: _Write) -> None:
        self._writes.append(write)
        self._wakeup.set()

    async def _write_loop(self) -> None:
        while True:
            if not self._writes:
                self._wakeup.clear()
                await self._wakeup.wait()
            run = self._next_run()
            try:
                await self._write(run)
            except PyMongoError as error:
                logger.warning("writing presence failed (%s); retrying", error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            del self._writes[: len(run)]
            for write in run:
                write.done()

    def _next_run(self) -> list[_Write]:
        """The longest prefix of pending writes of one kind to one database: one command."""
        first = self._writes[0]
        run = []
        for write in self._writes:
            if write.kind != first.kind or write.database != first.database or len(run) >= 1000:
                break
            run.append(write)
        return run

    async def _write(self, run: list[_Write]) -> None:
        collection = self.client[run[0].database][PRESENCE_COLLECTION]
        if run[0].kind == DELETE:
            await collection.delete_many({"_id": {"$in": [w.document["_id"] for w in run]}})
            return
        try:
            await collection.insert_many([w.document for w in run], ordered=False)
        except BulkWriteError as error:  # a retried batch: what went in before is fine
            codes = {e.get("code") for e in error.details.get("writeErrors", [])}
            if codes - {DUPLICATE_KEY}:
                raise

    # -- heartbeats ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.heartbeat_seconds)
            try:
                await self._heartbeat_once()
                if self.on_heartbeat is not None:
                    await self.on_heartbeat()
            except PyMongoError as error:
                logger.warning("presence heartbeat failed: %s", error)
            except Exception:
                logger.exception("presence heartbeat failed")

    async def _heartbeat_once(self) -> None:
        now = _now()
        for database in self.databases:
            db = self.client[database]
            await db[PROCESSES_COLLECTION].update_one(
                {"_id": self.origin}, {"$set": {"at": now}}, upsert=True
            )
            await db[PRESENCE_COLLECTION].update_many(
                {"origin": self.origin}, {"$set": {"at": now}}
            )

    # -- reads -----------------------------------------------------------------------------

    def _fresh_since(self) -> dt.datetime:
        return _now() - dt.timedelta(seconds=self.timing.timeout_seconds)

    async def members(self, database: str, app: str, room: str) -> list[dict[str, Any]]:
        """The stored members of a room (one read), without those of processes gone quiet."""
        query = {"app": app, "room": room, "at": {"$gte": self._fresh_since()}}
        cursor = self.client[database][PRESENCE_COLLECTION].find(query).sort("_id", 1)
        return [document async for document in cursor]

    async def gone(self, database: str, origins: set[str]) -> set[str]:
        """The processes among `origins` whose heartbeat stopped (or whose entry is gone)."""
        if not origins:
            return set()
        cursor = self.client[database][PROCESSES_COLLECTION].find(
            {"_id": {"$in": sorted(origins)}, "at": {"$gte": self._fresh_since()}}, {"_id": 1}
        )
        alive = {document["_id"] async for document in cursor}
        return origins - alive

    async def forget(self, database: str, origin: str) -> None:
        """Delete what a process that is gone left behind (any process may; idempotent)."""
        await self.client[database][PRESENCE_COLLECTION].delete_many({"origin": origin})
        await self.client[database][PROCESSES_COLLECTION].delete_one({"_id": origin})
