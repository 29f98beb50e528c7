"""`mdb-realtime serve` and `token` as a user runs them: embedded database, health, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, ServerProcess, connect, receive_json, serve_command


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (how we look for a leftover database)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and "secantus" in cmdline:
            found.append(int(entry.name))
    return found


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MDB_REALTIME", "MONGODB"))}
    env.pop("SECRET_KEY", None)
    env["MDB_REALTIME_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_serve_embedded_default_end_to_end(tmp_path: Path, stop_signal: int) -> None:
    data_dir = tmp_path / "state"
    env = clean_env(data_dir)
    server = ServerProcess(
        serve_command("--manifests", str(REPO / "manifests")), env, tmp_path / "serve.log"
    ).start(timeout=60)
    try:
        assert "embedded database (SecantusDB)" in server.logs()
        assert processes_mentioning(str(data_dir / "data")), "no embedded database running"
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            metrics = await client.get("/metrics")
            assert "mdb_realtime_connections" in metrics.text

        # `token` shares the generated secret with `serve`: no secret configured anywhere.
        token = subprocess.run(
            [sys.executable, "-m", "engine.cli", "token", "--app", "todo", "--user", "ann"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout.strip()
        assert (data_dir / "jwt_secret").exists()
        async with await connect(server.ws_url("/todo/ws", token=token)) as ws:
            hello = await receive_json(ws)
        assert (hello["app_slug"], hello["user_id"]) == ("todo", "ann")
    finally:
        server.signal(stop_signal)
        code = server.wait(30)
    assert code == 0
    assert processes_mentioning(str(data_dir / "data")) == [], "database left running"


def test_token_command_claims_and_errors(tmp_path: Path) -> None:
    import jwt

    env = clean_env(tmp_path)
    env["MDB_REALTIME_JWT_SECRET"] = "k" * 40
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "token",
            "--app",
            "todo",
            "--user",
            "u7",
            "--email",
            "u7@example.com",
            "--ttl",
            "60",
            "--claim",
            "team=red",
            "--claim",
            "level=3",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    claims = jwt.decode(run.stdout.strip(), "k" * 40, algorithms=["HS256"], audience="todo")
    assert (claims["sub"], claims["email"], claims["team"], claims["level"]) == (
        "u7",
        "u7@example.com",
        "red",
        3,
    )
    assert claims["exp"] - claims["iat"] == 60 and claims["type"] == "access"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "token",
            "--app",
            "todo",
            "--user",
            "u",
            "--claim",
            "x",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "K=V" in bad.stderr


def test_serve_refuses_invalid_manifests_clearly(tmp_path: Path, mongo_uri: str) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "broken.json").write_text('{"slug": "Bad Slug", "name": "x"}')
    env = clean_env(tmp_path)
    run = subprocess.run(
        [*serve_command("--manifests", str(folder), "--mongo-uri", mongo_uri)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 1
    assert "broken.json" in run.stderr and "slug" in run.stderr
