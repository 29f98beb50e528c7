"""Recent change events of one database, kept in memory to serve resumes without a query.

A transaction is one entry: its only position is the one after its last change."""

from __future__ import annotations

from collections import deque
from itertools import islice

from engine.transactions import Unit

DEFAULT_HISTORY_EVENTS = 10_000


class History:
    """The last `limit` events in commit order, found by their id."""

    def __init__(self, limit: int = DEFAULT_HISTORY_EVENTS) -> None:
        self.limit = limit
        self._events: deque[Unit] = deque()
        self._sequence_of: dict[str, int] = {}
        self._first_sequence = 0  # sequence number of _events[0]

    def append(self, event: Unit) -> None:
        self._sequence_of[event.event_id] = self._first_sequence + len(self._events)
        self._events.append(event)
        if len(self._events) > self.limit:
            dropped = self._events.popleft()
            self._sequence_of.pop(dropped.event_id, None)
            self._first_sequence += 1

    def after(self, event_id: str) -> list[Unit] | None:
        """Events committed after `event_id`; None when that id is not in memory."""
        sequence = self._sequence_of.get(event_id)
        if sequence is None:
            return None
        return list(islice(self._events, sequence - self._first_sequence + 1, None))

    @property
    def last_id(self) -> str | None:
        return self._events[-1].event_id if self._events else None

    def __len__(self) -> int:
        return len(self._events)
