"""The equalities a query implies, as keys a recipient index can look up.

`equality_keys(query)` is a set of (path, key) pairs such that a document can match the query
only if, at one of those paths, it holds a value with that key (`query.value_key`). It is a
necessary condition, never a sufficient one: the full matcher still decides. Where a query
implies no such set (ranges, `$regex`, `$ne`, `$exists`, comparisons with documents, arrays or
null) the answer is None and the query is evaluated on every change.

- `{"a": v}`, `{"a": {"$eq": v}}`: {("a", key(v))}
- `{"a": {"$in": [v, w]}}`: {("a", key(v)), ("a", key(w))}; `{"$in": []}` matches nothing: {}
- `{"a": {"$all": [v, w]}}`: either value must be present: the smaller set, {("a", key(v))}
- `{"$and": [q, r]}`, several fields: each part is necessary: the smallest part's set
- `{"$or": [q, r]}`: one branch must hold: the union, if every branch has a set
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from engine.query import is_operator_document, is_regex, value_key

EqualityKeys = frozenset[tuple[str, Hashable]]


def equality_keys(query: Mapping[str, Any] | None) -> EqualityKeys | None:
    """(path, key) pairs one of which every matching document holds; None if there are none."""
    if not query:
        return None
    parts: list[EqualityKeys | None] = []
    for name, value in query.items():
        if name == "$and" and isinstance(value, list | tuple):
            parts.extend(equality_keys(branch) for branch in value if isinstance(branch, Mapping))
        elif name == "$or" and isinstance(value, list | tuple):
            branches = (equality_keys(b) if isinstance(b, Mapping) else None for b in value)
            parts.append(_union(branches))
        elif isinstance(name, str) and not name.startswith("$"):
            parts.append(_field_keys(name, value))
    return smallest(parts)


def smallest(candidates: Iterable[EqualityKeys | None]) -> EqualityKeys | None:
    """The smallest of the sets that exist (each is necessary, so any one of them will do)."""
    best: EqualityKeys | None = None
    for keys in candidates:
        if keys is not None and (best is None or len(keys) < len(best)):
            best = keys
    return best


def _union(branches: Iterable[EqualityKeys | None]) -> EqualityKeys | None:
    result: set[tuple[str, Hashable]] = set()
    for keys in branches:
        if keys is None:
            return None
        result |= keys
    return frozenset(result)


def _field_keys(path: str, value: Any) -> EqualityKeys | None:
    if is_regex(value):
        return None
    if not is_operator_document(value):
        return _value_keys(path, [value])
    parts: list[EqualityKeys | None] = []
    for op, argument in value.items():
        if op == "$eq":
            parts.append(_value_keys(path, [argument]))
        elif op == "$in" and isinstance(argument, list | tuple):
            parts.append(_value_keys(path, argument))
        elif op == "$all" and isinstance(argument, list | tuple) and argument:
            parts.append(smallest(_value_keys(path, [item]) for item in argument))
    return smallest(parts)


def _value_keys(path: str, values: Iterable[Any]) -> EqualityKeys | None:
    """Keys of values compared for equality; None if one of them has none (or is null, which
    also matches a missing field, or a pattern or operator object, which are not equality)."""
    keys = set()
    for value in values:
        if value is None or is_regex(value) or is_operator_document(value):
            return None
        key = value_key(value)
        if key is None:
            return None
        keys.add((path, key))
    return frozenset(keys)
