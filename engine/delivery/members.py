"""The connections of one app, also by user, so one user's messages skip everybody else."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.hub import WebSocketConnection


class Members:
    """Connections under a key of the caller's choice, in the order they were added."""

    __slots__ = ("_all", "_by_user")

    def __init__(self) -> None:
        self._all: dict[Hashable, WebSocketConnection] = {}
        self._by_user: dict[str, dict[Hashable, WebSocketConnection]] = {}

    def add(self, key: Hashable, connection: WebSocketConnection) -> None:
        self.remove(key)
        self._all[key] = connection
        if connection.user_id is not None:
            self._by_user.setdefault(connection.user_id, {})[key] = connection

    def remove(self, key: Hashable) -> WebSocketConnection | None:
        connection = self._all.pop(key, None)
        if connection is not None and connection.user_id is not None:
            of_user = self._by_user.get(connection.user_id)
            if of_user is not None:
                of_user.pop(key, None)
                if not of_user:
                    del self._by_user[connection.user_id]
        return connection

    def get(self, key: Hashable) -> WebSocketConnection | None:
        return self._all.get(key)

    def of_user(self, user_id: str) -> list[WebSocketConnection]:
        """The connections whose `user_id` equals `user_id`."""
        return list(self._by_user.get(user_id, {}).values())

    def all(self) -> list[WebSocketConnection]:
        return list(self._all.values())

    def __iter__(self) -> Iterator[WebSocketConnection]:
        return iter(self.all())

    def __len__(self) -> int:
        return len(self._all)
