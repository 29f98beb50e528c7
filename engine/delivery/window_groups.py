"""Live windows shared by the connections that ask for the same one, kept by the database.

Connections whose window is the same (binding, bound scope, filter, sort, limit, fields)
share one `WindowGroup`: one state, one query when a place empties, one encoded frame per
change for all of them. While a group waits for the database (its first load, or a refill)
it holds the changes that arrive and applies them once the answer is in, as snapshots do:
what the query already saw is applied again and changes nothing, what it missed follows.

A change that moves several documents across the edge (a member out, the next one in; a
transaction) reaches a client as one frame: a plain `change` when it is one message, else a
`transaction` frame applied at once, so a client never holds a window that did not exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import codec
from engine.changes import ChangeEvent, Fields, cluster_time_iso, project
from engine.delivery.view import Binding, Subscription, View
from engine.delivery.window_index import WindowIndex
from engine.delivery.windows import MAX_RESERVE, SortSpec, WindowChange, WindowState
from engine.protocol import ErrorCode, error_message
from engine.query import Matcher, conjunction
from engine.transactions import transaction_message

if TYPE_CHECKING:
    from engine.hub import WebSocketConnection

logger = logging.getLogger("engine.windows")

# (query, sort, how many, ids to leave out) -> the documents, in order
WindowQuery = Callable[
    [Binding, Mapping[str, Any], SortSpec, int, Sequence[Any]],
    Awaitable[list[dict[str, Any]]],
]


@dataclass
class WindowStats:
    load_queries: int = 0
    refill_queries: int = 0
    departures: int = 0  # places that emptied: see `WindowState.departures`
    frames_encoded: int = 0


@dataclass(eq=False)
class WindowGroup:
    window_id: str
    binding: Binding
    query: Mapping[str, Any]  # binding filter, bound scope and subscription filter together
    fields: Fields
    state: WindowState
    last_event_id: str | None = None
    members: dict[tuple[int, Hashable], tuple[WebSocketConnection, Hashable]] = field(
        default_factory=dict
    )
    queued: list[tuple[tuple[ChangeEvent, ...], str]] = field(default_factory=list)
    busy: asyncio.Future[None] | None = None  # set while the database is asked
    task: asyncio.Task[None] | None = None  # the query being made
    joining: int = 0  # connections waiting for the window to be ready

    @property
    def unused(self) -> bool:
        return not self.members and not self.joining and self.busy is None

    def change_frame(self, changes: list[WindowChange], event: ChangeEvent, unit_id: str) -> str:
        messages = [self._message(change, event, unit_id) for change in changes]
        if len(messages) == 1:
            return codec.dumps(messages[0])
        return codec.dumps(transaction_message(unit_id, messages) | {"window": self.window_id})

    def _message(self, change: WindowChange, event: ChangeEvent, unit_id: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "change",
            "id": unit_id,
            "app_slug": self.binding.app_slug,
            "endpoint": self.binding.endpoint,
            "collection": self.binding.collection,
            "operation": change.operation,
            "document_id": change.document_id,
            "document": project(change.document, self.fields) if change.document else None,
            "update": None,
            "timestamp": event.timestamp if event.cluster_time else cluster_time_iso(None),
            "window": self.window_id,
        }
        if change.reason is not None:
            message["reason"] = change.reason
        return message

    def snapshot_message(self, subscription: Subscription) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "id": subscription.id,
            "collection": self.binding.collection,
            "documents": [project(d, self.fields) for d in self.state.ordered()],
            "event_id": self.last_event_id,
            "window": self.window_id,
            "sort": {path: direction for path, direction in self.state.spec},
            "limit": self.state.limit,
        }


class Windows:
    """Every live window of the process, by binding."""

    def __init__(
        self,
        query: WindowQuery,
        position: Callable[[Binding], str | None],
        max_reserve: int = MAX_RESERVE,
    ) -> None:
        self._query = query
        self._position = position
        self.max_reserve = max_reserve  # documents kept beyond each window at most
        self._groups: dict[Hashable, WindowGroup] = {}
        self._by_binding: dict[Binding, WindowIndex] = {}
        self._of_connection: dict[int, dict[Hashable, Hashable]] = {}  # sub id -> group key
        self._next_id = 0
        self.stats = WindowStats()

    # -- members ------------------------------------------------------------------------------

    async def join(
        self,
        connection: WebSocketConnection,
        view: View,
        subscription: Subscription,
        spec: SortSpec,
        limit: int,
        bound_scope: Mapping[str, Any] | None,
    ) -> None:
        """Send the window's snapshot and make the connection a member (SPEC 13)."""
        self.leave(connection, subscription.id)
        binding = view.binding
        query = _window_query(binding, bound_scope, subscription.filter)
        matcher = _matcher(view, subscription)
        key = (binding, codec.dumps(query), spec, limit, subscription.fields)
        group = self._groups.get(key)
        if group is None:
            group = self._create(key, binding, query, subscription.fields, spec, limit, matcher)
        group.joining += 1
        try:
            while group.busy is not None:
                await asyncio.shield(group.busy)
        finally:
            group.joining -= 1
        if self._groups.get(key) is not group:  # its query failed
            text = "the window could not be read"
            connection.send_message(error_message(ErrorCode.BAD_MESSAGE, text, subscription.id))
            return
        if connection.closing:  # gone meanwhile: a window nobody holds is not kept
            if group.unused:
                self._drop(key)
            return
        connection.send_message(group.snapshot_message(subscription))
        connection.send_message(
            {"type": "subscribed", "id": subscription.id, "window": group.window_id}
        )
        group.members[(id(connection), subscription.id)] = (connection, subscription.id)
        self._of_connection.setdefault(id(connection), {})[subscription.id] = key

    def leave(self, connection: WebSocketConnection, sub_id: Hashable) -> bool:
        keys = self._of_connection.get(id(connection))
        if not keys or sub_id not in keys:
            return False
        key = keys.pop(sub_id)
        if not keys:
            del self._of_connection[id(connection)]
        group = self._groups.get(key)
        if group is not None:
            group.members.pop((id(connection), sub_id), None)
            if group.unused:
                self._drop(key)
        return True

    def leave_all(self, connection: WebSocketConnection) -> None:
        for sub_id in list(self._of_connection.get(id(connection), {})):
            self.leave(connection, sub_id)

    def has_windows(self, binding: Binding) -> bool:
        return binding in self._by_binding

    # -- changes ------------------------------------------------------------------------------

    def route(self, binding: Binding, events: tuple[ChangeEvent, ...], unit_id: str) -> None:
        """Feed a change (or a transaction's changes of this binding) to its windows."""
        index = self._by_binding.get(binding)
        if index is None:
            return
        for group in index.candidates(events):
            if group.busy is not None:
                group.queued.append((events, unit_id))
            else:
                self._advance(group, events, unit_id)

    def _advance(
        self,
        group: WindowGroup,
        events: tuple[ChangeEvent, ...],
        unit_id: str,
        changes: list[WindowChange] | None = None,
        last: ChangeEvent | None = None,
    ) -> None:
        """Apply one unit; a refill in its middle carries what it produced so far, so the
        unit still goes out as one frame."""
        changes = [] if changes is None else changes
        for position, event in enumerate(events):
            last = event
            departures = group.state.departures
            changes.extend(group.state.apply(event))
            self.stats.departures += group.state.departures - departures
            if group.state.needs_refill:
                loop = asyncio.get_running_loop()
                group.busy = loop.create_future()
                rest = events[position + 1 :]
                group.task = loop.create_task(self._refill(group, changes, event, rest, unit_id))
                return
        group.last_event_id = unit_id
        if changes and last is not None:
            self._send(group, changes, last, unit_id)

    def _drain(self, group: WindowGroup) -> None:
        """Apply the units held while the database was asked, until one asks again."""
        while group.queued and group.busy is None:
            events, unit_id = group.queued.pop(0)
            self._advance(group, events, unit_id)

    async def _refill(
        self,
        group: WindowGroup,
        changes: list[WindowChange],
        event: ChangeEvent,
        rest: tuple[ChangeEvent, ...],
        unit_id: str,
    ) -> None:
        """Ask the database for the best documents outside the window, once for the group."""
        assert group.busy is not None
        busy = group.busy
        try:
            self.stats.refill_queries += 1
            state = group.state
            documents = await self._query(
                group.binding, group.query, state.spec, state.refill_size(), state.known_ids()
            )
            changes.extend(state.refilled(documents))
        except Exception as error:  # the database failed: members must rebuild their window
            logger.warning("refilling window %s failed: %s", group.window_id, error)
            self._fail(group)
            busy.set_result(None)
            return
        group.busy = None
        try:
            self._advance(group, rest, unit_id, changes, event)
            self._drain(group)
        except Exception:
            logger.exception("window %s could not be kept", group.window_id)
            self._fail(group)
        finally:
            busy.set_result(None)
        if group.unused:
            self._drop_group(group)

    def _send(
        self, group: WindowGroup, changes: list[WindowChange], event: ChangeEvent, unit_id: str
    ) -> None:
        if not group.members:
            return
        frame = group.change_frame(changes, event, unit_id)
        self.stats.frames_encoded += 1
        for connection, _ in list(group.members.values()):
            if connection.closing:
                continue
            if connection.pending is not None:
                connection.pending.add_frame(frame)
            else:
                connection.send(frame)

    # -- groups -------------------------------------------------------------------------------

    def _create(
        self,
        key: Hashable,
        binding: Binding,
        query: Mapping[str, Any],
        fields: Fields,
        spec: SortSpec,
        limit: int,
        matcher: Callable[[Mapping[str, Any]], bool],
    ) -> WindowGroup:
        self._next_id += 1
        group = WindowGroup(
            window_id=f"w{self._next_id}",
            binding=binding,
            query=query,
            fields=fields,
            state=WindowState(spec, limit, matcher, reserve=min(limit, self.max_reserve)),
        )
        group.busy = asyncio.get_running_loop().create_future()
        self._groups[key] = group
        index = self._by_binding.get(binding)
        if index is None:
            index = self._by_binding[binding] = WindowIndex()
        index.add(key, group, query)
        group.task = asyncio.get_running_loop().create_task(self._load(key, group))
        return group

    async def _load(self, key: Hashable, group: WindowGroup) -> None:
        assert group.busy is not None
        busy = group.busy
        group.last_event_id = self._position(group.binding)
        try:
            self.stats.load_queries += 1
            state = group.state
            documents = await self._query(
                group.binding, group.query, state.spec, state.load_size(), []
            )
            state.load(documents)
        except Exception as error:
            logger.warning("loading window %s failed: %s", group.window_id, error)
            self._drop(key)
            busy.set_result(None)
            return
        group.busy = None
        try:
            self._drain(group)
        except Exception:
            logger.exception("window %s could not be kept", group.window_id)
            self._fail(group)
        finally:
            busy.set_result(None)

    def _fail(self, group: WindowGroup) -> None:
        """A window that cannot be kept: its members are told to subscribe again."""
        for connection, sub_id in list(group.members.values()):
            connection.send_message(
                {"type": "resync_required", "reason": "window_unavailable", "ref": sub_id}
            )
        self._drop_group(group)

    def _drop_group(self, group: WindowGroup) -> None:
        for key, candidate in list(self._groups.items()):
            if candidate is group:
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        index = self._by_binding.get(group.binding)
        if index is not None:
            index.remove(key)
            if not index:
                del self._by_binding[group.binding]
        for (connection_key, sub_id), _ in list(group.members.items()):
            keys = self._of_connection.get(connection_key)
            if keys is not None and keys.get(sub_id) == key:
                del keys[sub_id]
                if not keys:
                    del self._of_connection[connection_key]

    def group_count(self) -> int:
        return len(self._groups)


def _window_query(
    binding: Binding, bound_scope: Mapping[str, Any] | None, subscription_filter: Matcher
) -> dict[str, Any]:
    """What the database is asked: binding filter, scope, subscription filter, and only this
    app's documents where documents carry `app_id`."""
    clauses: list[Mapping[str, Any]] = []
    if binding.filter.query:
        clauses.append(binding.filter.query)
    if bound_scope is not None:
        clauses.append(bound_scope)
    if subscription_filter.query:
        clauses.append(subscription_filter.query)
    # "No app_id, or this app's", without a top-level `$or`: some servers plan any top-level
    # operator as a collection scan, and this clause sits in every window query.
    clauses.append({"app_id": {"$not": {"$exists": True, "$ne": binding.app_slug}}})
    return conjunction(clauses)


def _matcher(view: View, subscription: Subscription) -> Callable[[Mapping[str, Any]], bool]:
    binding = view.binding
    scope = view.scope
    app_slug = binding.app_slug

    def matches(document: Mapping[str, Any]) -> bool:
        if "app_id" in document and document["app_id"] != app_slug:
            return False
        if not binding.filter(document) or not subscription.filter(document):
            return False
        return binding.scope is None or (scope is not None and scope(document))

    return matches
