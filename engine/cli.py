"""The `mdb-realtime` command: serve, validate, show, token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging.config
import os
import signal
import sys
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvicorn

from engine.settings import DEFAULT_DB_NAME, EngineSettings, mongo_uri_from_env
from engine.wsprotocol import protocol_for

DEFAULT_MANIFESTS_DIR = "manifests"
TRANSPORT_MAX_FRAME_BYTES = 1024 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdb-realtime", description="Realtime engine for FastAPI + MongoDB apps."
    )
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="serve the apps of a manifests folder")
    serve.add_argument("--manifests", default=DEFAULT_MANIFESTS_DIR, help="manifests folder")
    serve.add_argument(
        "--mongo-uri", default=None, help="MongoDB URI (default: $MONGODB_URI, then $MDB_MONGO_URI)"
    )
    serve.add_argument("--db", default=None, help=f"database (default: {DEFAULT_DB_NAME})")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--data-dir", default=None, help="data folder (default: .mdb-realtime)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--jwks-url", default=None, help="identity provider keys (default: $MDB_REALTIME_JWKS_URL)"
    )
    serve.add_argument(
        "--jwt-issuer", default=None, help="required `iss` (default: $MDB_REALTIME_JWT_ISSUER)"
    )
    serve.add_argument(
        "--jwt-audience",
        default=None,
        help="accepted `aud`, comma-separated (default: $MDB_REALTIME_JWT_AUDIENCE)",
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="engine processes sharing the port (default 1)"
    )
    serve.add_argument(
        "--ws",
        default="websockets-sansio",
        choices=["websockets", "websockets-sansio", "wsproto"],
        help="WebSocket implementation under the ASGI app",
    )
    serve.set_defaults(run=_serve)

    validate = commands.add_parser("validate", help="check manifests; exit 1 on any problem")
    validate.add_argument("paths", nargs="+", metavar="PATH")
    validate.set_defaults(run=_validate)

    show = commands.add_parser("show", help="print a manifest with every default filled in")
    show.add_argument("path", metavar="PATH")
    show.set_defaults(run=_show)

    token = commands.add_parser("token", help="print a signed access token for development")
    token.add_argument("--app", required=True, help="app slug (the token's audience)")
    token.add_argument("--user", required=True, help="user id (the `sub` claim)")
    token.add_argument("--email", default=None)
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.add_argument(
        "--claim", action="append", default=[], metavar="K=V", help="extra claim (JSON value)"
    )
    token.add_argument("--data-dir", default=None, help="data folder (default: .mdb-realtime)")
    token.set_defaults(run=_token)
    return parser


_PROVIDER_FLAGS = {
    "jwks_url": "MDB_REALTIME_JWKS_URL",
    "jwt_issuer": "MDB_REALTIME_JWT_ISSUER",
    "jwt_audience": "MDB_REALTIME_JWT_AUDIENCE",
}


def _apply_provider_flags(args: argparse.Namespace) -> None:
    """Flags win over the environment; set there, worker processes inherit them too."""
    for flag, variable in _PROVIDER_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[variable] = value


def _settings(data_dir: str | None) -> EngineSettings:
    settings = EngineSettings.from_env()
    return replace(settings, data_dir=Path(data_dir)) if data_dir else settings


def _validate(args: argparse.Namespace) -> int:
    from engine.manifest import validate_command

    return validate_command(list(args.paths))


def _show(args: argparse.Namespace) -> int:
    from engine.manifest import show_command

    return show_command(args.path)


def _parse_claim(text: str) -> tuple[str, Any]:
    name, separator, raw = text.partition("=")
    if not separator or not name:
        raise SystemExit(f"mdb-realtime token: --claim needs K=V, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def _token(args: argparse.Namespace) -> int:
    from engine.identity.tokens import issue_token

    if args.ttl <= 0:
        print("mdb-realtime token: --ttl must be positive", file=sys.stderr)
        return 2
    settings = _settings(args.data_dir)
    print(
        issue_token(
            settings.verifier().secret,
            app_slug=args.app,
            user_id=args.user,
            email=args.email,
            ttl_seconds=args.ttl,
            claims=dict(_parse_claim(c) for c in args.claim),
            algorithm=settings.jwt_algorithms[0],
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine.embedded import EmbeddedDatabase, EmbeddedDatabaseError
    from engine.logs import logging_config

    # Before anything logs, so that no line (the embedded database's start included) has a token.
    logging.config.dictConfig(logging_config(args.log_level.upper()))
    _apply_provider_flags(args)
    try:
        settings = _settings(args.data_dir)
    except ValueError as error:
        print(f"mdb-realtime: {error}", file=sys.stderr)
        return 2
    mongo_uri = args.mongo_uri or mongo_uri_from_env()
    embedded: EmbeddedDatabase | None = None
    if not mongo_uri:
        embedded = EmbeddedDatabase(settings.data_dir / "data")
        try:
            embedded.start(log_path=_embedded_log_path(settings.data_dir))
        except EmbeddedDatabaseError as error:
            print(f"mdb-realtime: {error}", file=sys.stderr)
            return 1
        mongo_uri = embedded.uri
        print(
            f"mdb-realtime: no MongoDB URI given; started the embedded database (SecantusDB) "
            f"at {mongo_uri} with data in {settings.data_dir / 'data'}. It is for trying the "
            "engine; production uses a MongoDB replica set (see docker-compose.yml).",
            file=sys.stderr,
            flush=True,
        )
    try:
        if args.workers > 1:
            return _run_workers(args, settings, mongo_uri)
        return run_event_loop(_run_server(args, settings, mongo_uri))
    except KeyboardInterrupt:
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


# Worker processes rebuild the app from these (set by the parent before it starts them).
_WORKER_MANIFESTS = "MDB_REALTIME_WORKER_MANIFESTS"
_WORKER_MONGO_URI = "MDB_REALTIME_WORKER_MONGO_URI"
_WORKER_DB = "MDB_REALTIME_WORKER_DB"


def _run_workers(args: argparse.Namespace, settings: EngineSettings, mongo_uri: str) -> int:
    """N processes on one listening socket (uvicorn's supervisor); each is a full engine that
    tails the change streams itself, and broadcasts reach all of them through the bus."""
    from uvicorn.supervisors import Multiprocess

    from engine.manifest import ManifestError, find_manifests, load_manifest_file

    try:  # refuse bad manifests once, clearly, before starting anything
        apps = [load_manifest_file(path) for path in find_manifests(args.manifests)]
    except (ManifestError, ValueError, OSError) as error:
        print(f"mdb-realtime: cannot serve {args.manifests}:\n{error}", file=sys.stderr)
        return 1
    os.environ[_WORKER_MANIFESTS] = str(Path(args.manifests).resolve())
    os.environ[_WORKER_MONGO_URI] = mongo_uri
    os.environ[_WORKER_DB] = args.db or ""
    os.environ["MDB_REALTIME_DATA_DIR"] = str(settings.data_dir.resolve())
    config = uvicorn.Config(
        "engine.cli:worker_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        ws=protocol_for(args.ws),
        ws_max_size=max(TRANSPORT_MAX_FRAME_BYTES, 4 * settings.max_message_bytes),
        # Without per-message compression a frame's bytes are the same for every socket,
        # so a broadcast is encoded once and written to each transport as is.
        ws_per_message_deflate=False,
        ws_ping_interval=None,  # the engine's own keepalive (ping / 4408) covers it
        log_config=None,
        lifespan="on",
    )
    sock = config.bind_socket()
    sock.listen(config.backlog)  # connections wait in the backlog until a worker is up
    port = sock.getsockname()[1]
    print(
        f"mdb-realtime serving {len(apps)} app(s) on http://{args.host}:{port} "
        f"with {args.workers} workers",
        flush=True,
    )
    Multiprocess(config, sockets=[sock]).run()
    return 0


def worker_app() -> Any:
    """The app of one worker process (see `_run_workers`)."""
    from engine.app import MongoDBEngine
    from engine.logs import install_log_filters

    install_log_filters()
    engine = MongoDBEngine(
        os.environ[_WORKER_MONGO_URI], os.environ.get(_WORKER_DB) or None, settings=_settings(None)
    )
    return engine.create_app(os.environ[_WORKER_MANIFESTS])


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop where it is installed (uvicorn[standard] brings it): its C
    transports are cheaper per socket and per write than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _embedded_log_path(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir / "secantus.log"


async def _run_server(args: argparse.Namespace, settings: EngineSettings, mongo_uri: str) -> int:
    from engine.app import MongoDBEngine
    from engine.manifest import ManifestError

    engine = MongoDBEngine(mongo_uri, args.db, settings=settings)
    try:
        app = engine.create_app(args.manifests)
    except (ManifestError, ValueError, OSError) as error:
        print(f"mdb-realtime: cannot serve {args.manifests}:\n{error}", file=sys.stderr)
        return 1
    return await serve_app(app, args.host, args.port, args.ws, settings, len(engine.apps))


async def serve_app(
    app: Any,
    host: str,
    port: int,
    ws: str,
    settings: EngineSettings,
    app_count: int,
) -> int:
    """Run an ASGI app under uvicorn until SIGINT/SIGTERM, printing the URL once bound."""
    from engine.logs import install_log_filters
    from engine.transport import outermost

    install_log_filters()
    app = outermost(app)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ws=protocol_for(ws),
        ws_max_size=max(TRANSPORT_MAX_FRAME_BYTES, 4 * settings.max_message_bytes),
        # Without per-message compression a frame's bytes are the same for every socket,
        # so a broadcast is encoded once and written to each transport as is.
        ws_per_message_deflate=False,
        ws_ping_interval=None,  # the engine's own keepalive (ping / 4408) covers it
        log_config=None,
        lifespan="on",
    )
    server = _Server(config)
    announce = asyncio.create_task(_announce(server, host, app_count))
    try:
        await server.serve()
    finally:
        announce.cancel()
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGINT/SIGTERM ends `serve()` normally instead of being re-raised
    after shutdown, so the caller's clean-up (stopping the embedded database) always runs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _announce(server: Any, host: str, app_count: int) -> None:
    """Print the URL once the socket is bound (with --port 0 this is how callers learn it)."""
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"mdb-realtime serving {app_count} app(s) on http://{host}:{port}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
