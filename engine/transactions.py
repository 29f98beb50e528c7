"""The changes of one MongoDB transaction kept together, so they are delivered as one unit.

Change events of a transaction carry its session (`lsid`) and `txnNumber`, and MongoDB emits
them one after the other at commit. The watcher gathers consecutive events with the same
(lsid, txnNumber) and hands them on as one `Transaction` when the next event is not part of
it, or when no event came for `TRANSACTION_IDLE_SECONDS` (the stream can pause between two
batches of one large transaction; the bound keeps a lone transaction from waiting forever).
A resume position inside a transaction is never handed out: history, checkpoints and
snapshot positions only ever hold the position after a whole unit.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from bson import Timestamp

from engine import codec
from engine.changes import ChangeEvent

TRANSACTION_IDLE_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Transaction:
    """The changes of one transaction, in commit order (never empty)."""

    events: tuple[ChangeEvent, ...]

    @property
    def event_id(self) -> str:
        """The resume position after its last change: the unit's only position."""
        return self.events[-1].event_id

    @property
    def resume_token(self) -> Mapping[str, Any]:
        return self.events[-1].resume_token

    @property
    def cluster_time(self) -> Timestamp | None:
        return self.events[-1].cluster_time

    @property
    def database(self) -> str:
        return self.events[-1].database


Unit = ChangeEvent | Transaction  # what the router, history and replays handle


def transaction_key(raw: Mapping[str, Any]) -> Hashable | None:
    """(lsid, txnNumber) of a raw change event that is part of a transaction, else None."""
    number = raw.get("txnNumber")
    lsid = raw.get("lsid")
    if number is None or lsid is None:
        return None
    return (codec.dumps(lsid), int(number))


def events_of(unit: Unit) -> tuple[ChangeEvent, ...]:
    return unit.events if isinstance(unit, Transaction) else (unit,)


class TransactionGrouper:
    """Consecutive events of one transaction gathered into one unit (pure; the caller flushes
    on idle). `add` returns the units that are complete because of this event."""

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._events: list[ChangeEvent] = []

    @property
    def open(self) -> bool:
        return bool(self._events)

    def add(self, event: ChangeEvent, key: Hashable | None) -> list[Unit]:
        done: list[Unit] = []
        if self._events and key != self._key:
            done.extend(self.flush())
        if key is None:
            done.append(event)
        else:
            self._key = key
            self._events.append(event)
        return done

    def flush(self) -> list[Unit]:
        if not self._events:
            return []
        events, self._events, self._key = tuple(self._events), [], None
        return [Transaction(events)]


def transaction_message(event_id: str, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The frame of the parts of one transaction a connection may see (SPEC 13)."""
    return {"type": "transaction", "id": event_id, "changes": changes}
