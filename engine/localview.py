"""A client's local copy of what an endpoint shows it, kept from protocol messages (no I/O).

The rules (SPEC 5): upsert on insert / update / replace, remove on delete (a `left_scope`
delete included), replace a collection wholesale on `snapshot`. A `transaction` frame is
applied whole, in one call, so nobody observes half of it. Messages that carry `window`
(SPEC 13) keep that window instead: its snapshot, then `entered_window` / `left_window`;
`window(sub_id)` is its documents in the window's order. The position to resume from
is the `id` of the last change seen, or the `event_id` of the last snapshot when that came
later: the server sends every frame of a connection in stream order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.query import compare_values, sort_value

UPSERT_OPERATIONS = frozenset({"insert", "update", "replace"})


def document_key(document_id: Any) -> Hashable:
    """A dictionary key for a JSON `_id`: strings and numbers as they are (1 and 1.0 are one
    `_id` to MongoDB too); anything else, booleans included, as tagged canonical JSON, so that
    `true`, `1` and `"true"` stay apart."""
    if isinstance(document_id, str | int | float) and not isinstance(document_id, bool):
        return document_id
    return ("json", json.dumps(document_id, sort_keys=True, separators=(",", ":")))


@dataclass
class WindowView:
    """One window's documents, and the order to show them in."""

    sort: list[tuple[str, int]]
    limit: int
    documents: dict[Hashable, dict[str, Any]] = field(default_factory=dict)

    def ordered(self) -> list[dict[str, Any]]:
        """The documents in the window's sort order (JSON values in BSON type order)."""

        def compare(left: dict[str, Any], right: dict[str, Any]) -> int:
            for path, direction in self.sort:
                order = compare_values(
                    sort_value(left, path, direction < 0), sort_value(right, path, direction < 0)
                )
                if order:
                    return order * direction
            return 0

        return sorted(self.documents.values(), key=functools.cmp_to_key(compare))


class LocalView:
    """Documents per collection, windows, and the position of the last change applied."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.collections: dict[str, dict[Hashable, dict[str, Any]]] = {}
        self.windows: dict[str, WindowView] = {}  # window id -> its documents
        self.window_of: dict[Any, str] = {}  # subscription id -> window id
        self.last_event_id = last_event_id

    def window(self, sub_id: Any) -> list[dict[str, Any]] | None:
        """The documents of a window subscription, in order; None before its snapshot."""
        window_id = self.window_of.get(sub_id)
        window = self.windows.get(window_id) if window_id is not None else None
        return window.ordered() if window is not None else None

    def documents(self, collection: str) -> list[dict[str, Any]]:
        return list(self.collections.get(collection, {}).values())

    def get(self, collection: str, document_id: Any) -> dict[str, Any] | None:
        return self.collections.get(collection, {}).get(document_key(document_id))

    def apply(self, message: Mapping[str, Any]) -> str | None:
        """Apply one server message; the collection it changed, or None."""
        kind = message.get("type")
        if kind == "change":
            return self._apply_change(message)
        if kind == "snapshot":
            return self._apply_snapshot(message)
        if kind == "transaction":
            return self._apply_transaction(message)
        return None

    def _apply_transaction(self, message: Mapping[str, Any]) -> str | None:
        """Every change of a transaction at once; the first collection it changed."""
        changed = None
        for change in message.get("changes") or ():
            if isinstance(change, Mapping):
                collection = self._apply_change(change)
                changed = changed or collection
        event_id = message.get("id")
        if isinstance(event_id, str):
            self.last_event_id = event_id
        return changed

    def _apply_change(self, message: Mapping[str, Any]) -> str | None:
        event_id = message.get("id")
        if isinstance(event_id, str):
            self.last_event_id = event_id
        collection = message.get("collection")
        if not isinstance(collection, str):
            return None
        window_id = message.get("window")
        if window_id is not None:
            window = self.windows.get(window_id)
            if window is None:
                return None
            documents = window.documents
        else:
            documents = self.collections.setdefault(collection, {})
        key = document_key(message.get("document_id"))
        operation = message.get("operation")
        if operation == "delete":
            return collection if documents.pop(key, None) is not None else None
        document = message.get("document")
        if operation in UPSERT_OPERATIONS and isinstance(document, dict):
            documents[key] = document
            return collection
        return None

    def _apply_snapshot(self, message: Mapping[str, Any]) -> str | None:
        collection = message.get("collection")
        if not isinstance(collection, str):
            return None
        window_id = message.get("window")
        if isinstance(window_id, str):
            sort = message.get("sort") or {"_id": 1}
            window = WindowView(list(sort.items()), int(message.get("limit") or 0))
            for document in message.get("documents") or []:
                window.documents[document_key(document.get("_id"))] = dict(document)
            self.windows[window_id] = window
            self.window_of[message.get("id")] = window_id
            return collection
        self.replace(collection, message.get("documents") or [])
        event_id = message.get("event_id")
        if isinstance(event_id, str):
            self.last_event_id = event_id
        return collection

    def replace(self, collection: str, documents: Iterable[Mapping[str, Any]]) -> None:
        self.collections[collection] = {
            document_key(document.get("_id")): dict(document) for document in documents
        }

    def clear(self) -> None:
        self.collections.clear()
        self.windows.clear()
        self.window_of.clear()
