"""Regular expressions from clients cannot stall the event loop.

A subscribe filter's `$regex` runs in the server process, on the event loop, against every
change of the collection: one pattern that backtracks for seconds on a document someone else
wrote freezes every connection of every app on that process. So:

- a pattern of the shapes known to backtrack catastrophically is refused (`forbidden_filter`),
  or, if the engine accepts it, it runs in bounded time on adversarial input;
- a long but safe pattern on large documents does not block the server: a concurrent client's
  request/response round trip stays short (a generous 2 s: a liveness check, not a benchmark).

Pattern timing runs in a forked child with a deadline, so a runaway pattern never takes the
test process (or pytest-timeout's alarm) with it.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from engine.query import QueryError, compile_query
from tests.conftest import RunningApp, start_app_server
from tests.test_fuzz_frames import FUZZ_ENV, Closed, RawClient, engine_tracebacks, token

SUBJECT_SECONDS = 0.25  # far above what a safe pattern needs on these inputs

# (pattern, adversarial subject): each backtracks exponentially or polynomially in Python's
# `re` on its subject when accepted. Subjects are short: documents carry far longer strings.
CATASTROPHIC: list[tuple[str, str]] = [
    ("(a+)+$", "a" * 40 + "!"),
    ("(a|a)*$", "a" * 40 + "!"),
    ("(a|aa)+$", "a" * 60 + "!"),
    ("(\\w+\\s?)*$", "word " * 20 + "!"),
    ("(x+x+)+y", "x" * 40),
    ("^(([a-z])+.)+[A-Z]([a-z])+$", "a" * 40 + "!"),
    ("(.*){1,32000}[bc]", "a" * 40),
    # Accepted by engine.query._may_backtrack today (no nested variable repetition):
    (".*.*.*.*.*=", "a" * 200),  # polynomial: n^5 tries per start position
    ("a*a*a*a*a*a*b", "a" * 200),
    ("\\d*\\d*\\d*\\d*\\d*c", "1" * 200),
    ("[a-z]*[a-z]*[a-z]*[a-z]*!", "a" * 300),
    ("(?:.*,){20}X", "a," * 50),  # fixed-count repetition of a variable body
    ("^(a?){30}a{30}$", "a" * 30),  # 2^30 ways to split: the classic (a?){n}a{n}
    ("(a)\\1*\\1*\\1*b", "a" * 1000),  # back-references repeated
]


def _match_in_child(pattern: str, subject: str, result: Any) -> None:
    try:
        matcher = compile_query({"text": {"$regex": pattern}})
    except QueryError:
        result.value = 2  # refused
        return
    matcher({"text": subject})
    result.value = 1  # accepted and finished


def refused_or_fast(pattern: str, subject: str, seconds: float = SUBJECT_SECONDS) -> str:
    """'refused', 'fast', or 'slow' (still running after `seconds`) for one pattern."""
    context = multiprocessing.get_context("fork")
    result = context.Value("i", 0)
    child = context.Process(target=_match_in_child, args=(pattern, subject, result))
    child.start()
    child.join(seconds)
    if child.is_alive():
        child.kill()
        child.join()
        return "slow"
    return {2: "refused", 1: "fast"}.get(result.value, f"child failed ({child.exitcode})")


@pytest.mark.parametrize(("pattern", "subject"), CATASTROPHIC, ids=[p for p, _ in CATASTROPHIC])
def test_catastrophic_patterns_are_refused_or_bounded(pattern: str, subject: str) -> None:
    """Found by fuzzing (the patterns after `(.*){1,32000}[bc]`): engine.query refuses nested
    variable repetition and overlapping alternatives inside a repetition, but accepts
    sequences of unbounded repeats over the same characters (`.*.*.*.*.*=`), a variable body
    repeated a fixed number of times (`(?:.*,){20}X`, `^(a?){30}a{30}$`) and repeated
    back-references. Each of those takes seconds to hours on a string of a few hundred
    characters. Expected: refused with QueryError (the client gets `forbidden_filter`), or
    matched in bounded time (e.g. a match timeout or a linear-time engine)."""
    outcome = refused_or_fast(pattern, subject)
    assert outcome in ("refused", "fast"), (
        f"{pattern!r} accepted and still running on {subject!r:.60}"
    )


# -- random patterns ------------------------------------------------------------------------------

atoms = st.sampled_from(["a", "a", ".", ".", "\\w", "\\d", "[ab]", "[^,]", "b", ","])
quantifiers = st.sampled_from(["", "*", "*", "+", "+", "?", "{2}", "{1,3}", "{0,}", "*?", "{3}"])


def _pieces(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    group = st.builds(
        lambda body, q, capture: f"({'' if capture else '?:'}{body}){q}",
        children,
        quantifiers,
        st.booleans(),
    )
    alternation = st.builds(lambda a, b: f"{a}|{b}", children, children)
    sequence = st.lists(children, min_size=2, max_size=5).map("".join)
    return st.one_of(group, alternation, sequence)


patterns = st.recursive(st.builds(lambda a, q: a + q, atoms, quantifiers), _pieces, max_leaves=8)
anchors = st.tuples(st.sampled_from(["", "^"]), st.sampled_from(["", "$", "!", "X", "=$"]))


def adversarial_subjects(pattern: str) -> list[str]:
    """Long runs of what the pattern matches, ending with what breaks the match."""
    return ["a" * 500 + "!", "ab" * 250 + "!", "a," * 250 + "!", "1" * 500 + "!"]


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a shrink would re-run many slow children
    suppress_health_check=[HealthCheck.too_slow],
)
@given(body=patterns, ends=anchors)
@example(body="[^,]+\\w*\\w*.*b{3}\\w{0,}", ends=("", "X"))  # found by this test
@example(body="\\w*?.*?.*?a[ab]*|(?:b{3})*?", ends=("", "$"))  # found by this test
def test_fuzz_accepted_patterns_run_in_bounded_time(body: str, ends: tuple[str, str]) -> None:
    """Any pattern engine.query accepts must finish on long adversarial strings.

    Fails today (see test_catastrophic_patterns_are_refused_or_bounded for minimal cases):
    within a few dozen examples hypothesis finds accepted patterns that backtrack polynomially
    on 500-character strings, e.g. `[^,]+\\w*\\w*.*b{3}\\w{0,}X` and
    `\\w*?.*?.*?a[ab]*|(?:b{3})*?$` (runs of unbounded repeats over overlapping characters).
    """
    pattern = ends[0] + body + ends[1]
    for subject in adversarial_subjects(pattern):
        outcome = refused_or_fast(pattern, subject, seconds=0.5)
        if outcome == "refused":
            return
        assert outcome == "fast", f"{pattern!r} accepted and still running after 0.5 s"


# -- over a socket --------------------------------------------------------------------------------

MANIFEST = {
    "slug": "rx",
    "name": "Regex",
    "websockets": {
        "realtime": {"path": "/ws", "ping_interval": 300, "watch": {"big": {}, "quiet": {}}}
    },
}


def start_regex_server(mongo_uri: str, folder: Path) -> RunningApp:
    manifests = folder / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "rx.json").write_text(json.dumps(MANIFEST))
    return start_app_server(mongo_uri, folder, manifests, **FUZZ_ENV)


@pytest.fixture(scope="module")
def regex_app(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    app = start_regex_server(mongo_uri, tmp_path_factory.mktemp("fuzz_regex"))
    try:
        yield app
    finally:
        app.server.stop()


def rx_client(app: RunningApp, user: str) -> RawClient:
    client = RawClient(app.server.url, f"/rx/ws?token={token(user, app='rx')}")
    assert client.recv()["type"] == "connected"
    return client


def subscribe(client: RawClient, sub_id: str, collection: str, pattern: str) -> dict[str, Any]:
    client.send_json(
        {
            "type": "subscribe",
            "id": sub_id,
            "collection": collection,
            "filter": {"text": {"$regex": pattern}},
        }
    )
    return client.recv_until(lambda m: m.get("type") in ("subscribed", "error"))[-1]


@pytest.mark.parametrize(("pattern", "subject"), CATASTROPHIC, ids=[p for p, _ in CATASTROPHIC])
def test_catastrophic_pattern_in_subscribe_is_forbidden_filter(
    regex_app: RunningApp, pattern: str, subject: str
) -> None:
    """The client-facing side of the catalogue: `error` `forbidden_filter` with the ref.

    Subscribed on a collection nobody writes, so an accepted pattern never runs here."""
    client = rx_client(regex_app, "picky")
    try:
        answer = subscribe(client, "rx", "quiet", pattern)
        assert (answer["type"], answer.get("code"), answer.get("ref")) == (
            "error",
            "forbidden_filter",
            "rx",
        ), f"{pattern!r} was accepted: {answer}"
    finally:
        client.close()


class EchoProbe:
    """A client that keeps doing request/response round trips and records the slowest."""

    def __init__(self, app: RunningApp) -> None:
        # The rx app has no handler: an unknown type is answered with an error, which is the
        # engine's own reply path, as good a round trip as an echo.
        self.client = RawClient(app.server.url, f"/rx/ws?token={token('prober', app='rx')}")
        assert self.client.recv()["type"] == "connected"
        # Narrowed to nothing: the large documents written meanwhile are not its to read.
        assert subscribe(self.client, "none", "big", "^never-matches$")["type"] == "subscribed"
        self.slowest = 0.0
        self.rounds = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                ref = f"r{self.rounds}"
                self.client.send_json({"type": "ping-me", "id": ref})
                self.client.recv_until(lambda m, ref=ref: m.get("ref") == ref, timeout=60)
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.rounds += 1
                time.sleep(0.02)
        except BaseException as error:  # reported by stop()
            self.failure = error

    def __enter__(self) -> EchoProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)
        self.client.close()


def test_long_safe_pattern_on_large_documents_keeps_the_server_live(
    regex_app: RunningApp,
) -> None:
    """Patterns near the 1000-character limit that are safe, on 1 MB strings, while another
    client keeps making round trips: every round trip stays under 2 s."""
    words = [f"w{n:03d}z" for n in range(150)]
    safe_patterns = [
        "^(?:" + "|".join(words) + ")$",  # a long alternation, not repeated
        "x" * 990 + "$",  # a long literal
        "[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}" + "q" * 900,
    ]
    subscriber = rx_client(regex_app, "reader")
    mongo: MongoClient[dict[str, Any]] = MongoClient(regex_app.mongo_uri)
    try:
        for index, pattern in enumerate(safe_patterns):
            answer = subscribe(subscriber, f"safe{index}", "big", pattern)
            assert answer["type"] == "subscribed", answer
        collection = mongo[regex_app.db_name]["rx_big"]
        haystacks = ["a" * 1_000_000, ("w001z," * 170_000), ("x" * 989 + "y") * 1000]
        with EchoProbe(regex_app) as probe:
            time.sleep(0.3)
            for round_ in range(6):
                collection.insert_many(
                    [{"text": text, "round": round_} for text in haystacks], ordered=True
                )
            collection.insert_one({"text": "w042z", "last": True})
            arrived = subscriber.recv_until(
                lambda m: m.get("type") == "change" and m["document"].get("last"), timeout=60
            )
            time.sleep(0.5)
        assert probe.failure is None, probe.failure
        assert probe.rounds >= 5
        assert probe.slowest < 2.0, f"a round trip took {probe.slowest:.2f} s"
        assert not [
            m for m in arrived if m.get("type") == "change" and not m["document"].get("last")
        ]
    finally:
        subscriber.close()
        mongo.close()
    process = regex_app.server._process
    assert process is not None and process.poll() is None
    assert not engine_tracebacks(regex_app.server.logs())


def test_an_accepted_pattern_cannot_stall_the_event_loop(mongo_uri: str, tmp_path: Path) -> None:
    """End to end: a client subscribes with `.*.*.*.*.*=`, another user writes a 90-character
    string; a third client's round trips must stay under 2 s.

    Found by fuzzing: engine.query accepts the pattern (no nested repetition), so
    Router._route_to_members evaluates it on the event loop for the insert: the whole process
    stops for seconds (about 5 s here; twice as long every 12 more characters, hours at a few
    hundred). Every connection of every app on the process waits, keepalive included.
    Expected: `forbidden_filter` at subscribe (then this test passes), or matching that cannot
    hold the loop. The server is this test's own: it may be frozen when the test ends.
    """
    app = start_regex_server(mongo_uri, tmp_path)
    mongo: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    attacker = rx_client(app, "attacker")
    try:
        answer = subscribe(attacker, "slow", "big", ".*.*.*.*.*=")
        if answer["type"] == "error":
            assert answer["code"] == "forbidden_filter"
            return
        with EchoProbe(app) as probe:
            time.sleep(0.3)
            mongo[app.db_name]["rx_big"].insert_one({"text": "a" * 90})
            time.sleep(3.0)
        assert probe.failure is None or isinstance(probe.failure, Closed), probe.failure
        assert probe.slowest < 2.0, (
            f"the event loop stalled: a round trip took {probe.slowest:.1f} s"
        )
    finally:
        attacker.close()
        mongo.close()
        app.server.stop()
