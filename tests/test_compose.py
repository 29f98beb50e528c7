"""docker-compose.yml and the Dockerfile: valid for Compose, and wired as the README says."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def compose_command() -> list[str] | None:
    """`docker-compose` (Debian's package), else the `docker compose` plugin; None if neither."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MDB_REALTIME", "MONGO"))}
    return subprocess.run(
        [*command, "--file", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**environ, **env},
        timeout=60,
        check=False,
    )


def test_compose_validates_the_file() -> None:
    result = run_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_the_secret_comes_from_the_environment_with_a_placeholder_otherwise() -> None:
    secret = "a-secret-of-our-own-for-this-test-0123456789"
    given = run_compose("config", MDB_REALTIME_JWT_SECRET=secret)
    assert given.returncode == 0, given.stderr
    engine = yaml.safe_load(given.stdout)["services"]["engine"]
    assert engine["environment"]["MDB_REALTIME_JWT_SECRET"] == secret

    default = run_compose("config")
    assert default.returncode == 0, default.stderr
    placeholder = yaml.safe_load(default.stdout)["services"]["engine"]["environment"]
    assert "CHANGE-ME" in placeholder["MDB_REALTIME_JWT_SECRET"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def test_mongodb_is_a_replica_set_initiated_by_its_healthcheck(compose: dict[str, Any]) -> None:
    mongo = compose["services"]["mongo"]
    assert mongo["image"] == "mongo:8"
    command = mongo["command"]
    assert command[command.index("--replSet") + 1] == "rs0"
    check = " ".join(mongo["healthcheck"]["test"])
    assert "mongosh" in check
    assert "rs.initiate({_id: 'rs0', members: [{_id: 0, host: 'mongo:27017'}]})" in check
    assert "isWritablePrimary" in check  # healthy only once it can take writes


def test_the_engine_waits_for_a_healthy_mongodb_and_serves_the_example_apps(
    compose: dict[str, Any],
) -> None:
    engine = compose["services"]["engine"]
    assert engine["build"] == "."
    assert engine["depends_on"]["mongo"]["condition"] == "service_healthy"
    environment = engine["environment"]
    assert environment["MONGODB_URI"] == "mongodb://mongo:27017/?replicaSet=rs0"
    assert environment["MDB_REALTIME_JWT_SECRET"].startswith("${MDB_REALTIME_JWT_SECRET:-")
    assert "./manifests:/app/manifests:ro" in engine["volumes"]
    assert any(str(port).endswith(":8000") for port in engine["ports"])


def test_the_image_runs_serve_on_all_interfaces() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert any(line.startswith("RUN pip install .") for line in lines)
    cmd = (
        'CMD ["mdb-realtime", "serve", "--host", "0.0.0.0", "--port", "8000", '
        '"--manifests", "/app/manifests"]'
    )
    assert cmd in lines
    example = Path(REPO / "manifests")
    assert any(example.glob("*/manifest.json")), "the image's manifests folder is empty"
