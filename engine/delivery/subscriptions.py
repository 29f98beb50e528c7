"""The `subscribe` / `unsubscribe` messages: checking them and answering mistakes (SPEC 5)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import bson
import bson.errors

from engine import protocol
from engine.changes import narrow_fields
from engine.delivery.view import Subscription, View
from engine.delivery.windows import SortSpec, parse_limit, parse_sort
from engine.protocol import ErrorCode
from engine.query import QueryError, compile_query

if TYPE_CHECKING:
    from engine.hub import WebSocketConnection


class WindowRequest(NamedTuple):
    sort: SortSpec
    limit: int


class SubscribeRequest(NamedTuple):
    view: View
    subscription: Subscription
    snapshot: bool
    window: WindowRequest | None  # `sort` / `limit`: a live window (SPEC 13)


def parse_subscribe(
    connection: WebSocketConnection, message: dict[str, Any], max_subscriptions: int
) -> SubscribeRequest | None:
    """The request in a `subscribe` message; None after answering the client with an error."""
    sub_id = message.get("id")
    if not valid_id(sub_id):
        send_error(connection, ErrorCode.BAD_MESSAGE, "subscribe needs an `id` (string or number)")
        return None
    collection = message.get("collection")
    view = connection.views.get(collection) if isinstance(collection, str) else None
    if view is None:
        watched = ", ".join(sorted(connection.views)) or "none"
        text = f"collection {collection!r} is not watched by this endpoint (watched: {watched})"
        send_error(connection, ErrorCode.BAD_MESSAGE, text, sub_id)
        return None
    query = message.get("filter")
    if query is not None and not isinstance(query, dict):
        send_error(connection, ErrorCode.FORBIDDEN_FILTER, "`filter` must be an object", sub_id)
        return None
    try:
        matcher = compile_query(query)
    except QueryError as error:
        send_error(connection, ErrorCode.FORBIDDEN_FILTER, f"filter: {error}", sub_id)
        return None
    if query and not _bson_encodable(query):
        text = "filter: values MongoDB cannot store (integers beyond 64 bits, NUL in names)"
        send_error(connection, ErrorCode.FORBIDDEN_FILTER, text, sub_id)
        return None
    requested = message.get("fields")
    if requested is not None and not _valid_fields(requested):
        text = "`fields` must be a list of field paths (non-empty strings, no `$`)"
        send_error(connection, ErrorCode.BAD_MESSAGE, text, sub_id)
        return None
    snapshot = message.get("snapshot", False)
    if not isinstance(snapshot, bool):
        send_error(connection, ErrorCode.BAD_MESSAGE, "`snapshot` must be true or false", sub_id)
        return None
    window = _window_request(connection, message, sub_id)
    if window is False:
        return None
    if _too_many_subscriptions(connection, sub_id, max_subscriptions):
        text = f"too many subscriptions on this connection (at most {max_subscriptions})"
        send_error(connection, ErrorCode.RATE_LIMITED, text, sub_id)
        return None
    fields = narrow_fields(view.binding.fields, tuple(requested) if requested is not None else None)
    subscription = Subscription(sub_id, view.binding.collection, matcher, fields)
    return SubscribeRequest(view, subscription, snapshot, window or None)


def _window_request(
    connection: WebSocketConnection, message: dict[str, Any], sub_id: Any
) -> WindowRequest | bool | None:
    """The window asked for; None without `sort` / `limit`; False after answering an error."""
    if "sort" not in message and "limit" not in message:
        return None
    if "limit" not in message:
        text = "`sort` needs a `limit` (a window holds the first `limit` documents)"
        send_error(connection, ErrorCode.BAD_MESSAGE, text, sub_id)
        return False
    limit = parse_limit(message["limit"])
    if isinstance(limit, str):
        send_error(connection, ErrorCode.BAD_MESSAGE, limit, sub_id)
        return False
    sort = parse_sort(message.get("sort", {"_id": 1}))
    if isinstance(sort, str):
        send_error(connection, ErrorCode.FORBIDDEN_FILTER, sort, sub_id)
        return False
    return WindowRequest(sort, limit)


def drop_subscription(connection: WebSocketConnection, sub_id: Hashable) -> bool:
    """Remove a subscription from whichever view of the connection has it."""
    return any(view.drop_subscription(sub_id) for view in connection.views.values())


def _too_many_subscriptions(
    connection: WebSocketConnection, sub_id: Hashable, max_subscriptions: int
) -> bool:
    others = sum(
        len(view.subscriptions) - (sub_id in view.subscriptions)
        for view in connection.views.values()
    )
    return 0 < max_subscriptions <= others


def _bson_encodable(query: Mapping[str, Any]) -> bool:
    """The database must be able to take the filter (snapshots query it)."""
    try:
        bson.encode(query)
    except (bson.errors.BSONError, OverflowError, ValueError, TypeError):
        return False
    return True


def valid_id(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _valid_fields(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(f, str) and f and not f.startswith("$") and "" not in f.split(".") for f in value
    )


def send_error(
    connection: WebSocketConnection, code: ErrorCode, text: str, ref: Any = None
) -> None:
    connection.send_message(protocol.error_message(code, text, ref if valid_id(ref) else None))
