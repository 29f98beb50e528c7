"""Test helpers: engine servers as real child processes, and WebSocket clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

REPO = Path(__file__).resolve().parent.parent
TEST_MANIFESTS = REPO / "tests" / "manifests"
CHANGE_MANIFESTS = REPO / "tests" / "manifests_changes"
URL_LINE = re.compile(r"on (http://\S+)")


class ServerProcess:
    """A server started as a child process; learns its URL from the line it prints."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.command = list(command)
        self.env = env
        self.log_path = log_path
        self.url = ""
        self.stdout_lines: list[str] = []
        self._process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps writing to it
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            text=True,
            cwd=REPO,
        )
        found = threading.Event()
        threading.Thread(target=self._read_stdout, args=(found,), daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError(f"server did not start; log:\n{self.logs()}")
        return self

    def _read_stdout(self, found: threading.Event) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self.stdout_lines.append(line)
            match = URL_LINE.search(line)
            if match and not found.is_set():
                self.url = match.group(1)
                found.set()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def ws_url(self, path: str, **query: str) -> str:
        base = self.url.replace("http://", "ws://") + path
        if query:
            base += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return base

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self._process is not None
        return self._process.wait(timeout)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def engine_env(mongo_uri: str | None, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MONGODB_URI", None)
    if mongo_uri:
        env["MONGODB_URI"] = mongo_uri
    env["MDB_REALTIME_DATA_DIR"] = str(data_dir)
    env["MDB_REALTIME_JWT_SECRET"] = TEST_SECRET
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


TEST_SECRET = "test-secret-that-is-long-enough-for-hs256-keys"


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "serve", "--port", "0", *args]


def app_under_test_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.apps.app_under_test", *args]


async def connect(url: str, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(url, open_timeout=10, **kwargs)


async def receive_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    import asyncio

    raw = await asyncio.wait_for(ws.recv(), timeout)
    message: dict[str, Any] = json.loads(raw)
    return message


async def receive_until(
    ws: ClientConnection, kind: str, timeout: float = 5.0, answer_pings: bool = False
) -> dict[str, Any]:
    """The next message of type `kind`, skipping others; pings answered if asked to."""
    deadline = time.monotonic() + timeout
    while True:
        message = await receive_json(ws, max(0.01, deadline - time.monotonic()))
        if message.get("type") == kind:
            return message
        if answer_pings and message.get("type") == "ping":
            await ws.send('{"type": "pong"}')
