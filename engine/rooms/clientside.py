"""Rooms for the Python client (`engine.client.RealtimeClient`): state and replies, no I/O.

Rooms joined are joined again after every reconnect; with the resume position the server
sends the room messages missed meanwhile. A message already seen (same `message_id`) is not
passed on twice. Members are kept by connection id: `joined` gives the list, `presence`
frames (one event, or `events` for several) change it. The browser twin is
`engine/static/rooms.js`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Callback = Callable[..., Awaitable[None] | None]
SEEN_LIMIT = 1000  # message ids remembered per room to drop repeats


class RoomError(Exception):
    """The server refused a room request (`code`: forbidden_room, unknown_room, ...)."""

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.code = reply.get("code")
        self.reply = dict(reply)


@dataclass
class JoinedRoom:
    info: Any = None
    history: bool = False
    on_message: Callback | None = None
    on_presence: Callback | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=SEEN_LIMIT))


@dataclass
class _Request:
    message: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]


class ClientRooms:
    def __init__(self) -> None:
        self.rooms: dict[str, JoinedRoom] = {}
        self._waiting: dict[str, _Request] = {}
        self._ids = itertools.count(1)

    def join_request(
        self, room: str, joined: JoinedRoom
    ) -> tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]:
        self.rooms[room] = joined
        return self.request(self.join_message(room, joined))

    def join_message(self, room: str, joined: JoinedRoom) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "join", "room": room}
        if joined.info is not None:
            message["info"] = joined.info
        if joined.history:
            message["history"] = True
        return message

    def request(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]:
        ref = f"room-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ref] = _Request(message, future)
        return {**message, "id": ref}, future

    def rejoin_messages(self) -> list[dict[str, Any]]:
        """What to send after (re)connecting. A publish still unanswered is refused: it may
        or may not have gone out, and sending it again could repeat it."""
        joins: dict[str, str] = {}
        for ref, waiting in list(self._waiting.items()):
            kind = waiting.message["type"]
            if kind == "join":
                joins[waiting.message["room"]] = ref
                continue
            del self._waiting[ref]
            if waiting.future.done():
                continue
            if kind == "leave":
                waiting.future.set_result(
                    {"type": "left", "id": ref, "room": waiting.message["room"]}
                )
            else:
                reply = {"code": "disconnected", "message": "connection lost before the answer"}
                waiting.future.set_exception(RoomError(reply))
        return [
            {**self.join_message(room, joined), "id": joins.get(room) or f"room-{next(self._ids)}"}
            for room, joined in self.rooms.items()
        ]

    def fail_all(self, error: BaseException) -> None:
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(error)
        self._waiting.clear()

    async def handle(self, message: Mapping[str, Any]) -> str | None:
        """Apply a server message; the resume position it carries (room messages), else None."""
        kind = message.get("type")
        if kind == "joined":
            await self._joined(message)
        elif kind == "room_message":
            await self._message(message)
        elif kind == "presence":
            await self._presence(message)
        ref = message.get("ref") if kind == "error" else message.get("id")
        waiting = self._waiting.get(ref) if isinstance(ref, str) else None
        if waiting is not None and kind in ("joined", "left", "published", "error"):
            del self._waiting[ref]  # type: ignore[arg-type]
            if not waiting.future.done():
                if kind == "error":
                    waiting.future.set_exception(RoomError(message))
                else:
                    waiting.future.set_result(dict(message))
        position = message.get("id")
        return position if kind == "room_message" and isinstance(position, str) else None

    async def _joined(self, message: Mapping[str, Any]) -> None:
        joined = self.rooms.get(str(message.get("room")))
        if joined is None:
            return
        members = message.get("members")
        if isinstance(members, list):
            joined.members = {m["connection_id"]: m for m in members}
            await _call(joined.on_presence, list(joined.members.values()), dict(message))
        for past in message.get("history") or ():
            await self._message({**past, "room": message.get("room")})

    async def _message(self, message: Mapping[str, Any]) -> None:
        joined = self.rooms.get(str(message.get("room")))
        message_id = message.get("message_id")
        if joined is None or message_id in joined.seen:
            return
        joined.seen.append(str(message_id))
        await _call(joined.on_message, dict(message))

    async def _presence(self, message: Mapping[str, Any]) -> None:
        joined = self.rooms.get(str(message.get("room")))
        if joined is None:
            return
        for item in message.get("events") or [message]:
            member = item.get("member") or {}
            if item.get("event") == "join":
                joined.members[member["connection_id"]] = member
            elif item.get("event") == "leave":
                joined.members.pop(member.get("connection_id"), None)
        await _call(joined.on_presence, list(joined.members.values()), dict(message))


async def _call(callback: Callback | None, *args: Any) -> None:
    if callback is None:
        return
    outcome = callback(*args)
    if inspect.isawaitable(outcome):
        await outcome
