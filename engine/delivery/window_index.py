"""Which windows of one binding a change could concern, without asking all of them.

As the recipient index does for views (`engine.delivery.index`): a window whose query implies
equalities (`{"board": 7}`, a scope `{"owner_id": "ann"}`) is filed under them, and a change
finds it through the values its post-image and pre-image hold there. A window whose query
implies none is asked on every change, and so is every window for a change without a
pre-image that is not an insert (a member may have left without a trace of its old values).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from engine.changes import ChangeEvent
from engine.delivery.keys import EqualityKeys, equality_keys
from engine.query import path_reader, value_key


class WindowIndex:
    def __init__(self) -> None:
        self.unindexed: dict[Hashable, Any] = {}  # group key -> group
        self._filed: dict[str, dict[Hashable, dict[Hashable, Any]]] = {}  # path -> key -> groups
        self._readers: dict[str, Callable[[Any], Sequence[Any]]] = {}
        self._keys_of: dict[Hashable, EqualityKeys] = {}
        self._all: dict[Hashable, Any] = {}

    def __bool__(self) -> bool:
        return bool(self._all)

    def add(self, group_key: Hashable, group: Any, query: Mapping[str, Any]) -> None:
        self._all[group_key] = group
        keys = equality_keys(query)
        if keys is None:
            self.unindexed[group_key] = group
            return
        self._keys_of[group_key] = keys
        for path, key in keys:
            if path not in self._filed:
                self._filed[path] = {}
                self._readers[path] = path_reader(path)
            self._filed[path].setdefault(key, {})[group_key] = group

    def remove(self, group_key: Hashable) -> None:
        self._all.pop(group_key, None)
        self.unindexed.pop(group_key, None)
        for path, key in self._keys_of.pop(group_key, ()):
            groups = self._filed[path][key]
            groups.pop(group_key, None)
            if not groups:
                del self._filed[path][key]
                if not self._filed[path]:
                    del self._filed[path]
                    del self._readers[path]

    def candidates(self, events: Iterable[ChangeEvent]) -> list[Any]:
        """The windows any of these changes could concern, each once."""
        found: dict[Hashable, Any] = dict(self.unindexed)
        for event in events:
            if event.operation != "insert" and event.before is None:
                return list(self._all.values())
            for document in (event.document, event.before):
                if document is None:
                    continue
                for path, by_key in self._filed.items():
                    for value in self._readers[path](document):
                        key = value_key(value)
                        groups = by_key.get(key) if key is not None else None
                        if groups:
                            found.update(groups)
        return list(found.values())
