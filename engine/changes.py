"""Change-stream documents turned into ChangeEvents, projections, and change messages (SPEC 5)."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson import Timestamp

DATA_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
# Events that end or reshape a stream; logged and handled by the watcher, never sent to clients.
LIFECYCLE_OPERATIONS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})

Fields = tuple[str, ...] | None  # projection paths; None is the whole document


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One committed write to a watched collection, as the engine routes it."""

    event_id: str  # opaque position: the resume token's data
    resume_token: Mapping[str, Any]
    operation: str  # insert, update, replace or delete
    database: str
    collection: str  # physical collection name
    document_id: Any
    document: Mapping[str, Any] | None  # full document after the change, when known
    before: Mapping[str, Any] | None  # pre-image, where the collection records them
    updated_fields: Mapping[str, Any] | None
    removed_fields: Sequence[str] | None
    cluster_time: Timestamp | None
    timestamp: str  # cluster time as ISO-8601 UTC
    # `document` is the state this change left (not a later lookup): always for inserts and
    # replaces, and for updates rebuilt from the pre-image and the update description.
    exact: bool = True


def cluster_time_iso(cluster_time: Timestamp | None) -> str:
    if cluster_time is None:
        return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    moment = dt.datetime.fromtimestamp(cluster_time.time, dt.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def event_id_of(token: Mapping[str, Any]) -> str:
    data = token.get("_data")
    return data if isinstance(data, str) else str(data)


def normalize(raw: Mapping[str, Any]) -> ChangeEvent | None:
    """The ChangeEvent of a raw change document; None for anything but a data change."""
    operation = raw.get("operationType")
    if operation not in DATA_OPERATIONS:
        return None
    namespace = raw.get("ns") or {}
    description = raw.get("updateDescription") or {}
    cluster_time = raw.get("clusterTime")
    before = raw.get("fullDocumentBeforeChange")
    document = raw.get("fullDocument") if operation != "delete" else None
    exact = True
    if operation == "update":
        if before is not None:
            document = apply_update_description(before, description)
        else:
            exact = False  # a lookup: the document as it is now, maybe after later writes
    return ChangeEvent(
        event_id=event_id_of(raw["_id"]),
        resume_token=raw["_id"],
        operation=operation,
        database=namespace.get("db", ""),
        collection=namespace.get("coll", ""),
        document_id=(raw.get("documentKey") or {}).get("_id"),
        document=document,
        before=before,
        updated_fields=description.get("updatedFields") if operation == "update" else None,
        removed_fields=description.get("removedFields") if operation == "update" else None,
        cluster_time=cluster_time,
        timestamp=cluster_time_iso(cluster_time),
        exact=exact,
    )


def apply_update_description(
    before: Mapping[str, Any], description: Mapping[str, Any]
) -> dict[str, Any]:
    """The document an update left: its pre-image with the update description applied."""
    document = copy.deepcopy(dict(before))
    for path, value in (description.get("updatedFields") or {}).items():
        _set_path(document, path.split("."), value)
    for path in description.get("removedFields") or ():
        _unset_path(document, path.split("."))
    for truncation in description.get("truncatedArrays") or ():
        array = _get_path(document, str(truncation.get("field", "")).split("."))
        if isinstance(array, list):
            del array[int(truncation.get("newSize", len(array))) :]
    return document


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part) if isinstance(node, Mapping) else None


def _get_path(document: Any, parts: list[str]) -> Any:
    for part in parts:
        document = _child(document, part)
    return document


def _set_path(document: Any, parts: list[str], value: Any) -> None:
    node = document
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if isinstance(node, list) and part.isdigit():
            position = int(part)
            node.extend([None] * (position + 1 - len(node)))
            if last:
                node[position] = value
            elif not isinstance(node[position], dict | list):
                node[position] = {}
            node = node[position]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part] if not last else node
        else:
            return


def _unset_path(document: Any, parts: list[str]) -> None:
    parent = _get_path(document, parts[:-1])
    if isinstance(parent, dict):
        parent.pop(parts[-1], None)
    elif isinstance(parent, list) and parts[-1].isdigit() and int(parts[-1]) < len(parent):
        parent[int(parts[-1])] = None  # $unset on an element leaves null, as MongoDB does


# -- projection ------------------------------------------------------------------------------


FieldTree = dict[str, "FieldTree | None"]  # None: the whole value at this key


def _field_tree(fields: Iterable[str]) -> FieldTree:
    """{"a.b", "c"} -> {"a": {"b": None}, "c": None}; a shorter path wins over a longer one."""
    tree: FieldTree = {}
    for path in fields:
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            if part in node and node[part] is None:
                break  # an enclosing path already takes the whole value
            child = node.setdefault(part, {})
            assert child is not None
            node = child
        else:
            node[leaf] = None
    return tree


def _project_value(value: Any, tree: FieldTree | None) -> Any:
    if tree is None:
        return value
    if isinstance(value, Mapping):
        return _project_document(value, tree)
    if isinstance(value, list):
        # As MongoDB does: keep projected subdocuments of the array, drop other elements.
        return [_project_value(item, tree) for item in value if isinstance(item, Mapping | list)]
    return _SKIP


class _Skip:
    pass


_SKIP = _Skip()


def _project_document(document: Mapping[str, Any], tree: FieldTree) -> dict[str, Any]:
    projected: dict[str, Any] = {}
    for key, value in document.items():
        if key not in tree:
            continue
        sub = _project_value(value, tree[key])
        if sub is not _SKIP:
            projected[key] = sub
    return projected


def project(document: Mapping[str, Any], fields: Fields) -> dict[str, Any]:
    """The document with only `fields` (dotted paths) and `_id`."""
    if fields is None:
        return dict(document)
    projected = _project_document(document, _field_tree(fields))
    if "_id" in document:
        projected = {"_id": document["_id"], **projected}
    return projected


def _path_relation(path: str, fields: Sequence[str]) -> str | None:
    """'inside' if `path` is a field or under one, 'above' if fields lie under it, else None."""
    for field in fields:
        if path == field or path.startswith(field + "."):
            return "inside"
    for field in fields:
        if field.startswith(path + "."):
            return "above"
    return None


def _logical_path(path: str, document: Mapping[str, Any] | None) -> str:
    """The path without positions into arrays ("a.0.b" -> "a.b" when `a` is an array)."""
    if document is None or not any(part.isdigit() for part in path.split(".")):
        return path
    kept: list[str] = []
    node: Any = document
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else None
            continue
        kept.append(part)
        node = node.get(part) if isinstance(node, Mapping) else None
    return ".".join(kept)


def project_update(
    updated_fields: Mapping[str, Any],
    removed_fields: Sequence[str],
    fields: Fields,
    document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The update description limited to `fields`, in the message's snake_case shape.

    `document` (the full document after the update) tells array positions in paths apart
    from numeric keys of subdocuments.
    """
    if fields is None:
        return {"updated_fields": dict(updated_fields), "removed_fields": list(removed_fields)}
    updated: dict[str, Any] = {}
    removed: list[str] = []
    for path, value in updated_fields.items():
        logical = _logical_path(path, document)
        relation = _path_relation(logical, fields)
        if relation == "inside":
            updated[path] = value
        elif relation == "above":
            prefix = logical + "."
            inner = tuple(f[len(prefix) :] for f in fields if f.startswith(prefix))
            sub = _project_value(value, _field_tree(inner))
            if sub is not _SKIP:
                updated[path] = sub
            elif logical == path:
                removed.append(path)  # a scalar now: the projected fields under it are gone
    for path in removed_fields:
        if _path_relation(_logical_path(path, document), fields) is not None:
            removed.append(path)
    return {"updated_fields": updated, "removed_fields": removed}


def narrow_fields(allowed: Fields, requested: Fields) -> Fields:
    """Fields a subscription may see: what it asks for, within what the manifest allows."""
    if requested is None:
        return allowed
    if allowed is None:
        return requested
    kept = [f for f in requested if _path_relation(f, allowed) == "inside"]
    kept += [f for f in allowed if _path_relation(f, requested) == "inside" and f not in kept]
    return tuple(kept)


def union_fields(field_sets: Iterable[Fields]) -> Fields:
    """Fields of several subscriptions together; None (everything) wins."""
    union: list[str] = []
    for fields in field_sets:
        if fields is None:
            return None
        union.extend(f for f in fields if f not in union)
    return tuple(union)


def change_message(
    event: ChangeEvent,
    *,
    app_slug: str,
    endpoint: str,
    collection: str,
    operation: str,
    fields: Fields,
    reason: str | None = None,
    describe_update: bool = True,
) -> dict[str, Any]:
    """The `change` message one group of connections receives for an event."""
    document = None
    update = None
    if operation != "delete" and event.document is not None:
        document = project(event.document, fields)
        if (
            operation == "update"
            and describe_update
            and event.updated_fields is not None
            and reason is None
        ):
            update = project_update(
                event.updated_fields, event.removed_fields or (), fields, event.document
            )
    message: dict[str, Any] = {
        "type": "change",
        "id": event.event_id,
        "app_slug": app_slug,
        "endpoint": endpoint,
        "collection": collection,
        "operation": operation,
        "document_id": event.document_id,
        "document": document,
        "update": update,
        "timestamp": event.timestamp,
    }
    if reason is not None:
        message["reason"] = reason
    return message
