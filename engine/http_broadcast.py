"""`POST /<slug>/broadcast`: app back ends that are not Python push messages to their clients.

The caller proves it is the app's back end with a service token: a JWT signed and checked
like connection tokens (secret, algorithms, `exp`, `type`), that also carries
`role: "service"` and an `aud` naming the app. A user's access token is never enough.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from engine.identity.tokens import AuthError, TokenVerifier

SERVICE_ROLE = "service"

Broadcast = Callable[[str, dict[str, Any], str | None], Awaitable[int]]


class BroadcastBody(BaseModel):
    """{"message": {"type": "...", ...}, "user_id"?: "..."}"""

    model_config = ConfigDict(extra="forbid")

    message: dict[str, Any]
    user_id: str | None = None

    @field_validator("message")
    @classmethod
    def _message_has_type(cls, message: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(message.get("type"), str) or not message["type"]:
            raise ValueError("message needs a non-empty string `type`")
        return message


class BroadcastResult(BaseModel):
    reached: int


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="service"'})


def bearer_token(request: Request) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise _unauthorized("a service token is required: Authorization: Bearer <token>")
    return credentials.strip()


def verify_service_token(verifier: TokenVerifier, token: str, app_slug: str) -> dict[str, Any]:
    """The token's claims; 401 when it is not a valid token, 403 when it is valid but not a
    service token of this app."""
    try:
        claims = verifier.claims(token)
    except AuthError as refused:
        raise _unauthorized(str(refused.reason)) from None
    if claims.get("type", "access") != "access":
        raise _unauthorized("invalid token")
    if claims.get("role") != SERVICE_ROLE:
        raise HTTPException(403, 'not a service token (needs the claim role: "service")')
    audience = claims.get("aud")
    if not (audience == app_slug or (isinstance(audience, list) and app_slug in audience)):
        raise HTTPException(403, f"this service token is not for app {app_slug!r} (see `aud`)")
    return claims


async def read_body(request: Request) -> BroadcastBody:
    """The request body: 400 when it is not JSON, 422 when it is JSON of the wrong shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError:
        raise HTTPException(400, 'the body must be JSON: {"message": {"type": ...}}') from None
    try:
        return BroadcastBody.model_validate(data)
    except ValidationError as error:
        raise HTTPException(
            422, jsonable_encoder(error.errors(include_url=False, include_context=False))
        ) from None


def add_broadcast_route(
    app: FastAPI,
    app_slug: str,
    verifier: Callable[[], TokenVerifier],
    broadcast: Broadcast,
) -> str:
    """Mount `POST /<slug>/broadcast`; the mounted path."""

    async def broadcast_route(request: Request) -> BroadcastResult:
        # The token is checked before the body is read: callers without a valid service token
        # learn nothing about what a good body looks like.
        verify_service_token(verifier(), bearer_token(request), app_slug)
        body = await read_body(request)
        reached = await broadcast(app_slug, body.message, body.user_id)
        return BroadcastResult(reached=reached)

    path = f"/{app_slug}/broadcast"
    app.add_api_route(
        path,
        broadcast_route,
        methods=["POST"],
        name=f"{app_slug}:broadcast",
        summary=f"Broadcast a message to the clients of app {app_slug!r}",
        response_model=BroadcastResult,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": BroadcastBody.model_json_schema()}},
            }
        },
    )
    return path
