"""Manifest keys of mdb-engine 0.15, read before validation: honoured where they have a
meaning here, else accepted with a warning that names them. None of them refuses a manifest.

| key | here |
|---|---|
| `websockets.<name>.require_auth` (legacy) | the endpoint's `auth.required` |
| `websockets.<name>.auth.csrf_required` | browsers only from allowed origins (a model field) |
| `websockets.<name>.ticket_ttl_seconds` | connection ticket lifetime, 1..3600 s |
| `collections.<name>.realtime: true` | `watch.<name>` on the app's endpoint (rule below) |
| `websocket_ticket_store` | warned: tickets are always kept in the engine's database |
| `cors.enabled` | `false` turns the Origin check off (a model field) |

The app's endpoint for `collections.<name>.realtime: true` is the endpoint named `realtime`,
else the app's only endpoint. With no endpoint, or several and none named `realtime`, the
collection is not bound and a warning says so. An endpoint that already has `watch.<name>`
keeps its own binding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_ENDPOINT = "realtime"

# Keys accepted for compatibility that nothing here reads: (JSON path, why).
_UNUSED_TOP_LEVEL_KEYS = {
    "websocket_ticket_store": (
        "not used: connection tickets are always kept in the engine's database "
        "(collection mdb_realtime_tickets)"
    ),
}


@dataclass
class Translation:
    """Manifest data with mdb-engine's keys turned into this engine's, and what was said."""

    data: dict[str, Any]
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (JSON path, message)
    problems: list[tuple[str, str]] = field(default_factory=list)


def translate(data: dict[str, Any]) -> Translation:
    """`data` is not changed; the translation holds a copy where something was rewritten."""
    result = Translation(dict(data))
    endpoints = data.get("websockets")
    if isinstance(endpoints, dict):
        result.data["websockets"] = {
            name: _endpoint(name, endpoint, result) for name, endpoint in endpoints.items()
        }
    _bind_realtime_collections(result)
    for key, why in _UNUSED_TOP_LEVEL_KEYS.items():
        if data.get(key) is not None:
            result.warnings.append((key, why))
    return result


def _endpoint(name: str, endpoint: Any, result: Translation) -> Any:
    if not isinstance(endpoint, dict):
        return endpoint
    if "require_auth" not in endpoint:
        return endpoint
    translated = {key: value for key, value in endpoint.items() if key != "require_auth"}
    legacy = endpoint["require_auth"]
    path = f"websockets.{name}.require_auth"
    if not isinstance(legacy, bool):
        result.problems.append((path, "must be true or false"))
        return translated
    auth = endpoint.get("auth", {})
    if not isinstance(auth, dict):
        return translated  # the model reports auth itself
    if "required" in auth and auth["required"] != legacy:
        result.problems.append((path, "contradicts auth.required; keep only auth.required"))
        return translated
    translated["auth"] = {**auth, "required": legacy}
    return translated


def _bind_realtime_collections(result: Translation) -> None:
    collections = result.data.get("collections")
    if not isinstance(collections, dict):
        return
    wanted = []
    for name, config in collections.items():
        if not isinstance(config, dict) or "realtime" not in config:
            continue
        if not isinstance(config["realtime"], bool):
            result.problems.append((f"collections.{name}.realtime", "must be true or false"))
        elif config["realtime"]:
            wanted.append(name)
    if not wanted:
        return
    endpoints = result.data.get("websockets")
    target = _app_endpoint(endpoints)
    if target is None:
        for name in wanted:
            result.warnings.append(
                (
                    f"collections.{name}.realtime",
                    "not bound: the app has no single endpoint to bind it to (name one "
                    f"{DEFAULT_ENDPOINT!r}, or add watch.{name} to an endpoint)",
                )
            )
        return
    assert isinstance(endpoints, dict)
    endpoint = endpoints[target]
    watch = endpoint.get("watch", {})
    if not isinstance(watch, dict):
        return  # the model reports watch itself
    bound = {**{name: {} for name in wanted if name not in watch}, **watch}
    endpoints[target] = {**endpoint, "watch": bound}


def _app_endpoint(endpoints: Any) -> str | None:
    """The endpoint `collections.<name>.realtime` binds to, or None when there is none."""
    if not isinstance(endpoints, dict):
        return None
    if isinstance(endpoints.get(DEFAULT_ENDPOINT), dict):
        return DEFAULT_ENDPOINT
    if len(endpoints) == 1:
        (only,) = endpoints
        return only if isinstance(endpoints[only], dict) else None
    return None
