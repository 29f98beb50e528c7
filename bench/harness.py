"""What the benchmarks share: targets, server processes pinned to a core, /proc readings, output.

The servers run on core 0 and the load generator (the benchmark script itself) on core 1, so
the two never compete for a core and the server's CPU time is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.servers.common import (
    BROADCAST_PATH,
    COUNT_PATH,
    SLUG,
    BroadcastRequest,
    run_broadcasts,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCH_MANIFESTS = REPO / "bench" / "manifests"
SERVER_CORE = 0
LOADGEN_CORE = 1
DEFAULT_MDB_ENGINE_PYTHON = "/tmp/mdbengine-venv/bin/python"
URL_LINE = re.compile(rb"on http://([\d.]+):(\d+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


# -- the process itself ------------------------------------------------------------------------


def prepare_loadgen() -> None:
    """Pin this process to the load generator's core, allow many sockets, use uvloop."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOADGEN_CORE})
    raise_fd_limit()
    # A terminated benchmark unwinds (and stops its servers) as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_fd_limit() -> int:
    """Raise the open-file limit to the hard limit (an unprivileged process may not go higher)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _server_preexec() -> None:
    os.sched_setaffinity(0, {SERVER_CORE})
    raise_fd_limit()
    os.setpgrp()  # its own group, so stopping it never signals the benchmark
    # Linux: the server gets SIGTERM when the benchmark dies, even by SIGKILL.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# -- /proc readings -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def core_busy_seconds(core: int) -> float:
    """Time a core spent running anything (any process), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(value) for value in line.split()[1:]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            return (sum(ticks[:8]) - idle) / _CLOCK_TICKS
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class Noise:
    """CPU that other processes took on the server's and the load generator's cores.

    This machine is shared: a trial during which others ran on either core is not comparable.
    """

    server_pid: int
    started: float
    server_core: float
    loadgen_core: float
    server_cpu: float
    own_cpu: float

    @classmethod
    def start(cls, server_pid: int) -> Noise:
        return cls(
            server_pid,
            time.monotonic(),
            core_busy_seconds(SERVER_CORE),
            core_busy_seconds(LOADGEN_CORE),
            cpu_seconds(server_pid),
            own_cpu_seconds(),
        )

    def percent(self) -> dict[str, float]:
        """Others' share of each core since `start`, in percent."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        server = core_busy_seconds(SERVER_CORE) - self.server_core
        server -= cpu_seconds(self.server_pid) - self.server_cpu
        loadgen = core_busy_seconds(LOADGEN_CORE) - self.loadgen_core
        loadgen -= own_cpu_seconds() - self.own_cpu
        return {
            "others_on_server_core_pct": 100 * max(0.0, server) / elapsed,
            "others_on_loadgen_core_pct": 100 * max(0.0, loadgen) / elapsed,
        }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def wait_idle(pid: int, quiet_seconds: float = 0.3, timeout: float = 15.0) -> None:
    """Wait until a process has used (almost) no CPU for `quiet_seconds`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(quiet_seconds)
        if cpu_seconds(pid) - before <= 0.02:
            return


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server to measure: how to start it and how to ask it to broadcast."""

    name: str
    description: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO  # first on the server's sys.path: where `engine` is imported from
    trigger_method: str = "POST"
    has_bench_routes: bool = True  # False: the plain CLI, which has no /_bench/* routes
    unavailable: str = ""  # why it cannot run here, if it cannot


@dataclass(frozen=True)
class Setting:
    """Where the targets of one run come from."""

    database_uri: str
    workdir: Path
    mdb_engine_python: str
    engine_dir: Path  # a folder holding the `engine` package to measure
    engine_commit: str


# A user's own FastAPI app mounting the engine the mdb-engine way, run by plain uvicorn: the
# module-level app of bench/servers/user_app.py, and uvicorn's --ws (None: its default).
USER_APP_TARGETS: dict[str, tuple[str, str | None]] = {
    "user-routes": ("routes_app", None),
    "user-endpoint": ("endpoint_app", None),
    "user-routes-engine-ws": ("routes_app", "engine.wsprotocol:EngineWebSocketProtocol"),
    "user-endpoint-engine-ws": ("endpoint_app", "engine.wsprotocol:EngineWebSocketProtocol"),
}
TARGET_NAMES = (
    "engine",
    "engine-asyncio",
    "engine-cli",
    *USER_APP_TARGETS,
    "naive",
    "websockets",
    "mdb-engine",
)
BENCH_SECRET = "bench-secret-that-is-long-enough-for-hs256"


def make_target(name: str, setting: Setting) -> Target:
    if name.startswith("engine"):
        return _engine_target(name, setting)
    if name in USER_APP_TARGETS:
        return _user_app_target(name, setting)
    python = sys.executable
    if name == "naive":
        return Target(
            name,
            "FastAPI list of sockets + await send_text loop, uvicorn defaults, uvloop",
            (python, "-m", "bench.servers.naive_app"),
        )
    if name == "websockets":
        return Target(
            name,
            "websockets 17 asyncio server + broadcast(), uvloop",
            (python, "-m", "bench.servers.websockets_app"),
            trigger_method="GET",
        )
    if name == "mdb-engine":
        interpreter = setting.mdb_engine_python
        return Target(
            name,
            "mdb-engine 0.1.6 create_websocket_endpoint + broadcast_to_app, uvicorn, uvloop",
            (interpreter, "-m", "bench.servers.mdbengine_app"),
            unavailable="" if Path(interpreter).exists() else f"no {interpreter}",
        )
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")


def serve_command(manifests: Path | str, mongo_uri: str, db: str) -> tuple[str, ...]:
    """`mdb-realtime serve` on a free port, exactly as users start it."""
    return (
        sys.executable,
        "-m",
        "engine.cli",
        "serve",
        "--port",
        "0",
        "--manifests",
        str(manifests),
        "--mongo-uri",
        mongo_uri,
        "--db",
        db,
    )


def _engine_target(name: str, setting: Setting) -> Target:
    python, manifests = sys.executable, str(BENCH_MANIFESTS)
    env = _engine_env(setting.database_uri, setting.workdir)
    where = f"engine {setting.engine_commit[:10]}"
    if name == "engine-cli":
        return Target(
            name,
            f"mdb-realtime serve as users start it (uvloop where installed), {where}",
            serve_command(manifests, setting.database_uri, env["MDB_REALTIME_DB"]),
            env,
            cwd=setting.engine_dir,
            has_bench_routes=False,  # broadcasts by POST /bench/broadcast, one per message
        )
    if name not in ("engine", "engine-asyncio"):
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")
    loop = "uvloop" if name == "engine" else "asyncio"
    return Target(
        name,
        f"broadcast_to_app in an app on the engine, uvicorn websockets-sansio, {loop}, {where}",
        (python, "-m", "bench.servers.engine_app", "--loop", loop, "--manifests", manifests),
        env,
        cwd=setting.engine_dir,
    )


def _user_app_target(name: str, setting: Setting) -> Target:
    app, ws = USER_APP_TARGETS[name]
    how = {
        "routes_app": "engine.register_websocket_routes(app, slug)",
        "endpoint_app": "app.add_api_websocket_route(path, create_websocket_endpoint(...))",
    }[app]
    command = [sys.executable, "-m", "uvicorn", f"bench.servers.user_app:{app}", "--port", "0"]
    if ws is not None:
        command += ["--ws", ws]
    server = f"uvicorn --ws {ws}" if ws else "plain uvicorn (its default ws, uvloop)"
    return Target(
        name,
        f"a user's FastAPI app (own route + middleware), {how}, {server}, "
        f"engine {setting.engine_commit[:10]}",
        tuple(command),
        _engine_env(setting.database_uri, setting.workdir),
        cwd=setting.engine_dir,
    )


def engine_snapshot(ref: str, workdir: Path) -> tuple[Path, str]:
    """The `engine` package as committed at `ref`, extracted under workdir; (folder, commit).

    Others may be editing the working tree while a benchmark runs; a commit holds still.
    `worktree` measures the working tree as it is.
    """
    if ref == "worktree":
        return REPO, "worktree"
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}").strip()
    folder = workdir / f"engine-src-{commit[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "engine"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, commit


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout


def _db_name() -> str:
    return f"bench_{uuid.uuid4().hex[:8]}"


def _engine_env(database_uri: str, workdir: Path) -> dict[str, str]:
    data_dir = workdir / f"engine-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "MONGODB_URI": database_uri,
        "MDB_REALTIME_DB": _db_name(),
        "MDB_REALTIME_DATA_DIR": str(data_dir),
        "MDB_REALTIME_JWT_SECRET": BENCH_SECRET,
    }


def add_target_arguments(parser: Any, default: Sequence[str]) -> None:
    parser.add_argument(
        "--targets",
        default=",".join(default),
        help=f"comma-separated, from {', '.join(TARGET_NAMES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--mdb-engine-python",
        default=os.environ.get("MDB_ENGINE_PYTHON", DEFAULT_MDB_ENGINE_PYTHON),
        help="interpreter of a virtualenv with mdb-engine==0.1.6 (default: %(default)s)",
    )
    parser.add_argument(
        "--engine-ref",
        default="HEAD",
        help="git commit of the engine to measure, or `worktree` (default: %(default)s)",
    )


# -- server processes ---------------------------------------------------------------------------


class Server:
    """A target running as a child process on the server core."""

    def __init__(self, target: Target, workdir: Path) -> None:
        self.target = target
        self.log_path = workdir / f"{target.name}-{uuid.uuid4().hex[:6]}.log"
        self.host = "127.0.0.1"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def preexec(self) -> None:
        """Runs in the child before the server starts: pinned to the server core."""
        _server_preexec()

    def start(self, timeout: float = 60.0) -> Server:
        # `python -m` puts the working folder first on sys.path, so `engine` comes from
        # target.cwd; the benchmark servers come from this repository.
        env = {**os.environ, **self.target.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        # The server's output goes to a file: a pipe nobody drains would block a chatty server.
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.target.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.target.cwd,
                preexec_fn=self.preexec,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL_LINE.search(self.log_path.read_bytes())
            if match:
                self.host, self.port = match.group(1).decode(), int(match.group(2))
                return self
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.target.name} did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def request(self, path: str, method: str = "GET", timeout: float = 600) -> Any:
        """A plain HTTP/1.1 request to the server; the JSON body of its answer."""
        return json.loads(await self.request_body(path, method, timeout))

    async def request_body(self, path: str, method: str = "GET", timeout: float = 600) -> bytes:
        """A plain HTTP/1.1 request to the server; the body of its answer."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self.target.name} {path}: {head[:200]!r}")
        if b"chunked" in head.lower():
            body = _dechunk(body)
        return body

    async def broadcast(self, count: int, size: int, interval: float, timeout: float) -> Any:
        if not self.target.has_bench_routes:
            request = BroadcastRequest(count, size, interval)
            return await asyncio.wait_for(self._broadcast_over_http(request), timeout)
        query = f"count={count}&size={size}&interval={interval}"
        return await self.request(
            f"{BROADCAST_PATH}?{query}", self.target.trigger_method, timeout=timeout
        )

    async def _broadcast_over_http(self, request: BroadcastRequest) -> dict[str, Any]:
        """`serve` has no bench routes: one `POST /<slug>/broadcast` per message, with a service
        token, on one kept-alive connection, as an app's back end calls it."""
        from engine.auth import issue_token

        token = issue_token(
            BENCH_SECRET, app_slug=SLUG, user_id="bench", claims={"role": "service"}
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)

        async def send(message: dict[str, Any]) -> int:
            body = json.dumps({"message": message}).encode()
            writer.write(
                f"POST /{SLUG}/broadcast HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            answer = await reader.readexactly(int(length.group(1))) if length else b""
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{self.target.name} broadcast: {head[:200]!r} {answer[:200]!r}")
            reached: int = json.loads(answer)["reached"]
            return reached

        try:
            return await run_broadcasts(request, send)
        finally:
            writer.close()

    async def connection_count(self) -> int:
        if self.target.has_bench_routes:
            count: int = (await self.request(COUNT_PATH))["connections"]
            return count
        metrics = (await self.request_body("/metrics")).decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in metrics.splitlines()
            if line.startswith("mdb_realtime_connections{")
        )

    async def wait_connections(self, expected: int, timeout: float = 60.0) -> None:
        """Wait until the server itself counts `expected` registered connections."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            seen = await self.connection_count()
            if seen == expected:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.target.name}: {seen} connections, expected {expected}")


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A scratch folder of our own, also used as TMPDIR for the embedded database."""
    folder = Path(tempfile.mkdtemp(prefix="mdb-realtime-bench-"))
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def database(workdir: Path, needed: bool) -> Iterator[str]:
    """MONGODB_URI if set, else SecantusDB in memory (only if an engine target needs one)."""
    external = os.environ.get("MONGODB_URI")
    if external or not needed:
        yield external or ""
        return
    from engine.embedded import EmbeddedDatabase

    embedded = EmbeddedDatabase(":memory:")
    embedded.start(log_path=workdir / "secantus.log")
    with contextlib.suppress(OSError):
        assert embedded.pid is not None
        os.sched_setaffinity(embedded.pid, {LOADGEN_CORE})  # off the server core; it idles
    try:
        yield embedded.uri
    finally:
        embedded.stop()


def needs_database(names: Sequence[str]) -> bool:
    return any(name.startswith("engine") or name in USER_APP_TARGETS for name in names)


# -- numbers and output -------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so it can be pasted into bench/README.md as is."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def select_targets(spec: str, setting: Setting) -> list[Target]:
    """The requested targets that can run here; the others are reported and skipped."""
    chosen = []
    for name in [n.strip() for n in spec.split(",") if n.strip()]:
        target = make_target(name, setting)
        if target.unavailable:
            print(f"skipping {name}: {target.unavailable}", file=sys.stderr)
            continue
        chosen.append(target)
    return chosen


@contextlib.contextmanager
def setting(args: Any) -> Iterator[Setting]:
    """Scratch folder, database and engine snapshot for the targets named in `args.targets`."""
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    with workspace() as workdir, database(workdir, needs_database(names)) as uri:
        engine_dir, commit = engine_snapshot(args.engine_ref, workdir)
        yield Setting(uri, workdir, args.mdb_engine_python, engine_dir, commit)
