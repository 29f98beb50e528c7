"""`POST /<slug>/broadcast` for back ends that are not Python: service tokens, bodies, delivery."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from engine.auth import issue_token
from engine.client import RealtimeClient
from tests.conftest import RunningApp
from tests.support import TEST_SECRET


def service_token(app: str | list[str] | None = "todo", **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": "backend", "role": "service", "exp": time.time() + 3600}
    if app is not None:
        payload["aud"] = app
    payload.update(claims)
    return jwt.encode(payload, TEST_SECRET, algorithm="HS256")


async def post(
    app: RunningApp, body: Any = None, token: str | None = None, content: bytes | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        if content is not None:
            return await http.post("/todo/broadcast", content=content, headers=headers)
        return await http.post("/todo/broadcast", json=body, headers=headers)


GOOD_BODY = {"message": {"type": "notice", "text": "hello"}}


@pytest.mark.parametrize(
    ("token", "status", "detail"),
    [
        (None, 401, "service token is required"),
        ("not-a-jwt", 401, "invalid token"),
        (service_token(exp=time.time() - 5), 401, "token expired"),
        (jwt.encode({"role": "service", "aud": "todo"}, TEST_SECRET), 401, "invalid token"),
        (service_token(type="refresh"), 401, "invalid token"),
        (
            jwt.encode(
                {"role": "service", "aud": "todo", "exp": time.time() + 3600},
                "a-different-secret-that-is-long-enough",
            ),
            401,
            "invalid token",
        ),
        (issue_token(TEST_SECRET, app_slug="todo", user_id="ann"), 403, "not a service token"),
        (service_token(app="other"), 403, "not for app 'todo'"),
        (service_token(app=None), 403, "not for app 'todo'"),
    ],
    ids=[
        "missing",
        "garbage",
        "expired",
        "no-exp",
        "refresh-type",
        "bad-signature",
        "user-token",
        "other-app",
        "no-audience",
    ],
)
async def test_bad_tokens_are_refused(
    demo_app: RunningApp, token: str | None, status: int, detail: str
) -> None:
    response = await post(demo_app, GOOD_BODY, token)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_tokens_are_checked_before_the_body(demo_app: RunningApp) -> None:
    response = await post(demo_app, content=b"not json", token="garbage")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "where"),
    [
        (b"not json", 400, None),
        ({}, 422, ["message"]),
        ({"message": "hello"}, 422, ["message"]),
        ({"message": {"text": "no type"}}, 422, ["message"]),
        ({"message": {"type": 3}}, 422, ["message"]),
        ({"message": {"type": ""}}, 422, ["message"]),
        ({"message": {"type": "x"}, "user_id": 7}, 422, ["user_id"]),
        ({"message": {"type": "x"}, "extra": 1}, 422, ["extra"]),
        ([1, 2], 422, []),
    ],
)
async def test_bad_bodies_are_refused(
    demo_app: RunningApp, body: Any, status: int, where: list[str] | None
) -> None:
    token = service_token()
    if isinstance(body, bytes):
        response = await post(demo_app, content=body, token=token)
    else:
        response = await post(demo_app, body, token)
    assert response.status_code == status, response.text
    if where is not None:
        assert response.json()["detail"][0]["loc"] == where


async def test_broadcast_reaches_the_app_or_one_user(demo_app: RunningApp) -> None:
    url = demo_app.server.ws_url("/todo/ws")

    def user_token(user: str) -> str:
        return issue_token(TEST_SECRET, app_slug="todo", user_id=user)

    async with (
        RealtimeClient(url, token=user_token("ann")) as ann,
        RealtimeClient(url, token=user_token("bob")) as bob,
    ):
        token = service_token(app=["billing", "todo"])  # an audience list naming the app
        bob_notice = bob.next_message("notice")
        response = await post(demo_app, GOOD_BODY, token)
        assert response.status_code == 200 and response.json() == {"reached": 2}
        received = await bob_notice
        assert received["text"] == "hello" and received["app_slug"] == "todo"
        assert received["timestamp"].endswith("Z")

        only_ann = ann.next_message("notice", lambda m: m["text"] == "for ann")
        body = {"message": {"type": "notice", "text": "for ann"}, "user_id": "ann"}
        assert (await post(demo_app, body, token)).json() == {"reached": 1}
        assert (await only_ann)["text"] == "for ann"
        assert (await post(demo_app, body | {"user_id": "nobody"}, token)).json() == {"reached": 0}


async def test_unknown_app_is_not_found(demo_app: RunningApp) -> None:
    async with httpx.AsyncClient(base_url=demo_app.server.url) as http:
        response = await http.post(
            "/nope/broadcast",
            json=GOOD_BODY,
            headers={"Authorization": f"Bearer {service_token(app='nope')}"},
        )
    assert response.status_code == 404
