"""Engine configuration: defaults, environment variables, and the token verifier they imply."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.auth import DEFAULT_ALGORITHMS, TokenVerifier, resolve_secret
from engine.bus import DEFAULT_BUS_TTL_SECONDS
from engine.endpoint import DEFAULT_MAX_MESSAGE_BYTES
from engine.history import DEFAULT_HISTORY_EVENTS
from engine.hub import QueueLimits
from engine.limits import ClientLimits
from engine.recovery import DEFAULT_SNAPSHOT_LIMIT
from engine.rooms.service import DEFAULT_BATCH_SECONDS
from engine.rooms.store import PresenceTiming

DEFAULT_DATA_DIR = ".mdb-realtime"
DEFAULT_DB_NAME = "mdb_realtime"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


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
    bus_ttl_seconds: int = DEFAULT_BUS_TTL_SECONDS  # how long broadcasts stay for resumes
    client_limits: ClientLimits = field(default_factory=ClientLimits)
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

    def verifier(self) -> TokenVerifier:
        secret = self.jwt_secret or resolve_secret(self.data_dir)
        return TokenVerifier(secret=secret, algorithms=self.jwt_algorithms)
