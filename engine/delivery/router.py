"""Which connections get which change: bindings, their recipient indexes, and dispatch.

Bindings (manifest `watch` entries) are kept by physical namespace. A change of a bound
collection asks each binding's `RecipientIndex` for the views it could concern, lets each of
them decide (`View.decide`), and queues one encoded frame per distinct decision. The cost of
a change follows the connections it reaches, plus those whose predicates cannot be indexed.
Broadcasts from the bus reach an app's connections, or one user's, through `Members`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

from engine import codec, protocol
from engine.bus import BUS_COLLECTION, parse_bus_document
from engine.changes import ChangeEvent, change_message
from engine.delivery.index import RecipientIndex
from engine.delivery.members import Members
from engine.delivery.subscriptions import (
    WindowRequest,
    drop_subscription,
    parse_subscribe,
    send_error,
    valid_id,
)
from engine.delivery.view import DEFAULT_KNOWN_IDS_LIMIT, Binding, Decision, Subscription, View
from engine.delivery.window_groups import Windows
from engine.hub import WebSocketConnection
from engine.manifest import Manifest
from engine.protocol import ErrorCode
from engine.query import Matcher, QueryError, compile_query, substitute_placeholders
from engine.transactions import Transaction, Unit, transaction_message

logger = logging.getLogger("engine.router")

NOTHING = compile_query({"_id": {"$in": []}})  # a filter no document matches

ProtocolHandler = Callable[["WebSocketConnection", dict[str, Any]], "Awaitable[None] | None"]
SnapshotHandler = Callable[["WebSocketConnection", "View", "Subscription"], "Awaitable[None]"]


class Part(NamedTuple):
    """One change of a transaction as one connection gets it."""

    position: int  # in the transaction
    binding: Binding
    decision: Decision


class PendingEvents:
    """Events held back for a connection while it is being brought up to date."""

    def __init__(self) -> None:
        # binding None: a broadcast, or a whole transaction; a str: a window's encoded frame
        self.items: list[tuple[Binding | None, Unit | str]] = []
        self.ids: set[str] = set()

    def add(self, binding: Binding | None, event: Unit) -> None:
        self.items.append((binding, event))
        self.ids.add(event.event_id)

    def add_frame(self, frame: str) -> None:
        """A frame already decided (windows decide for all their members at once)."""
        self.items.append((None, frame))


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
        self._indexes: dict[Binding, RecipientIndex] = {}
        self._members: dict[str, Members] = {}  # app slug -> its connections
        # Connections being brought up to date, per (app, endpoint): they hold every event.
        self._held: dict[tuple[str, str], dict[int, WebSocketConnection]] = {}
        self.snapshots: SnapshotHandler | None = None  # set by the engine: needs the database
        self.windows: Windows | None = None  # set by the engine: windows need the database
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
                self._indexes[binding] = RecipientIndex(binding)
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

    def index_of(self, binding: Binding) -> RecipientIndex:
        return self._indexes[binding]

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
            index = self._indexes[binding]
            view = View(binding, scope, self.known_ids_limit, owner=connection, index=index)
            connection.views[collection] = view
            index.place(view)
        members = self._members.setdefault(connection.app_slug, Members())
        members.add(id(connection), connection)

    def detach(self, connection: WebSocketConnection) -> None:
        members = self._members.get(connection.app_slug)
        if members is None or members.remove(id(connection)) is None:
            return
        for view in connection.views.values():
            if isinstance(view, View) and view.index is not None:
                view.index.remove(view)
                view.index = None  # a late subscribe must not file it again
        held = self._held.get((connection.app_slug, connection.endpoint))
        if held is not None:
            held.pop(id(connection), None)
        if self.windows is not None:
            self.windows.leave_all(connection)

    def hold(self, connection: WebSocketConnection) -> None:
        """Hold live events back for this connection until they are released."""
        if connection.pending is None:
            connection.pending = PendingEvents()
        members = self._members.get(connection.app_slug)
        if members is not None and members.get(id(connection)) is connection:
            key = (connection.app_slug, connection.endpoint)
            self._held.setdefault(key, {})[id(connection)] = connection

    # -- events ----------------------------------------------------------------------------

    def route(self, event: Unit) -> int:
        """Queue a change or a whole transaction for every connection that may see it; the
        number of frames queued."""
        if isinstance(event, Transaction):
            return self._route_transaction(event)
        if event.collection == BUS_COLLECTION:
            return self._route_broadcast(event)
        bindings = self._by_namespace.get((event.database, event.collection))
        if not bindings:
            return 0
        queued = 0
        for binding in self._bindings_for(event):
            self._hold_event((binding.app_slug, binding.endpoint), event, binding)
            queued += self._dispatch(event, binding)
            if self.windows is not None and self.windows.has_windows(binding):
                self.windows.route(binding, (event,), event.event_id)
        return queued

    def _hold_event(
        self,
        key: tuple[str, str],
        event: Unit,
        binding: Binding | None,
        user: Any = None,
        whole: Binding | None = None,
    ) -> None:
        """Add the event to the held connections of an endpoint that it concerns: those with a
        view of the binding, or for a broadcast (binding None) those of its user if it has one;
        a transaction (`whole`: one of its bindings there) goes to all of the endpoint's.
        Each decides once released, as it would have live."""
        held = self._held.get(key)
        if not held:
            return
        for connection_key, connection in list(held.items()):
            if connection.pending is None:
                del held[connection_key]  # released since
            elif connection.closing:
                continue
            elif whole is not None:
                connection.pending.add(None, event)
            elif binding is None:
                if user is None or connection.user_id == user:
                    connection.pending.add(None, event)
            elif binding.collection in connection.views:
                connection.pending.add(binding, event)
        if not held:
            del self._held[key]

    def _dispatch(self, event: ChangeEvent, binding: Binding) -> int:
        frames: dict[Decision, str] = {}
        queued = 0
        for connection, decision in self._decisions(event, binding):
            frame = frames.get(decision)
            if frame is None:
                frame = frames[decision] = self._encode(event, binding, decision)
            if connection.send(frame):
                queued += 1
        return queued

    def _decisions(
        self, event: ChangeEvent, binding: Binding
    ) -> Iterator[tuple[WebSocketConnection, Decision]]:
        """Each live connection the event concerns, with what it gets."""
        index = self._indexes[binding]
        if index.everyone:
            # Views that see everything of the binding: one decision for all of them.
            group_decision: Decision | None = None
            for view in list(index.everyone):
                connection = view.owner
                if connection is None or connection.closing or connection.pending is not None:
                    continue
                if group_decision is None:
                    group_decision = view.decide(event)
                    if group_decision is None:
                        break
                yield connection, group_decision
        for view in index.candidates(event):
            connection = view.owner
            if connection is None or connection.closing or connection.pending is not None:
                continue
            decision = view.decide(event)
            if decision is not None:
                yield connection, decision

    def _bindings_for(self, event: ChangeEvent) -> list[Binding]:
        """The bindings an event of a bound collection reaches (operation, app_id)."""
        return [
            binding
            for binding in self._by_namespace.get((event.database, event.collection), ())
            if event.operation in binding.operations and _app_id_allowed(event, binding.app_slug)
        ]

    def _route_transaction(self, transaction: Transaction) -> int:
        """One frame per connection with the parts of the transaction it may see."""
        parts: dict[int, tuple[WebSocketConnection, list[Part]]] = {}
        held_endpoints: dict[tuple[str, str], Binding] = {}
        queued = 0
        for position, event in enumerate(transaction.events):
            if event.collection == BUS_COLLECTION:
                queued += self._route_broadcast(event)
                continue
            for binding in self._bindings_for(event):
                held_endpoints.setdefault((binding.app_slug, binding.endpoint), binding)
                for connection, decision in self._decisions(event, binding):
                    entry = parts.setdefault(id(connection), (connection, []))
                    entry[1].append(Part(position, binding, decision))
        for key, binding in held_endpoints.items():
            self._hold_event(key, transaction, None, whole=binding)
        if self.windows is not None:
            self._route_transaction_to_windows(transaction)
        frames: dict[tuple[Part, ...], str] = {}
        for connection, visible in parts.values():
            signature = tuple(visible)
            frame = frames.get(signature)
            if frame is None:
                frame = frames[signature] = self._encode_parts(transaction, visible)
            if connection.send(frame):
                queued += 1
        return queued

    def _route_transaction_to_windows(self, transaction: Transaction) -> None:
        """Each window gets the transaction's changes of its binding together."""
        assert self.windows is not None
        per_binding: dict[Binding, list[ChangeEvent]] = {}
        for event in transaction.events:
            if event.collection == BUS_COLLECTION:
                continue
            for binding in self._bindings_for(event):
                if self.windows.has_windows(binding):
                    per_binding.setdefault(binding, []).append(event)
        for binding, events in per_binding.items():
            self.windows.route(binding, tuple(events), transaction.event_id)

    def _encode_parts(self, transaction: Transaction, parts: list[Part]) -> str:
        """A plain `change` when one part is visible, else a `transaction` frame; either way
        every id is the transaction's own position (the only one it has)."""
        changes = []
        for part in parts:
            event = transaction.events[part.position]
            message = self._change(event, part.binding, part.decision)
            message["id"] = transaction.event_id
            changes.append(message)
        if len(changes) == 1:
            return codec.dumps(changes[0])
        return codec.dumps(transaction_message(transaction.event_id, changes))

    def _route_broadcast(self, event: ChangeEvent) -> int:
        published = parse_bus_document(event.document or {})
        if published is None or published.origin == self.origin:
            return 0  # this process delivered its own broadcast when it was made
        if self._app_databases.get(published.app_slug) != event.database:
            return 0  # only the app's own database carries its broadcasts
        members = self._members.get(published.app_slug)
        if members is None:
            return 0
        for key in [key for key in self._held if key[0] == published.app_slug]:
            self._hold_event(key, event, None, published.user_id)
        recipients = (
            members.all() if published.user_id is None else members.of_user(published.user_id)
        )
        frame = codec.dumps(published.message)
        queued = 0
        for connection in recipients:
            if connection.pending is None and connection.send(frame):
                queued += 1
        return queued

    def frames_for(self, connection: WebSocketConnection, event: Unit) -> list[str]:
        """The frames one connection gets for one event or transaction (replays of history)."""
        if isinstance(event, Transaction):
            frame = self.frame_for(connection, None, event)
            return [frame] if frame is not None else []
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
        self, connection: WebSocketConnection, binding: Binding | None, event: Unit
    ) -> str | None:
        if isinstance(event, Transaction):
            return self._transaction_frame_for(connection, event)
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

    def _transaction_frame_for(
        self, connection: WebSocketConnection, transaction: Transaction
    ) -> str | None:
        parts: list[Part] = []
        for position, event in enumerate(transaction.events):
            if event.collection == BUS_COLLECTION:
                continue  # broadcasts are never written inside transactions by the engine
            for binding in self._bindings_for(event):
                if (binding.app_slug, binding.endpoint) != (
                    connection.app_slug,
                    connection.endpoint,
                ):
                    continue
                view = connection.views.get(binding.collection)
                decision = view.decide(event) if view is not None else None
                if decision is not None:
                    parts.append(Part(position, binding, decision))
        return self._encode_parts(transaction, parts) if parts else None

    @classmethod
    def _encode(cls, event: ChangeEvent, binding: Binding, decision: Decision) -> str:
        return codec.dumps(cls._change(event, binding, decision))

    @staticmethod
    def _change(event: ChangeEvent, binding: Binding, decision: Decision) -> dict[str, Any]:
        return change_message(
            event,
            app_slug=binding.app_slug,
            endpoint=binding.endpoint,
            collection=binding.collection,
            operation=decision.operation,
            fields=decision.fields,
            reason=decision.reason,
            describe_update=decision.describe_update,
        )

    # -- subscribe / unsubscribe -----------------------------------------------------------

    def protocol_handlers(self) -> dict[str, ProtocolHandler]:
        return {protocol.SUBSCRIBE: self.subscribe, protocol.UNSUBSCRIBE: self.unsubscribe}

    def subscribe(
        self, connection: WebSocketConnection, message: dict[str, Any]
    ) -> Awaitable[None] | None:
        request = parse_subscribe(connection, message, self.max_subscriptions)
        if request is None:
            return None
        view, subscription, snapshot, window = request
        drop_subscription(connection, subscription.id)
        if self.windows is not None:
            self.windows.leave(connection, subscription.id)
        if window is not None:
            return self._join_window(connection, view, subscription, window)
        if snapshot and self.snapshots is not None:
            return self.snapshots(connection, view, subscription)
        view.add_subscription(subscription)
        connection.send_message({"type": "subscribed", "id": subscription.id})
        return None

    def _join_window(
        self,
        connection: WebSocketConnection,
        view: View,
        subscription: Subscription,
        window: WindowRequest,
    ) -> Awaitable[None] | None:
        if self.windows is None:
            text = "windows (`sort` / `limit`) need the engine's database"
            send_error(connection, ErrorCode.BAD_MESSAGE, text, subscription.id)
            return None
        # The plain stream sends this subscription nothing: the window sends its changes.
        placeholder = Subscription(subscription.id, subscription.collection, NOTHING, (), True)
        view.add_subscription(placeholder)
        bound_scope = None
        if view.binding.scope is not None:
            values = connection.principal.placeholder_values()
            bound_scope = substitute_placeholders(view.binding.scope, values)
        if view.never or (view.binding.scope is not None and bound_scope is None):
            bound_scope = {"_id": {"$in": []}}  # this principal sees nothing of the binding
        return self.windows.join(
            connection, view, subscription, window.sort, window.limit, bound_scope
        )

    def unsubscribe(self, connection: WebSocketConnection, message: dict[str, Any]) -> None:
        sub_id = message.get("id")
        valid = valid_id(sub_id)
        left_window = valid and self.windows is not None and self.windows.leave(connection, sub_id)
        if not valid or not (drop_subscription(connection, sub_id) or left_window):
            text = f"no subscription with id {sub_id!r}"
            send_error(connection, ErrorCode.BAD_MESSAGE, text, sub_id)
            return
        connection.send_message({"type": "unsubscribed", "id": sub_id})


def _compile_scope(scope: Any, values: Any) -> Matcher | None:
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
