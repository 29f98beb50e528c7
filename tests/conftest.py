"""Shared fixtures: a real database (SecantusDB child process, or MONGODB_URI) and engine servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.embedded import EmbeddedDatabase


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
