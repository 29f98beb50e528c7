"""mdb-engine compatible routing names (`mdb_engine.routing` exports the same)."""

from engine.routing.websockets import (
    WebSocketConnection,
    WebSocketConnectionManager,
    authenticate_websocket,
    broadcast_to_app,
    broadcast_to_room,
    create_websocket_endpoint,
    get_message_handler,
    get_presence,
    get_websocket_manager,
    get_websocket_manager_sync,
    register_message_handler,
)

__all__ = [
    "WebSocketConnection",
    "WebSocketConnectionManager",
    "authenticate_websocket",
    "broadcast_to_app",
    "broadcast_to_room",
    "create_websocket_endpoint",
    "get_message_handler",
    "get_presence",
    "get_websocket_manager",
    "get_websocket_manager_sync",
    "register_message_handler",
]
