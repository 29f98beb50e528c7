"""The suite's database choice: MONGODB_URI, else a mongo:8 container, else embedded."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from tests import databases
from tests.databases import Choice, Kind, choose, docker_answers, session_database


def test_mongodb_uri_wins_over_everything() -> None:
    choice = choose(
        {"MONGODB_URI": "mongodb://db/?replicaSet=rs0", "MDB_REALTIME_TEST_DATABASE": "embedded"},
        docker=lambda: True,
        testcontainers=lambda: True,
    )
    assert choice.kind is Kind.EXTERNAL
    assert "MONGODB_URI" in choice.describe()


def test_container_where_docker_answers_and_testcontainers_is_installed() -> None:
    choice = choose({}, docker=lambda: True, testcontainers=lambda: True)
    assert choice.kind is Kind.CONTAINER
    assert "mongo:8" in choice.describe()


@pytest.mark.parametrize(
    ("docker", "testcontainers", "why"),
    [
        (False, True, "no Docker engine answers"),
        (True, False, "testcontainers is not installed"),
    ],
)
def test_embedded_otherwise_and_the_header_says_why(
    docker: bool, testcontainers: bool, why: str
) -> None:
    choice = choose({}, docker=lambda: docker, testcontainers=lambda: testcontainers)
    assert choice.kind is Kind.EMBEDDED
    assert why in choice.describe()
    assert "SecantusDB" in choice.describe()


def test_the_choice_can_be_forced_without_asking_docker() -> None:
    def docker() -> bool:
        raise AssertionError("docker must not be asked")

    forced = {"MDB_REALTIME_TEST_DATABASE": "embedded"}
    assert choose(forced, docker=docker).kind is Kind.EMBEDDED
    forced = {"MDB_REALTIME_TEST_DATABASE": "container"}
    assert choose(forced, docker=docker).kind is Kind.CONTAINER
    with pytest.raises(ValueError, match="'embedded' or 'container'"):
        choose({"MDB_REALTIME_TEST_DATABASE": "postgres"}, docker=docker)


def fake_docker(folder: Path, script: str) -> None:
    path = folder / "docker"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(("script", "answers"), [("exit 0", True), ("exit 1", False)])
def test_docker_answers_is_the_exit_status_of_docker_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, answers: bool
) -> None:
    fake_docker(tmp_path, script)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert docker_answers() is answers


def test_a_docker_that_hangs_counts_as_absent_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_docker(tmp_path, "exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    assert docker_answers(timeout=0.5) is False
    assert time.monotonic() - started < 5


def test_no_docker_command_means_no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert docker_answers() is False


class FakeContainer:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_a_started_container_is_used_then_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(databases, "_used", None)
    container = FakeContainer()
    choice = Choice(Kind.CONTAINER, "test")
    with session_database(tmp_path, choice, lambda: (container, "mongodb://c:1/")) as uri:
        assert uri == "mongodb://c:1/"
        assert databases.used_kind() is Kind.CONTAINER
        assert databases.needs_embedded("restarts it") is not None
        assert not container.stopped
    assert container.stopped


def test_a_container_that_cannot_start_falls_back_to_the_embedded_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(databases, "_used", None)

    def no_docker() -> tuple[object, str]:
        raise RuntimeError("no registry")

    choice = Choice(Kind.CONTAINER, "test")
    with (
        pytest.warns(UserWarning, match="no registry.*embedded database instead"),
        session_database(tmp_path, choice, no_docker) as uri,
    ):
        assert databases.used_kind() is Kind.EMBEDDED
        assert databases.needs_embedded("restarts it") is None
        client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=5000)
        try:
            assert client.admin.command("ping")["ok"] == 1
        finally:
            client.close()
