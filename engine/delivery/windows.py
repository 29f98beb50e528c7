"""Windows: the first `limit` matching documents in a sort order, kept as changes arrive.

A `WindowState` holds the documents of one window (pure, no I/O). For each change it says
what a client applying its messages must do: `insert` with reason `entered_window`, `delete`
with reason `left_window` (plain `delete` when the document was deleted), or `update`. When a
document leaves a window that may have more matching documents beyond it, the state asks for
a refill: the best documents outside it, read from the database by one bounded query
(`refill_query`). A member that moves to the last place of such a window is held in limbo
until that query says whether an outside document now sorts before it.

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
    """The members of one window, in order, and whether documents may lie beyond it."""

    spec: SortSpec
    limit: int
    matches: Callable[[Mapping[str, Any]], bool]
    # No matching document outside the window (known when a query returned fewer).
    exhausted: bool = False
    entries: list[tuple[Any, Hashable]] = field(default_factory=list)  # (sort key, id key)
    documents: dict[Hashable, Mapping[str, Any]] = field(default_factory=dict)
    limbo: dict[Hashable, Mapping[str, Any]] = field(default_factory=dict)
    _key: Callable[[Mapping[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        self._key = sort_key(self.spec)

    # -- loading --------------------------------------------------------------------------------

    def load(self, documents: list[Mapping[str, Any]]) -> None:
        """The result of `find(...).sort(spec).limit(limit + 1)`."""
        self.entries, self.documents, self.limbo = [], {}, {}
        for document in documents[: self.limit]:
            self._insert(document)
        self.exhausted = len(documents) <= self.limit

    def ordered(self) -> list[Mapping[str, Any]]:
        return [self.documents[key] for _, key in self.entries]

    @property
    def needs_refill(self) -> bool:
        return not self.exhausted and (len(self.entries) < self.limit or bool(self.limbo))

    def refill_size(self) -> int:
        """How many documents the refill query asks for: the empty places, plus one to know
        whether more lie beyond."""
        return self.limit - len(self.entries) + 1

    def member_ids(self) -> list[Any]:
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
            return self._member_changed(event, key, document if matching else None)
        if not matching:
            return []
        assert document is not None
        return self._outsider_matches(event, document)

    def _gone(self, event: ChangeEvent) -> WindowChange:
        reason = None if event.operation == "delete" else LEFT_WINDOW
        return WindowChange("delete", reason, event.document_id, None)

    def _member_changed(
        self, event: ChangeEvent, key: Hashable, document: Mapping[str, Any] | None
    ) -> list[WindowChange]:
        self._remove(key)
        if document is None:
            return [self._gone(event)]
        entry = (self._sort_key(document), key)
        if self.exhausted or (self.entries and entry < self.entries[-1]):
            self._insert(document)
            return [WindowChange("update", None, event.document_id, document)]
        # The last place of a window with more beyond: an outside document may now come first.
        self.limbo[key] = document
        return []

    def _outsider_matches(
        self, event: ChangeEvent, document: Mapping[str, Any]
    ) -> list[WindowChange]:
        if len(self.entries) < self.limit and self.exhausted:
            self._insert(document)
            return [WindowChange("insert", ENTERED_WINDOW, event.document_id, document)]
        if (
            self.entries
            and (self._sort_key(document), id_key(event.document_id)) < (self.entries[-1])
        ):
            changes = []
            if len(self.entries) >= self.limit:
                changes.append(self._evict_last())
            self._insert(document)
            changes.append(WindowChange("insert", ENTERED_WINDOW, event.document_id, document))
            self.exhausted = False
            return changes
        self.exhausted = False  # it lies beyond the window now
        return []

    def refilled(self, documents: list[Mapping[str, Any]]) -> list[WindowChange]:
        """Merge the refill query's answer (best documents outside the members, in order)."""
        wanted = self.limit - len(self.entries)
        changes: list[WindowChange] = []
        limbo, self.limbo = self.limbo, {}
        for document in documents[:wanted]:
            key = id_key(document["_id"])
            if key in self.documents:
                continue
            self._insert(document)
            if limbo.pop(key, None) is not None:
                changes.append(WindowChange("update", None, document["_id"], document))
            else:
                changes.append(WindowChange("insert", ENTERED_WINDOW, document["_id"], document))
        for document in limbo.values():
            changes.append(WindowChange("delete", LEFT_WINDOW, document["_id"], None))
        self.exhausted = len(documents) <= wanted
        while len(self.entries) > self.limit:
            changes.append(self._evict_last())
            self.exhausted = False
        return changes

    # -- order ------------------------------------------------------------------------------------

    def _sort_key(self, document: Mapping[str, Any]) -> Any:
        assert self._key is not None
        return self._key(document)

    def _insert(self, document: Mapping[str, Any]) -> None:
        key = id_key(document["_id"])
        bisect.insort(self.entries, (self._sort_key(document), key))
        self.documents[key] = document

    def _remove(self, key: Hashable) -> None:
        document = self.documents.pop(key)
        entry = (self._sort_key(document), key)
        position = bisect.bisect_left(self.entries, entry)
        if position < len(self.entries) and self.entries[position][1] == key:
            del self.entries[position]
        else:  # never expected: keys are total; fall back to a scan
            self.entries = [e for e in self.entries if e[1] != key]

    def _evict_last(self) -> WindowChange:
        _, key = self.entries.pop()
        document = self.documents.pop(key)
        return WindowChange("delete", LEFT_WINDOW, document["_id"], None)
