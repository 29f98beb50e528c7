"""Isolation over real sockets and a real change stream: nothing leaked, nothing lost (SPEC 3-6).

Three apps (`tests/manifests_isolation/`: acme and bolt both serve `/ws`, cargo has a
`collection_prefix`) and about twenty clients: users with and without a `team` claim, anonymous
connections, admins, and clients that narrow with `subscribe`. A seeded random sequence of
writes (inserts, `$set` / `$unset` updates that move documents in and out of scopes and
filters, replaces, deletes, `insert_many`, documents carrying another app's `app_id`, writes to
collections nobody watches) goes to the physical collections. An in-test model of every
collection computes, for every client, exactly the change messages SPEC 5 says it must receive,
in commit order; each client must receive exactly those.

The model is written by hand from the manifests (plain Python predicates, not `engine.query`)
so that it checks the engine instead of repeating it; `test_model_matches_the_manifests` keeps
the two in step. The last two tests write the same document twice in quick succession, which
the random test avoids (see `Run.settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from websockets.asyncio.client import ClientConnection

from engine.auth import issue_token
from tests.conftest import RunningApp, start_app_server
from tests.support import TEST_SECRET, connect, receive_json

MANIFESTS = Path(__file__).resolve().parent / "manifests_isolation"
ALL_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
WAIT_SECONDS = 15.0

Doc = dict[str, Any]
Predicate = Callable[[Mapping[str, Any]], bool]


# -- the model of the manifests -----------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    user: str | None  # None: anonymous
    team: str | None = None  # the `team` claim, when the token has one


def _everything(_: Mapping[str, Any]) -> bool:
    return True


def _owner_is(principal: Principal) -> Predicate | None:
    user = principal.user
    return None if user is None else (lambda doc: doc.get("owner") == user)


def _team_is(principal: Principal) -> Predicate | None:
    team = principal.team
    return None if team is None else (lambda doc: doc.get("team") == team)


def _owner_or_team(principal: Principal) -> Predicate | None:
    # The engine substitutes every placeholder first: one without a value (no `team` claim)
    # makes the whole scope match nothing, even the `owner` branch (engine.query docstring).
    user, team = principal.user, principal.team
    if user is None or team is None:
        return None
    return lambda doc: doc.get("owner") == user or doc.get("team") == team


def _int_at_least(name: str, low: int) -> Predicate:
    def check(doc: Mapping[str, Any]) -> bool:
        value = doc.get(name)
        return isinstance(value, int) and value >= low

    return check


def _meta_color_is(color: str) -> Predicate:
    def check(doc: Mapping[str, Any]) -> bool:
        meta = doc.get("meta")
        return isinstance(meta, dict) and meta.get("color") == color

    return check


@dataclass(frozen=True)
class Rule:
    """One `watch` entry: the JSON as written in the manifest, and its hand-written model."""

    filter_json: dict[str, Any] | None = None
    scope_json: dict[str, Any] | None = None
    operations: frozenset[str] = ALL_OPERATIONS
    fields: tuple[str, ...] | None = None
    filter: Predicate = _everything
    scope: Callable[[Principal], Predicate | None] | None = None


NOT_ARCHIVED = {"status": {"$ne": "archived"}}
OWNER_SCOPE = {"owner": "$user.id"}
TEAM_SCOPE = {"team": "$claims.team"}


def _not_archived(doc: Mapping[str, Any]) -> bool:
    return doc.get("status") != "archived"


UNRESTRICTED = Rule()
ADMIN = {"tasks": UNRESTRICTED, "notes": UNRESTRICTED, "docs": UNRESTRICTED}

PREFIXES = {"acme": "acme_", "bolt": "bolt_", "cargo": "cg_"}
PATHS = {
    ("acme", "live"): "/ws",
    ("acme", "team"): "/team",
    ("acme", "public"): "/public",
    ("acme", "admin"): "/admin",
    ("bolt", "live"): "/ws",
    ("bolt", "admin"): "/admin",
    ("cargo", "feed"): "/ws",
    ("cargo", "admin"): "/admin",
}
RULES: dict[tuple[str, str], dict[str, Rule]] = {
    ("acme", "live"): {
        "tasks": Rule(
            filter_json=NOT_ARCHIVED,
            scope_json=OWNER_SCOPE,
            fields=("title", "status", "owner", "meta.color"),
            filter=_not_archived,
            scope=_owner_is,
        ),
        "notes": UNRESTRICTED,
        "docs": Rule(
            scope_json=TEAM_SCOPE,
            operations=frozenset({"insert", "replace", "delete"}),
            scope=_team_is,
        ),
    },
    ("acme", "team"): {
        "tasks": Rule(
            filter_json={"status": {"$in": ["open", "done"]}},
            scope_json=TEAM_SCOPE,
            filter=lambda doc: doc.get("status") in ("open", "done"),
            scope=_team_is,
        ),
        "docs": Rule(scope_json=TEAM_SCOPE, fields=("team", "title"), scope=_team_is),
    },
    ("acme", "public"): {
        "notes": Rule(fields=("title", "n")),
        "tasks": Rule(scope_json=OWNER_SCOPE, scope=_owner_is),
        "docs": Rule(
            filter_json={"status": "open"},
            operations=frozenset({"insert", "update", "delete"}),
            filter=lambda doc: doc.get("status") == "open",
        ),
    },
    ("acme", "admin"): ADMIN,
    ("bolt", "live"): {
        "tasks": Rule(
            scope_json=OWNER_SCOPE, operations=frozenset({"update", "delete"}), scope=_owner_is
        ),
        "notes": Rule(
            filter_json={"n": {"$gte": 5}},
            operations=frozenset({"insert", "update"}),
            filter=_int_at_least("n", 5),
        ),
        "docs": Rule(
            filter_json=NOT_ARCHIVED,
            scope_json=TEAM_SCOPE,
            fields=("status", "meta"),
            filter=_not_archived,
            scope=_team_is,
        ),
    },
    ("bolt", "admin"): ADMIN,
    ("cargo", "feed"): {
        "tasks": Rule(
            scope_json={"$or": [{"owner": "$user.id"}, {"team": "$claims.team"}]},
            fields=("owner", "team", "status", "n"),
            scope=_owner_or_team,
        ),
        "notes": UNRESTRICTED,
        "docs": Rule(filter_json={"meta.color": "red"}, filter=_meta_color_is("red")),
    },
    ("cargo", "admin"): ADMIN,
}

# Physical collection -> (app, collection); the last three look like apps' but no app binds them.
PHYSICAL: dict[str, tuple[str, str] | None] = {
    f"{PREFIXES[slug]}{name}": (slug, name)
    for slug in PREFIXES
    for name in ("tasks", "notes", "docs")
}
PHYSICAL.update({"acme_misc": None, "cargo_tasks": None, "bolt_taskss": None})


# -- projection, as SPEC 5 describes it (`fields` + `_id`; dotted paths) ---------------------


def _inside(path: str, fields: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f + ".") for f in fields)


def _sub_fields(path: str, fields: Sequence[str]) -> list[str]:
    return [f[len(path) + 1 :] for f in fields if f.startswith(path + ".")]


def project(value: Mapping[str, Any], fields: Sequence[str] | None) -> dict[str, Any]:
    if fields is None:
        return dict(value)
    projected: dict[str, Any] = {}
    for key, item in value.items():
        if key == "_id" or key in fields:
            projected[key] = item
        elif isinstance(item, dict) and (inner := _sub_fields(key, fields)):
            projected[key] = project(item, inner)
    return projected


def project_update(
    updated: Mapping[str, Any], removed: Sequence[str], fields: Sequence[str] | None
) -> dict[str, Any]:
    if fields is None:
        return {"updated_fields": dict(updated), "removed_fields": list(removed)}
    kept: dict[str, Any] = {}
    for path, value in updated.items():
        if _inside(path, fields):
            kept[path] = value
        elif isinstance(value, dict) and (inner := _sub_fields(path, fields)):
            kept[path] = project(value, inner)
    gone = [p for p in removed if _inside(p, fields) or _sub_fields(p, fields)]
    return {"updated_fields": kept, "removed_fields": gone}


def narrow(allowed: tuple[str, ...] | None, requested: tuple[str, ...]) -> tuple[str, ...]:
    """What a subscription's `fields` leave of the manifest's: never more than it allows."""
    if allowed is None:
        return requested
    kept = [r for r in requested if _inside(r, allowed)]
    return tuple(kept + [a for a in allowed if _inside(a, requested) and a not in kept])


# -- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sub:
    id: str
    collection: str
    filter_json: dict[str, Any]
    filter: Predicate
    fields: tuple[str, ...] | None = None  # requested


@dataclass(frozen=True)
class ClientSpec:
    name: str
    slug: str
    endpoint: str
    principal: Principal
    subscriptions: tuple[Sub, ...] = ()


ANN, BOB, CID, DAN = (
    Principal("ann", "red"),
    Principal("bob", "blue"),
    Principal("cid", "red"),
    Principal("dan"),
)
ANON = Principal(None)
ROOT = Principal("root", "ops")

OPEN_TASKS = Sub(
    "open-tasks",
    "tasks",
    {"status": "open"},
    lambda doc: doc.get("status") == "open",
    ("title", "status", "secret"),  # `secret` is outside the manifest's fields: stays out
)
SMALL_NOTES = Sub("small", "notes", {"n": {"$lt": 5}}, lambda doc: _int(doc, "n") < 5, ("title",))
RED_META = Sub("red", "docs", {"meta.color": "red"}, _meta_color_is("red"), ("meta",))
# Two subscriptions on one collection: a document matching both gets the union of their fields.
MINE_N = Sub("mine", "tasks", {"owner": "ann"}, lambda doc: doc.get("owner") == "ann", ("n",))
DONE_STATUS = Sub("done", "tasks", {"status": "done"}, lambda doc: doc.get("status") == "done")


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    return value if isinstance(value, int) else 1_000


CLIENTS: tuple[ClientSpec, ...] = (
    ClientSpec("acme-live-ann", "acme", "live", ANN),
    ClientSpec("acme-live-bob", "acme", "live", BOB),
    ClientSpec("acme-live-dan", "acme", "live", DAN),
    ClientSpec("acme-live-ann-open", "acme", "live", ANN, (OPEN_TASKS,)),
    ClientSpec("acme-team-ann", "acme", "team", ANN),
    ClientSpec("acme-team-cid", "acme", "team", CID),
    ClientSpec("acme-team-bob", "acme", "team", BOB),
    ClientSpec("acme-public-anon", "acme", "public", ANON),
    ClientSpec("acme-public-anon-small", "acme", "public", ANON, (SMALL_NOTES,)),
    ClientSpec("acme-public-bob", "acme", "public", BOB),
    ClientSpec("acme-admin", "acme", "admin", ROOT),
    ClientSpec("bolt-live-ann", "bolt", "live", ANN),
    ClientSpec("bolt-live-bob", "bolt", "live", BOB),
    ClientSpec("bolt-live-cid-red", "bolt", "live", CID, (RED_META,)),
    ClientSpec("bolt-admin", "bolt", "admin", ROOT),
    ClientSpec("cargo-feed-ann", "cargo", "feed", ANN),
    ClientSpec("cargo-feed-bob", "cargo", "feed", BOB),
    ClientSpec("cargo-feed-dan", "cargo", "feed", DAN),
    ClientSpec("cargo-feed-ann-subs", "cargo", "feed", ANN, (MINE_N, DONE_STATUS)),
    ClientSpec("cargo-admin", "cargo", "admin", ROOT),
)
OBSERVERS = {"acme": "acme-admin", "bolt": "bolt-admin", "cargo": "cargo-admin"}


# -- what each client must receive -----------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One committed write to one document, as the model knows it."""

    seq: int
    physical: str
    operation: str
    document_id: str
    before: Doc | None
    after: Doc | None
    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()


class ClientModel:
    """What one connection may see (SPEC 3 scope / filter / fields, SPEC 5 subscribe)."""

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.rules = RULES[(spec.slug, spec.endpoint)]
        self.expected: list[dict[str, Any]] = []
        self.optional: list[bool] = []  # messages the engine may or may not send
        self.seqs: list[int] = []  # the write each expected message comes from
        # Documents this client was sent and still holds; True once one changed unseen.
        self.held: dict[tuple[str, str], bool] = {}

    def _subs(self, collection: str) -> list[Sub]:
        return [s for s in self.spec.subscriptions if s.collection == collection]

    def sees(self, collection: str, doc: Mapping[str, Any] | None) -> bool:
        rule = self.rules[collection]
        if doc is None or not rule.filter(doc):
            return False
        if rule.scope is not None:
            scope = rule.scope(self.spec.principal)
            if scope is None or not scope(doc):
                return False
        subs = self._subs(collection)
        return not subs or any(s.filter(doc) for s in subs)

    def fields_for(self, collection: str, doc: Mapping[str, Any]) -> tuple[str, ...] | None:
        allowed = self.rules[collection].fields
        subs = self._subs(collection)
        if not subs:
            return allowed
        union: list[str] = []
        for sub in subs:
            if not sub.filter(doc):
                continue
            if sub.fields is None:
                return allowed
            union += [f for f in narrow(allowed, sub.fields) if f not in union]
        return tuple(union)

    def message(self, event: Event) -> tuple[dict[str, Any], str | None] | None:
        """The change message (without ids and timestamps) and its reason, or None."""
        bound = PHYSICAL[event.physical]
        if bound is None or bound[0] != self.spec.slug or bound[1] not in self.rules:
            return None
        collection = bound[1]
        if event.operation not in self.rules[collection].operations:
            return None
        current = event.after if event.after is not None else event.before
        if current is not None and current.get("app_id", self.spec.slug) != self.spec.slug:
            return None  # another app's document (mdb-engine scoped writes)
        base = {"collection": collection, "document_id": event.document_id}
        gone = {**base, "operation": "delete", "document": None, "update": None}
        if event.operation == "delete":
            return (gone, None) if self.sees(collection, event.before) else None
        assert event.after is not None
        if self.sees(collection, event.after):
            # Moving in or staying in: the operation as committed, with the whole document.
            fields = self.fields_for(collection, event.after)
            update = None
            if event.operation == "update":
                assert event.updated is not None
                update = project_update(event.updated, event.removed, fields)
            document = project(event.after, fields)
            return {
                **base,
                "operation": event.operation,
                "document": document,
                "update": update,
            }, None
        if event.operation != "insert" and self.sees(collection, event.before):
            return gone, "left_scope"
        return None

    def add(self, event: Event) -> dict[str, Any] | None:
        """Append what the client gets for `event` to `expected`; the message, or None."""
        key = (event.physical, event.document_id)
        bound = PHYSICAL[event.physical]
        if (
            bound is not None
            and bound[0] == self.spec.slug
            and bound[1] in self.rules
            and event.operation not in self.rules[bound[1]].operations
        ):
            if key in self.held:
                self.held[key] = True  # it changed and this view was not told
            return None
        result = self.message(event)
        optional = False
        if result is None and event.operation != "insert" and self.held.get(key):
            # The client holds a copy that went stale through an operation its binding does
            # not watch, and now the document is deleted or changed again out of its view.
            # SPEC is silent: the engine may tell it the document is gone (it knows what it
            # sent) or stay silent (the pre-image is outside the view). Either is accepted.
            assert bound is not None
            gone = {"collection": bound[1], "document_id": event.document_id}
            reason = None if event.operation == "delete" else "left_scope"
            result = {**gone, "operation": "delete", "document": None, "update": None}, reason
            optional = True
        if result is None:
            if event.operation == "delete":
                self.held.pop(key, None)
            return None
        message, reason = result
        if message["operation"] == "delete":
            self.held.pop(key, None)
        else:
            self.held[key] = False
        message["reason"] = reason
        self.expected.append(message)
        self.optional.append(optional)
        self.seqs.append(event.seq)
        return None if optional else message


# -- live clients -------------------------------------------------------------------------------


@dataclass
class LiveClient:
    spec: ClientSpec
    ws: ClientConnection
    messages: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def changes(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "change"]

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.messages.append(json.loads(raw))

    async def wait_until(
        self, condition: Callable[[], bool], timeout: float = WAIT_SECONDS
    ) -> bool:
        # Polls a condition on what has arrived (no blind sleep); False on timeout.
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or (self.reader is not None and self.reader.done()):
                return condition()
            await asyncio.sleep(0.002)
        return True

    async def barrier(self, ref: str) -> None:
        """Everything queued for this connection before now has arrived: the answer to an
        unknown `unsubscribe` goes through the same outgoing queue as the changes."""
        await self.ws.send(json.dumps({"type": "unsubscribe", "id": ref}))
        arrived = await self.wait_until(
            lambda: any(m.get("type") == "error" and m.get("ref") == ref for m in self.messages)
        )
        assert arrived, f"{self.spec.name}: no answer to the barrier {ref!r}"


async def open_client(app: RunningApp, spec: ClientSpec) -> LiveClient:
    query = {}
    principal = spec.principal
    if principal.user is not None:
        claims = {"team": principal.team} if principal.team is not None else {}
        query["token"] = issue_token(
            TEST_SECRET, app_slug=spec.slug, user_id=principal.user, claims=claims
        )
    path = f"/{spec.slug}{PATHS[(spec.slug, spec.endpoint)]}"
    ws = await connect(app.server.ws_url(path, **query))
    hello = await receive_json(ws)
    assert hello["type"] == "connected", hello
    assert (hello["app_slug"], hello["endpoint"]) == (spec.slug, spec.endpoint)
    assert hello["authenticated"] is (principal.user is not None)
    for sub in spec.subscriptions:
        request: dict[str, Any] = {
            "type": "subscribe",
            "id": sub.id,
            "collection": sub.collection,
            "filter": sub.filter_json,
        }
        if sub.fields is not None:
            request["fields"] = list(sub.fields)
        await ws.send(json.dumps(request))
        answer = await receive_json(ws)
        assert answer == {"type": "subscribed", "id": sub.id}, answer
    client = LiveClient(spec, ws)
    client.reader = asyncio.create_task(client._read())
    return client


# -- random writes ------------------------------------------------------------------------------

USERS = ("ann", "bob", "cid", "dan", "root")
TEAMS = ("red", "blue", "green", "ops")
STATUSES = ("open", "done", "archived")
COLORS = ("red", "blue")
OTHER_SLUGS = {"acme": ("bolt", "cargo"), "bolt": ("acme", "cargo"), "cargo": ("acme", "blog")}


class World:
    """The documents of every physical collection, and the writes that change them."""

    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.docs: dict[str, dict[str, Doc]] = {name: {} for name in PHYSICAL}
        self.counter = 0
        self.seq = 0

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _pick(self, choices: Sequence[Any], current: Any = None) -> Any:
        return self.rng.choice([c for c in choices if c != current])

    def new_document(self, physical: str) -> Doc:
        rng = self.rng
        doc: Doc = {"_id": f"{self.tag}-{self._next()}"}
        bound = PHYSICAL[physical]
        roll = rng.random()
        # app_id never changes afterwards: see `update` below.
        if roll < 0.2:
            doc["app_id"] = bound[0] if bound else "acme"
        elif roll < 0.35:
            doc["app_id"] = rng.choice(OTHER_SLUGS[bound[0] if bound else "acme"])
        if rng.random() < 0.85:
            doc["owner"] = rng.choice(USERS)
        if rng.random() < 0.8:
            doc["team"] = rng.choice(TEAMS)
        doc["status"] = rng.choice(STATUSES)
        if rng.random() < 0.8:
            doc["title"] = f"t{self._next()}"
        doc["n"] = rng.randrange(10)
        if rng.random() < 0.6:
            doc["meta"] = {"color": rng.choice(COLORS), "size": rng.randrange(3)}
        doc["secret"] = f"s{self._next()}"
        return doc

    def update(self, doc: Doc) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...], Doc]:
        """A `$set` / `$unset` that changes every field it names (no-op sets make no event
        on MongoDB, and unchanged fields are left out of `updatedFields`), and the result.

        `app_id` is never changed: an update that gives a document to another app drops the
        event for everyone (SPEC 3), which is outside what this test models."""
        rng = self.rng
        after = json.loads(json.dumps(doc))
        sets: dict[str, Any] = {"rev": self._next()}
        for name in rng.sample(
            ("owner", "team", "status", "title", "n", "meta"), rng.randint(1, 3)
        ):
            if name == "owner":
                sets["owner"] = self._pick(USERS, doc.get("owner"))
            elif name == "team":
                sets["team"] = self._pick(TEAMS, doc.get("team"))
            elif name == "status":
                sets["status"] = self._pick(STATUSES, doc.get("status"))
            elif name == "title":
                sets["title"] = f"t{self._next()}"
            elif name == "n":
                sets["n"] = self._pick(range(10), doc.get("n"))
            elif isinstance(doc.get("meta"), dict):
                sets["meta.color"] = self._pick(COLORS, doc["meta"].get("color"))
            else:
                sets["meta"] = {"color": rng.choice(COLORS), "size": rng.randrange(3)}
        unsets: tuple[str, ...] = ()
        removable = [
            k for k in ("owner", "team", "title", "n", "meta") if k in doc and k not in sets
        ]
        removable = [k for k in removable if not (k == "meta" and "meta.color" in sets)]
        if removable and rng.random() < 0.3:
            unsets = (rng.choice(removable),)
        for path, value in sets.items():
            if path == "meta.color":
                after["meta"]["color"] = value
            else:
                after[path] = value
        for path in unsets:
            del after[path]
        spec: dict[str, Any] = {"$set": sets}
        if unsets:
            spec["$unset"] = dict.fromkeys(unsets, "")
        return spec, sets, unsets, after

    def replacement(self, doc: Doc) -> Doc:
        new = self.new_document("acme_misc")
        new["_id"] = doc["_id"]
        new.pop("app_id", None)
        if "app_id" in doc:
            new["app_id"] = doc["app_id"]
        return new


@dataclass
class Run:
    """The clients of one run and their models."""

    clients: dict[str, LiveClient]
    models: dict[str, ClientModel]
    pending: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def record(self, event: Event) -> None:
        """Add the event to every client's expected messages; note what the run covered."""
        self.count(event.operation)
        for model in self.models.values():
            message = model.add(event)
            if message is not None and message["reason"] == "left_scope":
                self.count("left_scope")
            elif (
                message is not None
                and event.before is not None
                and event.after is not None
                and not model.sees(message["collection"], event.before)
            ):
                self.count("moved_in")
        bound = PHYSICAL[event.physical]
        if bound is None:
            self.count("unbound")
            return
        current = event.after if event.after is not None else event.before
        assert current is not None
        if current.get("app_id", bound[0]) != bound[0]:
            self.count("foreign_app_id")
        key = (event.physical, event.document_id)
        observer = OBSERVERS[bound[0]]
        if event.operation == "update" and self.models[observer].seqs[-1:] == [event.seq]:
            self.pending[key] = (observer, len(self.models[observer].expected))
        else:
            self.pending.pop(key, None)

    async def settle(self, physical: str, document_id: str) -> None:
        """Wait until the engine has read the last update of this document.

        The post-image of an update comes from `updateLookup`: the document as it is when the
        engine reads the event, not as the update left it (SecantusDB and MongoDB alike). So a
        second write to the same document waits until the engine has read the first one; the
        app's admin connection, which sees every event of the app, shows when it has. Writes
        to other documents do not wait, so the stream still carries interleaved events."""
        waiting = self.pending.pop((physical, document_id), None)
        if waiting is None:
            return
        observer, count = waiting
        client = self.clients[observer]
        await client.wait_until(lambda: len(client.changes) >= count)


async def apply_random_write(db: AsyncDatabase[dict[str, Any]], world: World, run: Run) -> None:
    rng = world.rng
    physical = rng.choice(list(PHYSICAL))
    store = world.docs[physical]
    collection = db[physical]
    roll = rng.random()
    if not store or roll < 0.18:
        doc = world.new_document(physical)
        await collection.insert_one(dict(doc))
        store[doc["_id"]] = doc
        world.seq += 1
        run.record(Event(world.seq, physical, "insert", doc["_id"], None, doc))
    elif roll < 0.26:
        docs = [world.new_document(physical) for _ in range(rng.randint(2, 5))]
        await collection.insert_many([dict(d) for d in docs])
        for doc in docs:
            store[doc["_id"]] = doc
            world.seq += 1
            run.record(Event(world.seq, physical, "insert", doc["_id"], None, doc))
    else:
        doc_id = rng.choice(sorted(store))
        before = store[doc_id]
        await run.settle(physical, doc_id)
        world.seq += 1
        if roll < 0.72:
            spec, sets, unsets, after = world.update(before)
            result = await collection.update_one({"_id": doc_id}, spec)
            assert result.modified_count == 1
            store[doc_id] = after
            run.record(Event(world.seq, physical, "update", doc_id, before, after, sets, unsets))
        elif roll < 0.86:
            after = world.replacement(before)
            await collection.replace_one({"_id": doc_id}, dict(after))
            store[doc_id] = after
            run.record(Event(world.seq, physical, "replace", doc_id, before, after))
        else:
            await collection.delete_one({"_id": doc_id})
            del store[doc_id]
            run.record(Event(world.seq, physical, "delete", doc_id, before, None))


# -- the tests -----------------------------------------------------------------------------------

SEEDS = (20240611, 7, 99)
WRITES_PER_SEED = 200


@pytest.fixture(scope="module")
def isolation_app(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """One engine process serving the three apps, for the whole module."""
    folder = tmp_path_factory.mktemp("isolation_app")
    running = start_app_server(mongo_uri, folder, MANIFESTS)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture
async def db(isolation_app: RunningApp) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(isolation_app.mongo_uri)
    try:
        yield client[isolation_app.db_name]
    finally:
        await client.close()


def test_model_matches_the_manifests() -> None:
    """The hand-written model describes exactly what the manifests declare."""
    declared: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.json")):
        manifest = json.loads(path.read_text())
        slug = manifest["slug"]
        prefix = manifest.get("data", {}).get("collection_prefix", f"{slug}_")
        assert PREFIXES[slug] == prefix
        for name, endpoint in manifest["websockets"].items():
            assert PATHS[(slug, name)] == endpoint["path"]
            declared[(slug, name)] = endpoint.get("watch", {})
    assert declared.keys() == RULES.keys()
    for key, watch in declared.items():
        assert watch.keys() == RULES[key].keys(), key
        for collection, entry in watch.items():
            rule = RULES[key][collection]
            where = (*key, collection)
            assert frozenset(entry.get("operations", ALL_OPERATIONS)) == rule.operations, where
            assert entry.get("filter") == rule.filter_json, where
            assert entry.get("scope") == rule.scope_json, where
            fields = entry.get("fields")
            assert (tuple(fields) if fields is not None else None) == rule.fields, where
            assert (rule.filter_json is None) == (rule.filter is _everything), where
            assert (rule.scope_json is None) == (rule.scope is None), where
    assert set(OBSERVERS.values()) <= {c.name for c in CLIENTS}
    for slug, observer in OBSERVERS.items():
        assert RULES[(slug, "admin")] is ADMIN and observer == f"{slug}-admin"


def _received(client: LiveClient) -> list[dict[str, Any]]:
    return [
        {
            "collection": m.get("collection"),
            "document_id": m.get("document_id"),
            "operation": m.get("operation"),
            "document": m.get("document"),
            "update": m.get("update"),
            "reason": m.get("reason"),
        }
        for m in client.changes
    ]


def _first_difference(name: str, model: ClientModel, received: list[dict[str, Any]]) -> str | None:
    """None when `received` is `model.expected` (optional messages there or not)."""
    expected, at = model.expected, 0
    for index, want in enumerate(expected):
        if at < len(received) and received[at] == want:
            at += 1
        elif not model.optional[index]:
            got = received[at] if at < len(received) else "nothing more"
            return (
                f"{name}: expected message {index} (write #{model.seqs[index]}) differs\n"
                f"  expected {want}\n  received {got}"
            )
    if at < len(received):
        return f"{name}: {len(received) - at} more changes than expected: {received[at:][:3]}"
    return None


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_writes_reach_exactly_who_may_see_them(
    isolation_app: RunningApp, db: AsyncDatabase[dict[str, Any]], seed: int
) -> None:
    rng = random.Random(seed)
    world = World(rng, f"s{seed}")
    clients = {spec.name: await open_client(isolation_app, spec) for spec in CLIENTS}
    run = Run(clients, {spec.name: ClientModel(spec) for spec in CLIENTS})
    try:
        for _ in range(WRITES_PER_SEED):
            await apply_random_write(db, world, run)
        # A last write to each app that its admin sees: once the admins have every change they
        # expect, the engine has routed every event (one stream, read in commit order).
        for slug, prefix in PREFIXES.items():
            physical = f"{prefix}notes"
            end = {"_id": f"{world.tag}-end-{slug}", "title": "end", "n": 5}
            await db[physical].insert_one(dict(end))
            world.seq += 1
            run.record(Event(world.seq, physical, "insert", end["_id"], None, end))
        for observer in OBSERVERS.values():
            client, wanted = clients[observer], len(run.models[observer].expected)
            await client.wait_until(lambda c=client, w=wanted: len(c.changes) >= w)  # type: ignore[misc]
        await asyncio.gather(*(c.barrier(f"barrier-{seed}") for c in clients.values()))

        problems = [
            problem
            for name, client in clients.items()
            if (problem := _first_difference(name, run.models[name], _received(client)))
        ]
        assert not problems, "\n".join(problems)
        for name, client in clients.items():
            ids = [m["id"] for m in client.changes]
            assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids), name
            for message in client.changes:
                assert (message["app_slug"], message["endpoint"]) == (
                    client.spec.slug,
                    client.spec.endpoint,
                )
                assert message["timestamp"].endswith("Z")
        # The run exercised what it is meant to: leaving and entering views, foreign app_ids,
        # unbound collections, every operation.
        for what in ("left_scope", "moved_in", "foreign_app_id", "unbound", *ALL_OPERATIONS):
            assert run.stats.get(what, 0) >= 3, (what, run.stats)
    finally:
        for client in clients.values():
            if client.reader is not None:
                client.reader.cancel()
            await client.ws.close()


# -- writes that follow each other closely ---------------------------------------------------------
#
# The random test above waits, before writing a document again, until the engine has read the
# last update of it, because `updateLookup` post-images are read late. The two tests below do
# not wait: they check that this lateness never leaks and never loses anything. A backlog of
# events in front of the writes makes the engine read them after all of them are committed.

BACKLOG = 400


async def _backlog(db: AsyncDatabase[dict[str, Any]], tag: str) -> None:
    """Events the engine must read first, so it reads the next writes only after they commit."""
    await db["acme_notes"].insert_many([{"_id": f"{tag}-{i}", "n": i} for i in range(BACKLOG)])


async def _drain(client: LiveClient, tag: str) -> None:
    """Wait until the client has the last backlog note and the barrier answer."""
    last = f"{tag}-end"
    await client.wait_until(lambda: any(m.get("document_id") == last for m in client.changes))
    await client.barrier(f"barrier-{tag}")


def _about(client: LiveClient, document_id: str) -> list[dict[str, Any]]:
    return [m for m in client.changes if m["document_id"] == document_id]


async def test_an_update_never_shows_values_from_a_state_the_client_may_not_see(
    isolation_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    """bob's task gets a private title, then is given to ann with a new title. ann may see the
    task from the second update on, never the title it had while it was bob's."""
    ann = await open_client(isolation_app, ClientSpec("ann", "acme", "live", ANN))
    try:
        tasks, tag = db["acme_tasks"], "leak"
        await tasks.insert_one({"_id": tag, "owner": "bob", "title": "public", "status": "open"})
        await _backlog(db, tag)
        await tasks.update_one({"_id": tag}, {"$set": {"title": "bob's private title"}})
        await tasks.update_one({"_id": tag}, {"$set": {"owner": "ann", "title": "for ann"}})
        await db["acme_notes"].insert_one({"_id": f"{tag}-end"})
        await _drain(ann, tag)
        received = _about(ann, tag)
        leaked = [m for m in received if "bob's private title" in json.dumps(m)]
        assert not leaked, f"ann was sent a value from while the task was bob's: {leaked}"
        # SPEC 5: the update that moves it in brings the whole (projected) document.
        assert [(m["operation"], m["document"]) for m in received][-1:] == [
            ("update", {"_id": tag, "owner": "ann", "title": "for ann", "status": "open"})
        ]
    finally:
        await ann.ws.close()


async def test_a_document_that_leaves_a_view_and_is_deleted_at_once_leaves_the_client(
    isolation_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    """ann was sent her task; it is given to bob and deleted right away. ann must be told it is
    gone (SPEC 5: `delete` with `left_scope`), or her local view keeps it forever."""
    ann = await open_client(isolation_app, ClientSpec("ann", "acme", "live", ANN))
    try:
        tasks, tag = db["acme_tasks"], "lost"
        await tasks.insert_one({"_id": tag, "owner": "ann", "title": "mine", "status": "open"})
        await ann.wait_until(lambda: bool(_about(ann, tag)))
        await _backlog(db, tag)
        await tasks.update_one({"_id": tag}, {"$set": {"owner": "bob"}})
        await tasks.delete_one({"_id": tag})
        await db["acme_notes"].insert_one({"_id": f"{tag}-end"})
        await _drain(ann, tag)
        received = [m["operation"] for m in _about(ann, tag)]
        # `left_scope` says why; a plain `delete` would do as well: the document is gone.
        assert received == ["insert", "delete"]
    finally:
        await ann.ws.close()
