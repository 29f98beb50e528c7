"""An async Python client for mdb-realtime endpoints: reconnects, resumes, keeps a local view.

    async with RealtimeClient("ws://127.0.0.1:8000/todo/ws", token=token) as client:
        await client.subscribe("todos", snapshot=True)
        client.on("change", lambda message: print(message["operation"], message["document"]))
        await client.wait_until(lambda: len(client.documents("todos")) >= 3)

After a lost connection it reconnects with backoff and `last_event_id` (the last change it
saw), so the server replays what it missed. With no position yet, or after
`resync_required`, subscriptions made with `snapshot=True` ask for a snapshot to rebuild the
local view. The same rules drive the browser client, `engine/static/realtime.js`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from engine.identity.client_tokens import (
    GetToken,
    TicketRefused,
    TokenRefresher,
    call_token_source,
    fetch_ticket,
    ticket_url,
)
from engine.localview import LocalView
from engine.rooms.clientside import ClientRooms, JoinedRoom, RoomError

__all__ = ["Backoff", "ClientClosed", "NotConnected", "RealtimeClient", "RoomError"]

logger = logging.getLogger("engine.client")

TokenSource = str | Callable[[], str | Awaitable[str]]
Callback = Callable[[dict[str, Any]], Awaitable[None] | None]

ABNORMAL_CLOSURE = 1006  # the socket went away without a close frame
POLICY_VIOLATION = 1008  # the server refused the token: retrying with the same one is useless
TOKEN_EXPIRED = "token expired"
# Refusals a fresh token (or ticket) from a token callback can cure.
RENEWABLE_REFUSALS = frozenset({TOKEN_EXPIRED, "identity changed", "invalid ticket"})


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect attempt n: initial x factor^n, capped, with random jitter so a
    restarted server is not hit by every client at the same instant."""

    initial: float = 0.5
    maximum: float = 15.0
    factor: float = 2.0
    jitter: float = 0.5  # a delay is drawn from [d x (1 - jitter), d]

    def delay(self, attempt: int) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** max(0, attempt))
        return ceiling * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class Subscription:
    id: str
    collection: str
    filter: Mapping[str, Any] | None = None
    fields: tuple[str, ...] | None = None
    snapshot: bool = True
    sort: Mapping[str, int] | None = None  # with `limit`: a live window (SPEC 13)
    limit: int | None = None

    def message(self, snapshot: bool) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "subscribe",
            "id": self.id,
            "collection": self.collection,
        }
        if self.filter is not None:
            message["filter"] = dict(self.filter)
        if self.fields is not None:
            message["fields"] = list(self.fields)
        if snapshot:
            message["snapshot"] = True
        if self.limit is not None:  # a window always starts from its snapshot
            message["limit"] = self.limit
            if self.sort is not None:
                message["sort"] = dict(self.sort)
        return message


class ClientClosed(Exception):
    """The client stopped for good: closed by its owner, or refused by the server."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if code else reason)
        self.code = code
        self.reason = reason


class NotConnected(ConnectionError):
    """`send` was called while no connection is open."""


class RealtimeClient:
    """One logical connection to one endpoint, kept open across disconnects."""

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None = None,
        last_event_id: str | None = None,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        get_token: GetToken | None = None,
        use_ticket: bool = False,
    ) -> None:
        """`get_token`: a callback (sync or async) returning a fresh token; it is called on
        each connect and before the token expires (the connection is refreshed in place).
        `use_ticket`: trade the token for a single-use ticket (`POST /<slug>/ticket`) on
        each connect, so the token itself is never sent on the WebSocket handshake."""
        if get_token is not None and token is not None:
            raise ValueError("pass either token or get_token, not both")
        self.url = url
        self.view = LocalView(last_event_id)
        self.backoff = backoff or Backoff()
        self.open_timeout = open_timeout
        self.connected_message: dict[str, Any] | None = None
        self.state = "idle"  # idle, connecting, open, waiting (to reconnect), closed
        self.failure: ClientClosed | None = None
        self._token = get_token if get_token is not None else token
        self._use_ticket = use_ticket
        self._refreshes = get_token is not None  # a callable `token` is only read on connect
        self._connected_with: str | None = None  # the token of the current connection
        self._refresher: TokenRefresher | None = None
        self._headers = dict(headers or {})
        self._subscriptions: dict[str, Subscription] = {}
        self._callbacks: dict[str, list[Callback]] = {}
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connected_once: asyncio.Future[dict[str, Any]] | None = None
        self._updated: asyncio.Future[None] | None = None
        self._watchers: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]]] = []
        self._rooms = ClientRooms()

    # -- what users call -------------------------------------------------------------------

    @property
    def last_event_id(self) -> str | None:
        return self.view.last_event_id

    def documents(self, collection: str) -> list[dict[str, Any]]:
        return self.view.documents(collection)

    def window(self, sub_id: str) -> list[dict[str, Any]] | None:
        """A window subscription's documents in its order; None before its snapshot."""
        return self.view.window(sub_id)

    def on(self, kind: str, callback: Callback) -> Callable[[], None]:
        """Call `callback(message)` for server messages of type `kind` (`*`: every one).
        Also: `disconnected` ({"code", "reason"}) and `closed` (the client stopped for good).
        Async callbacks are awaited in order, before the next message is read."""
        self._callbacks.setdefault(kind, []).append(callback)
        return lambda: self._callbacks[kind].remove(callback)

    async def connect(self, timeout: float = 30.0) -> dict[str, Any]:
        """Start the client and wait for the first `connected` message."""
        if self._task is None:
            self._closing = False
            self._connected_once = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name=f"realtime-client {self.url}")
        assert self._connected_once is not None
        return await asyncio.wait_for(asyncio.shield(self._connected_once), timeout)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if self._ws is not None:
            await self._ws.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state("closed")

    async def __aenter__(self) -> RealtimeClient:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def send(self, message: Mapping[str, Any]) -> None:
        if self._ws is None or self.state != "open":
            raise NotConnected("not connected; the client reconnects by itself")
        await self._ws.send(json.dumps(message))

    async def subscribe(
        self,
        collection: str,
        *,
        filter: Mapping[str, Any] | None = None,
        fields: list[str] | tuple[str, ...] | None = None,
        snapshot: bool = True,
        id: str | None = None,
        sort: Mapping[str, int] | None = None,
        limit: int | None = None,
    ) -> str:
        """Narrow what arrives from `collection` (kept across reconnects); the subscription id.
        With `snapshot`, the collection's local view is (re)built from a server snapshot.
        With `limit` (and `sort`), a live window: `window(id)` is its documents in order."""
        sub = Subscription(
            id or f"sub-{next(self._ids)}",
            collection,
            filter,
            tuple(fields) if fields is not None else None,
            snapshot or limit is not None,
            sort,
            limit,
        )
        self._subscriptions[sub.id] = sub
        if self.state == "open":
            await self.send(sub.message(snapshot))
        return sub.id

    async def unsubscribe(self, sub_id: str) -> None:
        if self._subscriptions.pop(sub_id, None) is not None and self.state == "open":
            await self.send({"type": "unsubscribe", "id": sub_id})

    # -- rooms (SPEC 11; see engine/rooms/clientside.py) -------------------------------------

    async def join(
        self,
        room: str,
        *,
        info: Mapping[str, Any] | None = None,
        history: bool = False,
        on_message: Callback | None = None,
        on_presence: Callable[..., Awaitable[None] | None] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Join a room (joined again after reconnects); the `joined` reply. Raises RoomError
        when refused. `on_message(message)` gets room messages, `on_presence(members, frame)`
        the members whenever they change."""
        joined = JoinedRoom(
            dict(info) if info is not None else None, history, on_message, on_presence
        )
        message, reply = self._rooms.join_request(room, joined)
        return await self._room_request(message, reply, timeout)

    async def leave(self, room: str, timeout: float = 30.0) -> dict[str, Any]:
        self._rooms.rooms.pop(room, None)
        message, reply = self._rooms.request({"type": "leave", "room": room})
        return await self._room_request(message, reply, timeout)

    async def publish(self, room: str, data: Mapping[str, Any], timeout: float = 30.0) -> str:
        """Publish to a room; the message id."""
        message, reply = self._rooms.request({"type": "publish", "room": room, "data": dict(data)})
        return str((await self._room_request(message, reply, timeout))["message_id"])

    def members(self, room: str) -> list[dict[str, Any]]:
        """The members of a joined room with presence: [{user_id, connection_id, info}]."""
        joined = self._rooms.rooms.get(room)
        return list(joined.members.values()) if joined is not None else []

    async def _room_request(
        self, message: dict[str, Any], reply: asyncio.Future[dict[str, Any]], timeout: float
    ) -> dict[str, Any]:
        if self._ws is not None and self.state == "open":
            with contextlib.suppress(ConnectionClosed):  # sent again once reconnected
                await self._ws.send(json.dumps(message))
        return await asyncio.wait_for(reply, timeout)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds; it is checked after every message and state change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._updated is None or self._updated.done():
                    self._updated = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._updated)

    def next_message(
        self,
        kind: str | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
    ) -> Awaitable[dict[str, Any]]:
        """The first message from now on with type `kind` that satisfies `predicate`. It is
        registered at the call, so a message that arrives before the await is not missed:
        `reply = client.next_message("echo"); await client.send(...); await reply`."""

        def wanted(message: dict[str, Any]) -> bool:
            return (kind is None or message.get("type") == kind) and (
                predicate is None or predicate(message)
            )

        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._watchers.append(entry)
        return self._wait_for_message(entry, timeout)

    async def _wait_for_message(
        self,
        entry: tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]],
        timeout: float,
    ) -> dict[str, Any]:
        try:
            message: dict[str, Any] = await asyncio.wait_for(entry[1], timeout)
            return message
        finally:
            if entry in self._watchers:
                self._watchers.remove(entry)

    # -- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self._set_state("connecting")
            ending = await self._connect_once()
            self._ws = None
            if self._closing:
                break
            if ending.opened:  # the server let us in: start backing off from scratch
                attempt = 0
            if not self._should_retry(ending.code, ending.reason, ending.http_status):
                await self._stop(ClientClosed(ending.code, ending.reason))
                return
            await self._emit(
                "disconnected",
                {"type": "disconnected", "code": ending.code, "reason": ending.reason},
            )
            self._set_state("waiting")
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1
        self._set_state("closed")

    async def _connect_once(self) -> _Ending:
        """One connection, from handshake to close."""
        opened = False
        try:
            headers = dict(self._headers)
            token = await self._current_token()
            self._connected_with = token
            ticket = None
            if token and self._use_ticket:
                ticket = await fetch_ticket(ticket_url(self.url), token)
            elif token:
                headers["Authorization"] = f"Bearer {token}"
            async with websockets.connect(
                self._url(ticket),
                additional_headers=headers,
                open_timeout=self.open_timeout,
                max_size=None,
                ping_interval=None,  # the protocol has its own keepalive
            ) as ws:
                self._ws = ws
                async for raw in ws:
                    opened = await self._receive(ws, raw) or opened
                return _Ending(ws.close_code, ws.close_reason or "", opened)
        except ConnectionClosed as closed:
            frame = closed.rcvd
            if frame is None:
                return _Ending(ABNORMAL_CLOSURE, "connection lost", opened)
            return _Ending(frame.code, frame.reason, opened)
        except InvalidStatus as refused:
            status = refused.response.status_code
            return _Ending(None, f"handshake refused with HTTP {status}", opened, status)
        except TicketRefused as refused:
            return _Ending(None, str(refused), opened, refused.status)
        except (OSError, InvalidHandshake, TimeoutError) as error:
            return _Ending(None, f"cannot connect: {type(error).__name__}: {error}", opened)
        finally:
            if self._refresher is not None:
                self._refresher.stop()
                self._refresher = None

    def _should_retry(self, code: int | None, reason: str, http_status: int | None = None) -> bool:
        if http_status is not None:  # a refused handshake: only a server-side hiccup is retried
            return http_status >= 500 or http_status == 429
        if code == POLICY_VIOLATION:
            # A refused token: only a token source can offer a new one.
            return callable(self._token) and reason in RENEWABLE_REFUSALS
        return True

    def _url(self, ticket: str | None = None) -> str:
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("last_event_id", "ticket")]
        if self.view.last_event_id is not None:
            query.append(("last_event_id", self.view.last_event_id))
        if ticket is not None:
            query.append(("ticket", ticket))
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _current_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        return await call_token_source(self._token)

    # -- messages --------------------------------------------------------------------------

    async def _receive(self, ws: ClientConnection, raw: str | bytes) -> bool:
        """Handle one frame; True if it was the `connected` message."""
        try:
            message = json.loads(raw)
        except ValueError:
            logger.warning("ignoring a frame that is not JSON")
            return False
        if not isinstance(message, dict):
            return False
        kind = message.get("type")
        if kind == "ping":
            await ws.send('{"type":"pong"}')
        elif kind == "connected":
            await self._opened(ws, message)
        elif kind == "resync_required":
            await self._resubscribe(ws, snapshot_only=True)
        else:
            self.view.apply(message)
            position = await self._rooms.handle(message)
            if position is not None:
                self.view.last_event_id = position
        if self._refresher is not None:
            self._refresher.on_message(message)
        await self._emit(str(kind), message)
        await self._emit("*", message)
        for wanted, future in list(self._watchers):
            if not future.done() and wanted(message):
                future.set_result(message)
        self._notify()
        return kind == "connected"

    async def _opened(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        self.connected_message = message
        self._set_state("open")
        if self._refreshes and callable(self._token) and self._refresher is None:
            self._refresher = TokenRefresher(self._token, lambda m: ws.send(json.dumps(m)))
            self._refresher.start(self._connected_with)
        # With a position the server replays what was missed: subscriptions only narrow again.
        # Without one, snapshots rebuild the views.
        await self._resubscribe(ws, snapshot_only=False)
        for rejoin in self._rooms.rejoin_messages():
            await ws.send(json.dumps(rejoin))
        if self._connected_once is not None and not self._connected_once.done():
            self._connected_once.set_result(message)

    async def _resubscribe(self, ws: ClientConnection, snapshot_only: bool) -> None:
        fresh = self.view.last_event_id is None
        for sub in list(self._subscriptions.values()):
            if snapshot_only and not sub.snapshot:
                continue
            snapshot = sub.snapshot and (fresh or snapshot_only)
            await ws.send(json.dumps(sub.message(snapshot)))

    async def _emit(self, kind: str, message: dict[str, Any]) -> None:
        for callback in list(self._callbacks.get(kind, ())):
            try:
                outcome = callback(message)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                logger.exception("realtime client callback for %r failed", kind)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._notify()

    def _notify(self) -> None:
        if self._updated is not None and not self._updated.done():
            self._updated.set_result(None)

    async def _stop(self, failure: ClientClosed) -> None:
        self.failure = failure
        self._rooms.fail_all(failure)
        self._set_state("closed")
        logger.warning("realtime client stopped: %s", failure)
        if self._connected_once is not None and not self._connected_once.done():
            self._connected_once.set_exception(failure)
        for _wanted, future in self._watchers:
            if not future.done():
                future.set_exception(failure)
        await self._emit(
            "closed", {"type": "closed", "code": failure.code, "reason": failure.reason}
        )


@dataclass(frozen=True)
class _Ending:
    """How one connection ended."""

    code: int | None  # WebSocket close code; None when it never opened
    reason: str
    opened: bool  # the server sent `connected`
    http_status: int | None = None  # the handshake was refused with this status
