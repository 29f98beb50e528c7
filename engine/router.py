"""Which connections get which change, and the subscribe / unsubscribe protocol.

Bindings (manifest `watch` entries) are indexed by physical namespace. For each event, every
connection of a bound endpoint decides through its `View` (scope, filter, subscriptions) what
it sees; connections that see the same thing share one encoded frame.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import bson
import bson.errors

from engine import codec, protocol
from engine.bus import BUS_COLLECTION, parse_bus_document
from engine.changes import (
    ChangeEvent,
    Fields,
    change_message,
    narrow_fields,
    union_fields,
)
from engine.hub import WebSocketConnection
from engine.manifest import Manifest
from engine.protocol import ErrorCode
from engine.query import Matcher, QueryError, compile_query, substitute_placeholders

logger = logging.getLogger("engine.router")

LEFT_SCOPE = "left_scope"

ProtocolHandler = Callable[["WebSocketConnection", dict[str, Any]], "Awaitable[None] | None"]
SnapshotHandler = Callable[["WebSocketConnection", "View", "Subscription"], "Awaitable[None]"]
DEFAULT_KNOWN_IDS_LIMIT = 10_000


@dataclass(frozen=True, eq=False)
class Binding:
    """One `watch` entry of one endpoint, resolved to its physical namespace."""

    app_slug: str
    endpoint: str
    collection: str
    database: str
    physical: str
    operations: frozenset[str]
    filter: Matcher
    scope: Mapping[str, Any] | None
    fields: Fields


class Decision(NamedTuple):
    """What one connection gets for one event; equal decisions share one encoded frame."""

    operation: str
    reason: str | None
    fields: Fields
    describe_update: bool


@dataclass(frozen=True)
class Subscription:
    id: Hashable
    collection: str
    filter: Matcher
    fields: Fields


def _id_key(document_id: Any) -> Hashable:
    """A dictionary key per _id; booleans kept apart from numbers (True == 1 in Python only)."""
    if isinstance(document_id, bool):
        return ("bool", document_id)
    return document_id if isinstance(document_id, Hashable) else codec.dumps(document_id)


@dataclass(eq=False)
class View:
    """What one connection may see of one binding, and what it was sent.

    Without a pre-image, a delete or an update cannot be checked against the document as it
    was; the view then relies on the ids it delivered (bounded), so it never leaks a delete of
    a document the connection could not see.
    """

    binding: Binding
    scope: Matcher | None  # None with a scoped binding: this principal never matches
    known_ids_limit: int = DEFAULT_KNOWN_IDS_LIMIT
    subscriptions: dict[Hashable, Subscription] = field(default_factory=dict)
    known_ids: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)

    @property
    def never(self) -> bool:
        return self.binding.scope is not None and self.scope is None

    @property
    def unrestricted(self) -> bool:
        """The binding lets this connection see every document of the collection."""
        return self.binding.filter.matches_everything and self.binding.scope is None

    def sees(self, document: Mapping[str, Any]) -> bool:
        if self.never or not self.binding.filter(document):
            return False
        if self.scope is not None and not self.scope(document):
            return False
        if not self.subscriptions:
            return True
        return any(sub.filter(document) for sub in self.subscriptions.values())

    def fields_for(self, document: Mapping[str, Any]) -> Fields:
        if not self.subscriptions:
            return self.binding.fields
        matching = [s.fields for s in self.subscriptions.values() if s.filter(document)]
        return union_fields(matching)

    def _was_visible(self, event: ChangeEvent) -> bool:
        # What it was sent counts too: an update whose post-image was already gone (deleted
        # right after) could not move the document out of this view.
        if _id_key(event.document_id) in self.known_ids:
            return True
        if event.before is not None:
            return self.sees(event.before)
        return self.unrestricted  # at worst a delete of a document outside a subscription

    def remember(self, document_id: Any) -> None:
        """Note a document this connection was sent (only restricted views need to)."""
        if self.unrestricted:
            return
        key = _id_key(document_id)
        self.known_ids[key] = None
        self.known_ids.move_to_end(key)
        if len(self.known_ids) > self.known_ids_limit:
            self.known_ids.popitem(last=False)

    def _forget(self, document_id: Any) -> None:
        self.known_ids.pop(_id_key(document_id), None)

    def decide(self, event: ChangeEvent) -> Decision | None:
        """(operation, reason, fields) this connection gets for `event`, or None."""
        if self.never:
            return None
        operation = event.operation
        if operation == "delete":
            was_visible = self._was_visible(event)
            self._forget(event.document_id)
            return Decision("delete", None, None, False) if was_visible else None
        document = event.document
        if document is None:  # deleted right after; its delete event follows
            return None
        if self.sees(document):
            self.remember(event.document_id)
            # An update description from a lookup (no pre-image) may show a state this
            # connection could not see: only unrestricted views get it then.
            describe = event.exact or self.unrestricted
            return Decision(operation, None, self.fields_for(document), describe)
        if operation != "insert" and self._was_visible(event):
            self._forget(event.document_id)
            return Decision("delete", LEFT_SCOPE, None, False)
        return None


class PendingEvents:
    """Events held back for a connection while it is being brought up to date."""

    def __init__(self) -> None:
        self.items: list[tuple[Binding | None, ChangeEvent]] = []  # None: a broadcast
        self.ids: set[str] = set()

    def add(self, binding: Binding | None, event: ChangeEvent) -> None:
        self.items.append((binding, event))
        self.ids.add(event.event_id)


def _app_id_allowed(event: ChangeEvent, app_slug: str) -> bool:
    """mdb-engine's scoped writes carry `app_id`; a document of another app is never sent."""
    document = event.document if event.document is not None else event.before
    if document is None or "app_id" not in document:
        return True
    return bool(document["app_id"] == app_slug)


class Router:
    """Bindings of all registered apps and the connections of their endpoints."""

    def __init__(self, known_ids_limit: int = DEFAULT_KNOWN_IDS_LIMIT) -> None:
        self.known_ids_limit = known_ids_limit
        self._by_namespace: dict[tuple[str, str], list[Binding]] = {}
        self._by_endpoint: dict[tuple[str, str], dict[str, Binding]] = {}
        self._members: dict[tuple[str, str], dict[int, WebSocketConnection]] = {}
        self.snapshots: SnapshotHandler | None = None  # set by the engine: needs the database
        self.max_subscriptions = 0  # per connection; 0: no bound
        self.origin = ""  # this process on the bus: its own broadcasts were delivered already
        self._app_databases: dict[str, str] = {}

    # -- bindings --------------------------------------------------------------------------

    def add_app(self, manifest: Manifest, default_database: str) -> list[Binding]:
        bindings = []
        database = manifest.physical_database(default_database)
        self._app_databases[manifest.slug] = database
        for endpoint_name, endpoint in manifest.websockets.items():
            per_endpoint = self._by_endpoint.setdefault((manifest.slug, endpoint_name), {})
            for collection, watch in endpoint.watch.items():
                binding = Binding(
                    app_slug=manifest.slug,
                    endpoint=endpoint_name,
                    collection=collection,
                    database=database,
                    physical=manifest.physical_collection(collection),
                    operations=frozenset(watch.operations),
                    filter=compile_query(watch.filter),
                    scope=watch.scope,
                    fields=tuple(watch.fields) if watch.fields is not None else None,
                )
                per_endpoint[collection] = binding
                self._by_namespace.setdefault((database, binding.physical), []).append(binding)
                bindings.append(binding)
        return bindings

    def namespaces(self) -> dict[str, dict[str, frozenset[str]]]:
        """{database: {physical collection: operations}} that the change streams must match."""
        result: dict[str, dict[str, frozenset[str]]] = {}
        for (database, physical), bindings in self._by_namespace.items():
            operations = frozenset().union(*(b.operations for b in bindings))
            result.setdefault(database, {})[physical] = operations
        for database in self._app_databases.values():
            result.setdefault(database, {})[BUS_COLLECTION] = frozenset({"insert"})
        return result

    def app_database(self, app_slug: str) -> str | None:
        return self._app_databases.get(app_slug)

    def bindings_of(self, app_slug: str, endpoint: str) -> dict[str, Binding]:
        return self._by_endpoint.get((app_slug, endpoint), {})

    # -- connections -----------------------------------------------------------------------

    def attach(self, connection: WebSocketConnection) -> None:
        """Give a new connection its views; from now on it receives changes."""
        values = connection.principal.placeholder_values()
        for collection, binding in self.bindings_of(
            connection.app_slug, connection.endpoint
        ).items():
            scope = None
            if binding.scope is not None and connection.principal.authenticated:
                scope = _compile_scope(binding.scope, values)
            connection.views[collection] = View(binding, scope, self.known_ids_limit)
        key = (connection.app_slug, connection.endpoint)
        self._members.setdefault(key, {})[id(connection)] = connection

    def detach(self, connection: WebSocketConnection) -> None:
        members = self._members.get((connection.app_slug, connection.endpoint))
        if members is not None:
            members.pop(id(connection), None)

    # -- events ----------------------------------------------------------------------------

    def route(self, event: ChangeEvent) -> int:
        """Queue `event` for every connection that may see it; the number of frames queued."""
        if event.collection == BUS_COLLECTION:
            return self._route_broadcast(event)
        bindings = self._by_namespace.get((event.database, event.collection))
        if not bindings:
            return 0
        queued = 0
        for binding in bindings:
            if event.operation not in binding.operations:
                continue
            if not _app_id_allowed(event, binding.app_slug):
                continue
            members = self._members.get((binding.app_slug, binding.endpoint))
            if members:
                queued += self._route_to_members(event, binding, list(members.values()))
        return queued

    def _route_broadcast(self, event: ChangeEvent) -> int:
        published = parse_bus_document(event.document or {})
        if published is None or published.origin == self.origin:
            return 0  # this process delivered its own broadcast when it was made
        if self._app_databases.get(published.app_slug) != event.database:
            return 0  # only the app's own database carries its broadcasts
        frame = codec.dumps(published.message)
        queued = 0
        for (slug, _endpoint), members in list(self._members.items()):
            if slug != published.app_slug:
                continue
            for connection in list(members.values()):
                if published.user_id is not None and connection.user_id != published.user_id:
                    continue
                if connection.pending is not None:
                    connection.pending.add(None, event)
                elif connection.send(frame):
                    queued += 1
        return queued

    def _route_to_members(
        self, event: ChangeEvent, binding: Binding, members: list[WebSocketConnection]
    ) -> int:
        frames: dict[Decision, str] = {}
        queued = 0
        for connection in members:
            view = connection.views.get(binding.collection)
            if view is None or connection.closing:
                continue
            if connection.pending is not None:
                connection.pending.add(binding, event)
                continue
            decision = view.decide(event)
            if decision is None:
                continue
            frame = frames.get(decision)
            if frame is None:
                frame = frames[decision] = self._encode(event, binding, decision)
            if connection.send(frame):
                queued += 1
        return queued

    def frames_for(self, connection: WebSocketConnection, event: ChangeEvent) -> list[str]:
        """The frames one connection gets for one event (replays of history)."""
        if event.collection == BUS_COLLECTION:
            frame = self.frame_for(connection, None, event)
            return [frame] if frame is not None else []
        frames = []
        for binding in self._by_namespace.get((event.database, event.collection), ()):
            if (
                binding.app_slug == connection.app_slug
                and binding.endpoint == connection.endpoint
                and event.operation in binding.operations
                and _app_id_allowed(event, binding.app_slug)
            ):
                frame = self.frame_for(connection, binding, event)
                if frame is not None:
                    frames.append(frame)
        return frames

    def frame_for(
        self, connection: WebSocketConnection, binding: Binding | None, event: ChangeEvent
    ) -> str | None:
        if binding is None:  # a broadcast from the bus; replays include this process's own
            published = parse_bus_document(event.document or {})
            if (
                published is None
                or published.app_slug != connection.app_slug
                or (published.user_id is not None and published.user_id != connection.user_id)
            ):
                return None
            return codec.dumps(published.message)
        view = connection.views.get(binding.collection)
        decision = view.decide(event) if view is not None else None
        if decision is None:
            return None
        return self._encode(event, binding, decision)

    @staticmethod
    def _encode(event: ChangeEvent, binding: Binding, decision: Decision) -> str:
        message = change_message(
            event,
            app_slug=binding.app_slug,
            endpoint=binding.endpoint,
            collection=binding.collection,
            operation=decision.operation,
            fields=decision.fields,
            reason=decision.reason,
            describe_update=decision.describe_update,
        )
        return codec.dumps(message)

    @staticmethod
    def hold(connection: WebSocketConnection) -> None:
        """Hold live events back for this connection until they are released."""
        if connection.pending is None:
            connection.pending = PendingEvents()

    # -- subscribe / unsubscribe -----------------------------------------------------------

    def protocol_handlers(self) -> dict[str, ProtocolHandler]:
        return {protocol.SUBSCRIBE: self.subscribe, protocol.UNSUBSCRIBE: self.unsubscribe}

    def subscribe(
        self, connection: WebSocketConnection, message: dict[str, Any]
    ) -> Awaitable[None] | None:
        sub_id = message.get("id")
        if not _valid_id(sub_id):
            _error(connection, ErrorCode.BAD_MESSAGE, "subscribe needs an `id` (string or number)")
            return
        collection = message.get("collection")
        view = connection.views.get(collection) if isinstance(collection, str) else None
        if view is None:
            watched = ", ".join(sorted(connection.views)) or "none"
            _error(
                connection,
                ErrorCode.BAD_MESSAGE,
                f"collection {collection!r} is not watched by this endpoint (watched: {watched})",
                sub_id,
            )
            return
        query = message.get("filter")
        if query is not None and not isinstance(query, dict):
            _error(connection, ErrorCode.FORBIDDEN_FILTER, "`filter` must be an object", sub_id)
            return
        try:
            matcher = compile_query(query)
        except QueryError as error:
            _error(connection, ErrorCode.FORBIDDEN_FILTER, f"filter: {error}", sub_id)
            return None
        if query and not _bson_encodable(query):
            text = "filter: values MongoDB cannot store (integers beyond 64 bits, NUL in names)"
            _error(connection, ErrorCode.FORBIDDEN_FILTER, text, sub_id)
            return None
        requested = message.get("fields")
        if requested is not None and not _valid_fields(requested):
            _error(
                connection,
                ErrorCode.BAD_MESSAGE,
                "`fields` must be a list of field paths (non-empty strings, no `$`)",
                sub_id,
            )
            return
        snapshot = message.get("snapshot", False)
        if not isinstance(snapshot, bool):
            _error(connection, ErrorCode.BAD_MESSAGE, "`snapshot` must be true or false", sub_id)
            return None
        if self._too_many_subscriptions(connection, sub_id):
            text = f"too many subscriptions on this connection (at most {self.max_subscriptions})"
            _error(connection, ErrorCode.RATE_LIMITED, text, sub_id)
            return None
        self._drop_subscription(connection, sub_id)
        fields = narrow_fields(
            view.binding.fields, tuple(requested) if requested is not None else None
        )
        subscription = Subscription(sub_id, view.binding.collection, matcher, fields)
        if snapshot and self.snapshots is not None:
            return self.snapshots(connection, view, subscription)
        view.subscriptions[sub_id] = subscription
        connection.send_message({"type": "subscribed", "id": sub_id})
        return None

    def unsubscribe(self, connection: WebSocketConnection, message: dict[str, Any]) -> None:
        sub_id = message.get("id")
        if not _valid_id(sub_id) or not self._drop_subscription(connection, sub_id):
            _error(connection, ErrorCode.BAD_MESSAGE, f"no subscription with id {sub_id!r}", sub_id)
            return
        connection.send_message({"type": "unsubscribed", "id": sub_id})

    def _too_many_subscriptions(self, connection: WebSocketConnection, sub_id: Hashable) -> bool:
        others = sum(
            len(view.subscriptions) - (sub_id in view.subscriptions)
            for view in connection.views.values()
        )
        return 0 < self.max_subscriptions <= others

    @staticmethod
    def _drop_subscription(connection: WebSocketConnection, sub_id: Hashable) -> bool:
        for view in connection.views.values():
            if view.subscriptions.pop(sub_id, None) is not None:
                return True
        return False


def _compile_scope(scope: Mapping[str, Any], values: Mapping[str, Any]) -> Matcher | None:
    """A binding's scope with this principal's values; None (matches nothing) when a value is
    missing or cannot be matched (a claim is data, never an operator)."""
    bound = substitute_placeholders(scope, values)
    if bound is None:
        return None
    try:
        return compile_query(bound)
    except QueryError as error:
        logger.info("a scope cannot use this principal's values (%s): it matches nothing", error)
        return None


def _bson_encodable(query: Mapping[str, Any]) -> bool:
    """The database must be able to take the filter (snapshots query it)."""
    try:
        bson.encode(query)
    except (bson.errors.BSONError, OverflowError, ValueError, TypeError):
        return False
    return True


def _valid_id(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _valid_fields(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(f, str) and f and not f.startswith("$") and "" not in f.split(".") for f in value
    )


def _error(connection: WebSocketConnection, code: ErrorCode, text: str, ref: Any = None) -> None:
    connection.send_message(protocol.error_message(code, text, ref if _valid_id(ref) else None))
