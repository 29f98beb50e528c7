"""The clients' local views apply transactions whole and keep windows in order (no I/O):
the Python one directly, the browser one under Node when Node is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.localview import LocalView

STATIC = Path(__file__).resolve().parents[1] / "engine" / "static" / "realtime.js"

SNAPSHOT = {
    "type": "snapshot",
    "id": "top",
    "collection": "scores",
    "window": "w1",
    "sort": {"k": -1, "_id": 1},
    "limit": 3,
    "documents": [{"_id": "a", "k": True}, {"_id": "b", "k": "z"}, {"_id": "c", "k": 5}],
    "event_id": "e0",
}
MOVE = {
    "type": "transaction",
    "id": "e1",
    "window": "w1",
    "changes": [
        {
            "type": "change",
            "id": "e1",
            "collection": "scores",
            "window": "w1",
            "operation": "delete",
            "document_id": "c",
            "reason": "left_window",
        },
        {
            "type": "change",
            "id": "e1",
            "collection": "scores",
            "window": "w1",
            "operation": "insert",
            "document_id": "d",
            "document": {"_id": "d"},
            "reason": "entered_window",
        },
    ],
}
REORDER = {
    "type": "change",
    "id": "e2",
    "collection": "scores",
    "window": "w1",
    "operation": "update",
    "document_id": "d",
    "document": {"_id": "d", "k": [1, {}]},
}
# true > {} (an array sorts by its largest element descending) > "z"; "d" (missing) is last
EXPECTED = [["a", "b", "c"], ["a", "b", "d"], ["a", "d", "b"]]


def test_python_local_view_keeps_windows_and_applies_transactions_whole() -> None:
    view = LocalView()
    seen = []
    for message in (SNAPSHOT, MOVE, REORDER):
        view.apply(message)
        window = view.window("top")
        assert window is not None
        seen.append([d["_id"] for d in window])
    assert seen == EXPECTED
    assert view.last_event_id == "e2"
    assert view.documents("scores") == []  # a window is not the collection's plain view

    plain = LocalView()
    plain.apply(
        {
            "type": "transaction",
            "id": "t9",
            "changes": [
                {"type": "change", "id": "t9", "collection": "accounts", "operation": "update"}
                | {"document_id": n, "document": {"_id": n, "balance": b}}
                for n, b in (("x", 5), ("y", 7))
            ],
        }
    )
    assert plain.documents("accounts") == [{"_id": "x", "balance": 5}, {"_id": "y", "balance": 7}]
    assert plain.last_event_id == "t9"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
def test_browser_local_view_keeps_windows_in_order(tmp_path: Path) -> None:
    # The client's modules as the browser loads them (ES modules that import each other).
    (tmp_path / "package.json").write_text('{"type": "module"}')
    for source in STATIC.parent.glob("*.js"):
        (tmp_path / source.name).write_text(source.read_text())
    script = tmp_path / "check.mjs"
    messages: list[dict[str, Any]] = [SNAPSHOT, MOVE, REORDER]
    script.write_text(
        'import { LocalView } from "./realtime.js";\n'
        "const view = new LocalView();\n"
        f"const messages = {json.dumps(messages)};\n"
        "const seen = messages.map((m) => { view.apply(m); "
        "return view.window('top').map((d) => d._id); });\n"
        "console.log(JSON.stringify({ seen, last: view.lastEventId }));\n"
    )
    output = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert json.loads(output) == {"seen": EXPECTED, "last": "e2"}
