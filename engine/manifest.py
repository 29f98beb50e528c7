"""The app manifest: models, loading, and problems that name the file and the JSON path.

A manifest is a superset of mdb-engine's manifest schema v2. This module owns the keys the
realtime engine reads (`slug`, `name`, `websockets`, `data`, `cors`, and the auth defaults);
every other top-level key belongs to other tools and is kept untouched.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine import manifest_compat
from engine.identity.providers import check_algorithms, check_jwks_url
from engine.query import QueryError, validate_query
from engine.rooms.patterns import PatternError, parse_pattern
from engine.rooms.rules import join_rule_problems

OPERATIONS: tuple[str, ...] = ("insert", "update", "replace", "delete")

Operation = Literal["insert", "update", "replace", "delete"]

# One custom error type carries any number of (sub-path, message) pairs out of a validator,
# so cross-field checks report every problem, each at its own JSON path.
_PROBLEMS_ERROR = "manifest_problems"

_SLUG_RE = re.compile(r"[a-z0-9_-]+")
_ENDPOINT_NAME_RE = re.compile(r"[a-zA-Z0-9_-]+")
_ENDPOINT_PATH_RE = re.compile(r"/[a-zA-Z0-9_/-]+")
_ORIGIN_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s]+")
_DATABASE_FORBIDDEN = set('/\\. "$*<>:|?\x00')
_DATABASE_MAX_BYTES = 63
_PING_MIN, _PING_MAX = 5, 300
_TICKET_TTL_MIN, _TICKET_TTL_MAX = 1, 3600


class Problem(NamedTuple):
    """One thing wrong with a manifest: where (file and JSON path) and what."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class ManifestError(ValueError):
    """A manifest could not be loaded; `problems` lists every reason, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def _problems_error(items: list[tuple[str, str]]) -> PydanticCustomError:
    return PydanticCustomError(_PROBLEMS_ERROR, "manifest problems", {"problems": items})


def _describe(value: Any) -> str:
    """A short JSON rendering of a value the user wrote, for "got ..." in messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


# --- single-value checks (raise ValueError with a message meant for the user) ---------------


def _check_slug(value: str) -> str:
    if not _SLUG_RE.fullmatch(value):
        raise ValueError(
            f"must match ^[a-z0-9_-]+$ (lowercase letters, digits, _ and -), got {_describe(value)}"
        )
    return value


def _check_non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _check_endpoint_name(value: str) -> str:
    if not _ENDPOINT_NAME_RE.fullmatch(value):
        raise ValueError(f"endpoint names must match ^[a-zA-Z0-9_-]+$, got {_describe(value)}")
    return value


def _check_endpoint_path(value: str) -> str:
    if not _ENDPOINT_PATH_RE.fullmatch(value):
        raise ValueError(f"must match ^/[a-zA-Z0-9_/-]+$ (start with /), got {_describe(value)}")
    return value


def _check_ping_interval(value: int) -> int:
    if not _PING_MIN <= value <= _PING_MAX:
        raise ValueError(f"must be between {_PING_MIN} and {_PING_MAX} seconds, got {value}")
    return value


def _check_ticket_ttl(value: int) -> int:
    if not _TICKET_TTL_MIN <= value <= _TICKET_TTL_MAX:
        raise ValueError(
            f"must be between {_TICKET_TTL_MIN} and {_TICKET_TTL_MAX} seconds, got {value}"
        )
    return value


def _check_jwt_algorithms(value: list[str]) -> list[str]:
    return list(check_algorithms(value))


def collection_name_error(name: str) -> str | None:
    """Why `name` is not a valid MongoDB collection name, or None if it is."""
    if not name:
        return "a collection name must not be empty"
    if "$" in name or "\x00" in name:
        return f"a collection name must not contain '$' or NUL, got {_describe(name)}"
    if name.startswith("system."):
        return f"a collection name must not start with 'system.', got {_describe(name)}"
    return None


def _check_collection_name(value: str) -> str:
    error = collection_name_error(value)
    if error:
        raise ValueError(error)
    return value


def _check_prefix(value: str) -> str:
    # The prefix starts every physical name, so it obeys the same rules (an empty one is fine).
    if "$" in value or "\x00" in value:
        raise ValueError(f"must not contain '$' or NUL, got {_describe(value)}")
    if value.startswith("system."):
        raise ValueError(f"must not start with 'system.', got {_describe(value)}")
    return value


def _check_database(value: str) -> str:
    bad = sorted(set(value) & _DATABASE_FORBIDDEN)
    if not value:
        raise ValueError("a database name must not be empty")
    if bad:
        shown = " ".join(repr(char) for char in bad)
        raise ValueError(f"a database name must not contain {shown}, got {_describe(value)}")
    if len(value.encode()) > _DATABASE_MAX_BYTES:
        raise ValueError(f"a database name must be at most {_DATABASE_MAX_BYTES} bytes")
    return value


def _check_origin(value: str) -> str:
    # Browsers send Origin as scheme://host[:port]; a path or trailing slash would never match.
    if value != "*" and not _ORIGIN_RE.fullmatch(value):
        raise ValueError(
            f"must be '*' or an origin like 'https://example.com', got {_describe(value)}"
        )
    return value


def _check_field_path(value: str) -> str:
    parts = value.split(".")
    if not value or any(not part for part in parts):
        raise ValueError(f"must be a field path like 'a' or 'a.b', got {_describe(value)}")
    if any(part.startswith("$") for part in parts):
        raise ValueError(f"a field path must not start with '$', got {_describe(value)}")
    return value


Slug = Annotated[str, AfterValidator(_check_slug)]
NonEmptyStr = Annotated[str, AfterValidator(_check_non_empty)]
EndpointName = Annotated[str, AfterValidator(_check_endpoint_name)]
EndpointPath = Annotated[str, AfterValidator(_check_endpoint_path)]
CollectionName = Annotated[str, AfterValidator(_check_collection_name)]
FieldPath = Annotated[str, AfterValidator(_check_field_path)]
Origin = Annotated[str, AfterValidator(_check_origin)]


def _check_query(value: dict[str, Any], *, allow_placeholders: bool) -> dict[str, Any]:
    try:
        validate_query(value, allow_placeholders=allow_placeholders)
    except QueryError as err:
        raise _problems_error([(err.path, err.message)]) from None
    return value


# --- models ---------------------------------------------------------------------------------

# Manifests come from JSON, so no silent coercion ("30" is not 30, 1 is not true).
_STRICT = ConfigDict(strict=True, frozen=True, extra="forbid")


class EndpointAuth(BaseModel):
    """Who may connect. `required` is resolved from the app's defaults while parsing."""

    model_config = _STRICT

    required: bool = True
    allow_anonymous: bool = False
    csrf_required: bool = False  # mdb-engine 0.15: browsers only from allowed origins


class WatchBinding(BaseModel):
    """An endpoint's binding to one collection of its app."""

    model_config = _STRICT

    operations: list[Operation] = Field(default_factory=lambda: list(OPERATIONS))
    filter: dict[str, Any] | None = None
    fields: list[FieldPath] | None = None
    scope: dict[str, Any] | None = None

    @field_validator("operations")
    @classmethod
    def _operations_distinct(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"must list at least one of {', '.join(OPERATIONS)}")
        repeated = sorted({op for op in value if value.count(op) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value

    @field_validator("filter")
    @classmethod
    def _filter_query(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_query(value, allow_placeholders=False)

    @field_validator("scope")
    @classmethod
    def _scope_query(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_query(value, allow_placeholders=True)

    @field_validator("fields")
    @classmethod
    def _fields_disjoint(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            _reject_path_collisions(value)
        return value


def _reject_path_collisions(paths: list[str]) -> None:
    # MongoDB refuses a projection naming both "a" and "a.b"; so do we, at load time.
    for path in paths:
        for other in paths:
            if other != path and other.startswith(path + "."):
                raise ValueError(f"{path!r} and {other!r} overlap; list only one of them")


MAX_ROOM_HISTORY = 1000


def _check_room_history(value: int) -> int:
    if not 0 <= value <= MAX_ROOM_HISTORY:
        raise ValueError(f"must be between 0 and {MAX_ROOM_HISTORY} messages, got {value}")
    return value


class RoomConfig(BaseModel):
    """One `rooms` entry of an endpoint (SPEC 11); its key is the room name pattern."""

    model_config = _STRICT

    join: dict[str, Any] | None = None
    publish: bool = False
    presence: bool = False
    history: Annotated[int, AfterValidator(_check_room_history)] = 0


def _room_problems(rooms: dict[str, RoomConfig]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for pattern_text, config in rooms.items():
        try:
            pattern = parse_pattern(pattern_text)
        except PatternError as error:
            problems.append((f"rooms.{pattern_text}", str(error)))
            continue
        if config.join is not None:
            for sub, message in join_rule_problems(config.join, pattern.params):
                path = ".".join(part for part in (f"rooms.{pattern_text}.join", sub) if part)
                problems.append((path, message))
    return problems


class WebSocketEndpoint(BaseModel):
    """One WebSocket endpoint of an app, served at /<slug><path>."""

    model_config = _STRICT

    name: str = Field(exclude=True)
    path: EndpointPath
    description: str | None = None
    auth: EndpointAuth = Field(default_factory=EndpointAuth)
    ping_interval: Annotated[int, AfterValidator(_check_ping_interval)] = 30
    watch: dict[CollectionName, WatchBinding] = Field(default_factory=dict)
    # How long a connection ticket of the app lives (mdb-engine 0.15's key); see JwtConfig.
    ticket_ttl_seconds: Annotated[int, AfterValidator(_check_ticket_ttl)] | None = None

    rooms: dict[str, RoomConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rooms_valid(self) -> WebSocketEndpoint:
        problems = _room_problems(self.rooms)
        if problems:
            raise _problems_error(problems)
        return self


class JwtConfig(BaseModel):
    """`auth.jwt`: the app's identity provider. Each key set here replaces the engine's."""

    model_config = _STRICT

    jwks_url: Annotated[str, AfterValidator(check_jwks_url)] | None = None
    issuer: NonEmptyStr | None = None
    audience: NonEmptyStr | list[NonEmptyStr] | None = None
    algorithms: Annotated[list[str], AfterValidator(_check_jwt_algorithms)] | None = None

    def settings(self) -> dict[str, Any]:
        """The keys that are set, for ProviderConfig.overridden_by."""
        return self.model_dump(exclude_none=True)


class AppAuth(BaseModel):
    """The app's `auth`: mdb-engine's keys (`policy`, ...) are kept; `jwt` is read here."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    jwt: JwtConfig | None = None


class DataConfig(BaseModel):
    """Where the app's collections live, when not the mdb-engine convention."""

    model_config = _STRICT

    database: Annotated[str, AfterValidator(_check_database)] | None = None
    collection_prefix: Annotated[str, AfterValidator(_check_prefix)] | None = None


class CorsConfig(BaseModel):
    """Browser origins allowed to open WebSockets; mdb-engine's other CORS keys are kept."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    enabled: bool = True  # mdb-engine 0.15: false turns the Origin check off
    allow_origins: list[Origin] = Field(default_factory=list)


class Manifest(BaseModel):
    """An app's manifest. Unknown top-level keys are kept: other tools own them."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    slug: Slug
    name: NonEmptyStr
    websockets: dict[EndpointName, WebSocketEndpoint] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    cors: CorsConfig | None = None
    auth: AppAuth | None = None
    _warnings: tuple[Problem, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """Keys accepted from mdb-engine 0.15 that mean nothing here (see manifest_compat)."""
        return self._warnings

    @model_validator(mode="before")
    @classmethod
    def _fill_endpoint_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("websockets"), dict):
            return data
        required = app_auth_required(data)
        endpoints = {
            key: _endpoint_with_defaults(key, value, required)
            for key, value in data["websockets"].items()
        }
        return {**data, "websockets": endpoints}

    @field_validator("websockets")
    @classmethod
    def _endpoints_consistent(
        cls, value: dict[str, WebSocketEndpoint]
    ) -> dict[str, WebSocketEndpoint]:
        problems = _endpoint_name_problems(value) + _shared_path_problems(value)
        if problems:
            raise _problems_error(problems)
        return value

    @model_validator(mode="after")
    def _physical_names_valid(self) -> Manifest:
        problems = [
            (f"websockets.{endpoint.name}.watch.{collection}", f"the physical name {error}")
            for endpoint in self.websockets.values()
            for collection in endpoint.watch
            if (error := collection_name_error(self.physical_collection(collection)))
        ]
        problems += [
            (
                f"websockets.{endpoint.name}.rooms.{pattern}.join.collection",
                f"the physical name {error}",
            )
            for endpoint in self.websockets.values()
            for pattern, room in endpoint.rooms.items()
            if room.join is not None
            and isinstance(room.join.get("collection"), str)
            and (error := collection_name_error(self.physical_collection(room.join["collection"])))
        ]
        if problems:
            raise _problems_error(problems)
        return self

    def physical_collection(self, collection: str) -> str:
        """The MongoDB collection that holds the app's collection `collection`."""
        prefix = self.data.collection_prefix
        return f"{self.slug}_{collection}" if prefix is None else f"{prefix}{collection}"

    def jwt_settings(self) -> dict[str, Any]:
        """The app's `auth.jwt` keys that are set (empty: the engine's provider settings)."""
        if self.auth is None or self.auth.jwt is None:
            return {}
        return self.auth.jwt.settings()

    def ticket_ttl_seconds(self, default: int) -> int:
        """How long the app's tickets live: the shortest `ticket_ttl_seconds` of its endpoints
        (a ticket opens any endpoint of the app), else `default`."""
        ttls = [e.ticket_ttl_seconds for e in self.websockets.values() if e.ticket_ttl_seconds]
        return min(ttls) if ttls else default

    def physical_database(self, default_database: str) -> str:
        """The MongoDB database that holds the app's collections."""
        return self.data.database or default_database

    def to_document(self) -> dict[str, Any]:
        """The manifest as JSON-able data with every default filled in."""
        document = self.model_dump(mode="json")
        auth = document.get("auth")
        if isinstance(auth, dict):  # `jwt` shows only the keys it sets
            if auth.get("jwt") is None:
                auth.pop("jwt", None)
            else:
                auth["jwt"] = {k: v for k, v in auth["jwt"].items() if v is not None}
        if document.get("auth") is None:
            document.pop("auth", None)
        for endpoint in document.get("websockets", {}).values():
            if endpoint.get("ticket_ttl_seconds") is None:
                endpoint.pop("ticket_ttl_seconds", None)
        ours = {key: document.pop(key) for key in ("websockets", "data", "cors")}
        # Identity first, other tools' keys next, then what this engine reads.
        return {"slug": document.pop("slug"), "name": document.pop("name"), **document, **ours}


def _endpoint_with_defaults(key: str, endpoint: Any, required: bool) -> Any:
    # The endpoint's name is its key; auth.required falls back to the app's default.
    if not isinstance(endpoint, dict):
        return endpoint
    filled = {"name": key, **endpoint}
    auth = endpoint.get("auth", {})
    if isinstance(auth, dict) and "required" not in auth:
        filled["auth"] = {**auth, "required": required}
    return filled


def _endpoint_name_problems(endpoints: dict[str, WebSocketEndpoint]) -> list[tuple[str, str]]:
    return [
        (f"{key}.name", f"must equal the endpoint's key {key!r} (or be left out)")
        for key, endpoint in endpoints.items()
        if endpoint.name != key
    ]


def _shared_path_problems(endpoints: dict[str, WebSocketEndpoint]) -> list[tuple[str, str]]:
    first_owner: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for key, endpoint in endpoints.items():
        owner = first_owner.setdefault(endpoint.path, key)
        if owner != key:
            problems.append(
                (f"{key}.path", f"{endpoint.path!r} is already used by endpoint {owner!r}")
            )
    return problems


# --- app-level auth defaults ----------------------------------------------------------------

# Where an endpoint's auth.required comes from when it does not say, most specific first.
# mdb-engine read only the legacy keys here; the app's auth.policy.required now comes first.
_AUTH_DEFAULT_SOURCES: tuple[tuple[str, ...], ...] = (
    ("auth", "policy", "required"),
    ("auth_policy", "required"),
    ("auth_required",),
)


def _lookup(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def app_auth_required(data: dict[str, Any]) -> bool:
    """The app-wide default for `auth.required` of its endpoints (True when unset)."""
    for keys in _AUTH_DEFAULT_SOURCES:
        value = _lookup(data, keys)
        if isinstance(value, bool):
            return value
    return True


def _auth_default_problems(data: dict[str, Any], source: str) -> list[Problem]:
    return [
        Problem(source, ".".join(keys), "must be true or false")
        for keys in _AUTH_DEFAULT_SOURCES
        if (value := _lookup(data, keys)) is not None and not isinstance(value, bool)
    ]


# --- turning pydantic's errors into problems ------------------------------------------------

_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be an array",
}


def _json_path(loc: tuple[str | int, ...]) -> str:
    # Array items as [n] (as query paths show them); an empty key as "" so it stays visible.
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":
            path += ("." if path else "") + (part or '""')
    return path or "$"


def _model_at(parent: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model whose keys are expected at `parent` (for did-you-mean hints)."""
    if parent == ("data",):
        return DataConfig
    if parent == ("auth", "jwt"):
        return JwtConfig
    if not parent or parent[0] != "websockets":
        return None
    shapes: dict[tuple[int, str | None], type[BaseModel]] = {
        (2, None): WebSocketEndpoint,
        (3, "auth"): EndpointAuth,
        (4, "watch"): WatchBinding,
        (4, "rooms"): RoomConfig,
    }
    marker = str(parent[2]) if len(parent) > 2 else None
    return shapes.get((len(parent), marker))


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    known = sorted(name for name in model.model_fields if name != "name")
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key; expected one of: {', '.join(known)}"


def _message(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key_message(error["loc"])
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_describe(error['input'])}"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {_describe(error['input'])}"
    return str(error["msg"])


def _problems_from_error(error: Any, source: str) -> list[Problem]:
    base = _json_path(error["loc"])
    if error["type"] != _PROBLEMS_ERROR:
        return [Problem(source, base, _message(error))]
    prefix = "" if base == "$" else base
    return [
        Problem(source, ".".join(part for part in (prefix, sub) if part) or "$", message)
        for sub, message in error["ctx"]["problems"]
    ]


def _problems_from_validation(err: ValidationError, source: str) -> list[Problem]:
    return [
        problem
        for error in err.errors(include_url=False)
        for problem in _problems_from_error(error, source)
    ]


# --- loading ------------------------------------------------------------------------------


def _lone_surrogate_path(value: object, path: str) -> str | None:
    """The JSON path of the first string (key or value) that is not encodable Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items: list[tuple[str, object]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if _lone_surrogate_path(key, child) is not None:
                return child
            items.append((child, item))
    elif isinstance(value, list):
        items = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    for child, item in items:
        found = _lone_surrogate_path(item, child)
        if found is not None:
            return found
    return None


def parse_manifest(data: object, source: str = "<manifest>") -> Manifest:
    """Validate manifest data; raise ManifestError listing every problem found."""
    if not isinstance(data, dict):
        raise ManifestError(
            [Problem(source, "$", f"a manifest must be an object, got {_describe(data)}")]
        )
    broken = _lone_surrogate_path(data, "")
    if broken is not None:
        message = "not valid Unicode text (a lone surrogate escape such as \\ud800)"
        raise ManifestError([Problem(source, broken or "$", message)])
    problems = _auth_default_problems(data, source)
    compat = manifest_compat.translate(data)
    problems += [Problem(source, path, message) for path, message in compat.problems]
    try:
        manifest = Manifest.model_validate(compat.data)
    except ValidationError as err:
        raise ManifestError(problems + _problems_from_validation(err, source)) from None
    if problems:
        raise ManifestError(problems)
    manifest._warnings = tuple(
        Problem(source, path, f"warning: {message}") for path, message in compat.warnings
    )
    return manifest


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers keep the last of two equal keys; a silently dropped endpoint is worse.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


def _read_json(path: Path) -> object:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError([Problem(source, "$", f"cannot read file: {err.strerror}")]) from None
    except UnicodeDecodeError:
        raise ManifestError([Problem(source, "$", "not UTF-8 text")]) from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as err:
        message = f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        raise ManifestError([Problem(source, "$", message)]) from None
    except ValueError as err:
        raise ManifestError([Problem(source, "$", f"invalid JSON: {err}")]) from None
    except RecursionError:
        raise ManifestError([Problem(source, "$", "JSON nested too deeply")]) from None


def load_manifest_file(path: str | Path) -> Manifest:
    """Read and validate one manifest.json file."""
    data = _read_json(Path(path))
    try:
        return parse_manifest(data, source=str(path))
    except RecursionError:
        raise ManifestError([Problem(str(path), "$", "JSON nested too deeply")]) from None


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def find_manifests(directory: str | Path) -> list[Path]:
    """Every `*/manifest.json` and `*.json` directly under `directory`, sorted."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ManifestError([Problem(str(directory), "$", "no such directory")])
    nested = [
        path
        for path in folder.glob("*/manifest.json")
        if _is_visible(path.parent) and path.is_file()
    ]
    direct = [path for path in folder.glob("*.json") if _is_visible(path) and path.is_file()]
    return sorted(set(nested) | set(direct))


# --- commands -------------------------------------------------------------------------------


def _expand(path_text: str) -> tuple[list[Path], list[Problem]]:
    path = Path(path_text)
    if not path.is_dir():
        return [path], []
    try:
        found = find_manifests(path)
    except ManifestError as err:
        return [], err.problems
    if not found:
        message = "no manifest found (looked for */manifest.json and *.json)"
        return [], [Problem(path_text, "$", message)]
    return found, []


def _unique_files(paths: list[str]) -> tuple[list[Path], list[Problem]]:
    files: dict[Path, Path] = {}
    problems: list[Problem] = []
    for path_text in paths:
        found, trouble = _expand(path_text)
        problems += trouble
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values()), problems


def _duplicate_slugs(manifests: list[tuple[Path, Manifest]]) -> list[Problem]:
    owners: dict[str, Path] = {}
    problems: list[Problem] = []
    for file, manifest in manifests:
        owner = owners.setdefault(manifest.slug, file)
        if owner != file:
            message = f"slug {manifest.slug!r} is also used by {owner}"
            problems.append(Problem(str(file), "slug", message))
    return problems


def _printable(text: str) -> str:
    """Text a UTF-8 terminal can show: lone surrogates (valid in JSON strings) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validate_command(paths: list[str]) -> int:
    """`mdb-realtime validate PATH...`: print one line per problem; 0 if all valid, else 1."""
    files, problems = _unique_files(paths)
    manifests: list[tuple[Path, Manifest]] = []
    for file in files:
        try:
            manifests.append((file, load_manifest_file(file)))
        except ManifestError as err:
            problems += err.problems
    for _, manifest in manifests:
        for warning in manifest.warnings:
            print(_printable(str(warning)), file=sys.stderr)
    problems += _duplicate_slugs(manifests)
    for problem in problems:
        print(_printable(str(problem)))
    if not paths:
        print("no manifest given", file=sys.stderr)
        return 1
    summary = f"{len(files)} manifest(s) checked, {len(problems)} problem(s)"
    print(summary if problems else f"{len(files)} manifest(s) valid", file=sys.stderr)
    return 1 if problems else 0


def show_command(path: str) -> int:
    """`mdb-realtime show PATH`: print the manifest with every default filled in, as JSON."""
    file = Path(path)
    if file.is_dir():
        file = file / "manifest.json"
    try:
        manifest = load_manifest_file(file)
    except ManifestError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    print(json.dumps(manifest.to_document(), indent=2, ensure_ascii=False))
    return 0
