"""The mdb-engine WebSocket API (`mdb_engine.routing.websockets`), same names and meaning.

Module-level functions act on the default realtime state, which the first `MongoDBEngine`
of the process adopts; handlers may be registered before or after any engine exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from engine.endpoint import Endpoint, EndpointSettings, authenticate
from engine.hub import WebSocketConnection, WebSocketConnectionManager
from engine.identity.providers import AppIdentity, Identity
from engine.identity.tokens import AuthError
from engine.protocol import CloseCode
from engine.realtime import MessageHandler, default_realtime
from engine.settings import EngineSettings

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


async def get_websocket_manager(app_slug: str) -> WebSocketConnectionManager:
    """The connection manager of an app on this process."""
    return default_realtime().manager(app_slug)


def get_websocket_manager_sync(app_slug: str) -> WebSocketConnectionManager:
    return default_realtime().manager(app_slug)


async def broadcast_to_app(
    app_slug: str, message: dict[str, Any], user_id: str | None = None
) -> int:
    """Send `message` to the app's clients (or one user's); the connections reached here."""
    return await default_realtime().broadcast(app_slug, message, user_id)


async def broadcast_to_room(app_slug: str, room: str, message: dict[str, Any]) -> str:
    """Send `message` to the members of a room on every engine process (SPEC 11); the
    message id. Members get it as the `data` of a `room_message`."""
    return str(await _rooms().broadcast_to_room(app_slug, room, message))


async def get_presence(app_slug: str, room: str) -> list[dict[str, Any]]:
    """The members of a room with `presence`, on every engine process: [{user_id,
    connection_id, info}], one entry per connection."""
    members: list[dict[str, Any]] = await _rooms().get_presence(app_slug, room)
    return members


def _rooms() -> Any:
    rooms = default_realtime().rooms
    if rooms is None:
        raise RuntimeError("no engine is running: create a MongoDBEngine and initialize it")
    return rooms


def register_message_handler(app_slug: str, endpoint_name: str, handler: MessageHandler) -> None:
    """Handle client messages on an endpoint: `async def h(websocket, message[, connection])`."""
    default_realtime().register_handler(app_slug, endpoint_name, handler)


def get_message_handler(app_slug: str, endpoint_name: str) -> MessageHandler | None:
    registered = default_realtime().handler(app_slug, endpoint_name)
    return registered.func if registered is not None else None


async def authenticate_websocket(
    websocket: WebSocket, app_slug: str, require_auth: bool = True
) -> tuple[str | None, str | None]:
    """(user_id, user_email) of a handshake; (None, None) without a token.

    Raises WebSocketDisconnect(1008) for a token that is present but refused, or when a
    token is required and missing.
    """
    settings = EndpointSettings(app_slug=app_slug, name="", path="", require_auth=require_auth)
    try:
        principal = await authenticate(
            settings, _app_identity(app_slug), websocket.query_params, websocket.headers
        )
    except AuthError as refused:
        raise WebSocketDisconnect(CloseCode.POLICY_VIOLATION, str(refused.reason)) from None
    return principal.user_id, principal.email


def _app_identity(app_slug: str) -> AppIdentity:
    """How the engine of this process verifies the app's tokens, or, before any engine, the
    identity the environment's settings describe."""
    owner = default_realtime().owner
    if owner is None:
        return _shared_identity(EngineSettings.from_env()).for_app(app_slug)
    identity: AppIdentity = owner.app_identity(app_slug)
    return identity


def create_websocket_endpoint(
    app_slug: str,
    path: str,
    endpoint_name: str,
    handler: MessageHandler | None = None,
    require_auth: bool = True,
    ping_interval: int = 30,
) -> Callable[[WebSocket], Awaitable[None]]:
    """A route handler for one endpoint, to mount with `app.add_api_websocket_route(path, ...)`.

    It is built at its first connection, from the engine of the process when there is one
    (its settings, subscriptions, resumes and the manifest's bindings of this endpoint name),
    else from the environment's settings (`EngineSettings.from_env`), as `serve` reads them.
    """
    if handler is not None:
        default_realtime().register_handler(app_slug, endpoint_name, handler)
    built: list[Endpoint] = []

    def build() -> Endpoint:
        state = default_realtime()
        owner = state.owner
        settings = owner.settings if owner is not None else EngineSettings.from_env()
        endpoint_settings = settings.endpoint(
            app_slug, endpoint_name, path, require_auth=require_auth, ping_interval=ping_interval
        )
        if owner is not None:
            endpoint: Endpoint = owner.websocket_endpoint(endpoint_settings)
            return endpoint
        identity = _shared_identity(settings).for_app(app_slug)
        return Endpoint(endpoint_settings, state, lambda: identity)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        if not built:
            built.append(build())
        await built[0](websocket)

    return websocket_endpoint


_IDENTITIES: dict[tuple[object, ...], Identity] = {}


def _shared_identity(settings: EngineSettings) -> Identity:
    """One Identity per configuration in this process, so the functions above share one key
    cache per JWKS URL (and its refetch limit) instead of fetching per handshake."""
    key = (settings.jwt_secret, settings.data_dir, settings.jwt_algorithms, settings.provider)
    identity = _IDENTITIES.get(key)
    if identity is None:
        identity = _IDENTITIES[key] = settings.identity()
    return identity
