"""MongoDBEngine: registers apps from manifests, mounts their endpoints, runs the realtime parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from engine.bus import Bus
from engine.checkpoints import CHECKPOINT_COLLECTION, CheckpointStore
from engine.delivery.router import Router
from engine.delivery.view import Binding
from engine.endpoint import Endpoint, EndpointSettings
from engine.history import History
from engine.http_broadcast import add_broadcast_route
from engine.hub import WebSocketConnection, WebSocketConnectionManager
from engine.identity.providers import DEFAULT_TICKET_TTL_SECONDS, AppIdentity, Identity
from engine.identity.tickets import TICKET_COLLECTION, TicketStore, add_ticket_route
from engine.identity.tokens import TokenVerifier
from engine.manifest import (
    Manifest,
    WebSocketEndpoint,
    find_manifests,
    load_manifest_file,
    parse_manifest,
)
from engine.metrics import EngineMetrics
from engine.pages import add_app_page, mount_static, page_of
from engine.query import placeholders_in
from engine.realtime import MessageHandler, Realtime, claim_realtime
from engine.recovery import Recovery
from engine.rooms.service import Rooms
from engine.settings import DEFAULT_DB_NAME, EngineSettings, mongo_uri_from_env
from engine.stats import counting
from engine.transactions import Unit
from engine.transport import TransportAbortMiddleware
from engine.watcher import Watcher, enable_pre_images

logger = logging.getLogger("engine.app")

READY_TIMEOUT_SECONDS = 2.0
CHECKPOINT_INTERVAL_SECONDS = 1.0


class RegistrationError(ValueError):
    """An app cannot be registered next to the ones already registered."""


class MongoDBEngine:
    """One engine per process: a MongoDB client, the registered apps and their connections."""

    def __init__(
        self,
        mongo_uri: str | None = None,
        db_name: str | None = None,
        *,
        settings: EngineSettings | None = None,
    ) -> None:
        self.mongo_uri = mongo_uri or mongo_uri_from_env()
        self.db_name = db_name or os.environ.get("MDB_REALTIME_DB") or DEFAULT_DB_NAME
        self.settings = settings or EngineSettings.from_env()
        self.realtime: Realtime = claim_realtime()
        self.realtime.owner = self  # endpoints made by module-level functions use this engine
        self.metrics = EngineMetrics(self.realtime)
        self.router = Router()
        self.router.max_subscriptions = self.settings.client_limits.subscriptions_per_connection
        self._watchers: dict[str, Watcher] = {}
        self._websocket_routes: dict[str, Callable[[Any], Any]] = {}
        self._histories: dict[str, History] = {}
        self.recovery = Recovery(
            self.router,
            self._histories,
            self._watchers,
            self._binding_collection,
            snapshot_limit=self.settings.snapshot_limit,
            window_reserve=self.settings.window_reserve,
        )
        self.router.snapshots = self.recovery.snapshot
        self.metrics.add_windows(self.recovery.windows)
        self.origin = uuid.uuid4().hex  # this process on the bus
        self.router.origin = self.origin
        self.rooms = Rooms(
            self.origin, self.settings.presence_timing, self.settings.presence_batch_seconds
        )
        self.realtime.rooms = self.rooms
        self.bus: Bus | None = None
        self._checkpoints: CheckpointStore | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._apps: dict[str, Manifest] = {}
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect to MongoDB and start the realtime machinery."""
        if self._running:
            return
        if not self.mongo_uri:
            raise ValueError("no MongoDB URI: pass mongo_uri or set MONGODB_URI (or MDB_MONGO_URI)")
        self._client = AsyncMongoClient(self.mongo_uri)
        await self._client.admin.command("ping")
        self.realtime.start()
        self._running = True
        self._checkpoints = CheckpointStore(self._client[self.db_name][CHECKPOINT_COLLECTION])
        tickets = TicketStore(self._client[self.db_name][TICKET_COLLECTION])
        await tickets.prepare()
        self.identity.tickets = tickets
        await self.identity.start()
        await self._sync_watchers()
        self.bus = Bus(
            self._client, self.router.app_database, self.origin, self.settings.bus_ttl_seconds
        )
        await self.bus.start(set(self.router.namespaces()))
        self.realtime.publisher = self.bus.publish
        await self.rooms.start(self._client, self.bus, self._histories)
        self._checkpointing = asyncio.create_task(self._checkpoint_loop(), name="checkpoints")
        logger.info("engine ready on database %r with %d app(s)", self.db_name, len(self._apps))

    async def shutdown(self) -> None:
        self._running = False
        self.realtime.publisher = None
        await self.rooms.stop()  # before the bus stops: members elsewhere see these leave
        if self.bus is not None:
            await self.bus.stop()
            self.bus = None
        if self._checkpointing is not None:
            self._checkpointing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointing
        await self._save_checkpoints()
        for watcher in self._watchers.values():
            await watcher.stop()
        self._watchers.clear()
        await self.realtime.stop()
        for connection in list(self.realtime.connections()):
            connection.close(1001, "server shutting down")
        if self._client is not None:
            await self._client.close()
            self._client = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        await self.initialize()
        try:
            yield
        finally:
            await self.shutdown()

    # -- apps ----------------------------------------------------------------------------------

    async def load_manifest(self, path: str | Path) -> dict[str, Any]:
        """Read and validate a manifest file; the manifest with defaults filled, as a dict."""
        return load_manifest_file(path).to_document()

    async def register_app(self, manifest: Mapping[str, Any] | Manifest) -> bool:
        self.add_app(manifest)
        if self._running:
            await self._sync_watchers()
            await self.rooms.sync()
        return True

    def add_app(self, manifest: Mapping[str, Any] | Manifest) -> Manifest:
        """Register an app (synchronous form of `register_app`)."""
        if isinstance(manifest, Manifest):
            parsed = manifest
        else:
            parsed = parse_manifest(dict(manifest), f"manifest of app {manifest.get('slug')!r}")
        if parsed.slug in self._apps:
            raise RegistrationError(f"app {parsed.slug!r} is already registered")
        for other in self._apps.values():
            self._refuse_overlap(parsed, other)
        self._apps[parsed.slug] = parsed
        for warning in parsed.warnings:
            logger.warning("%s", warning)
        self.router.add_app(parsed, self.db_name)
        self.rooms.add_app(parsed, self.db_name)
        self.realtime.manager(parsed.slug)
        logger.info("registered app %r (%d endpoint(s))", parsed.slug, len(parsed.websockets))
        return parsed

    def _refuse_overlap(self, new: Manifest, other: Manifest) -> None:
        new_db, other_db = (
            new.physical_database(self.db_name),
            other.physical_database(self.db_name),
        )
        new_prefix, other_prefix = new.physical_collection(""), other.physical_collection("")
        if new_db == other_db and (
            new_prefix.startswith(other_prefix) or other_prefix.startswith(new_prefix)
        ):
            raise RegistrationError(
                f"app {new.slug!r} would share collections with app {other.slug!r}: "
                f"prefixes {new_prefix!r} and {other_prefix!r} overlap in database {new_db!r}; "
                "set data.collection_prefix or data.database in one of the manifests"
            )

    def app_manifest(self, slug: str) -> Manifest:
        try:
            return self._apps[slug]
        except KeyError:
            raise KeyError(f"no app {slug!r} is registered") from None

    @property
    def apps(self) -> dict[str, Manifest]:
        return dict(self._apps)

    def collection(self, slug: str, name: str) -> AsyncCollection[dict[str, Any]]:
        """The physical collection behind collection `name` of app `slug`, for writes."""
        if self._client is None:
            raise RuntimeError("the engine is not initialized: await engine.initialize() first")
        manifest = self.app_manifest(slug)
        database = self._client[manifest.physical_database(self.db_name)]
        return database[manifest.physical_collection(name)]

    # -- routes --------------------------------------------------------------------------------

    @cached_property
    def verifier(self) -> TokenVerifier:
        return self.identity.secret

    @cached_property
    def identity(self) -> Identity:
        return self.settings.identity()

    def app_identity(self, slug: str) -> AppIdentity:
        """How the tokens and tickets of app `slug` are verified (an app with no manifest, as
        mounted by `create_websocket_endpoint`, by the engine's settings alone)."""
        manifest = self._apps.get(slug)
        if manifest is None:
            return self.identity.for_app(slug)
        return self.identity.for_app(
            slug, manifest.jwt_settings(), manifest.ticket_ttl_seconds(DEFAULT_TICKET_TTL_SECONDS)
        )

    def register_websocket_routes(self, app: FastAPI, slug: str) -> list[str]:
        """Mount every endpoint of app `slug` at `/<slug><path>`; the mounted paths."""
        manifest = self.app_manifest(slug)
        mounted = []
        for name, config in manifest.websockets.items():
            endpoint = self.websocket_endpoint(
                self.settings.endpoint(
                    slug,
                    name,
                    config.path,
                    require_auth=config.auth.required,
                    allow_anonymous=config.auth.allow_anonymous,
                    ping_interval=config.ping_interval,
                    allowed_origins=_allowed_origins(manifest),
                    same_origin=config.auth.csrf_required,
                    identity_placeholders=_scope_placeholders(config),
                )
            )
            route = f"/{slug}{config.path}"
            app.router.add_websocket_route(route, endpoint.__call__, name=f"{slug}:{name}")
            self._websocket_routes[route] = endpoint.__call__
            mounted.append(route)
        return mounted

    def websocket_endpoint(self, settings: EndpointSettings) -> Endpoint:
        """An endpoint served by this engine: its connections, tokens, subscriptions, rooms,
        resumes and the changes of the manifest's bindings for (app, endpoint name), if any."""
        slug, name = settings.app_slug, settings.name
        return Endpoint(
            settings,
            self.realtime,
            lambda: self.app_identity(slug),
            protocol_handlers={
                **self.router.protocol_handlers(),
                **self.rooms.protocol_handlers(slug, name),
            },
            on_connect=self.recovery.on_connect,
            on_disconnect=self._detach,
            stats=self.metrics.stats.endpoint(slug, name),
        )

    def _detach(self, connection: WebSocketConnection) -> None:
        self.router.detach(connection)
        self.rooms.detach(connection)

    def register_message_handler(self, slug: str, endpoint: str, handler: MessageHandler) -> None:
        self.realtime.register_handler(slug, endpoint, handler)

    def get_websocket_manager(self, slug: str) -> WebSocketConnectionManager:
        return self.realtime.manager(slug)

    async def broadcast_to_app(
        self, slug: str, message: dict[str, Any], user_id: str | None = None
    ) -> int:
        return await self.realtime.broadcast(slug, message, user_id)

    async def broadcast_to_room(self, slug: str, room: str, message: dict[str, Any]) -> str:
        """Send `message` to the members of a room on every process; the message id."""
        return await self.rooms.broadcast_to_room(slug, room, message)

    async def get_presence(self, slug: str, room: str) -> list[dict[str, Any]]:
        """The members of a room with `presence`, on every process."""
        return await self.rooms.get_presence(slug, room)

    def create_app(self, manifests_dir: str | Path | None = None) -> FastAPI:
        """A FastAPI app serving every manifest in `manifests_dir`, with health routes."""
        app = FastAPI(title="mdb-realtime", lifespan=self.lifespan)
        app.add_middleware(TransportAbortMiddleware, websocket_routes=self.websocket_routes)
        app.state.engine = self
        if manifests_dir is not None:
            for path in find_manifests(manifests_dir):
                manifest = self.add_app(load_manifest_file(path))
                self.register_websocket_routes(app, manifest.slug)
                self.register_http_routes(app, manifest.slug, page_of(path))
        self.add_health_routes(app)
        mount_static(app)
        return app

    def register_http_routes(self, app: FastAPI, slug: str, page: Path | None = None) -> None:
        """`POST /<slug>/broadcast` for service back ends, and the app's page at `/<slug>/`."""
        add_broadcast_route(app, slug, lambda: self.verifier, self.realtime.broadcast)
        add_ticket_route(app, slug, lambda: self.app_identity(slug))
        if page is not None:
            add_app_page(app, slug, page)

    def add_health_routes(self, app: FastAPI) -> None:
        app.add_api_route("/healthz", self._healthz, methods=["GET"], include_in_schema=False)
        app.add_api_route("/readyz", self._readyz, methods=["GET"], include_in_schema=False)
        app.add_api_route("/metrics", self._metrics, methods=["GET"], include_in_schema=False)

    async def _healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _readyz(self) -> JSONResponse:
        problems = await self.readiness_problems()
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def readiness_problems(self) -> list[str]:
        if self._client is None or not self._running:
            return ["engine not started"]
        problems = [
            f"change stream on {name!r} is not running ({watcher.last_error or 'starting'})"
            for name, watcher in self._watchers.items()
            if not watcher.running
        ]
        problems += await self.identity.problems()
        try:
            await asyncio.wait_for(self._client.admin.command("ping"), READY_TIMEOUT_SECONDS)
        except (PyMongoError, TimeoutError) as error:
            problems.insert(0, f"MongoDB does not answer: {type(error).__name__}")
        return problems

    # -- change streams ------------------------------------------------------------------------

    async def _sync_watchers(self) -> None:
        """One watcher per database with bound collections, watching exactly those."""
        assert self._client is not None
        for database, collections in self.router.namespaces().items():
            await enable_pre_images(self._client[database], collections)
            watcher = self._watchers.get(database)
            if watcher is None:
                history = self._histories[database] = History(self.settings.history_events)
                checkpoint = await self._checkpoints.load(database) if self._checkpoints else None
                sink = counting(self.metrics.stats.watcher(database), self._sink(history))
                watcher = Watcher(self._client, database, collections, sink, checkpoint)
                self._watchers[database] = watcher
                await watcher.start()
            elif watcher.collections != collections:
                await watcher.watch(collections)

    def _sink(self, history: History) -> Callable[[Unit], None]:
        def route(event: Unit) -> None:
            history.append(event)
            self.router.route(event)
            self.rooms.route(event)  # room messages and presence on the bus

        return route

    def _binding_collection(self, binding: Binding) -> AsyncCollection[dict[str, Any]]:
        if self._client is None:
            raise RuntimeError("the engine is not initialized")
        return self._client[binding.database][binding.physical]

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_SECONDS)
            await self._save_checkpoints()

    async def _save_checkpoints(self) -> None:
        if self._checkpoints is None:
            return
        for database, watcher in self._watchers.items():
            await self._checkpoints.save(database, watcher.resume_token)

    @property
    def websocket_routes(self) -> dict[str, Callable[[Any], Any]]:
        """Path -> endpoint of every mounted engine endpoint (shared, kept up to date)."""
        return self._websocket_routes

    @property
    def watchers(self) -> dict[str, Watcher]:
        return dict(self._watchers)

    async def _metrics(self) -> PlainTextResponse:
        body, content_type = self.metrics.render()
        return PlainTextResponse(body, media_type=content_type)


def _scope_placeholders(endpoint: WebSocketEndpoint) -> tuple[str, ...]:
    """The placeholders the endpoint's scopes read (what a refreshed token must keep)."""
    found: set[str] = set()
    for binding in endpoint.watch.values():
        if binding.scope is not None:
            found |= placeholders_in(binding.scope)
    return tuple(sorted(found))


def _allowed_origins(manifest: Manifest) -> tuple[str, ...] | None:
    cors = manifest.cors
    if cors is None or not cors.enabled or not cors.allow_origins:
        return None
    return tuple(manifest.cors.allow_origins)
