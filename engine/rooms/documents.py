"""Room documents on the bus (no I/O): what is published, and what members are sent of it.

Room documents carry a `kind` and no `message`, so the router (and resumes) never take them
for app broadcasts. `data` and `info` are stored as JSON text: the bus then takes any JSON a
client sent (field names with `$` or `.`, for instance) exactly as sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine import codec, protocol
from engine.bus import BUS_COLLECTION
from engine.changes import ChangeEvent
from engine.rooms.presence import Member

ROOM_MESSAGE_KIND = "room_message"
PRESENCE_KIND = "presence"
NOBODY = {"user_id": None, "connection_id": None}  # the sender of messages from app code


def room_message_fields(room: str, sender: Mapping[str, Any], data: Any) -> dict[str, Any]:
    return {
        "kind": ROOM_MESSAGE_KIND,
        "room": room,
        "from": dict(sender),
        "data": codec.dumps(data),
    }


def presence_fields(room: str, event: str, member: Member) -> dict[str, Any]:
    return {
        "kind": PRESENCE_KIND,
        "room": room,
        "event": event,
        "member": {
            "user_id": member.user_id,
            "connection_id": member.connection_id,
            "info": codec.dumps(member.info),
        },
    }


def loads(text: Any) -> Any:
    """A JSON text field back as data; None when absent or not JSON."""
    if not isinstance(text, str):
        return None
    try:
        return codec.loads(text)
    except ValueError:
        return None


def room_message(document: Mapping[str, Any], timestamp: str, event_id: str | None) -> dict:
    """The `room_message` members get for a room message document."""
    sender = document.get("from")
    return protocol.room_message(
        room=str(document.get("room")),
        message_id=str(document["_id"]),
        sender={"user_id": sender.get("user_id"), "connection_id": sender.get("connection_id")}
        if isinstance(sender, Mapping)
        else dict(NOBODY),
        data=loads(document.get("data")),
        timestamp=timestamp,
        event_id=event_id,
    )


def room_message_of(event: ChangeEvent, app_slug: str, room: str) -> dict[str, Any] | None:
    """The `room_message` of a change event, if it is a message of that room."""
    document = event.document
    if (
        event.collection != BUS_COLLECTION
        or document is None
        or document.get("kind") != ROOM_MESSAGE_KIND
        or document.get("app") != app_slug
        or document.get("room") != room
    ):
        return None
    return room_message(document, event.timestamp, event.event_id)


def member_of(document: Mapping[str, Any], origin: str) -> Member | None:
    """A member from a presence event's `member` or a presence document; None if malformed."""
    connection_id = document.get("connection_id")
    if not isinstance(connection_id, str):
        return None
    user_id = document.get("user_id")
    return Member(
        connection_id,
        user_id if isinstance(user_id, str) else None,
        loads(document.get("info")),
        origin,
    )
