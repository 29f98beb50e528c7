"""Engine configuration: defaults, environment variables, and the token verifier they imply."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.bus import DEFAULT_BUS_TTL_SECONDS
from engine.delivery.windows import MAX_RESERVE
from engine.endpoint import DEFAULT_MAX_MESSAGE_BYTES, EndpointSettings
from engine.history import DEFAULT_HISTORY_EVENTS
from engine.hub import QueueLimits
from engine.identity.jwks import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MIN_REFETCH_SECONDS, JwksTiming
from engine.identity.providers import (
    DEFAULT_PROVIDER_ALGORITHMS,
    Identity,
    ProviderConfig,
    check_algorithms,
    check_jwks_url,
)
from engine.identity.tokens import DEFAULT_ALGORITHMS, TokenVerifier, resolve_secret
from engine.limits import ClientLimits
from engine.recovery import DEFAULT_SNAPSHOT_LIMIT
from engine.rooms.service import DEFAULT_BATCH_SECONDS
from engine.rooms.store import PresenceTiming

DEFAULT_DATA_DIR = ".mdb-realtime"
DEFAULT_DB_NAME = "mdb_realtime"
# The MongoDB URI, first set wins: the engine's variable, then the one mdb-engine reads.
MONGO_URI_ENVIRONMENT = ("MONGODB_URI", "MDB_MONGO_URI")


def mongo_uri_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return next((env[name] for name in MONGO_URI_ENVIRONMENT if env.get(name)), None)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def provider_from_env(env: Mapping[str, str]) -> ProviderConfig:
    """MDB_REALTIME_JWKS_URL, _JWT_ISSUER, _JWT_AUDIENCE (comma-separated), _JWKS_ALGORITHMS."""
    url = env.get("MDB_REALTIME_JWKS_URL") or None
    algorithms = _list(env, "MDB_REALTIME_JWKS_ALGORITHMS") or DEFAULT_PROVIDER_ALGORITHMS
    try:
        if url is not None:
            check_jwks_url(url)
    except ValueError as error:
        raise ValueError(f"MDB_REALTIME_JWKS_URL {error}") from None
    try:
        check_algorithms(algorithms)
    except ValueError as error:
        raise ValueError(f"MDB_REALTIME_JWKS_ALGORITHMS {error}") from None
    return ProviderConfig(
        jwks_url=url,
        issuer=env.get("MDB_REALTIME_JWT_ISSUER") or None,
        audience=_list(env, "MDB_REALTIME_JWT_AUDIENCE"),
        algorithms=algorithms,
    )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > minimum:
        raise ValueError(f"{name} must be more than {minimum:g}, got {raw!r}")
    return value


def _presence_timing(env: Mapping[str, str]) -> PresenceTiming:
    defaults = PresenceTiming()
    timing = PresenceTiming(
        heartbeat_seconds=_float(
            env, "MDB_REALTIME_PRESENCE_HEARTBEAT_SECONDS", defaults.heartbeat_seconds
        ),
        timeout_seconds=_float(
            env, "MDB_REALTIME_PRESENCE_TIMEOUT_SECONDS", defaults.timeout_seconds
        ),
    )
    if timing.timeout_seconds <= timing.heartbeat_seconds:
        raise ValueError(
            "MDB_REALTIME_PRESENCE_TIMEOUT_SECONDS must be longer than the heartbeat "
            f"({timing.heartbeat_seconds:g} s); three heartbeats is a good choice"
        )
    return timing


@dataclass(frozen=True)
class EngineSettings:
    """Settings shared by every app an engine serves."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    jwt_secret: str | None = None  # None: resolved from the environment or the data folder
    jwt_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    queue_limits: QueueLimits = field(default_factory=QueueLimits)
    history_events: int = DEFAULT_HISTORY_EVENTS  # recent events kept in memory for resumes
    snapshot_limit: int = DEFAULT_SNAPSHOT_LIMIT  # documents in one snapshot at most
    window_reserve: int = MAX_RESERVE  # documents kept beyond each live window at most
    bus_ttl_seconds: int = DEFAULT_BUS_TTL_SECONDS  # how long broadcasts stay for resumes
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    provider: ProviderConfig = field(default_factory=ProviderConfig)  # tokens from a JWKS URL
    jwks_timing: JwksTiming = field(default_factory=JwksTiming)
    presence_timing: PresenceTiming = field(default_factory=PresenceTiming)
    presence_batch_seconds: float = DEFAULT_BATCH_SECONDS  # presence frames per interval

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if environ is None else environ
        defaults = ClientLimits()
        algorithms = tuple(
            a.strip() for a in env.get("MDB_REALTIME_JWT_ALGORITHMS", "HS256").split(",") if a
        )
        return cls(
            data_dir=Path(env.get("MDB_REALTIME_DATA_DIR") or DEFAULT_DATA_DIR),
            jwt_algorithms=algorithms or DEFAULT_ALGORITHMS,
            max_message_bytes=_int(
                env, "MDB_REALTIME_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            bus_ttl_seconds=_int(env, "MDB_REALTIME_BUS_TTL_SECONDS", DEFAULT_BUS_TTL_SECONDS),
            client_limits=ClientLimits(
                connections_per_user=_int(
                    env, "MDB_REALTIME_MAX_CONNECTIONS_PER_USER", defaults.connections_per_user
                ),
                connections_per_ip=_int(
                    env, "MDB_REALTIME_MAX_CONNECTIONS_PER_IP", defaults.connections_per_ip
                ),
                messages_per_second=float(
                    env.get("MDB_REALTIME_MESSAGES_PER_SECOND") or defaults.messages_per_second
                ),
                message_burst=_int(env, "MDB_REALTIME_MESSAGE_BURST", defaults.message_burst),
                subscriptions_per_connection=_int(
                    env, "MDB_REALTIME_MAX_SUBSCRIPTIONS", defaults.subscriptions_per_connection
                ),
            ),
            history_events=_int(env, "MDB_REALTIME_HISTORY_EVENTS", DEFAULT_HISTORY_EVENTS),
            snapshot_limit=_int(env, "MDB_REALTIME_SNAPSHOT_MAX_DOCUMENTS", DEFAULT_SNAPSHOT_LIMIT),
            window_reserve=_count(env, "MDB_REALTIME_WINDOW_RESERVE", MAX_RESERVE),
            provider=provider_from_env(env),
            jwks_timing=JwksTiming(
                min_refetch_seconds=_float(
                    env, "MDB_REALTIME_JWKS_MIN_REFETCH_SECONDS", DEFAULT_MIN_REFETCH_SECONDS
                ),
                max_age_seconds=_float(
                    env, "MDB_REALTIME_JWKS_MAX_AGE_SECONDS", DEFAULT_MAX_AGE_SECONDS
                ),
            ),
            presence_timing=_presence_timing(env),
            presence_batch_seconds=_float(
                env, "MDB_REALTIME_PRESENCE_BATCH_MS", DEFAULT_BATCH_SECONDS * 1000
            )
            / 1000,
            queue_limits=QueueLimits(
                max_messages=_int(env, "MDB_REALTIME_QUEUE_MAX_MESSAGES", QueueLimits.max_messages),
                max_bytes=_int(env, "MDB_REALTIME_QUEUE_MAX_BYTES", QueueLimits.max_bytes),
            ),
        )

    def endpoint(
        self,
        app_slug: str,
        name: str,
        path: str,
        *,
        require_auth: bool = True,
        allow_anonymous: bool = False,
        ping_interval: int = 30,
        allowed_origins: tuple[str, ...] | None = None,
        same_origin: bool = False,
        identity_placeholders: tuple[str, ...] = (),
    ) -> EndpointSettings:
        """One endpoint's settings: what the manifest (or the caller) says about it, and
        the engine-wide bounds. Every way of mounting an endpoint builds them here."""
        return EndpointSettings(
            app_slug=app_slug,
            name=name,
            path=path,
            require_auth=require_auth,
            allow_anonymous=allow_anonymous,
            ping_interval=ping_interval,
            allowed_origins=allowed_origins,
            same_origin=same_origin,
            max_message_bytes=self.max_message_bytes,
            queue_limits=self.queue_limits,
            client_limits=self.client_limits,
            identity_placeholders=identity_placeholders,
        )

    def verifier(self) -> TokenVerifier:
        secret = self.jwt_secret or resolve_secret(self.data_dir)
        return TokenVerifier(secret=secret, algorithms=self.jwt_algorithms)

    def identity(self) -> Identity:
        """The engine secret and the default identity provider, for every app."""
        return Identity(self.verifier(), self.provider, self.jwks_timing)
