"""Who may join a room: the `join` rule of a room pattern (SPEC 11), checked and applied.

Two kinds of rule:
- a query over `{"user": {"id", "email"}, "claims": {...}, "room": {params}}`, e.g.
  `{"claims.team": "$room.team"}`, matched in process;
- `{"collection": "docs", "match": {...}}`: a document of that app collection must match at
  join time; the engine asks the database, never the client.
Values may be the placeholders `$user.id`, `$user.email`, `$claims.<name>` and
`$room.<param>`. No rule: any authenticated connection. Anonymous connections never join.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from engine.auth import Principal
from engine.query import (
    QueryError,
    compile_query,
    placeholders_in,
    substitute_placeholders,
    validate_query,
)

MEMBERSHIP_KEYS = frozenset({"collection", "match"})


@dataclass(frozen=True)
class JoinRule:
    """A compiled `join` rule; both None: any authenticated connection may join."""

    query: Mapping[str, Any] | None = None  # over user / claims / room
    collection: str | None = None  # with `match`: a membership document must exist
    match: Mapping[str, Any] | None = None

    @property
    def needs_database(self) -> bool:
        return self.collection is not None


def is_membership_rule(join: Mapping[str, Any]) -> bool:
    return "collection" in join or "match" in join


def join_rule_problems(join: Any, params: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every problem of a `join` rule, as (path below `join`, message)."""
    if not isinstance(join, Mapping):
        return [("", 'must be an object (a query, or {"collection", "match"})')]
    if is_membership_rule(join):
        return _membership_problems(join, params)
    return _query_problems(join, "", params)


def _membership_problems(join: Mapping[str, Any], params: tuple[str, ...]) -> list[tuple[str, str]]:
    problems = [
        (str(key), 'unknown key; a membership rule has only "collection" and "match"')
        for key in join
        if key not in MEMBERSHIP_KEYS
    ]
    collection = join.get("collection")
    if not isinstance(collection, str) or not collection:
        problems.append(("collection", "must be the name of a collection of the app"))
    elif "$" in collection or "\x00" in collection or collection.startswith("system."):
        problems.append(("collection", f"{collection!r} is not a valid collection name"))
    match = join.get("match")
    if not isinstance(match, Mapping) or not match:
        problems.append(("match", "must be a non-empty query the membership document matches"))
    else:
        problems += _query_problems(match, "match", params)
    return problems


def _query_problems(
    query: Mapping[str, Any], prefix: str, params: tuple[str, ...]
) -> list[tuple[str, str]]:
    def at(path: str) -> str:
        return ".".join(part for part in (prefix, path) if part)

    try:
        validate_query(query, room_placeholders=True)
    except QueryError as error:
        return [(at(error.path), error.message)]
    unknown = sorted(
        name.removeprefix("$room.")
        for name in placeholders_in(query, room=True)
        if name.startswith("$room.") and name.removeprefix("$room.") not in params
    )
    if unknown:
        have = ", ".join(params) or "none"
        message = f"$room.{unknown[0]} is not a parameter of this pattern (parameters: {have})"
        return [(prefix, message)]
    return []


def parse_join_rule(join: Mapping[str, Any] | None) -> JoinRule:
    """The rule of a `join` that `join_rule_problems` found valid."""
    if join is None:
        return JoinRule()
    if is_membership_rule(join):
        return JoinRule(collection=str(join["collection"]), match=join["match"])
    return JoinRule(query=join)


def placeholder_values(principal: Principal, params: Mapping[str, str]) -> dict[str, Any]:
    values = principal.placeholder_values()
    values.update({f"$room.{name}": value for name, value in params.items()})
    return values


def context_document(principal: Principal, params: Mapping[str, str]) -> dict[str, Any]:
    """What a query rule is matched against."""
    return {
        "user": {"id": principal.user_id, "email": principal.email},
        "claims": dict(principal.claims),
        "room": dict(params),
    }


def query_rule_allows(rule: JoinRule, principal: Principal, params: Mapping[str, str]) -> bool:
    """Whether a principal may join by a query rule (or by no rule): no database involved."""
    if not principal.authenticated:
        return False
    if rule.query is None:
        return True
    bound = substitute_placeholders(rule.query, placeholder_values(principal, params), room=True)
    if bound is None:  # a placeholder without a value (a missing claim): no match
        return False
    try:
        return compile_query(bound)(context_document(principal, params))
    except QueryError:  # a claim value that cannot be compared: data never becomes a query
        return False


def membership_queries(
    rule: JoinRule, principal: Principal, params: Mapping[str, str], app_slug: str
) -> list[dict[str, Any]]:
    """The database queries of a membership rule, any of which admits the principal.

    A parameter that looks like an ObjectId is tried as one too (room names are text, `_id`s
    are often ObjectIds). Documents of another app (`app_id`, mdb-engine's scoped writes)
    never admit anyone. Empty: the rule cannot match (a placeholder without a value).
    """
    assert rule.match is not None
    variants: list[Mapping[str, Any]] = [params]
    as_ids = {k: ObjectId(v) for k, v in params.items() if ObjectId.is_valid(v) and len(v) == 24}
    if as_ids:
        variants.append({**params, **as_ids})
    queries = []
    for variant in variants:
        values = principal.placeholder_values()
        values.update({f"$room.{name}": value for name, value in variant.items()})
        bound = substitute_placeholders(rule.match, values, room=True)
        if bound is None:
            return []
        same_app = {"$or": [{"app_id": {"$exists": False}}, {"app_id": app_slug}]}
        queries.append({"$and": [bound, same_app]})
    return queries
