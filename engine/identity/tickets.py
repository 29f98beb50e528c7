"""Connection tickets: a long-lived token is traded for a short-lived, single-use ticket
that travels in the WebSocket URL instead (`?ticket=...`), so proxies, browser history and
access logs never hold the token.

Tickets live in MongoDB, so a ticket issued by one engine process opens a connection on any
other. Only a digest of the ticket is stored (reading the collection does not hand out usable
tickets); redeeming deletes it in the same operation (`find_one_and_delete`), so two
processes can never both accept it. A TTL index removes the ones never used; the expiry is
also checked on redeem, since MongoDB's TTL monitor runs only once a minute.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from engine import codec
from engine.identity.tokens import AuthError, Principal, principal_from_claims
from engine.protocol import CloseReason

if TYPE_CHECKING:
    from engine.identity.providers import AppIdentity

logger = logging.getLogger("engine.identity.tickets")

TICKET_COLLECTION = "mdb_realtime_tickets"
# A recognisable prefix lets log redaction find a ticket anywhere, not only in a URL.
TICKET_PREFIX = "mrt_"


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TicketStore:
    """Issues and redeems tickets in one MongoDB collection."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection

    async def prepare(self) -> None:
        with contextlib.suppress(PyMongoError):
            await self.collection.create_index("expires_at", expireAfterSeconds=0)

    async def issue(self, app_slug: str, principal: Principal, ttl_seconds: int) -> str:
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        await self.collection.insert_one(
            {
                "_id": _digest(ticket),
                "app": app_slug,
                # As JSON text: claim names may hold `.` or start with `$`.
                "claims": str(codec.dumps(dict(principal.claims))),
                "expires_at": _now() + dt.timedelta(seconds=ttl_seconds),
            }
        )
        return ticket

    async def redeem(self, app_slug: str, ticket: str) -> Principal | None:
        """The principal of a valid ticket of this app, which is used up; None otherwise."""
        if not ticket.startswith(TICKET_PREFIX) or len(ticket) > 200:
            return None
        try:
            document = await self.collection.find_one_and_delete(
                {"_id": _digest(ticket), "app": app_slug, "expires_at": {"$gt": _now()}}
            )
        except PyMongoError as error:
            logger.warning("cannot redeem a ticket: %s", type(error).__name__)
            return None
        if document is None:
            return None
        try:
            claims = codec.loads(document["claims"])
            return principal_from_claims(claims, app_slug, audience_checked=True)
        except (AuthError, ValueError, KeyError, TypeError):
            return None


def add_ticket_route(app: FastAPI, app_slug: str, identity: Callable[[], AppIdentity]) -> str:
    """Mount `POST /<slug>/ticket`: Authorization: Bearer <token> -> {"ticket", "expires_in"}."""

    async def ticket_route(request: Request) -> JSONResponse:
        verifier = identity()
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        token = credentials.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("a token is required: Authorization: Bearer <token>")
        try:
            principal = await verifier.verify(token)
        except AuthError as refused:
            raise _unauthorized(str(refused.reason)) from None
        if principal.expires_at is not None and principal.expires_at <= _now().timestamp():
            raise _unauthorized(str(CloseReason.TOKEN_EXPIRED))
        store = verifier.tickets
        if store is None:
            raise HTTPException(503, "tickets need the engine's database, which is not ready")
        ttl = verifier.ticket_ttl_seconds
        try:
            ticket = await store.issue(app_slug, principal, ttl)
        except PyMongoError:
            raise HTTPException(503, "the database does not answer; try again") from None
        return JSONResponse(
            {"ticket": ticket, "expires_in": ttl},
            headers={"Cache-Control": "no-store"},
        )

    path = f"/{app_slug}/ticket"
    app.add_api_route(
        path,
        ticket_route,
        methods=["POST"],
        name=f"{app_slug}:ticket",
        summary=f"A single-use connection ticket for app {app_slug!r}",
    )
    return path


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
