"""Shared fixtures: a real database (SecantusDB child process or MONGODB_URI), engine servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.embedded import EmbeddedDatabase
from tests.support import TEST_MANIFESTS, ServerProcess, app_under_test_command, engine_env


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("MONGODB_URI"):
        return "database: MONGODB_URI (external MongoDB)"
    return "database: SecantusDB child process (embedded)"


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a MongoDB-compatible server with change streams, for the whole session."""
    external = os.environ.get("MONGODB_URI")
    if external:
        yield external
        return
    folder = tmp_path_factory.mktemp("secantus")
    database = EmbeddedDatabase(":memory:")
    os.environ.setdefault("TMPDIR", str(folder))
    database.start(log_path=folder / "secantus.log")
    try:
        yield database.uri
    finally:
        database.stop()


@pytest.fixture
def db_name() -> str:
    """A database name no other test uses, so tests never see each other's data."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def app_server(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The test app (engine + handlers + app code) on the test manifests, one per module."""
    folder = tmp_path_factory.mktemp("app_server")
    env = engine_env(
        mongo_uri,
        folder,
        MDB_REALTIME_DB=f"t_{uuid.uuid4().hex[:12]}",
        TEST_MANIFESTS=str(TEST_MANIFESTS),
        **APP_SERVER_LIMITS,
    )
    server = ServerProcess(app_under_test_command(), env, folder / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


# Small queues so the slow-consumer test overflows quickly; generous enough for the others.
APP_SERVER_LIMITS = {
    "MDB_REALTIME_QUEUE_MAX_MESSAGES": "500",
    "MDB_REALTIME_QUEUE_MAX_BYTES": str(1024 * 1024),
}
