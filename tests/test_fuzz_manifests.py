"""Fuzzing manifests, without a server.

- Any invalid manifest is refused with ManifestError (never another exception), and every
  problem names the file and a JSON path; one of them points at what was broken.
- `mdb-realtime validate` (validate_command) turns any file, even bytes that are not JSON, into
  exit status 1 and `FILE: JSON.PATH: message` lines.
- No valid manifest makes the engine fail at runtime: random valid manifests (endpoints, watch
  bindings with random operations, filters, fields and scopes) are registered on a Router,
  connections of every kind attach and subscribe, and random change events are routed through
  it without an exception; anonymous connections never receive a scoped binding's documents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bson import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import codec
from engine.auth import ANONYMOUS, Principal
from engine.changes import ChangeEvent, cluster_time_iso
from engine.delivery.router import Router
from engine.hub import WebSocketConnection
from engine.manifest import OPERATIONS, ManifestError, parse_manifest, validate_command
from tests.test_fuzz_query import documents, filters, json_values

Strategy = st.SearchStrategy
SOURCE = "fuzz/manifest.json"

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# -- valid manifests ----------------------------------------------------------------------------

COLLECTIONS = ["orders", "news", "items", "team_docs", "x.y", "a-b"]
DOC_FIELDS = ["title", "qty", "owner_id", "team", "email", "tags", "a.b"]
PLACEHOLDERS = ["$user.id", "$user.email", "$claims.team", "$claims.role"]

literals: Strategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["ann", "bob", "red", "blue", "", "x"]),
)


def _valid_queries(values: Strategy[Any]) -> Strategy[dict[str, Any]]:
    """Queries the whitelist accepts; `values` are what fields are compared with."""
    lists = st.lists(values, max_size=3)
    operators = st.one_of(
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$eq", "$ne"]), values),
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), literals),
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$in", "$nin"]), lists),
        st.builds(lambda v: {"$exists": v}, st.booleans()),
        st.builds(lambda v: {"$size": v}, st.integers(0, 3)),
        st.builds(lambda v: {"$all": v}, st.lists(literals, min_size=1, max_size=2)),
        st.builds(
            lambda p, o: {"$regex": p, **o},
            st.sampled_from(["^a", "b$", "[a-c]", "ann|bob"]),
            st.sampled_from([{}, {"$options": "i"}]),
        ),
        st.builds(lambda v: {"$not": {"$gt": v}}, literals),
        st.builds(lambda v: {"$elemMatch": {"$gte": v}}, literals),
    )
    field_queries = st.dictionaries(
        st.sampled_from(DOC_FIELDS), values | operators, min_size=1, max_size=3
    )
    return st.recursive(
        field_queries,
        lambda queries: st.builds(
            lambda op, items: {op: items},
            st.sampled_from(["$and", "$or", "$nor"]),
            st.lists(queries, min_size=1, max_size=3),
        ),
        max_leaves=6,
    )


valid_filters = _valid_queries(literals)
valid_scopes = _valid_queries(st.one_of(st.sampled_from(PLACEHOLDERS), literals)).filter(
    lambda scope: any(p in json.dumps(scope) for p in PLACEHOLDERS)
)


@st.composite
def watch_bindings(draw: st.DrawFn) -> dict[str, Any]:
    binding: dict[str, Any] = {}
    if draw(st.booleans()):
        binding["operations"] = draw(
            st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=4, unique=True)
        )
    if draw(st.booleans()):
        binding["filter"] = draw(valid_filters)
    if draw(st.booleans()):
        binding["fields"] = draw(st.lists(st.sampled_from(DOC_FIELDS), unique=True, max_size=4))
    if draw(st.booleans()):
        binding["scope"] = draw(valid_scopes)
    return binding


@st.composite
def valid_manifests(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True), min_size=1, max_size=3).map(
            lambda items: list(dict.fromkeys(items))
        )
    )
    endpoints: dict[str, Any] = {}
    for index, name in enumerate(names):
        endpoint: dict[str, Any] = {"path": f"/ws{index}" if index else "/ws"}
        if draw(st.booleans()):
            endpoint["auth"] = {
                "required": draw(st.booleans()),
                "allow_anonymous": draw(st.booleans()),
            }
        if draw(st.booleans()):
            endpoint["ping_interval"] = draw(st.integers(5, 300))
        if draw(st.booleans()):
            endpoint["description"] = draw(st.text(max_size=10))
        endpoint["watch"] = draw(
            st.dictionaries(st.sampled_from(COLLECTIONS), watch_bindings(), max_size=3)
        )
        endpoints[name] = endpoint
    manifest: dict[str, Any] = {
        "slug": draw(st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True)),
        "name": draw(st.text(min_size=1, max_size=10)),
        "websockets": endpoints,
    }
    if draw(st.booleans()):
        manifest["data"] = {
            "collection_prefix": draw(st.from_regex(r"[a-z_]{0,5}", fullmatch=True))
        }
    if draw(st.booleans()):
        manifest["cors"] = {"allow_origins": ["https://good.example", "http://localhost:3000"]}
    if draw(st.booleans()):
        manifest["auth"] = {"policy": {"required": draw(st.booleans())}}
    if draw(st.booleans()):
        manifest["other_tool"] = draw(json_values)  # unknown top-level keys are kept
    return manifest


# -- invalid manifests: one breakage at a known place -------------------------------------------

bad_slugs = st.one_of(
    st.text(min_size=1, max_size=8).filter(lambda s: not re.fullmatch(r"[a-z0-9_-]+", s)),
    st.sampled_from(["", "Todo", "a b", "a/b", "../x"]),
    st.integers(),
    st.lists(st.integers(), max_size=2),
    st.none(),
)
non_objects = st.one_of(
    st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.booleans()
)
bad_paths = st.one_of(
    st.sampled_from(["", "ws", "/", "/a b", "/ws?x=1", "/ws#", "/é", "ws/x"]),
    st.text(max_size=6).filter(lambda s: not re.fullmatch(r"/[a-zA-Z0-9_/-]+", s)),
    st.integers(),
)
bad_pings = st.one_of(
    st.integers(max_value=4), st.integers(min_value=301), st.sampled_from(["30", 30.5, True, None])
)
bad_collections = st.sampled_from(["", "a$b", "system.users", "x\x00y"])
bad_operations = st.one_of(
    st.just([]),
    st.sampled_from([["upsert"], ["insert", "insert"], "insert", [1], ["INSERT"]]),
)
forbidden_clauses = st.sampled_from(
    [
        {"$where": "true"},
        {"a": {"$function": {"body": "x", "args": [], "lang": "js"}}},
        {"$expr": {"$eq": [1, 1]}},
        {"a": {"$type": "string"}},
        {"a": {"$mod": [2, 0]}},
        {"$text": {"$search": "x"}},
    ]
)
bad_filters = st.one_of(
    forbidden_clauses,
    st.sampled_from([{"owner_id": "$user.id"}, {"a": {"$in": 5}}, {"a": {"$size": -1}}]),
    st.sampled_from([{"$and": []}, {"a": {"$regex": "(a+)+$"}}, {"a": {"$regex": "("}}]),
    non_objects,
)
bad_scopes = st.one_of(
    forbidden_clauses,
    st.sampled_from(
        [{"owner_id": "$user.name"}, {"team": "$claims."}, {"a": {"$regex": "$user.id"}}]
    ),
    non_objects,
)
bad_fields = st.one_of(
    st.sampled_from([["$x"], ["a..b"], [""], ["a", "a.b"], ["a.$b"], "title", [1]]),
)
bad_databases = st.sampled_from(["", "a/b", "a.b", "a b", "x" * 64, "a$"])
bad_origins = st.sampled_from(["example.com", "https://example.com/", "https://e.com/path", ""])
unknown_keys = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)


@dataclass
class Broken:
    manifest: dict[str, Any]
    where: str  # a JSON path (prefix) that a problem must name
    what: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@st.composite
def broken_manifests(draw: st.DrawFn) -> Broken:
    manifest = json.loads(json.dumps(draw(valid_manifests())))
    endpoint = draw(st.sampled_from(sorted(manifest["websockets"])))
    ep = manifest["websockets"][endpoint]
    at = f"websockets.{endpoint}"
    watch = ep["watch"]
    if not watch:
        watch["news"] = {}
    collection = draw(st.sampled_from(sorted(watch)))
    binding = watch[collection]
    bind_at = f"{at}.watch.{collection}"
    kind = draw(
        st.sampled_from(
            [
                "slug",
                "no_slug",
                "name",
                "websockets",
                "endpoint",
                "endpoint_key",
                "path",
                "ping",
                "auth",
                "auth_key",
                "watch",
                "collection",
                "binding",
                "binding_key",
                "operations",
                "filter",
                "scope",
                "fields",
                "database",
                "prefix",
                "data_key",
                "origins",
                "endpoint_name",
                "shared_path",
                "policy",
            ]
        )
    )
    known = {"path", "description", "auth", "ping_interval", "watch", "name"}
    if kind == "slug":
        manifest["slug"] = draw(bad_slugs)
        return Broken(manifest, "slug", kind)
    if kind == "no_slug":
        del manifest["slug"]
        return Broken(manifest, "slug", kind)
    if kind == "name":
        manifest["name"] = draw(st.sampled_from(["", 5, None, ["x"]]))
        return Broken(manifest, "name", kind)
    if kind == "websockets":
        manifest["websockets"] = draw(non_objects)
        return Broken(manifest, "websockets", kind)
    if kind == "endpoint":
        manifest["websockets"][endpoint] = draw(non_objects)
        return Broken(manifest, at, kind)
    if kind == "endpoint_key":
        ep[draw(unknown_keys.filter(lambda k: k not in known))] = draw(json_values)
        return Broken(manifest, at, kind)
    if kind == "path":
        ep["path"] = draw(bad_paths)
        return Broken(manifest, f"{at}.path", kind)
    if kind == "ping":
        ep["ping_interval"] = draw(bad_pings)
        return Broken(manifest, f"{at}.ping_interval", kind)
    if kind == "auth":
        ep["auth"] = {"required": draw(st.sampled_from(["yes", 1, None, []]))}
        return Broken(manifest, f"{at}.auth", kind)
    if kind == "auth_key":
        ep["auth"] = {"requird": True}
        return Broken(manifest, f"{at}.auth", kind)
    if kind == "watch":
        ep["watch"] = draw(non_objects)
        return Broken(manifest, f"{at}.watch", kind)
    if kind == "collection":
        watch[draw(bad_collections)] = {}
        return Broken(manifest, f"{at}.watch", kind)
    if kind == "binding":
        watch[collection] = draw(non_objects)
        return Broken(manifest, bind_at, kind)
    if kind == "binding_key":
        binding[
            draw(
                unknown_keys.filter(lambda k: k not in {"operations", "filter", "fields", "scope"})
            )
        ] = 1
        return Broken(manifest, bind_at, kind)
    if kind == "operations":
        binding["operations"] = draw(bad_operations)
        return Broken(manifest, f"{bind_at}.operations", kind)
    if kind == "filter":
        binding["filter"] = draw(bad_filters)
        return Broken(manifest, f"{bind_at}.filter", kind)
    if kind == "scope":
        binding["scope"] = draw(bad_scopes)
        return Broken(manifest, f"{bind_at}.scope", kind)
    if kind == "fields":
        binding["fields"] = draw(bad_fields)
        return Broken(manifest, f"{bind_at}.fields", kind)
    if kind == "database":
        manifest["data"] = {"database": draw(bad_databases)}
        return Broken(manifest, "data.database", kind)
    if kind == "prefix":
        manifest["data"] = {"collection_prefix": draw(st.sampled_from(["a$", "system.", "x\x00"]))}
        return Broken(manifest, "data.collection_prefix", kind)
    if kind == "data_key":
        manifest["data"] = {"databse": "x"}
        return Broken(manifest, "data", kind)
    if kind == "origins":
        manifest["cors"] = {"allow_origins": [draw(bad_origins)]}
        return Broken(manifest, "cors.allow_origins", kind)
    if kind == "endpoint_name":
        manifest["websockets"][draw(st.sampled_from(["bad name", "é", "a.b", ""]))] = {
            "path": "/zz"
        }
        return Broken(manifest, "websockets", kind)
    if kind == "shared_path":
        manifest["websockets"]["zz_second"] = {"path": ep.get("path", "/ws")}
        return Broken(manifest, "websockets", kind)
    manifest["auth"] = {"policy": {"required": draw(st.sampled_from(["true", 0, []]))}}
    return Broken(manifest, "auth", kind)


def assert_refused_naming(error: ManifestError, where: str) -> None:
    assert error.problems, "a refusal lists at least one problem"
    for problem in error.problems:
        assert problem.file == SOURCE
        assert problem.path and problem.message
        assert str(problem) == f"{SOURCE}: {problem.path}: {problem.message}"
    paths = [problem.path for problem in error.problems]
    assert any(path.startswith(where) for path in paths), f"no problem at {where}: {paths}"


# -- properties: invalid manifests --------------------------------------------------------------


@settings(FUZZ, max_examples=120)
@given(broken=broken_manifests())
def test_invalid_manifests_are_refused_naming_file_and_path(broken: Broken) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_manifest(broken.manifest, source=SOURCE)
    assert_refused_naming(refused.value, broken.where)


@settings(FUZZ, max_examples=200)
@given(data=json_values)
def test_any_json_is_a_manifest_or_a_manifest_error(data: Any) -> None:
    try:
        parse_manifest(data, source=SOURCE)
    except ManifestError as error:
        assert all(problem.file == SOURCE and problem.path for problem in error.problems)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@settings(FUZZ, max_examples=120)
@given(manifest=valid_manifests(), data=st.data())
def test_any_value_anywhere_gives_a_manifest_or_a_manifest_error(
    manifest: dict[str, Any], data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(_paths(manifest)[1:]))
    replacement = data.draw(json_values)
    node: Any = manifest
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = replacement
    try:
        parse_manifest(manifest, source=SOURCE)
    except ManifestError as error:
        assert all(problem.file == SOURCE and problem.path for problem in error.problems)


# -- properties: files through `mdb-realtime validate` ------------------------------------------

file_contents = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.sampled_from(
        [
            b"\xff\xfe{}",
            b'{"slug": "a", "slug": "b", "name": "x"}',
            b'{"slug": "a", "name": "x",}',
            b"[" * 500 + b"]" * 500,
            b'{"slug": "a", "name": "x", "websockets": {"w": {"path": "/ws"}}} trailing',
            b"",
            b"null",
        ]
    ),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@settings(FUZZ, max_examples=150)
@given(content=file_contents)
def test_validate_reports_any_bad_file_as_lines_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    status = validate_command([str(path)])
    out = capsys.readouterr().out
    if status == 0:
        return  # some random JSON is a valid manifest after all
    assert status == 1
    lines = [line for line in out.splitlines() if line]
    assert lines and all(line.startswith(f"{path}: ") for line in lines), out


def test_validate_prints_a_problem_for_a_lone_surrogate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value the problem line quotes may not be printable as UTF-8: the line is still printed.

    A regression test now: fixed in af710fb.

    Found by fuzzing: a manifest whose slug is the JSON string "\\ud800" (a lone surrogate,
    which json.loads accepts) makes `mdb-realtime validate` die with UnicodeEncodeError in
    `print(problem)` (engine/manifest.py validate_command), because the message quotes the
    value with json.dumps(ensure_ascii=False). Expected: `FILE: slug: must match ...`.
    """
    path = tmp_path / "manifest.json"
    path.write_bytes(b'{"slug": "\\ud800", "name": "x"}')
    status = validate_command([str(path)])
    out = capsys.readouterr().out
    assert status == 1
    assert out.startswith(f"{path}: slug: ")


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_validate_reports_deeply_nested_json_as_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    """A manifest file nested deeper than the JSON parser recurses is a problem line too.

    A regression test now: fixed in af710fb.

    Found by fuzzing: engine.manifest._read_json catches ValueError but json.loads raises
    RecursionError here, so `mdb-realtime validate` (and `serve`) die with a traceback instead
    of printing `FILE: $: ...`.
    """
    path = tmp_path / "deep.json"
    path.write_text('{"slug": "a", "name": "A", "x": ' + "[" * depth + "]" * depth + "}")
    status = validate_command([str(path)])
    out = capsys.readouterr().out
    assert status == 1
    assert out.startswith(f"{path}: $: ")


# -- properties: valid manifests never break the engine at runtime ------------------------------


@dataclass(eq=False)
class Recorder(WebSocketConnection):
    """A connection whose frames are kept instead of written to a socket."""

    frames: list[str] = field(default_factory=list)

    def send(self, frame: str) -> bool:
        if self.closing:
            return False
        self.frames.append(frame)
        return True


claim_values = st.one_of(
    literals,
    st.lists(literals, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), literals, max_size=2),
)
principals = st.one_of(
    st.just(ANONYMOUS),
    st.builds(
        lambda user, email, team, role: Principal(
            user_id=user,
            email=email,
            claims={"sub": user, "team": team, "role": role},
        ),
        st.sampled_from(["ann", "bob", "", "0"]),
        st.sampled_from([None, "ann@example.com"]),
        claim_values,
        claim_values,
    ),
)


def change_events(collections: list[str]) -> Strategy[ChangeEvent]:
    def build(
        collection: str, operation: str, doc_id: Any, after: Any, before: Any, exact: bool
    ) -> ChangeEvent:
        document = None if operation == "delete" else {"_id": doc_id, **after}
        return ChangeEvent(
            event_id=f"e{doc_id}",
            resume_token={"_data": f"e{doc_id}"},
            operation=operation,
            database="db",
            collection=collection,
            document_id=doc_id,
            document=document,
            before=None if before is None else {"_id": doc_id, **before},
            updated_fields=dict(after) if operation == "update" else None,
            removed_fields=[] if operation == "update" else None,
            cluster_time=Timestamp(1_700_000_000, 1),
            timestamp=cluster_time_iso(Timestamp(1_700_000_000, 1)),
            exact=exact,
        )

    return st.builds(
        build,
        st.sampled_from(collections),
        st.sampled_from(OPERATIONS),
        st.integers(0, 5) | st.sampled_from(["a", True]),
        documents,
        st.none() | documents,
        st.booleans(),
    )


@settings(FUZZ, max_examples=100)
@given(manifest=valid_manifests(), data=st.data())
def test_valid_manifests_register_attach_and_route_without_errors(
    manifest: dict[str, Any], data: st.DataObject
) -> None:
    parsed = parse_manifest(manifest, source=SOURCE)
    router = Router(known_ids_limit=3)
    bindings = router.add_app(parsed, "db")
    connections: list[Recorder] = []
    for endpoint in parsed.websockets:
        for principal in data.draw(st.lists(principals, min_size=1, max_size=3)):
            connection = Recorder(
                websocket=object(),
                app_slug=parsed.slug,
                user_id=principal.user_id,
                endpoint=endpoint,
                principal=principal,
            )
            router.attach(connection)
            connections.append(connection)
            for _ in range(data.draw(st.integers(0, 2))):
                message = {
                    "type": "subscribe",
                    "id": data.draw(st.sampled_from(["s1", "s2", 3])),
                    "collection": data.draw(st.sampled_from([*COLLECTIONS, "nope"])),
                    "filter": data.draw(st.none() | filters),
                }
                if data.draw(st.booleans()):
                    message["fields"] = data.draw(
                        st.lists(st.sampled_from([*DOC_FIELDS, "$x", ""]), max_size=3)
                    )
                assert router.subscribe(connection, message) is None
    physical = sorted({binding.physical for binding in bindings}) or ["nothing"]
    for event in data.draw(st.lists(change_events(physical), max_size=6)):
        router.route(event)
    scoped = {(b.endpoint, b.collection) for b in bindings if b.scope is not None}
    for connection in connections:
        for frame in connection.frames:
            message = codec.loads(frame)
            assert message["type"] in ("change", "subscribed", "error")
            if message["type"] == "change" and not connection.principal.authenticated:
                assert (connection.endpoint, message["collection"]) not in scoped
        router.detach(connection)


def test_attach_with_claims_that_hold_operator_documents() -> None:
    """A token's claim values are data: a scope must never fail to compile because of them.

    A regression test now: fixed in af710fb.

    Found by fuzzing: `{"team": "$claims.team"}` with the claim `team: ["a", {"$gt": ""}]` (a
    list holding a document with a `$` key, as a token issuer may well put in a claim) makes
    Router.attach raise QueryError. Over a socket (engine.endpoint -> Recovery.on_connect ->
    Router.attach) the connection gets `connected`, then the socket is dropped without a close
    frame and the server logs a traceback (test_fuzz_frames.py reproduces it over a socket).
    Expected: the claim is compared as a literal, as a document claim already is.
    """
    manifest = parse_manifest(
        {
            "slug": "s",
            "name": "S",
            "websockets": {
                "e": {"path": "/ws", "watch": {"t": {"scope": {"team": "$claims.team"}}}}
            },
        }
    )
    router = Router()
    router.add_app(manifest, "db")
    for team in (["a", {"$gt": ""}], [{"$where": "1"}], {"$gt": ""}):
        principal = Principal(user_id="u", claims={"sub": "u", "team": team})
        connection = Recorder(
            websocket=object(), app_slug="s", user_id="u", endpoint="e", principal=principal
        )
        router.attach(connection)
        assert "t" in connection.views
