"""Sampling a server with py-spy and reading where its time goes (self and inclusive)."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from bench import harness

SAMPLE_RATE = 250  # per second
TOP = 20


async def record(pid: int, seconds: float, output: Path, native: bool = False) -> list[str]:
    """Collapsed stacks ("frame;frame;... count") of `pid` sampled for `seconds`."""
    binary = shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--function",  # aggregate by function, not by line
        "--output",
        str(output),
        # Native frames need the process paused while it is sampled; Python frames do not.
        *(["--native"] if native else ["--nonblocking"]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    if process.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
    return output.read_text().splitlines()


def summarize(lines: list[str]) -> dict[str, Any]:
    """Share of samples per function: as the running frame (self) and anywhere on the stack."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    return {
        "samples": total,
        "self": [(f, 100 * c / total) for f, c in own.most_common(TOP)] if total else [],
        "inclusive": [(f, 100 * c / total) for f, c in anywhere.most_common(TOP * 2)]
        if total
        else [],
    }


def _short(frame: str) -> str:
    """`send (starlette/websockets.py)` instead of the full site-packages path."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def print_summary(name: str, profile: dict[str, Any]) -> None:
    print(f"\n{name} profile under fan-out ({profile['samples']} samples, busy time only)")
    print("\nself time (the function running when sampled):")
    harness.print_table(["function", "%"], profile["self"])
    print("\ninclusive time (the function anywhere on the stack):")
    harness.print_table(["function", "%"], profile["inclusive"])
