"""Unit tests of engine.auth: token sources, verification, dev tokens and the secret (SPEC 2, 4).

No sockets: handshakes are represented by their query parameters and headers.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from engine.auth import (
    ANONYMOUS,
    SECRET_FILE_NAME,
    AuthError,
    Principal,
    TokenVerifier,
    extract_token,
    issue_token,
    resolve_secret,
)
from engine.protocol import CloseReason

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4  # long enough for HS512
SLUG = "todo"


def token(claims: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def valid_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "ann", "exp": int(time.time()) + 600}
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not ...}


def verify(text: str, slug: str = SLUG, **verifier: Any) -> Principal:
    return TokenVerifier(SECRET, **verifier).verify(text, slug)


def refused(text: str, slug: str = SLUG, **verifier: Any) -> CloseReason:
    with pytest.raises(AuthError) as raised:
        verify(text, slug, **verifier)
    assert str(raised.value) == str(raised.value.reason)
    return raised.value.reason


# -- extract_token -----------------------------------------------------------------------------


def test_no_token_anywhere() -> None:
    assert extract_token({}, {}) is None


def test_query_token() -> None:
    assert extract_token({"token": "q"}, {}) == "q"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_header(scheme: str) -> None:
    assert extract_token({}, {"authorization": f"{scheme} h.t.x"}) == "h.t.x"


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer    ", "Token abc", "abc"]
)
def test_other_authorization_headers_are_not_tokens(header: str) -> None:
    assert extract_token({}, {"authorization": header}) is None


def test_bearer_credentials_are_stripped() -> None:
    assert extract_token({}, {"authorization": "Bearer   abc  "}) == "abc"


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("ws_token=w", "w"),
        ("token=t", "t"),
        ("ws_token=w; token=t", "w"),
        ("token=t; ws_token=w", "w"),
        ("theme=dark; token=t", "t"),
        ("theme=dark", None),
        ("ws_token=; token=t", "t"),
        ("", None),
    ],
)
def test_cookies(cookie: str, expected: str | None) -> None:
    assert extract_token({}, {"cookie": cookie}) == expected


@pytest.mark.parametrize(
    ("query", "headers", "expected"),
    [
        ({"token": "q"}, {"authorization": "Bearer h", "cookie": "ws_token=w; token=t"}, "q"),
        ({}, {"authorization": "Bearer h", "cookie": "ws_token=w; token=t"}, "h"),
        ({}, {"authorization": "Basic x", "cookie": "ws_token=w; token=t"}, "w"),
        ({"token": ""}, {"authorization": "Bearer h"}, "h"),
        ({"other": "x"}, {"cookie": "token=t"}, "t"),
    ],
)
def test_first_found_wins(query: dict[str, str], headers: dict[str, str], expected: str) -> None:
    assert extract_token(query, headers) == expected


def test_a_bad_token_first_is_not_rescued_by_a_later_good_one() -> None:
    good = issue_token(SECRET, app_slug=SLUG, user_id="ann")
    found = extract_token({"token": "garbage"}, {"authorization": f"Bearer {good}"})
    assert found == "garbage"
    assert refused(found) == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize(
    "cookie",
    ['ws_token="unterminated', "=; ;=", "\x00\x01", 'a="b', ";;;", "ws_token"],
)
def test_malformed_cookie_header_is_no_token_and_no_error(cookie: str) -> None:
    assert extract_token({}, {"cookie": cookie}) in (None, '"unterminated', "unterminated")


@pytest.mark.parametrize(
    "cookie",
    [
        "a=b;;ws_token=w",  # empty cookie pair (seen from some clients)
        'prefs={"a": 1}; ws_token=w',  # an app's JSON cookie
        "x=\\; ws_token=w",
        'c"d=e; ws_token=w',
        "foo bar=1; ws_token=w",
    ],
)
def test_a_malformed_unrelated_cookie_does_not_hide_the_token(cookie: str) -> None:
    # Browsers send other sites' cookies verbatim; Starlette's own cookie parser still finds
    # ws_token in every one of these headers.
    assert extract_token({}, {"cookie": cookie}) == "w"


# -- TokenVerifier.verify ----------------------------------------------------------------------


def test_valid_token_gives_the_principal() -> None:
    claims = valid_claims(email="ann@example.com", role="admin")
    principal = verify(token(claims))
    assert principal.user_id == "ann"
    assert principal.email == "ann@example.com"
    assert principal.authenticated
    assert principal.expires_at == float(claims["exp"])
    assert principal.claims["role"] == "admin"


def test_user_id_claim_when_sub_is_absent() -> None:
    assert verify(token(valid_claims(sub=..., user_id="u1"))).user_id == "u1"


def test_sub_wins_over_user_id() -> None:
    assert verify(token(valid_claims(sub="s", user_id="u"))).user_id == "s"


def test_numeric_user_id_is_a_string() -> None:
    assert verify(token(valid_claims(sub=..., user_id=42))).user_id == "42"


@pytest.mark.parametrize("user_id", [None, {"a": 1}, [1]])
def test_without_a_usable_user_id_is_invalid(user_id: Any) -> None:
    claims = valid_claims(sub=...)
    if user_id is not None:
        claims["user_id"] = user_id
    assert refused(token(claims)) == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize("email", [None, 5, ["a@b"]])
def test_non_string_email_is_ignored(email: Any) -> None:
    assert verify(token(valid_claims(email=email))).email is None


def test_expired() -> None:
    assert refused(token(valid_claims(exp=int(time.time()) - 10))) == CloseReason.TOKEN_EXPIRED


def test_expired_within_leeway_is_accepted() -> None:
    claims = valid_claims(exp=int(time.time()) - 5)
    assert verify(token(claims), leeway_seconds=60).user_id == "ann"


def test_expired_with_a_wrong_signature_is_invalid_not_expired() -> None:
    text = token(
        valid_claims(exp=int(time.time()) - 10), secret="other-secret-that-is-long-enough-for-hs256"
    )
    assert refused(text) == CloseReason.INVALID_TOKEN


def test_missing_exp() -> None:
    assert refused(token(valid_claims(exp=...))) == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize("exp", ["tomorrow", None])
def test_malformed_exp(exp: Any) -> None:
    assert refused(token(valid_claims(exp=exp))) == CloseReason.INVALID_TOKEN


def test_not_yet_valid() -> None:
    claims = valid_claims(nbf=int(time.time()) + 600)
    assert refused(token(claims)) == CloseReason.INVALID_TOKEN


def test_alg_none() -> None:
    text = jwt.encode(valid_claims(), None, algorithm="none")
    assert text.endswith(".")
    assert refused(text) == CloseReason.INVALID_TOKEN


def test_alg_none_is_refused_even_if_configured_with_hs256() -> None:
    text = jwt.encode(valid_claims(), None, algorithm="none")
    assert refused(text, algorithms=("HS256", "HS512")) == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_an_algorithm_not_configured(algorithm: str) -> None:
    assert refused(token(valid_claims(), algorithm=algorithm)) == CloseReason.INVALID_TOKEN


def test_another_algorithm_when_configured() -> None:
    text = token(valid_claims(), algorithm="HS512")
    assert verify(text, algorithms=("HS256", "HS512")).user_id == "ann"


def test_wrong_signature() -> None:
    text = token(valid_claims(), secret="a-different-secret-of-enough-length")
    assert refused(text) == CloseReason.INVALID_TOKEN


def test_tampered_payload() -> None:
    header, _, signature = token(valid_claims()).split(".")
    forged = token(valid_claims(sub="mallory")).split(".")[1]
    assert refused(f"{header}.{forged}.{signature}") == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize("text", ["", "garbage", "a.b.c", "eyJ.eyJ.x", "Bearer x"])
def test_not_a_jwt(text: str) -> None:
    assert refused(text) == CloseReason.INVALID_TOKEN


def test_type_access_is_accepted() -> None:
    assert verify(token(valid_claims(type="access"))).user_id == "ann"


@pytest.mark.parametrize("token_type", ["refresh", "ACCESS", "", None, 1])
def test_type_other_than_access(token_type: Any) -> None:
    assert refused(token(valid_claims(type=token_type))) == CloseReason.INVALID_TOKEN


@pytest.mark.parametrize("audience", [SLUG, [SLUG], ["other", SLUG]])
def test_audience_containing_the_slug(audience: Any) -> None:
    assert verify(token(valid_claims(aud=audience))).user_id == "ann"


@pytest.mark.parametrize("audience", ["other", ["other"], [], "todo2", "tod", 5, ""])
def test_audience_without_the_slug(audience: Any) -> None:
    assert refused(token(valid_claims(aud=audience))) == CloseReason.INVALID_TOKEN


def test_audience_is_checked_against_the_app_being_joined() -> None:
    text = token(valid_claims(aud="todo"))
    assert verify(text, "todo").user_id == "ann"
    assert refused(text, "chat") == CloseReason.INVALID_TOKEN


def test_auth_error_carries_the_close_reason() -> None:
    error = AuthError(CloseReason.TOKEN_EXPIRED)
    assert error.reason is CloseReason.TOKEN_EXPIRED
    assert str(error) == "token expired"
    assert str(CloseReason.INVALID_TOKEN) == "invalid token"
    assert str(CloseReason.AUTH_REQUIRED) == "authentication required"


# -- issue_token -------------------------------------------------------------------------------


def test_issue_token_round_trip() -> None:
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", email="ann@example.com")
    principal = verify(text)
    assert principal.user_id == "ann"
    assert principal.email == "ann@example.com"
    assert principal.claims["aud"] == SLUG
    assert principal.claims["type"] == "access"


def test_issue_token_claims() -> None:
    before = int(time.time())
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", ttl_seconds=120)
    claims = jwt.decode(text, SECRET, algorithms=["HS256"], audience=SLUG)
    after = int(time.time())
    assert jwt.get_unverified_header(text)["alg"] == "HS256"
    assert claims["sub"] == "ann"
    assert before <= claims["iat"] <= after
    assert claims["exp"] == claims["iat"] + 120
    assert "email" not in claims


def test_issued_token_is_for_its_app_only() -> None:
    text = issue_token(SECRET, app_slug="todo", user_id="ann")
    assert refused(text, "chat") == CloseReason.INVALID_TOKEN


def test_issued_token_expires() -> None:
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", ttl_seconds=-1)
    assert refused(text) == CloseReason.TOKEN_EXPIRED


def test_issue_token_extra_claims_reach_the_principal() -> None:
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", claims={"team": "red", "n": 3})
    principal = verify(text)
    assert principal.claims["team"] == "red"
    assert principal.placeholder_values()["$claims.team"] == "red"


def test_issue_token_claims_override_defaults() -> None:
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", claims={"type": "refresh"})
    assert refused(text) == CloseReason.INVALID_TOKEN


def test_issue_token_with_another_algorithm() -> None:
    text = issue_token(SECRET, app_slug=SLUG, user_id="ann", algorithm="HS512")
    assert jwt.get_unverified_header(text)["alg"] == "HS512"
    assert refused(text) == CloseReason.INVALID_TOKEN
    assert verify(text, algorithms=("HS512",)).user_id == "ann"


# -- resolve_secret ----------------------------------------------------------------------------


def test_secret_from_mdb_realtime_jwt_secret(tmp_path: Path) -> None:
    environ = {"MDB_REALTIME_JWT_SECRET": "one", "SECRET_KEY": "two"}
    assert resolve_secret(tmp_path, environ) == "one"
    assert not (tmp_path / SECRET_FILE_NAME).exists()


def test_secret_from_secret_key(tmp_path: Path) -> None:
    assert resolve_secret(tmp_path, {"SECRET_KEY": "two"}) == "two"
    assert resolve_secret(tmp_path, {"MDB_REALTIME_JWT_SECRET": "", "SECRET_KEY": "two"}) == "two"
    assert not (tmp_path / SECRET_FILE_NAME).exists()


def test_secret_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MDB_REALTIME_JWT_SECRET", "from-env")
    assert resolve_secret(tmp_path) == "from-env"
    monkeypatch.delenv("MDB_REALTIME_JWT_SECRET")
    monkeypatch.setenv("SECRET_KEY", "legacy")
    assert resolve_secret(tmp_path) == "legacy"


def test_generated_secret_is_kept_owner_only_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / ".mdb-realtime"
    first = resolve_secret(data_dir, {})
    path = data_dir / SECRET_FILE_NAME
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert path.read_text().strip() == first
    assert resolve_secret(data_dir, {}) == first
    assert resolve_secret(str(data_dir), {"MDB_REALTIME_JWT_SECRET": ""}) == first


def test_generated_secret_is_owner_only_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        resolve_secret(tmp_path, {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / SECRET_FILE_NAME).stat().st_mode) == 0o600


def test_generated_secrets_differ_between_data_dirs(tmp_path: Path) -> None:
    assert resolve_secret(tmp_path / "a", {}) != resolve_secret(tmp_path / "b", {})


def test_existing_secret_file_is_used(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE_NAME).write_text("kept-secret\n")
    assert resolve_secret(tmp_path, {}) == "kept-secret"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE_NAME).write_text("kept-secret")
    assert resolve_secret(tmp_path, {"SECRET_KEY": "env"}) == "env"


def test_generated_secret_signs_tokens_that_verify(tmp_path: Path) -> None:
    secret = resolve_secret(tmp_path, {})
    text = issue_token(resolve_secret(tmp_path, {}), app_slug=SLUG, user_id="ann")
    assert TokenVerifier(secret).verify(text, SLUG).user_id == "ann"


# -- Principal ---------------------------------------------------------------------------------


def test_anonymous_placeholder_values() -> None:
    assert ANONYMOUS.placeholder_values() == {"$user.id": None, "$user.email": None}
    assert not ANONYMOUS.authenticated


def test_anonymous_claims_are_never_placeholders() -> None:
    principal = Principal(claims={"team": "red"})
    assert principal.placeholder_values() == {"$user.id": None, "$user.email": None}


def test_authenticated_placeholder_values() -> None:
    principal = Principal(
        user_id="ann", email="ann@example.com", claims={"sub": "ann", "team": "red", "n": 2}
    )
    assert principal.authenticated
    assert principal.placeholder_values() == {
        "$user.id": "ann",
        "$user.email": "ann@example.com",
        "$claims.sub": "ann",
        "$claims.team": "red",
        "$claims.n": 2,
    }


def test_placeholder_values_of_a_verified_token() -> None:
    principal = verify(token(valid_claims(team="red")))
    values = principal.placeholder_values()
    assert values["$user.id"] == "ann"
    assert values["$user.email"] is None
    assert values["$claims.team"] == "red"
    assert "$claims.exp" in values
