"""Rooms on one engine process: joins, leaves, publishes, presence, and delivery from the bus.

Membership on this process is a dict room -> members (connections), so delivering a room
message costs what its recipients cost. Room messages and presence events travel through
the engine's bus (a MongoDB collection tailed in the change stream):

- a room message is delivered from the change stream on every process, this one included,
  so all members see one order (MongoDB's commit order) and each message carries its resume
  position `id`; a client that resumes with `last_event_id` and joins again gets what it
  missed;
- a presence change is applied here at once and published after its presence document is
  written (`store`); the other processes apply it from the change stream.

Presence frames are batched per room: every `batch_seconds` each member gets one frame with
the interval's events. A member that is still joining (its rule, members list or history is
being read) holds what arrives and gets it right after `joined`, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from engine import codec, protocol
from engine.bus import BUS_COLLECTION, Bus
from engine.changes import ChangeEvent
from engine.history import History
from engine.hub import WebSocketConnection
from engine.manifest import Manifest, RoomConfig
from engine.protocol import ErrorCode
from engine.rooms.documents import (
    NOBODY,
    PRESENCE_KIND,
    ROOM_MESSAGE_KIND,
    member_of,
    presence_fields,
    room_message,
    room_message_fields,
)
from engine.rooms.history import missed_since, stored_history
from engine.rooms.patterns import RoomPattern, parse_pattern, valid_room_name
from engine.rooms.presence import JOIN, LEAVE, Member, PresenceBatch, RoomPresence
from engine.rooms.rules import (
    JoinRule,
    membership_queries,
    parse_join_rule,
    query_rule_allows,
)
from engine.rooms.store import PresenceStore, PresenceTiming

logger = logging.getLogger("engine.rooms")

DEFAULT_BATCH_SECONDS = 0.2  # presence frames: at most one per member per room per interval
MAX_INFO_BYTES = 4096

ProtocolHandler = Callable[[WebSocketConnection, dict[str, Any]], Awaitable[None] | None]


@dataclass(frozen=True)
class RoomKind:
    """One `rooms` entry of one endpoint."""

    pattern: RoomPattern
    config: RoomConfig
    rule: JoinRule


@dataclass(eq=False, slots=True)
class Membership:
    connection: WebSocketConnection
    member: Member
    document_id: ObjectId | None = None  # its presence document, where the room tracks presence
    held: list[tuple[str | None, str]] | None = None  # (message_id, frame) while joining


@dataclass(eq=False)
class LocalRoom:
    """A room with members on this process."""

    app_slug: str
    name: str
    kind: RoomKind
    database: str
    members: dict[str, Membership] = field(default_factory=dict)  # by connection id
    ready: dict[str, WebSocketConnection] = field(default_factory=dict)  # members done joining
    presence: RoomPresence | None = None
    loading: asyncio.Future[None] | None = None
    batch: PresenceBatch = field(default_factory=PresenceBatch)
    flush: asyncio.TimerHandle | None = None

    def deliver(self, frame: str, message_id: str | None = None) -> int:
        sent = sum(1 for connection in list(self.ready.values()) if connection.send(frame))
        if len(self.ready) != len(self.members):  # some are still joining: they hold it
            for membership in self.members.values():
                if membership.held is not None:
                    membership.held.append((message_id, frame))
        return sent


def _valid_ref(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _error(connection: WebSocketConnection, code: ErrorCode, text: str, ref: Any = None) -> None:
    connection.send_message(protocol.error_message(code, text, ref if _valid_ref(ref) else None))


class Rooms:
    """The rooms of every app an engine serves, on this process."""

    def __init__(
        self,
        origin: str,
        timing: PresenceTiming | None = None,
        batch_seconds: float = DEFAULT_BATCH_SECONDS,
    ) -> None:
        self.origin = origin
        self.timing = timing or PresenceTiming()
        self.batch_seconds = batch_seconds
        self.bus: Bus | None = None
        self.store: PresenceStore | None = None
        self.histories: Mapping[str, History] = {}
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._kinds: dict[tuple[str, str], list[RoomKind]] = {}  # (app, endpoint) -> kinds
        self._manifests: dict[str, Manifest] = {}
        self._databases: dict[str, str] = {}
        self._rooms: dict[tuple[str, str], LocalRoom] = {}
        self._indexed: set[str] = set()  # databases with the room history index

    # -- setup -----------------------------------------------------------------------------

    def add_app(self, manifest: Manifest, default_database: str) -> None:
        self._manifests[manifest.slug] = manifest
        self._databases[manifest.slug] = manifest.physical_database(default_database)
        for name, endpoint in manifest.websockets.items():
            kinds = [
                RoomKind(parse_pattern(pattern), config, parse_join_rule(config.join))
                for pattern, config in endpoint.rooms.items()
            ]
            if kinds:
                self._kinds[(manifest.slug, name)] = kinds

    @property
    def enabled(self) -> bool:
        return bool(self._kinds)

    async def start(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        bus: Bus,
        histories: Mapping[str, History],
    ) -> None:
        self._client, self.bus, self.histories = client, bus, histories
        await self.sync()

    async def sync(self) -> None:
        """Presence store and indexes for the databases of every app with rooms (again after
        an app is registered on a running engine)."""
        if not self.enabled or self._client is None:
            return
        databases = {self._databases[slug] for slug, _endpoint in self._kinds}
        if self.store is None:
            self.store = PresenceStore(self._client, self.origin, self.timing, self.sweep)
            await self.store.start(databases)
        else:
            await self.store.add_databases(databases)
        for database in databases - self._indexed:
            with contextlib.suppress(PyMongoError):  # room history reads
                await self._client[database][BUS_COLLECTION].create_index(
                    [("app", 1), ("room", 1), ("at", -1)], sparse=True
                )
            self._indexed.add(database)

    async def stop(self) -> None:
        """Leave every room (members elsewhere see them go), then stop the store."""
        for room in list(self._rooms.values()):
            for membership in list(room.members.values()):
                self._remove(room, membership)
        if self.store is not None:
            await self.store.stop()
            self.store = None

    def protocol_handlers(self, app_slug: str, endpoint: str) -> dict[str, ProtocolHandler]:
        """join / leave / publish, for endpoints that declare rooms (others keep those types
        for their own message handlers)."""
        if (app_slug, endpoint) not in self._kinds:
            return {}
        return {
            protocol.JOIN: self.join,
            protocol.LEAVE: self.leave,
            protocol.PUBLISH: self.publish,
        }

    def kind_of(self, app_slug: str, endpoint: str, room: str) -> tuple[RoomKind, dict[str, str]]:
        for kind in self._kinds.get((app_slug, endpoint), ()):
            params = kind.pattern.match(room)
            if params is not None:
                return kind, params
        raise LookupError(room)

    # -- join ------------------------------------------------------------------------------

    async def join(self, connection: WebSocketConnection, message: dict[str, Any]) -> None:
        ref, room_name = message.get("id"), message.get("room")
        if not valid_room_name(room_name):
            _error(
                connection,
                ErrorCode.BAD_MESSAGE,
                "join needs a `room` name (1-256 characters)",
                ref,
            )
            return
        info = message.get("info")
        if info is not None and (
            not isinstance(info, dict) or len(codec.dumps(info)) > MAX_INFO_BYTES
        ):
            _error(
                connection,
                ErrorCode.BAD_MESSAGE,
                f"`info` must be an object of at most {MAX_INFO_BYTES} bytes",
                ref,
            )
            return
        try:
            kind, params = self.kind_of(connection.app_slug, connection.endpoint, room_name)
        except LookupError:
            _error(
                connection,
                ErrorCode.UNKNOWN_ROOM,
                f"no room pattern of this endpoint matches {room_name!r}",
                ref,
            )
            return
        if room_name in connection.rooms:
            _error(connection, ErrorCode.BAD_MESSAGE, f"already in room {room_name!r}", ref)
            return
        try:
            allowed = await self._may_join(connection, kind, params)
        except PyMongoError as error:
            logger.warning("join rule of %r could not be checked: %s", room_name, error)
            _error(
                connection,
                ErrorCode.FORBIDDEN_ROOM,
                "the membership could not be checked; try again",
                ref,
            )
            return
        if not allowed:
            _error(connection, ErrorCode.FORBIDDEN_ROOM, f"not allowed to join {room_name!r}", ref)
            return
        if connection.closing or room_name in connection.rooms:
            return
        await self._enter(connection, ref, room_name, kind, info, message.get("history") is True)

    async def _may_join(
        self, connection: WebSocketConnection, kind: RoomKind, params: dict[str, str]
    ) -> bool:
        principal = connection.principal
        if not kind.rule.needs_database:
            return query_rule_allows(kind.rule, principal, params)
        if not principal.authenticated or self._client is None:
            return False
        manifest = self._manifests[connection.app_slug]
        assert kind.rule.collection is not None
        collection = self._client[self._databases[connection.app_slug]][
            manifest.physical_collection(kind.rule.collection)
        ]
        for query in membership_queries(kind.rule, principal, params, connection.app_slug):
            if await collection.find_one(query, {"_id": 1}) is not None:
                return True
        return False

    async def _enter(
        self,
        connection: WebSocketConnection,
        ref: Any,
        room_name: str,
        kind: RoomKind,
        info: Any,
        wants_history: bool,
    ) -> None:
        key = (connection.app_slug, room_name)
        room = self._rooms.get(key)
        if room is None:
            room = self._rooms[key] = LocalRoom(
                connection.app_slug, room_name, kind, self._databases[connection.app_slug]
            )
        member = Member(connection.connection_id, connection.user_id, info, self.origin)
        membership = Membership(connection, member, held=[])
        room.members[connection.connection_id] = membership
        connection.rooms.add(room_name)
        try:
            members = (
                await self._presence_on_join(room, membership) if kind.config.presence else None
            )
            history = await self._history_for(connection, room, wants_history)
        except PyMongoError as error:
            logger.warning("join of %r failed: %s", room_name, error)
            self._remove(room, membership)
            _error(
                connection, ErrorCode.FORBIDDEN_ROOM, "the room could not be read; try again", ref
            )
            return
        if room.members.get(connection.connection_id) is not membership:
            return  # closed meanwhile
        connection.send_message(protocol.joined_message(ref, room_name, members, history))
        already = {m["message_id"] for m in history or ()}
        held, membership.held = membership.held or [], None
        for message_id, frame in held:
            if message_id is None or message_id not in already:
                connection.send(frame)
        room.ready[connection.connection_id] = connection

    async def _presence_on_join(
        self, room: LocalRoom, membership: Membership
    ) -> list[dict[str, Any]]:
        await self._load_presence(room)
        assert room.presence is not None
        member = membership.member
        room.presence.join(member)
        self._queue_presence(room, JOIN, member)
        if self.store is not None:
            membership.document_id = ObjectId()
            document = {
                "_id": membership.document_id,
                "app": room.app_slug,
                "room": room.name,
                "connection_id": member.connection_id,
                "user_id": member.user_id,
                "info": codec.dumps(member.info),  # JSON text: any JSON the client sent
            }
            written = asyncio.get_running_loop().create_future()

            def announce() -> None:
                self._announce(room, JOIN, member)
                if not written.done():
                    written.set_result(None)

            listing = room.presence.listing()
            self.store.insert(room.database, document, announce)
            # `joined` goes out once the membership is stored: whoever joins after that, on
            # any process, finds this member in the list.
            await written
            return listing
        return room.presence.listing()

    async def _load_presence(self, room: LocalRoom) -> None:
        """One read of the room's members, shared by every member joining meanwhile."""
        if room.presence is not None and not room.presence.loading:
            return
        if room.loading is None:
            room.presence = RoomPresence()
            room.loading = asyncio.ensure_future(self._read_presence(room))
        await asyncio.shield(room.loading)

    async def _read_presence(self, room: LocalRoom) -> None:
        assert room.presence is not None
        try:
            stored = (
                await self.store.members(room.database, room.app_slug, room.name)
                if self.store
                else []
            )
        except BaseException:
            room.presence, room.loading = None, None
            raise
        members = [
            member
            for d in stored
            if d.get("origin") != self.origin  # this process's own members are known here
            and (member := member_of(d, str(d.get("origin", "")))) is not None
        ]
        for member in room.presence.loaded(members):
            self._queue_presence(room, JOIN, member)

    async def _history_for(
        self, connection: WebSocketConnection, room: LocalRoom, wants_history: bool
    ) -> list[dict[str, Any]] | None:
        limit = room.kind.config.history
        if limit <= 0:
            return [] if wants_history else None
        last_event_id = connection.websocket.query_params.get("last_event_id")
        if last_event_id:
            missed = missed_since(
                self.histories, room.database, room.app_slug, room.name, last_event_id
            )
            if missed is not None:
                return missed[-limit:]
        if not wants_history and not last_event_id:
            return None
        if self._client is None:
            return []
        return await stored_history(self._client, room.database, room.app_slug, room.name, limit)

    # -- leave -----------------------------------------------------------------------------

    def leave(self, connection: WebSocketConnection, message: dict[str, Any]) -> None:
        ref, room_name = message.get("id"), message.get("room")
        room = (
            self._rooms.get((connection.app_slug, room_name))
            if isinstance(room_name, str)
            else None
        )
        membership = room.members.get(connection.connection_id) if room is not None else None
        if room is None or membership is None:
            _error(connection, ErrorCode.BAD_MESSAGE, f"not in room {room_name!r}", ref)
            return
        self._remove(room, membership)
        connection.send_message(protocol.left_message(ref, room.name))

    def detach(self, connection: WebSocketConnection) -> None:
        """A closed connection leaves all its rooms."""
        for room_name in list(connection.rooms):
            room = self._rooms.get((connection.app_slug, room_name))
            membership = room.members.get(connection.connection_id) if room else None
            if room is not None and membership is not None:
                self._remove(room, membership)
        connection.rooms.clear()

    def _remove(self, room: LocalRoom, membership: Membership) -> None:
        connection = membership.connection
        if room.members.get(connection.connection_id) is membership:
            del room.members[connection.connection_id]
            room.ready.pop(connection.connection_id, None)
        connection.rooms.discard(room.name)
        member = membership.member
        if room.presence is not None and room.presence.leave(member.connection_id) is not None:
            self._queue_presence(room, LEAVE, member)
        if membership.document_id is not None and self.store is not None:
            self.store.delete(
                room.database, membership.document_id, lambda: self._announce(room, LEAVE, member)
            )
        if not room.members:
            self._close_room(room)

    def _close_room(self, room: LocalRoom) -> None:
        """No member here any more: stop following the room (a new joiner reads it again)."""
        if self._rooms.get((room.app_slug, room.name)) is room:
            del self._rooms[(room.app_slug, room.name)]
        if room.flush is not None:
            room.flush.cancel()
            room.flush = None

    # -- publish ---------------------------------------------------------------------------

    def publish(self, connection: WebSocketConnection, message: dict[str, Any]) -> None:
        ref, room_name, data = message.get("id"), message.get("room"), message.get("data")
        if not isinstance(room_name, str) or room_name not in connection.rooms:
            _error(
                connection,
                ErrorCode.FORBIDDEN_PUBLISH,
                f"join room {room_name!r} before publishing to it",
                ref,
            )
            return
        room = self._rooms[(connection.app_slug, room_name)]
        if not room.kind.config.publish:
            _error(
                connection,
                ErrorCode.FORBIDDEN_PUBLISH,
                f"room {room_name!r} does not take messages from clients",
                ref,
            )
            return
        if not isinstance(data, dict):
            _error(connection, ErrorCode.BAD_MESSAGE, "publish needs `data` (an object)", ref)
            return
        sender = {"user_id": connection.user_id, "connection_id": connection.connection_id}
        message_id = self._publish(connection.app_slug, room_name, sender, data)
        if message_id is None:
            _error(
                connection, ErrorCode.HANDLER_ERROR, "the room message could not be published", ref
            )
            return
        connection.send_message(protocol.published_message(ref, message_id))

    def _publish(self, app_slug: str, room: str, sender: dict[str, Any], data: Any) -> str | None:
        if self.bus is None:
            return None
        document_id = self.bus.publish_document(app_slug, room_message_fields(room, sender, data))
        return str(document_id) if document_id is not None else None

    async def broadcast_to_room(self, app_slug: str, room: str, message: dict[str, Any]) -> str:
        """Send `message` as `data` of a room message to the room's members on every process;
        the message id."""
        if not isinstance(message, dict):
            raise TypeError(f"a room message must be a dict, not {type(message).__name__}")
        if not valid_room_name(room):
            raise ValueError("a room name is 1-256 characters")
        message_id = self._publish(app_slug, room, NOBODY, message)
        if message_id is None:
            raise RuntimeError(f"app {app_slug!r} is not served by a running engine")
        return message_id

    async def get_presence(self, app_slug: str, room: str) -> list[dict[str, Any]]:
        """The members of a room on every process: this process's copy when it follows the
        room, else one read of the presence store."""
        local = self._rooms.get((app_slug, room))
        if local is not None and local.presence is not None and not local.presence.loading:
            return [dict(member) for member in local.presence.listing()]
        database = self._databases.get(app_slug)
        if self.store is None or database is None:
            return []
        stored = await self.store.members(database, app_slug, room)
        return [dict(m.to_json()) for d in stored if (m := member_of(d, "")) is not None]

    # -- from the bus ----------------------------------------------------------------------

    def route(self, event: ChangeEvent) -> int:
        """Deliver a room document of the bus to this process's members; frames queued."""
        document = event.document
        if event.collection != BUS_COLLECTION or document is None or "room" not in document:
            return 0
        room = self._rooms.get((document.get("app"), document.get("room")))  # type: ignore[arg-type]
        if room is None or room.database != event.database:
            return 0
        kind = document.get("kind")
        if kind == ROOM_MESSAGE_KIND:
            message = room_message(document, event.timestamp, event.event_id)
            return room.deliver(codec.dumps(message), message["message_id"])
        if kind == PRESENCE_KIND and document.get("origin") != self.origin:
            self._apply_presence(room, document)
        return 0

    def _apply_presence(self, room: LocalRoom, document: Mapping[str, Any]) -> None:
        raw = document.get("member")
        member = (
            member_of(raw, str(document.get("origin", ""))) if isinstance(raw, Mapping) else None
        )
        if room.presence is None or member is None:
            return
        event = document.get("event")
        if event == JOIN and room.presence.join(member):
            self._queue_presence(room, JOIN, member)
        elif event == LEAVE and room.presence.leave(member.connection_id) is not None:
            self._queue_presence(room, LEAVE, member)

    def _announce(self, room: LocalRoom, event: str, member: Member) -> None:
        """Tell the other processes, once the presence document is written."""
        if self.bus is not None:
            self.bus.publish_document(room.app_slug, presence_fields(room.name, event, member))

    # -- presence frames -------------------------------------------------------------------

    def _queue_presence(self, room: LocalRoom, event: str, member: Member) -> None:
        room.batch.add(event, member)
        if room.flush is None:
            loop = asyncio.get_running_loop()
            room.flush = loop.call_later(self.batch_seconds, self._flush, room)

    def _flush(self, room: LocalRoom) -> None:
        room.flush = None
        frame = room.batch.take_frame(room.name)
        if frame is not None:
            room.deliver(frame)

    # -- processes that are gone -----------------------------------------------------------

    async def sweep(self) -> None:
        """Drop the members of processes whose heartbeat stopped (run after each heartbeat)."""
        if self.store is None:
            return
        by_database: dict[str, set[str]] = {}
        for room in list(self._rooms.values()):
            if room.presence is not None:
                by_database.setdefault(room.database, set()).update(room.presence.origins())
        for database, origins in by_database.items():
            origins.discard(self.origin)
            gone = await self.store.gone(database, origins)
            for origin in gone:
                logger.info("process %s stopped its heartbeat: its room members leave", origin)
                for room in list(self._rooms.values()):
                    if room.presence is not None and room.database == database:
                        for member in room.presence.drop_origin(origin):
                            self._queue_presence(room, LEAVE, member)
                await self.store.forget(database, origin)
