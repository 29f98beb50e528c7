"""The embedded database: SecantusDB run as a child process for trying the engine and for tests.

Production uses a real MongoDB replica set; this exists so that `mdb-realtime serve` works on a
fresh machine with nothing else installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from pymongo import MongoClient
from pymongo.errors import PyMongoError

STARTUP_TIMEOUT_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM when the process that started it dies, even by SIGKILL,
    # so a crashed engine never leaves a database behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def secantus_available() -> bool:
    """Whether the SecantusDB package (the `embedded` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("secantus") is not None


class EmbeddedDatabase:
    """A SecantusDB server in a child process, listening on loopback."""

    def __init__(self, storage_path: str | Path, host: str = "127.0.0.1", port: int | None = None):
        self.storage_path = str(storage_path)
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, log_path: str | Path | None = None) -> None:
        if not secantus_available():
            raise EmbeddedDatabaseError(
                "no MongoDB URI given and the embedded database is not installed: "
                "pip install 'mdb-realtime[embedded]', or pass --mongo-uri / set MONGODB_URI"
            )
        env = dict(os.environ)
        if self.storage_path != ":memory:":
            Path(self.storage_path).mkdir(parents=True, exist_ok=True)
            tmp = Path(self.storage_path).parent / "tmp"
        else:
            tmp = Path(env.get("TMPDIR", "/tmp")) / f"mdb-realtime-secantus-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
        if log_path is not None:
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            "secantus",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            self.storage_path,
        ]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise EmbeddedDatabaseError(
                    f"the embedded database exited with code {self._process.returncode}"
                )
            client: MongoClient[dict[str, object]] = MongoClient(
                self.uri, serverSelectionTimeoutMS=300
            )
            try:
                client.admin.command("ping")
                return
            except PyMongoError:
                time.sleep(0.1)
            finally:
                client.close()
        self.stop()
        raise EmbeddedDatabaseError(
            f"the embedded database did not answer within {STARTUP_TIMEOUT_SECONDS:.0f} s"
        )

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> EmbeddedDatabase:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
