"""Tokens from identity providers (SPEC 12): JWKS keys over real HTTP, rotation, outages.

A local JWKS server (tests/jwks_server.py) plays the provider with keys generated for this
run; the engine is a real server process configured by environment variables (engine-wide
provider) and by a manifest's `auth.jwt` (an app with a provider of its own).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient
from websockets.exceptions import ConnectionClosed

from engine.auth import issue_token
from tests.conftest import RunningApp, start_app_server
from tests.jwks_server import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    provider_claims,
    provider_env,
    sign_raw,
)
from tests.support import (
    REPO,
    TEST_SECRET,
    ServerProcess,
    connect,
    engine_env,
    receive_json,
    receive_until,
    serve_command,
)

TENANT_AUDIENCE = "tenant-api"


def manifests(folder: Path, tenant_jwks: str) -> Path:
    root = folder / "manifests"
    root.mkdir()
    alpha = {
        "slug": "alpha",
        "name": "Alpha",
        "websockets": {
            "realtime": {
                "path": "/ws",
                "ping_interval": 300,
                "watch": {
                    "notes": {"scope": {"org": "$claims.org_id"}},
                    "memos": {"scope": {"team": "$claims.https://idp.test/team"}},
                    "groups": {"scope": {"group": {"$in": "$claims.realm_access.groups"}}},
                },
            }
        },
    }
    tenant = {
        "slug": "tenant",
        "name": "Tenant",
        "auth": {"jwt": {"jwks_url": tenant_jwks, "audience": TENANT_AUDIENCE}},
        "websockets": {"realtime": {"path": "/ws", "ping_interval": 300}},
    }
    for manifest in (alpha, tenant):
        (root / f"{manifest['slug']}.json").write_text(json.dumps(manifest))
    return root


@dataclass
class Provider:
    app: RunningApp
    server: JwksServer
    tenant_server: JwksServer
    keys: dict[str, SigningKey]
    tenant_key: SigningKey
    folder: Path


@pytest.fixture(scope="module")
def provider(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    folder = tmp_path_factory.mktemp("identity")
    keys = {alg: SigningKey.generate(alg) for alg in ("RS256", "ES256", "EdDSA")}
    server = JwksServer(list(keys.values())).start()
    tenant_key = SigningKey.generate("ES256")
    tenant_server = JwksServer([tenant_key]).start()
    app = start_app_server(
        mongo_uri, folder, manifests(folder, tenant_server.url), **provider_env(server)
    )
    try:
        yield Provider(app, server, tenant_server, keys, tenant_key, folder)
    finally:
        app.server.stop()
        server.stop()
        tenant_server.stop()


async def hello_for(provider: Provider, token: str, path: str = "/alpha/ws") -> dict[str, Any]:
    async with await connect(provider.app.server.ws_url(path, token=token)) as ws:
        return await receive_json(ws)


async def refused_with(provider: Provider, token: str, path: str = "/alpha/ws") -> tuple:
    async with await connect(provider.app.server.ws_url(path, token=token)) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await receive_json(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_provider_tokens_are_accepted(provider: Provider, alg: str) -> None:
    token = provider.keys[alg].sign(provider_claims(f"user-{alg}", email="a@idp.test"))
    hello = await hello_for(provider, token)
    assert hello["type"] == "connected" and hello["authenticated"] is True
    assert (hello["user_id"], hello["user_email"]) == (f"user-{alg}", "a@idp.test")


async def test_engine_secret_tokens_keep_working(provider: Provider) -> None:
    token = issue_token(TEST_SECRET, app_slug="alpha", user_id="local")
    assert (await hello_for(provider, token))["user_id"] == "local"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a public key as an HMAC secret)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def refused_tokens(provider: Provider) -> dict[str, tuple[str, str]]:
    rsa, es = provider.keys["RS256"], provider.keys["ES256"]
    stranger = SigningKey.generate("RS256")  # a key the provider does not have
    stranger_with_known_kid = SigningKey("RS256", stranger.private, kid=rsa.kid)
    rs384 = SigningKey("RS384", rsa.private, kid=rsa.kid)
    invalid, expired = "invalid token", "token expired"
    claims = provider_claims("mallory")
    pem = rsa.public_pem()
    return {
        "wrong issuer": (rsa.sign(provider_claims("u", iss="https://evil.test/")), invalid),
        "no issuer": (rsa.sign(provider_claims("u", iss=None)), invalid),
        "wrong audience": (rsa.sign(provider_claims("u", aud="other-api")), invalid),
        "no audience": (rsa.sign(provider_claims("u", aud=None)), invalid),
        "unknown key": (stranger.sign(claims), invalid),
        "forged with a known kid": (stranger_with_known_kid.sign(claims), invalid),
        "alg not allowed (RS384)": (rs384.sign(claims), invalid),
        "alg not of the key (ES256 kid, RS256 header)": (
            SigningKey("RS256", rsa.private, kid=es.kid).sign(claims),
            invalid,
        ),
        "HS256 signed with the public key": (
            hs256_signed_with(pem, {"alg": "HS256", "typ": "JWT", "kid": rsa.kid}, claims),
            invalid,
        ),
        "HS256 public key, no kid": (
            hs256_signed_with(pem, {"alg": "HS256", "typ": "JWT"}, claims),
            invalid,
        ),
        "expired": (rsa.sign(provider_claims("u", ttl=-30)), expired),
        "no exp": (rsa.sign(provider_claims("u", exp=None)), invalid),
        "refresh token": (rsa.sign(provider_claims("u", type="refresh")), invalid),
        "embedded jwk": (
            stranger.sign(claims, jwk=stranger.public_jwk()),
            invalid,
        ),
        "embedded jwk of the known kid": (
            stranger_with_known_kid.sign(claims, jwk=stranger.public_jwk()),
            invalid,
        ),
        "jku to another key set": (
            stranger.sign(claims, jku="http://127.0.0.1:9/jwks"),
            invalid,
        ),
        "x5u": (stranger.sign(claims, x5u="http://127.0.0.1:9/cert.pem"), invalid),
        "jku on a good token": (rsa.sign(claims, jku=provider.server.url), invalid),
        "kid not a string": (sign_raw(rsa, {"alg": "RS256", "kid": 5}, claims), invalid),
        "kid a list": (sign_raw(rsa, {"alg": "RS256", "kid": [rsa.kid]}, claims), invalid),
    }


async def test_provider_tokens_are_refused_with_1008(provider: Provider) -> None:
    for case, (token, reason) in refused_tokens(provider).items():
        assert await refused_with(provider, token) == (1008, reason), case


async def test_a_provider_token_is_refused_where_another_provider_is_configured(
    provider: Provider,
) -> None:
    tenant_token = provider.tenant_key.sign(provider_claims("t1", aud=TENANT_AUDIENCE))
    assert (await hello_for(provider, tenant_token, "/tenant/ws"))["user_id"] == "t1"
    # The tenant's key is unknown to alpha's provider, and alpha's to the tenant's.
    assert await refused_with(provider, tenant_token) == (1008, "invalid token")
    alpha_token = provider.keys["ES256"].sign(provider_claims("a1", aud=TENANT_AUDIENCE))
    assert await refused_with(provider, alpha_token, "/tenant/ws") == (1008, "invalid token")
    wrong_audience = provider.tenant_key.sign(provider_claims("t1"))
    assert await refused_with(provider, wrong_audience, "/tenant/ws") == (1008, "invalid token")


async def test_scope_placeholders_read_provider_claims(provider: Provider) -> None:
    claims = provider_claims(
        "scoped",
        org_id="org-1",
        realm_access={"groups": ["g1", "g2"]},
        **{"https://idp.test/team": "blue"},
    )
    token = provider.keys["RS256"].sign(claims)
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(provider.app.mongo_uri)
    db = mongo[provider.app.db_name]
    marker = uuid.uuid4().hex
    try:
        async with await connect(provider.app.server.ws_url("/alpha/ws", token=token)) as ws:
            await receive_json(ws)
            await db["alpha_notes"].insert_many(
                [{"_id": f"{marker}-other", "org": "org-2"}, {"_id": f"{marker}-n", "org": "org-1"}]
            )
            await db["alpha_memos"].insert_many(
                [{"_id": f"{marker}-red", "team": "red"}, {"_id": f"{marker}-m", "team": "blue"}]
            )
            await db["alpha_groups"].insert_many(
                [{"_id": f"{marker}-g9", "group": "g9"}, {"_id": f"{marker}-g", "group": "g2"}]
            )
            seen = [(await receive_until(ws, "change", 10))["document_id"] for _ in range(3)]
        assert seen == [f"{marker}-n", f"{marker}-m", f"{marker}-g"]
    finally:
        await mongo.close()


async def test_rotation_accepts_the_new_key_without_a_restart(provider: Provider) -> None:
    old, new = provider.keys["ES256"], SigningKey.generate("ES256")
    token = new.sign(provider_claims("rotated"))
    assert await refused_with(provider, token) == (1008, "invalid token")  # not published yet
    provider.server.rotate([*provider.keys.values(), new])
    deadline = time.monotonic() + 20
    while True:  # the refused token above made the engine fetch; it may fetch again after 1 s
        with contextlib.suppress(ConnectionClosed):
            hello = await hello_for(provider, token)
            break
        assert time.monotonic() < deadline, "the new key was never fetched"
        await asyncio.sleep(0.3)
    assert hello["user_id"] == "rotated"
    # The provider withdraws the old ES256 key: once fetched again it is refused.
    provider.server.rotate([provider.keys["RS256"], provider.keys["EdDSA"], new])
    provider.keys["ES256"] = new
    await asyncio.sleep(1.2)
    stale_kid = SigningKey.generate("ES256").sign(provider_claims("x"))  # forces a refetch
    assert await refused_with(provider, stale_kid) == (1008, "invalid token")
    assert await refused_with(provider, old.sign(provider_claims("old"))) == (
        1008,
        "invalid token",
    )


async def test_a_flood_of_unknown_kids_does_not_hammer_the_provider(provider: Provider) -> None:
    before = provider.server.requests
    started = time.monotonic()
    for _ in range(40):
        forged = SigningKey.generate("EdDSA").sign(provider_claims("flood"))
        assert await refused_with(provider, forged) == (1008, "invalid token")
    elapsed = time.monotonic() - started
    fetched = provider.server.requests - before
    # MDB_REALTIME_JWKS_MIN_REFETCH_SECONDS=1: at most one fetch per second, plus one.
    assert fetched <= elapsed / 1.0 + 1, (fetched, elapsed)
    assert fetched < 40


async def test_provider_tokens_can_be_traded_for_tickets(provider: Provider) -> None:
    token = provider.keys["EdDSA"].sign(provider_claims("ticket-holder"))
    async with httpx.AsyncClient(base_url=provider.app.server.url) as http:
        response = await http.post("/alpha/ticket", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    ticket = response.json()["ticket"]
    url = provider.app.server.ws_url("/alpha/ws", ticket=ticket)
    async with await connect(url) as ws:
        assert (await receive_json(ws))["user_id"] == "ticket-holder"


# -- the provider down ---------------------------------------------------------------------------


async def test_cached_keys_keep_working_when_the_provider_stops(
    mongo_uri: str, tmp_path: Path
) -> None:
    key = SigningKey.generate("RS256")
    server = JwksServer([key]).start()
    other = JwksServer([SigningKey.generate("ES256")]).start()
    app = start_app_server(
        mongo_uri, tmp_path, manifests(tmp_path, other.url), **provider_env(server)
    )
    state = Provider(app, server, other, {"RS256": key}, key, tmp_path)
    try:
        assert (await hello_for(state, key.sign(provider_claims("before"))))["user_id"] == "before"
        server.stop()
        other.stop()
        await asyncio.sleep(1.2)  # past the refetch interval: unknown kids try the provider
        unknown = SigningKey.generate("RS256").sign(provider_claims("x"))
        assert await refused_with(state, unknown) == (1008, "invalid token")
        assert (await hello_for(state, key.sign(provider_claims("after"))))["user_id"] == "after"
        async with httpx.AsyncClient(base_url=app.server.url) as http:
            assert (await http.get("/readyz")).status_code == 200  # fetched at start
        assert "Traceback" not in app.server.logs()
    finally:
        app.server.stop()
        server.stop()


async def test_readyz_reports_a_jwks_that_cannot_be_fetched_at_start(
    mongo_uri: str, tmp_path: Path
) -> None:
    key = SigningKey.generate("ES256")
    server = JwksServer([key]).start()
    server.stop()  # the port is known, nothing answers on it yet
    tenant = JwksServer([SigningKey.generate("ES256")]).start()
    app = start_app_server(
        mongo_uri, tmp_path, manifests(tmp_path, tenant.url), **provider_env(server)
    )
    try:
        async with httpx.AsyncClient(base_url=app.server.url) as http:
            response = await http.get("/readyz")
            assert response.status_code == 503
            problems = response.json()["problems"]
            assert any(server.url in p and "cannot be fetched" in p for p in problems), problems
            assert not any(tenant.url in p for p in problems)
            # Engine-secret tokens do not need the provider.
            local = issue_token(TEST_SECRET, app_slug="alpha", user_id="local")
            state = Provider(app, server, tenant, {}, key, tmp_path)
            assert (await hello_for(state, local))["user_id"] == "local"

            server.start()  # the provider comes up: readiness follows without a restart
            deadline = time.monotonic() + 20
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "readyz never recovered"
                await asyncio.sleep(0.3)
        assert (await hello_for(state, key.sign(provider_claims("late"))))["user_id"] == "late"
    finally:
        app.server.stop()
        server.stop()
        tenant.stop()


# -- serve flags -----------------------------------------------------------------------------------


async def test_serve_flags_configure_the_provider(mongo_uri: str, tmp_path: Path) -> None:
    key = SigningKey.generate("EdDSA")
    server = JwksServer([key]).start()
    tenant = JwksServer([SigningKey.generate("ES256")]).start()
    env = engine_env(mongo_uri, tmp_path, MDB_REALTIME_DB=f"t_{uuid.uuid4().hex[:12]}")
    flags = ["--jwks-url", server.url, "--jwt-issuer", ISSUER, "--jwt-audience", f"x,{AUDIENCE}"]
    command = serve_command("--manifests", str(manifests(tmp_path, tenant.url)), *flags)
    process = ServerProcess(command, env, tmp_path / "serve.log").start()
    try:
        state = Provider(
            RunningApp(process, mongo_uri, ""), server, tenant, {"EdDSA": key}, key, tmp_path
        )
        assert (await hello_for(state, key.sign(provider_claims("flagged"))))[
            "user_id"
        ] == "flagged"
        wrong = key.sign(provider_claims("u", iss="https://elsewhere.test/"))
        assert await refused_with(state, wrong) == (1008, "invalid token")
    finally:
        process.stop()
        server.stop()
        tenant.stop()


def test_serve_refuses_a_bad_jwks_url_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [*serve_command("--jwks-url", "ftp://idp.test/jwks"), "--manifests", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=engine_env(None, tmp_path),
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "MDB_REALTIME_JWKS_URL must be an http(s) URL" in result.stderr


async def test_mdb_engine_style_endpoints_accept_provider_tokens(provider: Provider) -> None:
    token = provider.keys["RS256"].sign(provider_claims("compat-user"))
    assert (await hello_for(provider, token, "/_test/compat"))["user_id"] == "compat-user"
    forged = SigningKey.generate("RS256").sign(provider_claims("compat-user"))
    assert await refused_with(provider, forged, "/_test/compat") == (1008, "invalid token")
