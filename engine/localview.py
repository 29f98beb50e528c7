"""A client's local copy of what an endpoint shows it, kept from protocol messages (no I/O).

The rules (SPEC 5): upsert on insert / update / replace, remove on delete (a `left_scope`
delete included), replace a collection wholesale on `snapshot`. The position to resume from
is the `id` of the last change seen, or the `event_id` of the last snapshot when that came
later: the server sends every frame of a connection in stream order.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

UPSERT_OPERATIONS = frozenset({"insert", "update", "replace"})


def document_key(document_id: Any) -> Hashable:
    """A dictionary key for a JSON `_id`: strings and numbers as they are (1 and 1.0 are one
    `_id` to MongoDB too); anything else, booleans included, as tagged canonical JSON, so that
    `true`, `1` and `"true"` stay apart."""
    if isinstance(document_id, str | int | float) and not isinstance(document_id, bool):
        return document_id
    return ("json", json.dumps(document_id, sort_keys=True, separators=(",", ":")))


class LocalView:
    """Documents per collection, and the position of the last change applied."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.collections: dict[str, dict[Hashable, dict[str, Any]]] = {}
        self.last_event_id = last_event_id

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
        return None

    def _apply_change(self, message: Mapping[str, Any]) -> str | None:
        event_id = message.get("id")
        if isinstance(event_id, str):
            self.last_event_id = event_id
        collection = message.get("collection")
        if not isinstance(collection, str):
            return None
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
