"""Tails one database's change stream and hands every data change to the router.

One stream per database: its pipeline matches exactly the bound namespaces and operations, so
MongoDB filters before anything crosses the network. Transient errors reconnect with backoff
and resume from the last position; an invalidated stream is restarted after the invalidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NamedTuple

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure, PyMongoError

from engine.changes import LIFECYCLE_OPERATIONS, event_id_of, normalize
from engine.transactions import (
    TRANSACTION_IDLE_SECONDS,
    TransactionGrouper,
    Unit,
    transaction_key,
)

logger = logging.getLogger("engine.watcher")

INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0
OPEN_TIMEOUT_SECONDS = 15.0
MAX_AWAIT_MS = 500  # how long one empty poll waits for events; bounds reopen latency
PREFETCH_EVENTS = 1000  # changes read ahead of routing at most
# Server answers that mean "this resume position cannot be used any more".
_POSITION_LOST_CODES = frozenset({260, 280, 286})

EventSink = Callable[[Unit], Any]  # a change, or a whole transaction


def build_pipeline(collections: Mapping[str, frozenset[str]]) -> list[dict[str, Any]]:
    """A $match on exactly these collections and, for each, its operations (plus the events
    that drop or invalidate them, which the watcher logs and handles)."""
    names = sorted(collections)
    clauses: list[dict[str, Any]] = [
        {"ns.coll": name, "operationType": {"$in": sorted(collections[name])}} for name in names
    ]
    clauses.append({"ns.coll": {"$in": names}, "operationType": {"$in": ["drop", "rename"]}})
    clauses.append({"operationType": {"$in": ["dropDatabase", "invalidate"]}})
    return [{"$match": {"$or": clauses}}]


def stream_options(resume_token: Mapping[str, Any] | None, start_after: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "full_document": "updateLookup",
        "full_document_before_change": "whenAvailable",
        "max_await_time_ms": MAX_AWAIT_MS,
    }
    if resume_token is not None:
        options["start_after" if start_after else "resume_after"] = resume_token
    return options


class _Fetched(NamedTuple):
    """One read of the stream: a change and its position, a position alone (caught up), or
    the error that ended the reading."""

    raw: Mapping[str, Any] | None
    token: Mapping[str, Any] | None
    error: BaseException | None = None


async def _read(stream: Any, fetched: asyncio.Queue[_Fetched]) -> None:
    """Read the stream ahead of routing, into a bounded queue, in order."""
    try:
        while True:
            raw = await stream.try_next()
            if raw is None:
                await fetched.put(_Fetched(None, stream.resume_token))
            else:
                await fetched.put(_Fetched(raw, raw.get("_id")))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        await fetched.put(_Fetched(None, None, error))


class Watcher:
    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        database: str,
        collections: Mapping[str, frozenset[str]],
        sink: EventSink,
        resume_token: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.database = database
        self.collections = dict(collections)
        self.sink = sink
        # Where everything routed ends: always after a whole unit, never inside a transaction.
        self.resume_token: Mapping[str, Any] | None = resume_token
        self.transaction_idle = TRANSACTION_IDLE_SECONDS
        self._grouper = TransactionGrouper()
        self._idle_flush: asyncio.TimerHandle | None = None
        self.last_error: str | None = None
        self._start_after = False  # the token is an invalidate event's
        self._task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()
        self._restart = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._open.is_set() and self._task is not None and not self._task.done()

    async def start(self, timeout: float = OPEN_TIMEOUT_SECONDS) -> None:
        """Start tailing and wait until the stream is open: writes after this are seen."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"watcher-{self.database}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._open.wait(), timeout)

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._open.clear()
        self._drop_open_transaction()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def watch(self, collections: Mapping[str, frozenset[str]]) -> None:
        """Change what is watched; the stream reopens at its current position (no gap)."""
        self.collections = dict(collections)
        if self._task is not None and not self._task.done():
            self._open.clear()
            self._restart.set()
            await self.start()

    async def _run(self) -> None:
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            try:
                await self._tail()
                backoff = INITIAL_BACKOFF_SECONDS
            except asyncio.CancelledError:
                raise
            except PyMongoError as error:
                self._open.clear()
                self.last_error = f"{type(error).__name__}: {error}"
                if self._position_lost(error):
                    continue
                logger.warning(
                    "change stream on %r failed (%s); retrying in %.1f s",
                    self.database,
                    self.last_error,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)

    def _position_lost(self, error: PyMongoError) -> bool:
        if not isinstance(error, OperationFailure) or error.code not in _POSITION_LOST_CODES:
            return False
        logger.error(
            "change stream on %r cannot resume from its position (%s); restarting from now",
            self.database,
            error,
        )
        self.resume_token, self._start_after = None, False
        return True

    async def _tail(self) -> None:
        options = stream_options(self.resume_token, self._start_after)
        database = self.client[self.database]
        self._restart.clear()
        self._drop_open_transaction()  # reopened at a unit's end: its events come again
        async with await database.watch(build_pipeline(self.collections), **options) as stream:
            self._start_after = False
            if self.resume_token is None:
                self.resume_token = stream.resume_token  # resume from here, not from "now"
            self.last_error = None
            self._open.set()
            # The next batch is asked for while this one is routed, so routing and the
            # database's work overlap instead of adding up.
            fetched: asyncio.Queue[_Fetched] = asyncio.Queue(PREFETCH_EVENTS)
            reader = asyncio.create_task(_read(stream, fetched), name=f"reader-{self.database}")
            try:
                await self._route_fetched(fetched)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, PyMongoError):
                    await reader

    async def _route_fetched(self, fetched: asyncio.Queue[_Fetched]) -> None:
        while not self._restart.is_set():
            raw, token, error = await fetched.get()
            if error is not None:
                raise error
            if raw is not None and not self._handle(raw):
                return
            if token is not None and not self._grouper.open:
                self.resume_token = token  # never a position inside a transaction
            if raw is not None:
                # Let socket writers run between events: a burst (insert_many) is then paced
                # to the readers instead of landing in their queues all at once.
                await asyncio.sleep(0)

    async def read_after(self, event_id: str) -> AsyncIterator[Unit | None]:
        """The database's own history after `event_id`, through the same pipeline and in the
        same units (transactions whole); None is yielded whenever the stream is caught up with
        the server (the caller decides to stop). Raises OperationFailure when the position is
        unknown or no longer in history."""
        database = self.client[self.database]
        options = stream_options({"_data": event_id}, start_after=False)
        grouper = TransactionGrouper()
        async with await database.watch(build_pipeline(self.collections), **options) as stream:
            while True:
                raw = await stream.try_next()
                if raw is None:
                    for unit in grouper.flush():
                        yield unit
                    yield None
                    continue
                event = normalize(raw)
                if event is not None:
                    for unit in grouper.add(event, transaction_key(raw)):
                        yield unit

    @property
    def position(self) -> str | None:
        """The stream's position: every event up to it has been routed."""
        return event_id_of(self.resume_token) if self.resume_token is not None else None

    def _handle(self, raw: Mapping[str, Any]) -> bool:
        """Deliver one raw change; False when the stream must be reopened."""
        operation = raw.get("operationType")
        if operation in LIFECYCLE_OPERATIONS:
            self._flush_transaction()
            namespace = raw.get("ns") or {}
            logger.warning("change stream on %r saw %s of %s", self.database, operation, namespace)
            if operation == "invalidate":
                self.resume_token, self._start_after = raw["_id"], True
                self._open.clear()
                return False
            return True
        event = normalize(raw)
        if event is not None:
            for unit in self._grouper.add(event, transaction_key(raw)):
                self._deliver(unit)
            self._arm_idle_flush()
        return True

    def _deliver(self, unit: Unit) -> None:
        self.resume_token = unit.resume_token
        try:
            self.sink(unit)
        except Exception:
            logger.exception("routing a change of %s failed", unit.database)

    def _arm_idle_flush(self) -> None:
        if self._idle_flush is not None:
            self._idle_flush.cancel()
            self._idle_flush = None
        if self._grouper.open:
            loop = asyncio.get_running_loop()
            self._idle_flush = loop.call_later(self.transaction_idle, self._flush_transaction)

    def _flush_transaction(self) -> None:
        if self._idle_flush is not None:
            self._idle_flush.cancel()
            self._idle_flush = None
        for unit in self._grouper.flush():
            self._deliver(unit)

    def _drop_open_transaction(self) -> None:
        if self._idle_flush is not None:
            self._idle_flush.cancel()
            self._idle_flush = None
        self._grouper = TransactionGrouper()


async def enable_pre_images(database: AsyncDatabase[dict[str, Any]], names: Iterable[str]) -> None:
    """Record pre-images on watched collections, so deletes and updates that leave a scope are
    checked against the document as it was. Where the server refuses, the router falls back
    to remembering what each connection was sent."""
    existing = set(await database.list_collection_names())
    for name in names:
        try:
            if name not in existing:
                with contextlib.suppress(CollectionInvalid):
                    await database.create_collection(name)
            await database.command("collMod", name, changeStreamPreAndPostImages={"enabled": True})
        except PyMongoError as error:
            logger.warning(
                "pre-images unavailable on %s.%s (%s): deletes in scoped bindings rely on "
                "what each connection was sent",
                database.name,
                name,
                error,
            )
