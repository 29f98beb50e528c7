"""Who is in a room, as one process knows it, and presence events batched into frames (no I/O).

`RoomPresence` is this process's copy of a room's members on every process: loaded from the
presence store by one read when the first local member joins, then kept up to date from the
presence events on the bus. Events that arrive while the read runs are merged, so the copy
never misses a join or resurrects a member who left.

`PresenceBatch` collects the events of one interval; every member then gets one frame for the
whole interval, encoded once for the room, so a join storm of N members costs each member
about (storm duration / interval) frames, not N.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine import codec

JOIN = "join"
LEAVE = "leave"


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in a room; `origin` is the process it is connected to."""

    connection_id: str
    user_id: str | None
    info: Any
    origin: str
    # Built once: a join storm lists every member to every joiner (read-only, never mutated).
    shown: dict[str, Any] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        shown = {"user_id": self.user_id, "connection_id": self.connection_id, "info": self.info}
        object.__setattr__(self, "shown", shown)

    def to_json(self) -> dict[str, Any]:
        return self.shown


@dataclass
class RoomPresence:
    """Members of one room by connection id, and what changed while they were being read."""

    members: dict[str, Member] = field(default_factory=dict)
    loading: bool = True
    _left_while_loading: set[str] = field(default_factory=set)

    def join(self, member: Member) -> bool:
        """Add or update a member; True if that changed anything."""
        self._left_while_loading.discard(member.connection_id)
        if self.members.get(member.connection_id) == member:
            return False
        self.members[member.connection_id] = member
        return True

    def leave(self, connection_id: str) -> Member | None:
        """Remove a member; the member removed, or None if it was not there."""
        if self.loading:
            self._left_while_loading.add(connection_id)
        return self.members.pop(connection_id, None)

    def loaded(self, stored: Iterable[Member]) -> list[Member]:
        """Merge the members read from the store; the ones that were new here."""
        added = []
        for member in stored:
            key = member.connection_id
            if key in self._left_while_loading or key in self.members:
                continue
            self.members[key] = member
            added.append(member)
        self.loading = False
        self._left_while_loading.clear()
        return added

    def drop_origin(self, origin: str) -> list[Member]:
        """Remove every member of a process that is gone; the members removed."""
        gone = [m for m in self.members.values() if m.origin == origin]
        for member in gone:
            del self.members[member.connection_id]
        return gone

    def origins(self) -> set[str]:
        return {member.origin for member in self.members.values()}

    def listing(self) -> list[dict[str, Any]]:
        return [member.to_json() for member in self.members.values()]


@dataclass
class PresenceBatch:
    """Presence events of one room waiting for the next frame."""

    events: list[tuple[str, Member]] = field(default_factory=list)

    def add(self, event: str, member: Member) -> None:
        self.events.append((event, member))

    def take_frame(self, room: str) -> str | None:
        """The frame for the events so far (None if there are none), and start afresh."""
        events, self.events = self.events, []
        if not events:
            return None
        return codec.dumps(presence_message(room, events))


def presence_message(room: str, events: list[tuple[str, Member]]) -> dict[str, Any]:
    """SPEC 11's single-event shape for one event; several: `events`, each {event, member}."""
    if len(events) == 1:
        event, member = events[0]
        return {"type": "presence", "room": room, "event": event, "member": member.to_json()}
    return {
        "type": "presence",
        "room": room,
        "events": [{"event": event, "member": member.to_json()} for event, member in events],
    }
