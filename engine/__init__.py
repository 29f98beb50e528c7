"""mdb-realtime: a realtime engine for FastAPI + MongoDB apps."""

from engine.app import MongoDBEngine, RegistrationError
from engine.manifest import Manifest, ManifestError
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
    register_message_handler,
)

__all__ = [
    "Manifest",
    "ManifestError",
    "MongoDBEngine",
    "RegistrationError",
    "WebSocketConnection",
    "WebSocketConnectionManager",
    "authenticate_websocket",
    "broadcast_to_app",
    "broadcast_to_room",
    "create_websocket_endpoint",
    "get_message_handler",
    "get_presence",
    "get_websocket_manager",
    "register_message_handler",
]
