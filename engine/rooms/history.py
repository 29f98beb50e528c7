"""Room history: the last messages of a room, and those a resumed connection missed.

Room messages are bus documents, so the bus collection is the history (bounded by the room's
`history` and by the bus TTL). What a resuming connection missed comes from the engine's
in-memory history of change events, which holds the bus documents in commit order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo import AsyncMongoClient

from engine import codec
from engine.bus import BUS_COLLECTION
from engine.history import History
from engine.rooms.documents import ROOM_MESSAGE_KIND, room_message, room_message_of


def missed_since(
    histories: Mapping[str, History], database: str, app_slug: str, room: str, position: str
) -> list[dict[str, Any]] | None:
    """The room's messages committed after `position`; None if that position is not in
    memory any more."""
    history = histories.get(database)
    events = history.after(position) if history is not None else None
    if events is None:
        return None
    return [
        message
        for event in events
        if (message := room_message_of(event, app_slug, room)) is not None
    ]


async def stored_history(
    client: AsyncMongoClient[dict[str, Any]], database: str, app_slug: str, room: str, limit: int
) -> list[dict[str, Any]]:
    """The room's last `limit` messages in the bus collection, oldest first (without `id`)."""
    query = {"app": app_slug, "room": room, "kind": ROOM_MESSAGE_KIND}
    cursor = (
        client[database][BUS_COLLECTION].find(query).sort([("at", -1), ("_id", -1)]).limit(limit)
    )
    documents = [document async for document in cursor]
    return [room_message(d, codec.loads(codec.dumps(d["at"])), None) for d in reversed(documents)]
