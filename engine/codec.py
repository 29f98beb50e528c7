"""JSON encoding of messages, with BSON values turned into plain JSON (SPEC 5)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import orjson
from bson import Binary, Code, DBRef, Decimal128, MaxKey, MinKey, ObjectId, Regex, Timestamp

from engine.frames import Frame

# Datetimes pass through to `_bson_default` so that every zone is converted to UTC.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _bson_default(value: Any) -> Any:
    """JSON form of values orjson does not know: called only for those, so the common path is C."""
    if isinstance(value, dt.datetime):
        return _utc_iso(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, ObjectId | Decimal128):
        return str(value)
    if isinstance(value, Timestamp):
        return _utc_iso(value.as_datetime())
    if isinstance(value, bytes | Binary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Regex):
        return value.pattern
    if isinstance(value, Code):
        return str(value)
    if isinstance(value, DBRef):
        return value.as_doc().to_dict()
    if isinstance(value, MinKey | MaxKey):
        return type(value).__name__
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    pattern = getattr(value, "pattern", None)
    if isinstance(pattern, str):  # compiled re.Pattern
        return pattern
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _utc_iso(value: dt.datetime) -> str:
    """ISO-8601 in UTC with a Z; naive datetimes are UTC already (that is how BSON stores them)."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def dumps(message: Any) -> Frame:
    """Encode a message as JSON text (a Frame: its wire form is built once, when first sent).
    Raises TypeError for values that have no JSON form."""
    return Frame(orjson.dumps(message, default=_bson_default, option=_OPTIONS).decode("utf-8"))


def loads(text: str | bytes) -> Any:
    """Decode JSON text; raises ValueError (orjson.JSONDecodeError) on bad input."""
    if isinstance(text, str) and type(text) is not str:
        text = str(text)  # orjson reads exact str only (a Frame is a str subclass)
    return orjson.loads(text)


def utc_now_iso() -> str:
    """Current time as ISO-8601 UTC with a trailing Z, the form every timestamp takes."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_utc(unix_time: float | None) -> str | None:
    """A unix time as ISO-8601 UTC with a trailing Z (None stays None)."""
    if unix_time is None:
        return None
    moment = dt.datetime.fromtimestamp(unix_time, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
