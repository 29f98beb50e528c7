"""Unit tests of engine.identity: the JWKS key cache (against a real local HTTP server),
provider settings, provider claims as scope placeholders, and ticket redaction in logs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from engine.identity.jwks import JwksKeys, JwksTiming
from engine.identity.providers import AppIdentity, Identity, ProviderConfig
from engine.identity.tokens import AuthError, Principal, TokenVerifier
from engine.logs import redact
from engine.manifest import ManifestError, parse_manifest
from engine.query import QueryError, substitute_placeholders, validate_query
from engine.settings import EngineSettings
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey, provider_claims

SECRET = "unit-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def server() -> Iterator[JwksServer]:
    running = JwksServer([SigningKey.generate("ES256")]).start()
    try:
        yield running
    finally:
        running.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the key cache ---------------------------------------------------------------------------------


async def test_unknown_kids_refetch_at_most_once_per_interval(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(server.url, JwksTiming(min_refetch_seconds=10), clock)
    known = server.keys[0].kid
    assert await keys.key_for(known) is not None
    assert server.requests == 1
    for n in range(50):
        assert await keys.key_for(f"made-up-{n}") is None
    assert server.requests == 1  # within the interval: no fetch at all
    clock.now += 10
    assert await keys.key_for("made-up-again") is None
    assert server.requests == 2  # one fetch once the interval has passed
    assert await keys.key_for(known) is not None
    assert server.requests == 2


async def test_concurrent_lookups_share_one_fetch(server: JwksServer) -> None:
    server.delay = 0.3
    keys = JwksKeys(server.url, JwksTiming(min_refetch_seconds=0))
    found = await asyncio.gather(*(keys.key_for(server.keys[0].kid) for _ in range(20)))
    assert all(key is not None for key in found)
    assert server.requests == 1


async def test_a_fetch_never_blocks_the_event_loop(server: JwksServer) -> None:
    server.delay = 1.0
    keys = JwksKeys(server.url)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await keys.key_for(server.keys[0].kid)
    finally:
        task.cancel()
    assert ticks >= 5  # the loop kept running while the provider took a second to answer


async def test_keys_are_refreshed_in_the_background_when_old(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(server.url, JwksTiming(min_refetch_seconds=1, max_age_seconds=60), clock)
    old = server.keys[0]
    assert await keys.key_for(old.kid) is not None
    server.rotate([SigningKey.generate("ES256")])  # the provider withdraws the old key
    clock.now += 61
    assert await keys.key_for(old.kid) is not None  # served from the cache, refresh started
    for _ in range(100):
        if keys.fetches == 2 and keys._fetching is None:
            break
        await asyncio.sleep(0.02)
    assert await keys.key_for(old.kid) is None


async def test_a_failed_fetch_keeps_the_keys_and_reports_the_error(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(server.url, JwksTiming(min_refetch_seconds=1), clock)
    kid = server.keys[0].kid
    assert await keys.key_for(kid) is not None
    server.stop()
    clock.now += 5
    assert await keys.key_for("unknown") is None
    assert keys.last_error is not None and "PyJWKClientConnectionError" in keys.last_error
    assert await keys.key_for(kid) is not None


async def test_symmetric_keys_in_a_jwks_are_never_used() -> None:
    class OctServer(JwksServer):
        def document(self) -> bytes:
            return b'{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0", "alg": "HS256"}]}'

    server = OctServer([]).start()
    try:
        keys = JwksKeys(server.url)
        assert await keys.key_for("s") is None
    finally:
        server.stop()


async def test_identity_problems_name_the_url_until_it_answers(server: JwksServer) -> None:
    url = server.url
    server.stop()
    identity = Identity(
        TokenVerifier(SECRET), ProviderConfig(jwks_url=url), JwksTiming(min_refetch_seconds=0)
    )
    await identity.start()
    problems = await identity.problems()
    assert len(problems) == 1 and url in problems[0] and "cannot be fetched" in problems[0]
    server.start()
    assert await identity.problems() == []


# -- verification ----------------------------------------------------------------------------------


async def test_provider_and_secret_tokens_side_by_side(server: JwksServer) -> None:
    key = server.keys[0]
    identity = Identity(
        TokenVerifier(SECRET),
        ProviderConfig(jwks_url=server.url, issuer=ISSUER, audience=(AUDIENCE,)),
    )
    app = identity.for_app("todo")
    principal = await app.verify(key.sign(provider_claims("ann", org_id="o1")))
    assert (principal.user_id, principal.claims["org_id"]) == ("ann", "o1")
    assert principal.expires_at is not None and principal.expires_at > time.time()
    from engine.auth import issue_token

    assert (await app.verify(issue_token(SECRET, app_slug="todo", user_id="bob"))).user_id == "bob"
    with pytest.raises(AuthError):
        await app.verify(issue_token(SECRET, app_slug="other", user_id="bob"))


async def test_without_a_provider_asymmetric_tokens_are_refused(server: JwksServer) -> None:
    app = AppIdentity("todo", TokenVerifier(SECRET))
    with pytest.raises(AuthError) as refused:
        await app.verify(server.keys[0].sign(provider_claims("ann")))
    assert str(refused.value.reason) == "invalid token"
    with pytest.raises(AuthError) as no_store:
        await app.redeem_ticket("mrt_anything")
    assert str(no_store.value.reason) == "invalid ticket"


def test_an_apps_jwt_settings_replace_the_engines_key_by_key() -> None:
    engine = ProviderConfig(
        jwks_url="https://a.test/jwks", issuer="https://a.test/", audience=("x",)
    )
    app = engine.overridden_by({"audience": "y", "algorithms": ["RS256"]})
    assert app == ProviderConfig("https://a.test/jwks", "https://a.test/", ("y",), ("RS256",))
    assert engine.overridden_by({}) == engine


def test_engine_settings_read_the_provider_from_the_environment() -> None:
    settings = EngineSettings.from_env(
        {
            "MDB_REALTIME_JWKS_URL": "https://idp.test/.well-known/jwks.json",
            "MDB_REALTIME_JWT_ISSUER": "https://idp.test/",
            "MDB_REALTIME_JWT_AUDIENCE": "api, other",
            "MDB_REALTIME_JWKS_ALGORITHMS": "RS256,EdDSA",
            "MDB_REALTIME_JWKS_MIN_REFETCH_SECONDS": "2.5",
        }
    )
    assert settings.provider == ProviderConfig(
        "https://idp.test/.well-known/jwks.json",
        "https://idp.test/",
        ("api", "other"),
        ("RS256", "EdDSA"),
    )
    assert settings.jwks_timing.min_refetch_seconds == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MDB_REALTIME_JWKS_URL", "file:///etc/passwd", "must be an http(s) URL"),
        ("MDB_REALTIME_JWKS_ALGORITHMS", "HS256", "engine secret"),
        ("MDB_REALTIME_JWKS_ALGORITHMS", "none", "not 'none'"),
        ("MDB_REALTIME_JWKS_MIN_REFETCH_SECONDS", "soon", "must be a number"),
    ],
)
def test_bad_provider_settings_are_clear_errors(variable: str, value: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        EngineSettings.from_env({variable: value})
    assert variable in str(error.value) and message in str(error.value)


# -- the manifest's auth.jwt -----------------------------------------------------------------------


def test_manifest_auth_jwt_is_read_and_shown() -> None:
    manifest = parse_manifest(
        {
            "slug": "todo",
            "name": "Todo",
            "auth": {
                "policy": {"required": True},
                "jwt": {"jwks_url": "https://idp.test/jwks", "audience": ["a", "b"]},
            },
            "websockets": {"rt": {"path": "/ws", "ticket_ttl_seconds": 10}},
        }
    )
    assert manifest.jwt_settings() == {"jwks_url": "https://idp.test/jwks", "audience": ["a", "b"]}
    assert manifest.ticket_ttl_seconds(30) == 10
    document = manifest.to_document()
    assert document["auth"] == {
        "jwt": {"jwks_url": "https://idp.test/jwks", "audience": ["a", "b"]},
        "policy": {"required": True},
    }
    plain = parse_manifest({"slug": "p", "name": "P", "websockets": {"rt": {"path": "/ws"}}})
    assert "auth" not in plain.to_document()
    assert "ticket_ttl_seconds" not in plain.to_document()["websockets"]["rt"]
    assert plain.jwt_settings() == {} and plain.ticket_ttl_seconds(30) == 30


@pytest.mark.parametrize(
    ("jwt", "path", "message"),
    [
        ({"jwks_url": "ftp://idp.test/jwks"}, "auth.jwt.jwks_url", "http(s) URL"),
        ({"jwks_url": 5}, "auth.jwt.jwks_url", "must be a string"),
        ({"issuer": ""}, "auth.jwt.issuer", "empty"),
        ({"audience": [""]}, "auth.jwt.audience", ""),
        ({"algorithms": ["HS256"]}, "auth.jwt.algorithms", "engine secret"),
        ({"algorithms": []}, "auth.jwt.algorithms", "must list"),
        ({"jwks": "https://idp.test/jwks"}, "auth.jwt.jwks", "unknown key"),
    ],
)
def test_bad_auth_jwt_values_are_load_errors(jwt: dict, path: str, message: str) -> None:
    with pytest.raises(ManifestError) as error:
        parse_manifest({"slug": "todo", "name": "Todo", "auth": {"jwt": jwt}})
    text = str(error.value)
    assert path in text and message in text, text


# -- provider claims as placeholders ---------------------------------------------------------------


def test_placeholders_name_claims_as_providers_write_them() -> None:
    for name in ("org_id", "https://example.com/roles", "cognito:groups", "realm_access.roles"):
        validate_query({"field": f"$claims.{name}"}, allow_placeholders=True)
    with pytest.raises(QueryError):
        validate_query({"field": "$claims.a b"}, allow_placeholders=True)


def test_placeholder_values_of_namespaced_and_nested_claims() -> None:
    principal = Principal(
        user_id="ann",
        claims={
            "sub": "ann",
            "https://example.com/roles": ["admin"],
            "cognito:groups": ["g1"],
            "realm_access": {"roles": ["r1"], "deep": {"er": 1}},
            "o": {"id": "org_1"},
            "o.id": "exact name wins",
        },
    )
    values = principal.placeholder_values()
    assert values["$claims.https://example.com/roles"] == ["admin"]
    assert values["$claims.cognito:groups"] == ["g1"]
    assert values["$claims.realm_access.roles"] == ["r1"]
    assert values["$claims.realm_access.deep.er"] == 1
    assert values["$claims.o.id"] == "exact name wins"
    scope = {"org": "$claims.realm_access.deep.er", "roles": "$claims.https://example.com/roles"}
    assert substitute_placeholders(scope, values) == {"org": 1, "roles": ["admin"]}


def test_a_token_cannot_define_unbounded_placeholders() -> None:
    wide = {f"c{n}": {f"d{m}": m for m in range(100)} for n in range(100)}
    values = Principal(user_id="ann", claims=wide).placeholder_values()
    assert len(values) <= 2 + 256


# -- logs ------------------------------------------------------------------------------------------


def test_tickets_are_redacted_anywhere_in_a_log_line() -> None:
    ticket = "mrt_" + "Ab3-_x" * 7
    line = f"redeeming {ticket} for /alpha/ws?ticket={ticket} and ticket={ticket}"
    assert ticket not in redact(line)
    assert redact(f"GET /alpha/ws?ticket={ticket} HTTP/1.1") == "GET /alpha/ws?[redacted] HTTP/1.1"


def test_an_array_claim_can_feed_in_and_nin() -> None:
    scope = {"team": {"$in": "$claims.teams"}, "level": {"$nin": "$claims.banned"}}
    validate_query(scope, allow_placeholders=True)
    with pytest.raises(QueryError):
        validate_query(scope)  # outside a scope, placeholders are refused
    values = Principal(
        user_id="a", claims={"teams": ["red", "blue"], "banned": 3}
    ).placeholder_values()
    bound = substitute_placeholders(scope, values)
    assert bound == {"team": {"$in": ["red", "blue"]}, "level": {"$nin": [3]}}
    assert substitute_placeholders(scope, {"$claims.teams": ["red"]}) is None  # no `banned`


async def test_provider_clock_skew_is_allowed_for_iat_and_nbf_not_exp(server: JwksServer) -> None:
    key = server.keys[0]
    app = Identity(TokenVerifier(SECRET), ProviderConfig(jwks_url=server.url)).for_app("todo")
    now = int(time.time())
    soon = provider_claims("ann", aud=None, iat=now + 10, nbf=now + 10)
    assert (await app.verify(key.sign(soon))).user_id == "ann"
    with pytest.raises(AuthError) as early:
        await app.verify(key.sign(provider_claims("ann", aud=None, nbf=now + 3600)))
    assert str(early.value.reason) == "invalid token"
    with pytest.raises(AuthError) as late:
        await app.verify(key.sign(provider_claims("ann", aud=None, exp=now - 1)))
    assert str(late.value.reason) == "token expired"
