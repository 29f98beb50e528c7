"""Windows: the first `limit` matching documents in a sort order, kept as changes arrive.

A `WindowState` holds the documents of one window and a reserve of the ones after it (pure,
no I/O). For each change it says what a client applying its messages must do: `insert` with
reason `entered_window`, `delete` with reason `left_window` (plain `delete` when the document
was deleted), or `update`. A member that leaves is replaced by the reserve's first. Only when
the window itself runs short (the reserve is used up) and more matching documents may lie
beyond does the state ask for a refill: the best documents outside the known ones, read from
the database by one bounded query. A member that moves beyond everything known while the
window runs short is held in limbo until that query says whether it is still in.

Order is MongoDB's: BSON comparison order across types (`engine.query.compare_values`),
missing and null equal, arrays by their smallest (ascending) or largest (descending)
element, ties broken by `_id` ascending.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.changes import ChangeEvent
from engine.delivery.view import id_key
from engine.query import compare_values, sort_value

LEFT_WINDOW = "left_window"
ENTERED_WINDOW = "entered_window"
MAX_WINDOW_LIMIT = 1000
# Documents kept beyond a window at most (the default), so most departures need no query.
MAX_RESERVE = 100

SortSpec = tuple[tuple[str, int], ...]  # (path, 1 | -1), ending with ("_id", ...) always


def parse_sort(value: Any) -> SortSpec | str:
    """The sort of a `subscribe` message, with the `_id` tie-breaker; or what is wrong."""
    if not isinstance(value, dict) or not value:
        return "`sort` must be a non-empty object of field paths to 1 or -1"
    spec: list[tuple[str, int]] = []
    for path, direction in value.items():
        if not isinstance(path, str) or not path or path.startswith("$") or "" in path.split("."):
            return f"`sort`: {path!r} is not a field path"
        if direction not in (1, -1) or isinstance(direction, bool):
            return f"`sort`: the direction of {path!r} must be 1 or -1"
        spec.append((path, int(direction)))
    if all(path != "_id" for path, _ in spec):
        spec.append(("_id", 1))
    return tuple(spec)


def parse_limit(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WINDOW_LIMIT:
        return f"`limit` must be an integer from 1 to {MAX_WINDOW_LIMIT}"
    return value


def sort_key(spec: SortSpec) -> Callable[[Mapping[str, Any]], Any]:
    """A key function ordering documents as MongoDB's `.sort(spec)` does."""
    paths = [(path, direction) for path, direction in spec]

    def compare(left: tuple[Any, ...], right: tuple[Any, ...]) -> int:
        for (_, direction), a, b in zip(paths, left, right, strict=True):
            order = compare_values(a, b)
            if order:
                return order * direction
        return 0

    to_key = functools.cmp_to_key(compare)

    def key(document: Mapping[str, Any]) -> Any:
        return to_key(tuple(sort_value(document, p, d < 0) for p, d in paths))

    return key


class WindowChange(NamedTuple):
    """One message of a window: what a client does to its copy."""

    operation: str  # insert, update or delete
    reason: str | None
    document_id: Any
    document: Mapping[str, Any] | None  # full (unprojected); None for delete


@dataclass
class WindowState:
    """The documents of one window and a reserve of the ones that come next, in order.

    `entries` is always the first `len(entries)` matching documents: the window is its first
    `limit`, the rest the reserve (up to `reserve` more). A member that leaves is replaced
    from the reserve without asking the database; only a window that runs short asks.
    """

    spec: SortSpec
    limit: int
    matches: Callable[[Mapping[str, Any]], bool]
    reserve: int = -1  # -1: min(limit, MAX_RESERVE)
    # No matching document beyond `entries` (known when a query returned fewer).
    exhausted: bool = False
    entries: list[tuple[Any, Hashable]] = field(default_factory=list)  # (sort key, id key)
    documents: dict[Hashable, Mapping[str, Any]] = field(default_factory=dict)
    limbo: dict[Hashable, Mapping[str, Any]] = field(default_factory=dict)
    # Members that left by a change of their own (deleted, no longer matching, moved past the
    # window's end): the places that emptied, which the reserve or a refill fills.
    departures: int = 0
    _key: Callable[[Mapping[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        self._key = sort_key(self.spec)
        if self.reserve < 0:
            self.reserve = min(self.limit, MAX_RESERVE)

    @property
    def capacity(self) -> int:
        return self.limit + self.reserve

    # -- loading --------------------------------------------------------------------------------

    def load_size(self) -> int:
        """How many documents the loading query asks for: the window, the reserve, and one
        to know whether more lie beyond."""
        return self.capacity + 1

    def load(self, documents: list[Mapping[str, Any]]) -> None:
        """The result of `find(...).sort(spec).limit(load_size())`."""
        self.entries, self.documents, self.limbo = [], {}, {}
        for document in documents[: self.capacity]:
            self._insert(document)
        self.exhausted = len(documents) <= self.capacity

    def ordered(self) -> list[Mapping[str, Any]]:
        """The window's documents in order (the reserve is not shown)."""
        return [self.documents[key] for _, key in self.entries[: self.limit]]

    @property
    def needs_refill(self) -> bool:
        return not self.exhausted and (len(self.entries) < self.limit or bool(self.limbo))

    def refill_size(self) -> int:
        """How many documents the refill query asks for: the empty places of the window and
        the reserve, plus one to know whether more lie beyond."""
        return self.capacity - len(self.entries) + 1

    def known_ids(self) -> list[Any]:
        """The ids the refill query leaves out: window and reserve."""
        return [self.documents[key]["_id"] for _, key in self.entries]

    # -- changes --------------------------------------------------------------------------------

    def apply(self, event: ChangeEvent) -> list[WindowChange]:
        """The messages for one change; afterwards, see `needs_refill`."""
        key = id_key(event.document_id)
        document = event.document if event.operation != "delete" else None
        matching = document is not None and self.matches(document)
        if key in self.limbo:
            del self.limbo[key]
            if matching:
                assert document is not None
                self.limbo[key] = document  # still waiting for the refill to place it
                return []
            return [self._gone(event)]
        if key in self.documents:
            return self._known_changed(event, key, document if matching else None)
        if not matching:
            return []
        assert document is not None
        return self._outsider_matches(event, document)

    def _gone(self, event: ChangeEvent) -> WindowChange:
        reason = None if event.operation == "delete" else LEFT_WINDOW
        return WindowChange("delete", reason, event.document_id, None)

    def _known_changed(
        self, event: ChangeEvent, key: Hashable, document: Mapping[str, Any] | None
    ) -> list[WindowChange]:
        was_shown = self._remove(key) < self.limit
        left = WindowChange("delete", LEFT_WINDOW, event.document_id, None)
        if was_shown:
            self.departures += 1  # taken back below if it stays in the window
        if document is None:
            return [self._gone(event), *self._promote()] if was_shown else []
        if self._belongs(document, key):
            shown = self._insert(document) < self.limit
            if was_shown and shown:
                self.departures -= 1
                return [WindowChange("update", None, event.document_id, document)]
            if was_shown:  # down into the reserve: the reserve's first takes its place
                return [left, *self._promote()]
            if shown:  # up from the reserve: the window's last makes room
                return [
                    self._left(self.limit),
                    WindowChange("insert", ENTERED_WINDOW, event.document_id, document),
                ]
            return []
        # It now sorts beyond everything known, where unknown documents may come first.
        if not was_shown:
            return []
        if len(self.entries) >= self.limit:
            return [left, *self._promote()]
        self.limbo[key] = document  # the refill query says whether it is still in
        return []

    def _outsider_matches(
        self, event: ChangeEvent, document: Mapping[str, Any]
    ) -> list[WindowChange]:
        key = id_key(event.document_id)
        if not self._belongs(document, key) or (
            len(self.entries) >= self.capacity and not self._before_last(document, key)
        ):
            self.exhausted = False  # it lies beyond what is known now
            return []
        changes = []
        if self._insert(document) < self.limit:
            if len(self.entries) > self.limit:
                changes.append(self._left(self.limit))
            changes.append(WindowChange("insert", ENTERED_WINDOW, event.document_id, document))
        if len(self.entries) > self.capacity:
            self._drop_last()
        return changes

    def refilled(self, documents: list[Mapping[str, Any]]) -> list[WindowChange]:
        """Merge the refill query's answer (best documents outside the known ones, in order)."""
        shown_before = {key: self.documents[key]["_id"] for _, key in self.entries[: self.limit]}
        limbo, self.limbo = self.limbo, {}
        wanted = self.capacity - len(self.entries)
        for document in documents[:wanted]:
            if id_key(document["_id"]) not in self.documents:
                self._insert(document)
        self.exhausted = len(documents) <= wanted
        while len(self.entries) > self.capacity:
            self._drop_last()
        shown = [key for _, key in self.entries[: self.limit]]
        shown_now = set(shown)
        changes = [
            WindowChange("delete", LEFT_WINDOW, document_id, None)
            for key, document_id in shown_before.items()
            if key not in shown_now
        ]
        changes.extend(
            WindowChange("delete", LEFT_WINDOW, document["_id"], None)
            for key, document in limbo.items()
            if key not in shown_now
        )
        for key in shown:
            if key in shown_before:
                continue
            document = self.documents[key]
            if key in limbo:
                changes.append(WindowChange("update", None, document["_id"], document))
            else:
                changes.append(WindowChange("insert", ENTERED_WINDOW, document["_id"], document))
        return changes

    # -- order ------------------------------------------------------------------------------------

    def _sort_key(self, document: Mapping[str, Any]) -> Any:
        assert self._key is not None
        return self._key(document)

    def _before_last(self, document: Mapping[str, Any], key: Hashable) -> bool:
        return bool(self.entries) and (self._sort_key(document), key) < self.entries[-1]

    def _belongs(self, document: Mapping[str, Any], key: Hashable) -> bool:
        """Whether a matching document falls among the known ones (not beyond them)."""
        return self.exhausted or self._before_last(document, key)

    def _insert(self, document: Mapping[str, Any]) -> int:
        """File a document; its position."""
        key = id_key(document["_id"])
        entry = (self._sort_key(document), key)
        position = bisect.bisect_left(self.entries, entry)
        self.entries.insert(position, entry)
        self.documents[key] = document
        return position

    def _remove(self, key: Hashable) -> int:
        """Take a document out; the position it had."""
        document = self.documents.pop(key)
        entry = (self._sort_key(document), key)
        position = bisect.bisect_left(self.entries, entry)
        if position < len(self.entries) and self.entries[position][1] == key:
            del self.entries[position]
            return position
        # never expected: keys are total; fall back to a scan
        position = next(n for n, e in enumerate(self.entries) if e[1] == key)
        del self.entries[position]
        return position

    def _promote(self) -> list[WindowChange]:
        """After a member left: the reserve's first, if any, enters the window."""
        if len(self.entries) < self.limit:
            return []
        document = self.documents[self.entries[self.limit - 1][1]]
        return [WindowChange("insert", ENTERED_WINDOW, document["_id"], document)]

    def _left(self, position: int) -> WindowChange:
        """The document at `position` was pushed out of the window (it stays known)."""
        document = self.documents[self.entries[position][1]]
        return WindowChange("delete", LEFT_WINDOW, document["_id"], None)

    def _drop_last(self) -> None:
        """Forget the last known document: the reserve is full."""
        _, key = self.entries.pop()
        del self.documents[key]
        self.exhausted = False
