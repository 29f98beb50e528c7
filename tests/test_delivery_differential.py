"""The recipient index changes what routing costs, never what it delivers (SPEC 10).

Random manifests (scopes with `$user.id`, `$claims.*`, `$in`, dotted paths, array fields,
`$or`, ranges; binding filters; projections), hundreds of random connections with random
subscriptions, and random insert / update / replace / delete sequences, with or without
pre-images, broadcasts, subscription changes, connections coming, going and being held
during a resume: the indexed `Router` and the brute-force reference deliver exactly the same
frames to the same connections in the same order, and count the same.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from bson import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.auth import ANONYMOUS, Principal
from engine.bus import BUS_COLLECTION
from engine.changes import ChangeEvent, cluster_time_iso
from engine.delivery.router import Router
from engine.manifest import parse_manifest
from tests.brute_force_router import BruteForceRouter
from tests.test_core_router import RecordingConnection, connect

Doc = dict[str, Any]

USERS = ["u0", "u1", "u2", "u3", "u4"]
TEAMS = ["red", "blue", "green"]
SCOPES: list[Doc | None] = [
    None,
    {"owner": "$user.id"},
    {"team": "$claims.team"},
    {"meta.org": "$claims.org"},
    {"tags": "$claims.tag"},
    {"members": "$user.id"},
    {"team": {"$in": ["$claims.team", "green"]}},
    {"team": "$claims.teams"},
    {"owner": "$user.id", "n": {"$gte": "$claims.level"}},
    {"$or": [{"owner": "$user.id"}, {"public": True}]},
    {"$and": [{"team": "$claims.team"}, {"kind": {"$ne": "b"}}]},
    {"n": {"$gt": "$claims.level"}},
    {"items.sku": "$claims.sku"},
]
FILTERS: list[Doc | None] = [
    None,
    {"archived": {"$ne": True}},
    {"kind": "a"},
    {"kind": {"$in": ["a", "b"]}},
    {"n": {"$lt": 4}},
    {"$or": [{"kind": "a"}, {"public": True}]},
]
SUBSCRIPTION_FILTERS: list[Doc] = [
    {},
    {"kind": "a"},
    {"team": "red"},
    {"n": {"$gte": 2}},
    {"tags": "x"},
    {"meta.org": "o1"},
    {"$or": [{"kind": "b"}, {"owner": "u1"}]},
    {"owner": {"$in": ["u0", "u2"]}},
    {"n": 1.0},
    {"tags": {"$all": ["x", "y"]}},
]
FIELDS: list[list[str] | None] = [None, ["owner", "team", "n"], ["kind"]]

maybe = st.one_of
values_of = st.sampled_from


@st.composite
def bindings(draw: st.DrawFn) -> Doc:
    binding: Doc = {}
    scope = draw(values_of(SCOPES))
    if scope is not None:
        binding["scope"] = scope
    query = draw(values_of(FILTERS))
    if query is not None:
        binding["filter"] = query
    fields = draw(values_of(FIELDS))
    if fields is not None:
        binding["fields"] = fields
    if draw(st.booleans()):
        operations = draw(
            st.lists(values_of(["insert", "update", "replace", "delete"]), min_size=1, unique=True)
        )
        binding["operations"] = operations
    return binding


@st.composite
def manifests(draw: st.DrawFn) -> Doc:
    endpoints = {}
    for number in range(draw(st.integers(1, 2))):
        watch = {"items": draw(bindings())}
        if draw(st.booleans()):
            watch["notes"] = draw(bindings())
        endpoints[f"e{number}"] = {"path": f"/e{number}", "watch": watch}
    return {"slug": "app", "name": "App", "websockets": endpoints}


@st.composite
def principals(draw: st.DrawFn) -> Principal:
    if draw(st.integers(0, 9)) == 0:
        return ANONYMOUS
    user = draw(values_of(USERS))
    claims: Doc = {"sub": user}
    for name, strategy in (
        ("team", values_of(TEAMS)),
        ("teams", st.lists(values_of(TEAMS), max_size=2)),
        ("org", values_of(["o1", "o2"])),
        ("tag", values_of(["x", "y"])),
        ("level", st.integers(0, 4)),
        ("sku", values_of(["s1", "s2"])),
    ):
        if draw(st.integers(0, 4)) > 0:
            claims[name] = draw(strategy)
    return Principal(user_id=user, email=f"{user}@example.com", claims=claims)


@st.composite
def documents(draw: st.DrawFn, doc_id: int) -> Doc:
    document: Doc = {"_id": doc_id}
    optional: list[tuple[str, st.SearchStrategy[Any]]] = [
        ("owner", values_of(USERS)),
        ("team", maybe(values_of(TEAMS), st.lists(values_of(TEAMS), max_size=2))),
        ("meta", st.fixed_dictionaries({"org": values_of(["o1", "o2"])})),
        ("tags", st.lists(values_of(["x", "y", "z"]), max_size=3)),
        ("members", st.lists(values_of(USERS), max_size=3)),
        ("kind", values_of(["a", "b", "c"])),
        ("n", maybe(st.integers(0, 5), st.just(1.0))),
        ("archived", st.booleans()),
        ("public", st.booleans()),
        ("items", st.lists(st.fixed_dictionaries({"sku": values_of(["s1", "s2"])}), max_size=2)),
    ]
    for name, strategy in optional:
        if draw(st.booleans()):
            document[name] = draw(strategy)
    return document


@dataclass
class Pair:
    """The same client on both routers."""

    indexed: RecordingConnection
    reference: RecordingConnection
    checked: int = 0  # frames compared so far


_sequence = itertools.count(1)


def event(
    operation: str,
    collection: str,
    doc_id: Any,
    document: Doc | None,
    before: Doc | None,
    *,
    exact: bool = True,
) -> ChangeEvent:
    number = next(_sequence)
    cluster_time = Timestamp(1_700_000_000, number)
    is_update = operation == "update"
    return ChangeEvent(
        event_id=f"event-{number}",
        resume_token={"_data": f"event-{number}"},
        operation=operation,
        database="db",
        collection=collection,
        document_id=doc_id,
        document=document,
        before=before,
        updated_fields={"changed": True} if is_update else None,
        removed_fields=[] if is_update else None,
        cluster_time=cluster_time,
        timestamp=cluster_time_iso(cluster_time),
        exact=exact,
    )


def bus_event(user_id: str | None) -> ChangeEvent:
    number = next(_sequence)
    document = {"app": "app", "message": {"type": "notice", "n": number}, "origin": "elsewhere"}
    if user_id is not None:
        document["user_id"] = user_id
    return event("insert", BUS_COLLECTION, number, document, None)


class World:
    """Both routers, their clients, and the database state the events are drawn from."""

    def __init__(self, manifest: Doc, known_ids_limit: int) -> None:
        parsed = parse_manifest(manifest)
        self.endpoints = list(parsed.websockets)
        self.indexed = Router(known_ids_limit=known_ids_limit)
        self.reference = BruteForceRouter(known_ids_limit=known_ids_limit)
        for router in (self.indexed, self.reference):
            router.add_app(parsed, "db")
        self.pairs: list[Pair] = []
        self.state: dict[str, dict[int, Doc]] = {"items": {}, "notes": {}}

    def connect(self, principal: Principal, endpoint: str) -> Pair:
        pair = Pair(
            connect(self.indexed, principal, app_slug="app", endpoint=endpoint),
            connect(self.reference, principal, app_slug="app", endpoint=endpoint),
        )
        self.pairs.append(pair)
        return pair

    def both(self, pair: Pair, action: Any) -> None:
        action(self.indexed, pair.indexed)
        action(self.reference, pair.reference)

    def route(self, change: ChangeEvent) -> None:
        assert self.indexed.route(change) == self.reference.route(change)
        self.check()

    def release(self, pair: Pair) -> None:
        """What recovery does once a replay is over: the held events, decided now."""
        for router, connection in ((self.indexed, pair.indexed), (self.reference, pair.reference)):
            held, connection.pending = connection.pending, None
            for binding, change in held.items if held is not None else []:
                frame = router.frame_for(connection, binding, change)
                if frame is not None:
                    connection.send(frame)

    def check(self) -> None:
        for pair in self.pairs:
            checked = pair.checked
            assert pair.indexed.frames[checked:] == pair.reference.frames[checked:]
            pair.checked = len(pair.indexed.frames)


def physical(collection: str) -> str:
    return f"app_{collection}"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    manifest=manifests(),
    clients=st.lists(st.tuples(principals(), st.integers(0, 1)), min_size=20, max_size=250),
    pre_images=st.booleans(),
    known_ids_limit=st.sampled_from([2, 10_000]),
    data=st.data(),
)
def test_indexed_routing_delivers_what_brute_force_delivers(
    manifest: Doc,
    clients: list[tuple[Principal, int]],
    pre_images: bool,
    known_ids_limit: int,
    data: st.DataObject,
) -> None:
    world = World(manifest, known_ids_limit)
    for principal, endpoint in clients:
        world.connect(principal, world.endpoints[endpoint % len(world.endpoints)])
    for pair in world.pairs[: len(world.pairs) // 2]:
        for number in range(data.draw(st.integers(0, 2))):
            subscribe = {
                "type": "subscribe",
                "id": f"s{number}",
                "collection": data.draw(values_of(["items", "notes"])),
                "filter": data.draw(values_of(SUBSCRIPTION_FILTERS)),
            }
            if data.draw(st.booleans()):
                subscribe["fields"] = data.draw(values_of([["kind"], ["owner", "n"]]))
            world.both(
                pair, lambda router, connection, m=subscribe: router.subscribe(connection, m)
            )
    for pair in world.pairs:
        pair.indexed.frames.clear()
        pair.reference.frames.clear()

    for _step in range(data.draw(st.integers(10, 40))):
        action = data.draw(values_of(["write"] * 8 + ["broadcast", "subscribe", "churn", "hold"]))
        if action == "write":
            world.route(draw_write(world, data, pre_images))
        elif action == "broadcast":
            world.route(bus_event(data.draw(maybe(st.none(), values_of(USERS)))))
        elif action == "subscribe":
            pair = data.draw(values_of(world.pairs))
            if data.draw(st.booleans()):
                message = {
                    "type": "subscribe",
                    "id": data.draw(values_of(["s0", "s1", "s9"])),
                    "collection": data.draw(values_of(["items", "notes"])),
                    "filter": data.draw(values_of(SUBSCRIPTION_FILTERS)),
                }
                world.both(pair, lambda r, c, m=message: r.subscribe(c, m))
            else:
                message = {"type": "unsubscribe", "id": data.draw(values_of(["s0", "s1"]))}
                world.both(pair, lambda r, c, m=message: r.unsubscribe(c, m))
            world.check()
        elif action == "churn":
            if data.draw(st.booleans()):
                pair = data.draw(values_of(world.pairs))
                world.both(pair, lambda router, connection: router.detach(connection))
            else:
                principal, endpoint = data.draw(st.tuples(principals(), st.integers(0, 1)))
                world.connect(principal, world.endpoints[endpoint % len(world.endpoints)])
        elif action == "hold":
            pair = data.draw(values_of(world.pairs))
            if pair.indexed.pending is None:
                world.both(pair, lambda router, connection: router.hold(connection))
            else:
                world.release(pair)
                world.check()
    for pair in world.pairs:
        if pair.indexed.pending is not None:
            world.release(pair)
    world.check()


def draw_write(world: World, data: st.DataObject, pre_images: bool) -> ChangeEvent:
    collection = data.draw(values_of(["items", "notes"]))
    documents_now = world.state[collection]
    doc_id = data.draw(st.integers(0, 7))
    before = documents_now.get(doc_id)
    if before is None:
        after = data.draw(documents(doc_id))
        documents_now[doc_id] = after
        return event("insert", physical(collection), doc_id, after, None)
    operation = data.draw(values_of(["update", "replace", "delete"]))
    shown_before = before if pre_images else None
    if operation == "delete":
        del documents_now[doc_id]
        return event("delete", physical(collection), doc_id, None, shown_before)
    after = data.draw(documents(doc_id))
    documents_now[doc_id] = after
    if operation == "update" and data.draw(st.integers(0, 7)) == 0:
        # The post-image lookup found the document already deleted.
        return event("update", physical(collection), doc_id, None, shown_before, exact=False)
    exact = pre_images or operation == "replace"
    return event(operation, physical(collection), doc_id, after, shown_before, exact=exact)
