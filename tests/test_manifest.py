"""The manifest: parsing, defaults, every rule with its file and JSON path, loading, commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from engine.manifest import (
    OPERATIONS,
    CorsConfig,
    DataConfig,
    EndpointAuth,
    Manifest,
    ManifestError,
    Problem,
    WatchBinding,
    WebSocketEndpoint,
    find_manifests,
    load_manifest_file,
    parse_manifest,
    show_command,
    validate_command,
)

SPEC_EXAMPLE: dict[str, Any] = {
    "slug": "todo",
    "name": "Todo",
    "auth": {"policy": {"required": True}},
    "websockets": {
        "realtime": {
            "path": "/ws",
            "description": "Live todo list",
            "auth": {"required": True, "allow_anonymous": False},
            "ping_interval": 30,
            "watch": {
                "todos": {
                    "operations": ["insert", "update", "replace", "delete"],
                    "filter": {"archived": {"$ne": True}},
                    "fields": ["title", "done", "owner_id"],
                    "scope": {"owner_id": "$user.id"},
                },
                "announcements": {},
            },
        }
    },
}

SOURCE = "apps/todo/manifest.json"
EP = "websockets.rt"


def app(**endpoint: Any) -> dict[str, Any]:
    """A minimal valid manifest with one endpoint `rt`, its keys overridden by `endpoint`."""
    return {"slug": "todo", "name": "Todo", "websockets": {"rt": {"path": "/ws", **endpoint}}}


def binding(**keys: Any) -> dict[str, Any]:
    """A manifest whose endpoint `rt` watches collection `t` with the given binding keys."""
    return app(watch={"t": keys})


def problems_of(data: object) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, SOURCE)
    return caught.value.problems


def paths_of(data: object) -> list[str]:
    return [problem.path for problem in problems_of(data)]


def only_problem(data: object) -> Problem:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].file == SOURCE
    return problems[0]


def as_key(name: str) -> str:
    """A key as problems show it in a JSON path (an empty key as "")."""
    return name or '""'


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- the example and its defaults -----------------------------------------------------------


def test_spec_example_parses() -> None:
    manifest = parse_manifest(SPEC_EXAMPLE)
    endpoint = manifest.websockets["realtime"]
    todos = endpoint.watch["todos"]
    assert (manifest.slug, manifest.name) == ("todo", "Todo")
    assert (endpoint.name, endpoint.path, endpoint.ping_interval) == ("realtime", "/ws", 30)
    assert endpoint.auth == EndpointAuth(required=True, allow_anonymous=False)
    assert todos.filter == {"archived": {"$ne": True}}
    assert todos.fields == ["title", "done", "owner_id"]
    assert todos.scope == {"owner_id": "$user.id"}
    assert endpoint.watch["announcements"] == WatchBinding()


def test_parsing_leaves_the_input_untouched() -> None:
    data = copy.deepcopy(SPEC_EXAMPLE)
    parse_manifest(data)
    assert data == SPEC_EXAMPLE


def test_to_document_fills_every_default() -> None:
    manifest = parse_manifest(app(watch={"todos": {}}))
    assert manifest.to_document() == {
        "slug": "todo",
        "name": "Todo",
        "websockets": {
            "rt": {
                "path": "/ws",
                "description": None,
                "auth": {"required": True, "allow_anonymous": False, "csrf_required": False},
                "ping_interval": 30,
                "watch": {
                    "todos": {
                        "operations": ["insert", "update", "replace", "delete"],
                        "filter": None,
                        "fields": None,
                        "scope": None,
                    }
                },
                "rooms": {},
            }
        },
        "data": {"database": None, "collection_prefix": None},
        "cors": None,
    }


def test_minimal_manifest_has_no_endpoints() -> None:
    manifest = parse_manifest({"slug": "a", "name": "A"})
    assert manifest.websockets == {}
    assert manifest.data == DataConfig()
    assert manifest.cors is None


@pytest.mark.parametrize(
    "data",
    [
        SPEC_EXAMPLE,
        app(),
        {**app(), "schema_version": "2.0", "indexes": {"t": [{"name": "x"}]}, "cors": {}},
        {**app(auth={"allow_anonymous": True}), "auth_required": False},
        {**app(), "data": {"database": "other", "collection_prefix": ""}},
    ],
)
def test_to_document_round_trips(data: dict[str, Any]) -> None:
    manifest = parse_manifest(data)
    document = manifest.to_document()
    assert json.loads(json.dumps(document)) == document
    assert parse_manifest(document) == manifest


def test_unknown_top_level_keys_are_kept_as_they_were() -> None:
    extra = {"schema_version": "2.0", "managed_indexes": {"todos": [{"keys": [["a", 1]]}]}}
    manifest = parse_manifest({**app(), **extra, "auth": {"mode": "app"}})
    document = manifest.to_document()
    assert document["schema_version"] == "2.0"
    assert document["managed_indexes"] == extra["managed_indexes"]
    assert document["auth"] == {"mode": "app"}
    assert list(document)[:2] == ["slug", "name"]


def test_other_cors_keys_are_kept() -> None:
    cors = {"enabled": True, "allow_origins": ["https://a.example"], "max_age": 60}
    manifest = parse_manifest({**app(), "cors": cors})
    assert manifest.cors == CorsConfig(
        allow_origins=["https://a.example"], enabled=True, max_age=60
    )
    assert manifest.to_document()["cors"] == cors


# --- required keys, slug, name --------------------------------------------------------------


def test_slug_and_name_are_required() -> None:
    problems = problems_of({"websockets": {}})
    assert problems == [
        Problem(SOURCE, "slug", "is required"),
        Problem(SOURCE, "name", "is required"),
    ]


@pytest.mark.parametrize("slug", ["Todo", "to do", "todo!", "", "a.b", "todo\n", "é"])
def test_bad_slug(slug: str) -> None:
    problem = only_problem({"slug": slug, "name": "X"})
    assert problem.path == "slug"
    assert "^[a-z0-9_-]+$" in problem.message


@pytest.mark.parametrize("slug", ["todo", "a", "my-app_2", "0"])
def test_good_slug(slug: str) -> None:
    assert parse_manifest({"slug": slug, "name": "X"}).slug == slug


def test_name_must_be_a_non_empty_string() -> None:
    assert only_problem({"slug": "a", "name": ""}) == Problem(SOURCE, "name", "must not be empty")
    assert only_problem({"slug": "a", "name": 3}).message == "must be a string, got 3"


@pytest.mark.parametrize("data", [[], "x", None, 3])
def test_root_must_be_an_object(data: object) -> None:
    problem = only_problem(data)
    assert problem.path == "$"
    assert "must be an object" in problem.message


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "slug": "Bad Slug",
        "websockets": {
            "rt": {"path": "ws", "ping_interval": 1, "extra": 1, "watch": {"t": {"x": 1}}},
        },
    }
    assert paths_of(data) == [
        "slug",
        "name",
        f"{EP}.path",
        f"{EP}.ping_interval",
        f"{EP}.watch.t.x",
        f"{EP}.extra",
    ]


def test_error_text_names_file_and_path_without_library_internals() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(app(ping_interval="30", auth={"required": 1}), SOURCE)
    text = str(caught.value)
    assert text.splitlines() == [
        f"{SOURCE}: {EP}.auth.required: must be true or false, got 1",
        f'{SOURCE}: {EP}.ping_interval: must be an integer, got "30"',
    ]
    assert "pydantic" not in text
    assert "http" not in text
    assert isinstance(caught.value, ValueError)


def test_problem_str() -> None:
    problem = Problem("m.json", "websockets.rt.ping_interval", "too big")
    assert str(problem) == "m.json: websockets.rt.ping_interval: too big"
    assert str(ManifestError([problem, problem])) == f"{problem}\n{problem}"


# --- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["ws", "/", "", "/ws?x=1", "/w s", "/ws.json", "/é", "/ws\n"])
def test_bad_endpoint_path(path: str) -> None:
    problem = only_problem(app(path=path))
    assert problem.path == f"{EP}.path"
    assert "^/[a-zA-Z0-9_/-]+$" in problem.message


@pytest.mark.parametrize("path", ["/ws", "/a/b-c_d", "/WS1"])
def test_good_endpoint_path(path: str) -> None:
    assert parse_manifest(app(path=path)).websockets["rt"].path == path


def test_endpoint_path_is_required() -> None:
    data = {"slug": "a", "name": "A", "websockets": {"rt": {}}}
    assert only_problem(data) == Problem(SOURCE, f"{EP}.path", "is required")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (4, "must be between 5 and 300 seconds, got 4"),
        (301, "must be between 5 and 300 seconds, got 301"),
        (0, "must be between 5 and 300 seconds, got 0"),
        ("30", 'must be an integer, got "30"'),
        (30.5, "must be an integer, got 30.5"),
        (True, "must be an integer, got true"),
        (None, "must be an integer, got null"),
    ],
)
def test_bad_ping_interval(value: object, message: str) -> None:
    assert only_problem(app(ping_interval=value)) == Problem(SOURCE, f"{EP}.ping_interval", message)


@pytest.mark.parametrize("value", [5, 30, 300])
def test_good_ping_interval(value: int) -> None:
    assert parse_manifest(app(ping_interval=value)).websockets["rt"].ping_interval == value


def test_description_must_be_a_string() -> None:
    assert only_problem(app(description=["x"])).path == f"{EP}.description"


@pytest.mark.parametrize("name", ["a.b", "a b", "", "é"])
def test_bad_endpoint_name(name: str) -> None:
    data = {"slug": "a", "name": "A", "websockets": {name: {"path": "/ws"}}}
    problem = only_problem(data)
    assert problem.path == f"websockets.{as_key(name)}"
    assert "^[a-zA-Z0-9_-]+$" in problem.message


def test_two_endpoints_may_not_share_a_path() -> None:
    data = app()
    data["websockets"]["b"] = {"path": "/ws"}
    data["websockets"]["c"] = {"path": "/other"}
    data["websockets"]["d"] = {"path": "/ws"}
    assert problems_of(data) == [
        Problem(SOURCE, "websockets.b.path", "'/ws' is already used by endpoint 'rt'"),
        Problem(SOURCE, "websockets.d.path", "'/ws' is already used by endpoint 'rt'"),
    ]


def test_two_apps_may_use_the_same_path() -> None:
    first = parse_manifest(app())
    second = parse_manifest({**app(), "slug": "other"})
    assert first.websockets["rt"].path == second.websockets["rt"].path


def test_endpoint_name_is_its_key_and_not_in_the_document() -> None:
    manifest = parse_manifest(app(name="rt"))
    assert manifest.websockets["rt"].name == "rt"
    assert "name" not in manifest.to_document()["websockets"]["rt"]


def test_endpoint_name_given_must_equal_its_key() -> None:
    problem = only_problem(app(name="other"))
    assert problem.path == f"{EP}.name"
    assert "'rt'" in problem.message


@pytest.mark.parametrize(
    ("data", "path", "hint"),
    [
        (app(pingInterval=10), f"{EP}.pingInterval", "did you mean 'ping_interval'?"),
        (app(paths="/x"), f"{EP}.paths", "did you mean 'path'?"),
        (app(auth={"requird": True}), f"{EP}.auth.requird", "did you mean 'required'?"),
        (app(auth={"roles": []}), f"{EP}.auth.roles", "allow_anonymous, csrf_required, required"),
        (binding(filters={}), f"{EP}.watch.t.filters", "did you mean 'filter'?"),
        (binding(projection=[]), f"{EP}.watch.t.projection", "fields, filter, operations"),
        ({**app(), "data": {"prefix": "x_"}}, "data.prefix", "collection_prefix, database"),
    ],
)
def test_unknown_keys_inside_websockets_and_data_are_errors(
    data: dict[str, Any], path: str, hint: str
) -> None:
    problem = only_problem(data)
    assert problem.path == path
    assert problem.message.startswith("unknown key")
    assert hint in problem.message


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("/ws", EP),
        ({"path": "/ws", "auth": None}, f"{EP}.auth"),
        ({"path": "/ws", "auth": True}, f"{EP}.auth"),
        ({"path": "/ws", "watch": []}, f"{EP}.watch"),
        ({"path": "/ws", "watch": {"t": None}}, f"{EP}.watch.t"),
    ],
)
def test_endpoint_parts_must_be_objects(endpoint: object, path: str) -> None:
    data = {"slug": "a", "name": "A", "websockets": {"rt": endpoint}}
    problem = only_problem(data)
    assert problem.path == path
    assert problem.message.startswith("must be an object")


def test_websockets_must_be_an_object() -> None:
    problem = only_problem({"slug": "a", "name": "A", "websockets": ["/ws"]})
    assert problem == Problem(SOURCE, "websockets", "must be an object, got an array")


# --- auth defaults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_keys", "endpoint_auth", "required"),
    [
        ({}, None, True),
        ({"auth": {"policy": {"required": False}}}, None, False),
        ({"auth": {"policy": {"required": True}}}, None, True),
        ({"auth_required": False}, None, False),
        ({"auth_policy": {"required": False}}, None, False),
        # mdb-engine read only the legacy keys; the app's auth.policy.required wins here.
        ({"auth": {"policy": {"required": False}}, "auth_required": True}, None, False),
        ({"auth": {"policy": {"required": True}}, "auth_required": False}, None, True),
        ({"auth": {"policy": {"required": False}}, "auth_policy": {"required": True}}, None, False),
        ({"auth_policy": {"required": True}, "auth_required": False}, None, True),
        ({"auth": {"policy": {}}, "auth_required": False}, None, False),
        ({"auth": {"mode": "shared"}}, None, True),
        ({"auth": {"policy": {"required": False}}}, {"required": True}, True),
        ({"auth_required": True}, {"required": False}, False),
        ({"auth": {"policy": {"required": False}}}, {"allow_anonymous": True}, False),
        ({}, {}, True),
    ],
)
def test_endpoint_auth_required_resolution(
    app_keys: dict[str, Any], endpoint_auth: dict[str, Any] | None, required: bool
) -> None:
    endpoint = {} if endpoint_auth is None else {"auth": endpoint_auth}
    manifest = parse_manifest({**app(**endpoint), **app_keys})
    assert manifest.websockets["rt"].auth.required is required
    assert parse_manifest(manifest.to_document()) == manifest


def test_allow_anonymous_defaults_to_false() -> None:
    assert parse_manifest(app()).websockets["rt"].auth.allow_anonymous is False
    auth = parse_manifest(app(auth={"allow_anonymous": True})).websockets["rt"].auth
    assert auth == EndpointAuth(required=True, allow_anonymous=True)


@pytest.mark.parametrize(
    ("app_keys", "path"),
    [
        ({"auth": {"policy": {"required": "yes"}}}, "auth.policy.required"),
        ({"auth_policy": {"required": 0}}, "auth_policy.required"),
        ({"auth_required": "false"}, "auth_required"),
    ],
)
def test_app_auth_defaults_must_be_booleans(app_keys: dict[str, Any], path: str) -> None:
    assert only_problem({**app(), **app_keys}) == Problem(SOURCE, path, "must be true or false")


# --- watch bindings -------------------------------------------------------------------------


def test_operations_default_to_all_four() -> None:
    watch = parse_manifest(binding()).websockets["rt"].watch["t"]
    assert watch.operations == list(OPERATIONS) == ["insert", "update", "replace", "delete"]


def test_operations_subset() -> None:
    watch = parse_manifest(binding(operations=["delete", "insert"])).websockets["rt"].watch["t"]
    assert watch.operations == ["delete", "insert"]


@pytest.mark.parametrize(
    ("operations", "path", "message"),
    [
        ([], "operations", "must list at least one of insert, update, replace, delete"),
        (["insert", "insert"], "operations", "lists insert more than once"),
        (["insert", "upsert"], "operations[1]", 'got "upsert"'),
        (["Insert"], "operations[0]", "must be 'insert', 'update', 'replace' or 'delete'"),
        ("insert", "operations", "must be an array"),
    ],
)
def test_bad_operations(operations: object, path: str, message: str) -> None:
    problem = only_problem(binding(operations=operations))
    assert problem.path == f"{EP}.watch.t.{path}"
    assert message in problem.message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("system.users", "must not start with 'system.'"),
        ("a$b", "must not contain '$' or NUL"),
        ("a\x00b", "must not contain '$' or NUL"),
        ("", "must not be empty"),
    ],
)
def test_bad_collection_name(name: str, message: str) -> None:
    problem = only_problem(app(watch={name: {}}))
    assert problem.path == f"{EP}.watch.{as_key(name)}"
    assert message in problem.message


@pytest.mark.parametrize("name", ["todos", "a.b", "system", "my-things_2"])
def test_good_collection_name(name: str) -> None:
    assert name in parse_manifest(app(watch={name: {}})).websockets["rt"].watch


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        ([""], "fields[0]", "must be a field path"),
        (["a", "$b"], "fields[1]", "must not start with '$'"),
        (["a.$b"], "fields[0]", "must not start with '$'"),
        (["a..b"], "fields[0]", "must be a field path"),
        (["a."], "fields[0]", "must be a field path"),
        (["a", "a.b"], "fields", "'a' and 'a.b' overlap"),
        ([3], "fields[0]", "must be a string, got 3"),
        ("title", "fields", "must be an array"),
    ],
)
def test_bad_fields(fields: object, path: str, message: str) -> None:
    problem = only_problem(binding(fields=fields))
    assert problem.path == f"{EP}.watch.t.{path}"
    assert message in problem.message


@pytest.mark.parametrize("fields", [[], ["a"], ["_id", "a.b", "a.c", "ab"]])
def test_good_fields(fields: list[str]) -> None:
    assert parse_manifest(binding(fields=fields)).websockets["rt"].watch["t"].fields == fields


def test_filter_and_scope_must_be_objects() -> None:
    problems = problems_of(binding(filter=[{"a": 1}], scope="owner"))
    assert [problem.path for problem in problems] == [f"{EP}.watch.t.filter", f"{EP}.watch.t.scope"]
    assert all(problem.message.startswith("must be an object") for problem in problems)


# --- filter and scope: the query operator whitelist -----------------------------------------


@pytest.mark.parametrize(
    ("query", "subpath", "operator"),
    [
        ({"$where": "this.a == 1"}, "$where", "$where"),
        ({"$expr": {"$eq": ["$a", "$b"]}}, "$expr", "$expr"),
        ({"a": {"$function": {"body": "x", "args": [], "lang": "js"}}}, "a.$function", "$function"),
        ({"status": {"$where": "1"}}, "status.$where", "$where"),
        ({"$and": [{"a": 1}, {"b": {"$where": "1"}}]}, "$and[1].b.$where", "$where"),
        ({"a": {"$not": {"$expr": 1}}}, "a.$not.$expr", "$expr"),
    ],
)
@pytest.mark.parametrize("key", ["filter", "scope"])
def test_forbidden_query_operators(
    key: str, query: dict[str, Any], subpath: str, operator: str
) -> None:
    problem = only_problem(binding(**{key: query}))
    assert problem.path == f"{EP}.watch.t.{key}.{subpath}"
    assert problem.message.startswith(f"operator {operator} is not allowed")


def test_allowed_query_operators() -> None:
    query = {
        "a.b": {"$elemMatch": {"c": {"$gt": 1, "$lte": 9}}},
        "$or": [{"x": {"$in": [1, 2]}}, {"y": {"$exists": False}}],
        "$nor": [{"tags": {"$all": ["a"], "$size": 2}}],
        "name": {"$regex": "^a", "$options": "i", "$ne": "abc"},
        "n": {"$not": {"$gte": 3}, "$nin": [7], "$eq": 4, "$lt": 10},
        "$and": [{"archived": {"$ne": True}}],
    }
    watch = parse_manifest(binding(filter=query)).websockets["rt"].watch["t"]
    assert watch.filter == query


def test_malformed_filter_is_reported_with_its_path() -> None:
    problem = only_problem(binding(filter={"a": {"$in": 3}}))
    assert problem.path == f"{EP}.watch.t.filter.a.$in"


def test_scope_placeholders() -> None:
    scope = {"owner_id": "$user.id", "email": "$user.email", "team": {"$in": ["$claims.team"]}}
    assert parse_manifest(binding(scope=scope)).websockets["rt"].watch["t"].scope == scope


def test_unknown_scope_placeholder() -> None:
    problem = only_problem(binding(scope={"owner_id": "$user.name"}))
    assert problem.path == f"{EP}.watch.t.scope.owner_id"
    assert "$user.id" in problem.message


def test_placeholders_only_in_scope() -> None:
    problem = only_problem(binding(filter={"owner_id": "$user.id"}))
    assert problem.path == f"{EP}.watch.t.filter.owner_id"
    assert "scope" in problem.message


def test_query_problems_come_with_the_others() -> None:
    data = binding(filter={"$where": "1"}, scope={"$expr": 1}, operations=[])
    data["websockets"]["rt"]["ping_interval"] = 1
    assert paths_of(data) == [
        f"{EP}.ping_interval",
        f"{EP}.watch.t.operations",
        f"{EP}.watch.t.filter.$where",
        f"{EP}.watch.t.scope.$expr",
    ]


# --- data and cors --------------------------------------------------------------------------


def test_physical_names_follow_the_mdb_engine_convention() -> None:
    manifest = parse_manifest(app())
    assert manifest.physical_collection("todos") == "todo_todos"
    assert manifest.physical_database("mdb_realtime") == "mdb_realtime"


def test_physical_names_from_data() -> None:
    manifest = parse_manifest({**app(), "data": {"database": "crm", "collection_prefix": "x_"}})
    assert manifest.physical_collection("todos") == "x_todos"
    assert manifest.physical_database("mdb_realtime") == "crm"


def test_empty_prefix_keeps_collection_names() -> None:
    manifest = parse_manifest({**app(), "data": {"collection_prefix": ""}})
    assert manifest.physical_collection("todos") == "todos"


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("a.b", "must not contain '.'"),
        ("a/b", "must not contain '/'"),
        ("a b", "must not contain ' '"),
        ("a$b", "must not contain '$'"),
        ("", "must not be empty"),
        ("x" * 64, "at most 63 bytes"),
        (3, "must be a string"),
    ],
)
def test_bad_database(database: object, message: str) -> None:
    problem = only_problem({**app(), "data": {"database": database}})
    assert problem.path == "data.database"
    assert message in problem.message


@pytest.mark.parametrize("prefix", ["$x", "a\x00", "system."])
def test_bad_collection_prefix(prefix: str) -> None:
    assert only_problem({**app(), "data": {"collection_prefix": prefix}}).path == (
        "data.collection_prefix"
    )


def test_prefix_and_collection_must_make_a_valid_name() -> None:
    data = {**app(watch={"tem.x": {}, "ok": {}}), "data": {"collection_prefix": "sys"}}
    problem = only_problem(data)
    assert problem.path == f"{EP}.watch.tem.x"
    assert '"system.x"' in problem.message


@pytest.mark.parametrize("origin", ["https://a.example/", "a.example", "https://a.example/app", ""])
def test_bad_cors_origin(origin: str) -> None:
    problem = only_problem({**app(), "cors": {"allow_origins": ["*", origin]}})
    assert problem.path == "cors.allow_origins[1]"


def test_good_cors_origins() -> None:
    origins = ["*", "https://a.example", "http://localhost:3000", "chrome-extension://abc"]
    manifest = parse_manifest({**app(), "cors": {"allow_origins": origins}})
    assert manifest.cors is not None
    assert manifest.cors.allow_origins == origins


def test_models_can_be_built_directly() -> None:
    endpoint = WebSocketEndpoint(name="rt", path="/ws", auth=EndpointAuth(required=False))
    manifest = Manifest(slug="a", name="A", websockets={"rt": endpoint})
    assert manifest.websockets["rt"].auth.allow_anonymous is False
    assert parse_manifest(manifest.to_document()) == manifest


# --- loading files --------------------------------------------------------------------------


def test_load_manifest_file(tmp_path: Path) -> None:
    path = write(tmp_path / "todo" / "manifest.json", SPEC_EXAMPLE)
    assert load_manifest_file(path) == parse_manifest(SPEC_EXAMPLE)
    assert load_manifest_file(str(path)) == parse_manifest(SPEC_EXAMPLE)


def test_load_names_the_file_in_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", app(ping_interval=1))
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    assert [problem.file for problem in caught.value.problems] == [str(path)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"slug": "a",\n  "name": }', "invalid JSON at line 2 column 11: Expecting value"),
        ("", "invalid JSON at line 1 column 1: Expecting value"),
        ('{"slug": "a", "slug": "b", "name": "A"}', "invalid JSON: duplicate key 'slug'"),
        ("[1, 2]", "a manifest must be an object, got an array"),
    ],
)
def test_load_bad_json(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "m.json", text)
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    [problem] = caught.value.problems
    assert (problem.file, problem.path) == (str(path), "$")
    assert message in problem.message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    assert caught.value.problems == [
        Problem(str(path), "$", "cannot read file: No such file or directory")
    ]


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    assert caught.value.problems == [Problem(str(path), "$", "not UTF-8 text")]


def test_find_manifests(tmp_path: Path) -> None:
    expected = [
        write(tmp_path / "a.json", {}),
        write(tmp_path / "blog" / "manifest.json", {}),
        write(tmp_path / "chat.json", {}),
        write(tmp_path / "todo" / "manifest.json", {}),
    ]
    write(tmp_path / "todo" / "other.json", {})
    write(tmp_path / "deep" / "er" / "manifest.json", {})
    write(tmp_path / "notes.txt", "x")
    write(tmp_path / ".hidden.json", {})
    write(tmp_path / ".cache" / "manifest.json", {})
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "empty").mkdir()
    assert find_manifests(tmp_path) == expected
    assert find_manifests(str(tmp_path)) == expected


def test_find_manifests_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ManifestError) as caught:
        find_manifests(missing)
    assert caught.value.problems == [Problem(str(missing), "$", "no such directory")]


# --- commands -------------------------------------------------------------------------------


def test_validate_valid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write(tmp_path / "todo.json", SPEC_EXAMPLE)
    second = write(tmp_path / "chat.json", {**app(), "slug": "chat"})
    assert validate_command([str(first), str(second)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "2 manifest(s) valid" in err


def test_validate_reports_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good.json", SPEC_EXAMPLE)
    bad = write(tmp_path / "bad.json", {"slug": "x", "name": "X", **app(ping_interval=2, foo=1)})
    broken = write(tmp_path / "broken.json", '{"slug": "x",')
    assert validate_command([str(good), str(bad), str(broken)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: {EP}.ping_interval: must be between 5 and 300 seconds, got 2",
        f"{bad}: {EP}.foo: unknown key; expected one of: auth, description, path, "
        "ping_interval, rooms, ticket_ttl_seconds, watch",
        f"{broken}: $: invalid JSON at line 1 column 14: Expecting property name enclosed "
        "in double quotes",
    ]


def test_validate_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "apps" / "todo" / "manifest.json", SPEC_EXAMPLE)
    bad = write(tmp_path / "apps" / "chat.json", {"slug": "chat"})
    assert validate_command([str(tmp_path / "apps")]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{bad}: name: is required"]


def test_validate_a_valid_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "todo" / "manifest.json", SPEC_EXAMPLE)
    write(tmp_path / "chat.json", {**app(), "slug": "chat"})
    assert validate_command([str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_validate_duplicate_slugs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write(tmp_path / "a" / "manifest.json", SPEC_EXAMPLE)
    second = write(tmp_path / "b.json", SPEC_EXAMPLE)
    assert validate_command([str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{second}: slug: slug 'todo' is also used by {first}"
    ]


def test_validate_same_file_twice_is_not_a_duplicate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "todo" / "manifest.json", SPEC_EXAMPLE)
    assert validate_command([str(path), str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_validate_missing_and_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate_command([str(missing), str(empty)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{empty}: $: no manifest found (looked for */manifest.json and *.json)",
        f"{missing}: $: cannot read file: No such file or directory",
    ]


def test_validate_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_command([]) == 1
    assert capsys.readouterr().out == ""


def test_show_prints_the_filled_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "todo.json", app(watch={"todos": {}}))
    assert show_command(str(path)) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == parse_manifest(app(watch={"todos": {}})).to_document()
    assert out.startswith('{\n  "slug": "todo",')


def test_show_a_directory_with_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "todo" / "manifest.json", SPEC_EXAMPLE)
    assert show_command(str(tmp_path / "todo")) == 0
    assert json.loads(capsys.readouterr().out)["slug"] == "todo"


def test_show_reports_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "todo.json", app(path="ws"))
    assert show_command(str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f'{path}: {EP}.path: must match ^/[a-zA-Z0-9_/-]+$ (start with /), got "ws"'
    ]


def test_show_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "todo.json", "{")
    assert show_command(str(path)) == 1
    assert capsys.readouterr().err.startswith(f"{path}: $: invalid JSON at line 1 column 2")
