"""mdb-engine 0.15 manifest keys and environment variables: honoured, or accepted with a
warning, never refused (the keys' meaning is in engine/manifest_compat.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.app import _allowed_origins
from engine.auth import resolve_secret
from engine.endpoint import origin_allowed
from engine.manifest import ManifestError, Problem, parse_manifest
from engine.settings import mongo_uri_from_env

SOURCE = "m.json"


def manifest(**endpoints: dict[str, Any]) -> dict[str, Any]:
    return {"slug": "a", "name": "A", "websockets": endpoints}


def problems_of(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(ManifestError) as refused:
        parse_manifest(data, SOURCE)
    return refused.value.problems


@pytest.mark.parametrize("legacy", [True, False])
def test_require_auth_is_auth_required(legacy: bool) -> None:
    parsed = parse_manifest(manifest(rt={"path": "/ws", "require_auth": legacy}), SOURCE)
    assert parsed.websockets["rt"].auth.required is legacy
    assert parsed.warnings == ()
    # It wins over the app's default, as an endpoint's own auth.required does.
    data = {**manifest(rt={"path": "/ws", "require_auth": legacy}), "auth_required": not legacy}
    assert parse_manifest(data).websockets["rt"].auth.required is legacy


def test_require_auth_agreeing_with_auth_required_is_fine_and_contradicting_is_an_error() -> None:
    same = {"path": "/ws", "require_auth": False, "auth": {"required": False}}
    assert parse_manifest(manifest(rt=same)).websockets["rt"].auth.required is False
    both = {"path": "/ws", "require_auth": False, "auth": {"required": True}}
    assert problems_of(manifest(rt=both)) == [
        Problem(
            SOURCE,
            "websockets.rt.require_auth",
            "contradicts auth.required; keep only auth.required",
        )
    ]
    assert problems_of(manifest(rt={"path": "/ws", "require_auth": "yes"})) == [
        Problem(SOURCE, "websockets.rt.require_auth", "must be true or false")
    ]


def test_csrf_required_admits_only_same_origin_browsers_without_an_origin_list() -> None:
    rt = {"path": "/ws", "auth": {"csrf_required": True}}
    assert parse_manifest(manifest(rt=rt)).websockets["rt"].auth.csrf_required is True
    assert parse_manifest(manifest(rt={"path": "/ws"})).websockets["rt"].auth.csrf_required is False
    host = "app.example:8443"
    assert origin_allowed("https://app.example:8443", None, host, same_origin=True)
    assert not origin_allowed("https://evil.example", None, host, same_origin=True)
    assert origin_allowed(None, None, host, same_origin=True)  # not a browser
    assert origin_allowed("https://evil.example", None, host, same_origin=False)
    listed = ("https://evil.example",)
    assert origin_allowed("https://evil.example", listed, host, same_origin=True)


def test_ticket_ttl_seconds_sets_the_lifetime_of_the_apps_tickets() -> None:
    parsed = parse_manifest(manifest(rt={"path": "/ws", "ticket_ttl_seconds": 60}), SOURCE)
    assert parsed.websockets["rt"].ticket_ttl_seconds == 60
    assert parsed.ticket_ttl_seconds(30) == 60
    assert parsed.warnings == ()
    for bad in (0, -5, "60", 1.5, 3601):
        (problem,) = problems_of(manifest(rt={"path": "/ws", "ticket_ttl_seconds": bad}))
        assert problem.path == "websockets.rt.ticket_ttl_seconds"


def test_websocket_ticket_store_is_kept_with_a_warning() -> None:
    parsed = parse_manifest({**manifest(), "websocket_ticket_store": {"type": "mongo"}}, SOURCE)
    assert parsed.to_document()["websocket_ticket_store"] == {"type": "mongo"}
    assert [w.path for w in parsed.warnings] == ["websocket_ticket_store"]


def test_cors_enabled_false_turns_the_origin_check_off() -> None:
    origins = ["https://good.example"]
    on = parse_manifest({**manifest(), "cors": {"enabled": True, "allow_origins": origins}})
    off = parse_manifest({**manifest(), "cors": {"enabled": False, "allow_origins": origins}})
    assert _allowed_origins(on) == ("https://good.example",)
    assert _allowed_origins(off) is None
    (problem,) = problems_of({**manifest(), "cors": {"enabled": "no"}})
    assert problem.path == "cors.enabled"


def collections(**configs: Any) -> dict[str, Any]:
    return {name: {"realtime": value} for name, value in configs.items()}


def test_realtime_collections_bind_to_the_endpoint_named_realtime_or_the_only_one() -> None:
    named = {
        **manifest(realtime={"path": "/ws"}, other={"path": "/other"}),
        "collections": collections(todos=True, logs=False),
    }
    parsed = parse_manifest(named)
    assert list(parsed.websockets["realtime"].watch) == ["todos"]
    assert parsed.websockets["other"].watch == {}
    only = {**manifest(live={"path": "/ws"}), "collections": collections(todos=True)}
    assert list(parse_manifest(only).websockets["live"].watch) == ["todos"]


def test_a_binding_of_its_own_is_kept() -> None:
    own = {"filter": {"done": False}}
    data = {
        **manifest(rt={"path": "/ws", "watch": {"todos": own}}),
        "collections": collections(todos=True),
    }
    assert parse_manifest(data).websockets["rt"].watch["todos"].filter == {"done": False}


@pytest.mark.parametrize(
    "endpoints", [{}, {"one": {"path": "/one"}, "two": {"path": "/two"}}], ids=["none", "two"]
)
def test_realtime_collections_without_an_app_endpoint_are_warned_about(
    endpoints: dict[str, Any],
) -> None:
    parsed = parse_manifest({**manifest(**endpoints), "collections": collections(todos=True)})
    assert all(endpoint.watch == {} for endpoint in parsed.websockets.values())
    (warning,) = parsed.warnings
    assert warning.path == "collections.todos.realtime"
    assert "not bound" in warning.message


def test_realtime_must_be_a_boolean() -> None:
    (problem,) = problems_of({**manifest(rt={"path": "/ws"}), "collections": collections(t="on")})
    assert problem == Problem(SOURCE, "collections.t.realtime", "must be true or false")


def test_mdb_engine_environment_variables_come_after_the_engines_own(tmp_path: Path) -> None:
    every = {
        "MDB_REALTIME_JWT_SECRET": "own",
        "SECRET_KEY": "generic",
        "MDB_ENGINE_JWT_SECRET": "engine",
        "MDB_JWT_SECRET": "jwt",
    }
    order = list(every)
    for index, name in enumerate(order):
        environ = {other: every[other] for other in order[index:]}
        assert resolve_secret(tmp_path, environ) == every[name]
    assert mongo_uri_from_env({"MONGODB_URI": "a", "MDB_MONGO_URI": "b"}) == "a"
    assert mongo_uri_from_env({"MONGODB_URI": "", "MDB_MONGO_URI": "b"}) == "b"
    assert mongo_uri_from_env({}) is None


def test_engine_routing_exports_the_mdb_engine_names() -> None:
    import engine.routing
    import engine.routing.websockets as websockets_module
    from engine.routing import broadcast_to_app, create_websocket_endpoint

    assert broadcast_to_app is websockets_module.broadcast_to_app
    assert create_websocket_endpoint is websockets_module.create_websocket_endpoint
    for name in websockets_module.__all__:
        assert getattr(engine.routing, name) is getattr(websockets_module, name)
