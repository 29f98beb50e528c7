"""Shared fixtures: a real database (see tests/databases.py), engine servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from tests import databases
from tests.support import (
    CHANGE_MANIFESTS,
    REPO,
    TEST_MANIFESTS,
    ServerProcess,
    app_under_test_command,
    engine_env,
    serve_command,
)


def pytest_report_header(config: pytest.Config) -> str:
    return f"database: {databases.chosen().describe()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if databases.used_kind() is not databases.chosen().kind:
        terminalreporter.write_line(f"database used: {databases.used_kind()}")


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a MongoDB-compatible server with change streams, for the whole session: the one
    `tests/databases.py` chooses (MONGODB_URI, else a mongo:8 container, else SecantusDB)."""
    with databases.session_database(tmp_path_factory.mktemp("database")) as uri:
        yield uri


@pytest.fixture
def db_name() -> str:
    """A database name no other test uses, so tests never see each other's data."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@dataclass
class RunningApp:
    """An engine server process and the database it serves."""

    server: ServerProcess
    mongo_uri: str
    db_name: str


def start_app_server(mongo_uri: str, folder: Path, manifests: Path, **extra_env: str) -> RunningApp:
    db = f"t_{uuid.uuid4().hex[:12]}"
    env = engine_env(
        mongo_uri, folder, MDB_REALTIME_DB=db, TEST_MANIFESTS=str(manifests), **extra_env
    )
    server = ServerProcess(app_under_test_command(), env, folder / "server.log").start()
    return RunningApp(server, mongo_uri, db)


@pytest.fixture(scope="module")
def app_server(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The test app (engine + handlers + app code) on the test manifests, one per module."""
    folder = tmp_path_factory.mktemp("app_server")
    running = start_app_server(mongo_uri, folder, TEST_MANIFESTS, **APP_SERVER_LIMITS)
    try:
        yield running.server
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def change_app(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The test app on manifests with `watch` bindings, one per module."""
    folder = tmp_path_factory.mktemp("change_app")
    running = start_app_server(mongo_uri, folder, CHANGE_MANIFESTS)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def demo_app(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """`mdb-realtime serve` on the example apps of `manifests/`, as a user runs it."""
    folder = tmp_path_factory.mktemp("demo_app")
    db = f"t_{uuid.uuid4().hex[:12]}"
    env = engine_env(mongo_uri, folder, MDB_REALTIME_DB=db)
    command = serve_command("--manifests", str(REPO / "manifests"))
    server = ServerProcess(command, env, folder / "server.log").start()
    try:
        yield RunningApp(server, mongo_uri, db)
    finally:
        server.stop()


# Small queues so the slow-consumer test overflows quickly; generous enough for the others.
APP_SERVER_LIMITS = {
    "MDB_REALTIME_QUEUE_MAX_MESSAGES": "500",
    "MDB_REALTIME_QUEUE_MAX_BYTES": str(2 * 1024 * 1024),
}


@pytest.fixture
async def db(change_app: RunningApp) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """The database of `change_app`, for writes (modules with another app define their own)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(change_app.mongo_uri)
    try:
        yield client[change_app.db_name]
    finally:
        await client.close()
