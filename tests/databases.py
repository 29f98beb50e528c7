"""Which database the test suite runs against: chosen here, once per session.

1. `MONGODB_URI`, when set: that MongoDB (a replica set: change streams need one).
2. Else, where a Docker engine answers (`docker info`): a `mongo:8` container started as a
   one-node replica set, through testcontainers.
3. Else SecantusDB in a child process (the embedded database), in memory.

`MDB_REALTIME_TEST_DATABASE=embedded` or `=container` skips the detection and forces 3 or 2.
A container that cannot be started (no image, no registry) falls back to the embedded
database with a warning, so the suite still runs; the summary says which database was used.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib.util
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from engine.embedded import EmbeddedDatabase

FORCE_VARIABLE = "MDB_REALTIME_TEST_DATABASE"
CONTAINER_IMAGE = "mongo:8"
REPLICA_SET = "rs0"
MONGO_PORT = 27017
DOCKER_INFO_TIMEOUT_SECONDS = 5.0
CONTAINER_READY_TIMEOUT_SECONDS = 60.0
_ALREADY_INITIALIZED = 23


class Kind(enum.StrEnum):
    EXTERNAL = "external"
    CONTAINER = "container"
    EMBEDDED = "embedded"


@dataclass(frozen=True)
class Choice:
    """The database chosen for the session, and why."""

    kind: Kind
    why: str

    def describe(self) -> str:
        what = {
            Kind.EXTERNAL: "MONGODB_URI (external MongoDB)",
            Kind.CONTAINER: f"{CONTAINER_IMAGE} replica set in a container (testcontainers)",
            Kind.EMBEDDED: "SecantusDB child process (embedded)",
        }[self.kind]
        return f"{what}; {self.why}"


def docker_answers(timeout: float = DOCKER_INFO_TIMEOUT_SECONDS) -> bool:
    """Whether a Docker engine answers `docker info` within `timeout` seconds."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def testcontainers_installed() -> bool:
    return importlib.util.find_spec("testcontainers") is not None


def choose(
    environ: Mapping[str, str],
    docker: Callable[[], bool] = docker_answers,
    testcontainers: Callable[[], bool] = testcontainers_installed,
) -> Choice:
    """The database to use, from the environment and what this machine has."""
    if environ.get("MONGODB_URI"):
        return Choice(Kind.EXTERNAL, "MONGODB_URI is set")
    forced = environ.get(FORCE_VARIABLE, "").strip().lower()
    if forced == Kind.EMBEDDED:
        return Choice(Kind.EMBEDDED, f"{FORCE_VARIABLE}=embedded")
    if forced == Kind.CONTAINER:
        return Choice(Kind.CONTAINER, f"{FORCE_VARIABLE}=container")
    if forced:
        raise ValueError(f"{FORCE_VARIABLE} must be 'embedded' or 'container', not {forced!r}")
    if not docker():
        return Choice(Kind.EMBEDDED, "no Docker engine answers")
    if not testcontainers():
        return Choice(Kind.EMBEDDED, "Docker answers but testcontainers is not installed")
    return Choice(Kind.CONTAINER, "a Docker engine answers")


@functools.cache
def chosen() -> Choice:
    """The session's choice (decided once: the header and the fixture agree)."""
    return choose(os.environ)


_used: Kind | None = None  # what the session's database really is, once started


def used_kind() -> Kind:
    """The kind of database the session runs on (the choice until one has started)."""
    return _used or chosen().kind


def needs_embedded(reason: str) -> str | None:
    """Why a test that needs the embedded database itself must be skipped; None if it may run."""
    if used_kind() is Kind.EMBEDDED:
        return None
    return f"{reason}: needs the embedded database (this session runs on {used_kind()})"


@contextlib.contextmanager
def session_database(
    folder: Path,
    choice: Choice | None = None,
    start: Callable[[], tuple[Any, str]] | None = None,
) -> Iterator[str]:
    """Start the chosen database (unless it is external); its URI until the session ends."""
    global _used
    choice = choice or chosen()
    if choice.kind is Kind.EXTERNAL:
        _used = Kind.EXTERNAL
        yield os.environ["MONGODB_URI"]
        return
    if choice.kind is Kind.CONTAINER:
        try:
            container, uri = (start or start_container)()
        except Exception as error:  # any failure (no image, no registry): fall back, say why
            warnings.warn(
                f"could not start a {CONTAINER_IMAGE} container ({type(error).__name__}: "
                f"{error}); using the embedded database instead",
                stacklevel=1,
            )
        else:
            _used = Kind.CONTAINER
            try:
                yield uri
            finally:
                container.stop()
            return
    _used = Kind.EMBEDDED
    with embedded_database(folder) as uri:
        yield uri


@contextlib.contextmanager
def embedded_database(folder: Path) -> Iterator[str]:
    database = EmbeddedDatabase(":memory:")
    os.environ.setdefault("TMPDIR", str(folder))
    database.start(log_path=folder / "secantus.log")
    try:
        yield database.uri
    finally:
        database.stop()


def start_container(image: str = CONTAINER_IMAGE) -> tuple[Any, str]:
    """A started `mongod --replSet` container, initiated as a one-node replica set; (container,
    URI). The URI connects directly (the member's own name is only known inside the container)."""
    from testcontainers.core.container import DockerContainer  # lazy: Docker is optional

    container = (
        DockerContainer(image)
        .with_command(["--replSet", REPLICA_SET, "--bind_ip_all"])
        .with_exposed_ports(MONGO_PORT)
    )
    container.start()
    try:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(MONGO_PORT))
        uri = f"mongodb://{host}:{port}/?directConnection=true"
        initiate_replica_set(uri)
    except BaseException:
        container.stop()
        raise
    return container, uri


def initiate_replica_set(uri: str, timeout: float = CONTAINER_READY_TIMEOUT_SECONDS) -> None:
    """`replSetInitiate` a fresh one-node replica set and wait until it is a writable primary."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=1000)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.admin.command("ping")
                break
            except PyMongoError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        config = {"_id": REPLICA_SET, "members": [{"_id": 0, "host": f"localhost:{MONGO_PORT}"}]}
        try:
            client.admin.command("replSetInitiate", config)
        except OperationFailure as error:
            if error.code != _ALREADY_INITIALIZED:
                raise
        while not client.admin.command("hello").get("isWritablePrimary"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica set did not elect a primary within {timeout} s")
            time.sleep(0.2)
    finally:
        client.close()
