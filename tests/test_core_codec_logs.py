"""Unit tests of engine.codec (BSON values as JSON, SPEC 5) and engine.logs (no token in logs).

Log redaction is checked on real logging handlers that write to memory.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from bson import (
    SON,
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.tz_util import utc as bson_utc
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import codec
from engine.auth import issue_token
from engine.logs import REDACTED, RedactingFilter, install_redaction, logging_config, redact

OID = ObjectId("65a0000000000000000000ff")
ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJhbm4iLCJleHAiOjE3MDAwMDAwMDB9"
    ".Zm9vYmFyYmF6cXV4LXNpZ25hdHVyZV9fXw"
)


def encode(value: Any) -> Any:
    """The JSON form of one value, decoded back to Python."""
    return codec.loads(codec.dumps({"v": value}))["v"]


# -- codec: BSON values ------------------------------------------------------------------------


def test_object_id_is_its_hex_string() -> None:
    assert encode(OID) == "65a0000000000000000000ff"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal128("9.99"), "9.99"),
        (Decimal128("1.10"), "1.10"),  # trailing zeros kept: it is a decimal, not a float
        (Decimal128("-0"), "-0"),
        (Decimal128("1E+3"), "1E+3"),
        (Decimal128("NaN"), "NaN"),
        (Decimal128(Decimal("12345678901234567890.1234")), "12345678901234567890.1234"),
    ],
)
def test_decimal128_is_its_string(value: Decimal128, expected: str) -> None:
    assert encode(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05Z"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 123000), "2024-01-02T03:04:05.123000Z"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "2024-01-02T03:04:05Z"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=bson_utc), "2024-01-02T03:04:05Z"),
        (dt.datetime(1970, 1, 1), "1970-01-01T00:00:00Z"),
    ],
)
def test_utc_datetimes(value: dt.datetime, expected: str) -> None:
    # PyMongo gives naive datetimes in UTC (or aware UTC ones with tz_aware=True).
    assert encode(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            dt.datetime(2024, 1, 2, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2024-01-02T10:00:00Z",
        ),
        (
            dt.datetime(2024, 1, 2, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            "2024-01-02T06:00:00Z",
        ),
        (dt.datetime(2024, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Paris")), "2024-07-01T10:00:00Z"),
    ],
)
def test_aware_datetimes_in_other_zones_become_utc(value: dt.datetime, expected: str) -> None:
    # SPEC 5 / docs/protocol.md: datetimes are ISO-8601 UTC with Z, whatever zone app code used.
    assert encode(value) == expected


def test_timestamp_is_its_time_in_utc() -> None:
    assert encode(Timestamp(1_700_000_000, 5)) == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\x01\xfe\xff",
        b"",
        Binary(b"\x00\x01\xfe\xff"),
        Binary(b"\x00\x01\xfe\xff", 0x80),
        Binary(uuid.UUID("12345678-1234-5678-1234-567812345678").bytes, 4),
    ],
)
def test_binary_is_base64(value: bytes) -> None:
    assert encode(value) == base64.b64encode(bytes(value)).decode("ascii")
    assert base64.b64decode(encode(value)) == bytes(value)


def test_regex_is_its_pattern() -> None:
    assert encode(Regex("^ab+c$", "i")) == "^ab+c$"
    assert encode(re.compile(r"\d+")) == r"\d+"


def test_other_bson_types() -> None:
    assert encode(Code("function() {}")) == "function() {}"
    assert encode(MinKey()) == "MinKey"
    assert encode(MaxKey()) == "MaxKey"
    assert encode(DBRef("things", OID)) == {"$ref": "things", "$id": str(OID)}
    assert encode(Int64(2**40)) == 2**40
    assert encode(SON([("b", 1), ("a", OID)])) == {"b": 1, "a": str(OID)}


def test_python_containers_and_scalars() -> None:
    assert encode((1, 2)) == [1, 2]
    assert sorted(encode({3, 1})) == [1, 3]
    assert encode(frozenset({"x"})) == ["x"]
    assert encode(uuid.UUID("12345678-1234-5678-1234-567812345678")) == (
        "12345678-1234-5678-1234-567812345678"
    )
    assert encode(dt.date(2024, 2, 29)) == "2024-02-29"
    assert encode(None) is None
    assert encode(True) is True
    assert encode(1.5) == 1.5
    assert encode("é ✓ \u2028") == "é ✓ \u2028"


def test_non_string_keys() -> None:
    assert codec.loads(codec.dumps({1: "a", None: "b"})) == {"1": "a", "null": "b"}


def test_nested_values() -> None:
    document = {
        "_id": OID,
        "items": [
            {"sku": OID, "price": Decimal128("1.50"), "at": dt.datetime(2024, 5, 6, 7, 8, 9)},
            [b"\x01", Timestamp(0, 1), {"deep": [{"deeper": Decimal128("2")}]}],
        ],
        "meta": SON([("seen", (OID,))]),
    }
    assert codec.loads(codec.dumps(document)) == {
        "_id": str(OID),
        "items": [
            {"sku": str(OID), "price": "1.50", "at": "2024-05-06T07:08:09Z"},
            ["AQ==", "1970-01-01T00:00:00Z", {"deep": [{"deeper": "2"}]}],
        ],
        "meta": {"seen": [str(OID)]},
    }


def test_dumps_is_compact_text() -> None:
    text = codec.dumps({"a": [1, 2], "b": "x"})
    assert isinstance(text, str)
    assert text == '{"a":[1,2],"b":"x"}'


class Unknown:
    pass


@pytest.mark.parametrize(
    "value", [Unknown(), object(), {"nested": [Unknown()]}, Decimal("1.5"), 2**70]
)
def test_dumps_raises_type_error_for_values_without_json_form(value: Any) -> None:
    with pytest.raises(TypeError):
        codec.dumps({"v": value})


def test_loads() -> None:
    assert codec.loads('{"a": [1, null, "x"]}') == {"a": [1, None, "x"]}
    assert codec.loads(b'{"a": 1}') == {"a": 1}
    for bad in ("", "{", "nope", '{"a": }', b"\xff"):
        with pytest.raises(ValueError):
            codec.loads(bad)


def test_utc_now_iso() -> None:
    text = codec.utc_now_iso()
    assert ISO_MS_Z.fullmatch(text), text
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 2


# -- redact ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /todo/ws?token=abc HTTP/1.1", f"GET /todo/ws?{REDACTED} HTTP/1.1"),
        (
            '127.0.0.1:5000 - "WebSocket /todo/ws?token=abc&last_event_id=82" [accepted]',
            f'127.0.0.1:5000 - "WebSocket /todo/ws?{REDACTED}" [accepted]',
        ),
        ("ws://127.0.0.1:8000/todo/ws?token=abc", f"ws://127.0.0.1:8000/todo/ws?{REDACTED}"),
        ("http://host?token=abc", f"http://host?{REDACTED}"),
        ("url='/a/b?x=1' next", f"url='/a/b?{REDACTED}' next"),
        ("/a?x=1 and /b?y=2", f"/a?{REDACTED} and /b?{REDACTED}"),
        ("/ws?", f"/ws?{REDACTED}"),
    ],
)
def test_redact_url_query_strings(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "template",
    [
        "token {}",
        "Authorization: Bearer {}",
        "{{'cookie': 'ws_token={}; theme=dark'}}",
        '{{"token": "{}"}}',
        "{}",
        "x{}y",
    ],
)
def test_redact_jwt_shaped_strings(template: str) -> None:
    text = template.format(JWT)
    cleaned = redact(text)
    assert JWT not in cleaned
    assert JWT.split(".")[1] not in cleaned  # the claims are gone too
    assert REDACTED in cleaned


def test_redact_issued_and_unsigned_tokens() -> None:
    issued = issue_token("s" * 64, app_slug="todo", user_id="ann", email="ann@example.com")
    unsigned = JWT.rsplit(".", 1)[0] + "."
    for secret in (issued, unsigned):
        assert secret not in redact(f"got {secret} from client")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "user ann connected from 10.0.0.1:5000",
        "what? really?",
        "watching db.shop_orders (insert, update)",
        "path /todo/ws without a query",
        "eyJ alone, eyJabc.def and a.b.c are not tokens",
        "résumé ✓",
    ],
)
def test_redact_leaves_other_text_unchanged(text: str) -> None:
    assert redact(text) == text


@settings(max_examples=100, deadline=None)
@given(
    user=st.text(min_size=1, max_size=20),
    prefix=st.text(max_size=20),
    suffix=st.text(max_size=20),
)
def test_redact_never_lets_a_token_through(user: str, prefix: str, suffix: str) -> None:
    secret = issue_token("k" * 64, app_slug="app", user_id=user)
    cleaned = redact(prefix + secret + suffix)
    assert secret not in cleaned
    assert secret.split(".")[1] not in cleaned
    assert redact(cleaned) == cleaned


# -- RedactingFilter on real handlers -----------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose only handler writes to memory through a RedactingFilter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"tests.core.redact.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_filter_redacts_args(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("client %s sent %s", "ann", JWT)
    logger.warning("handshake on %s", "/todo/ws?token=abc")
    assert stream.getvalue().splitlines() == [
        f"INFO {logger.name}: client ann sent {REDACTED}",
        f"WARNING {logger.name}: handshake on /todo/ws?{REDACTED}",
    ]


def test_filter_redacts_the_message_itself(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info(f"token {JWT} seen")
    assert stream.getvalue().strip() == f"INFO {logger.name}: token {REDACTED} seen"


def test_filter_redacts_mapping_args(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("headers %(h)s", {"h": {"authorization": f"Bearer {JWT}"}})
    assert JWT not in stream.getvalue()
    assert REDACTED in stream.getvalue()


def test_filter_leaves_clean_records_alone(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(RedactingFilter())
    logger.addHandler(keep)
    try:
        logger.info("user %s joined %d rooms", "ann", 3)
    finally:
        logger.removeHandler(keep)
    assert stream.getvalue().strip() == f"INFO {logger.name}: user ann joined 3 rooms"
    assert records[0].msg == "user %s joined %d rooms"
    assert records[0].args == ("ann", 3)


def test_filter_never_drops_records() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "t %s", (JWT,), None)
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == f"t {REDACTED}"


def test_filter_redacts_exception_text(captured: tuple[logging.Logger, io.StringIO]) -> None:
    # "Tokens never reach the logs": a traceback is part of the log line.
    logger, stream = captured
    try:
        raise ValueError(f"bad handshake /todo/ws?token=abc with {JWT}")
    except ValueError:
        logger.exception("handshake failed for %s", "ann")
    output = stream.getvalue()
    assert "handshake failed for ann" in output
    assert JWT not in output
    assert "token=abc" not in output


def test_install_redaction_adds_one_filter_to_existing_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    install_redaction()
    install_redaction()
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", (JWT,), None)
    handler.handle(record)
    assert stream.getvalue().strip() == REDACTED


def test_logging_config_redacts_every_handler() -> None:
    config = logging_config("DEBUG")
    assert config["filters"]["redact"]["()"] is RedactingFilter
    assert config["handlers"]
    for handler in config["handlers"].values():
        assert "redact" in handler["filters"]
    assert config["root"]["level"] == "DEBUG"
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's loggers reach the redacting root handler instead of their own.
        assert config["loggers"][name]["handlers"] == []
        assert config["loggers"][name]["propagate"] is True
    assert config["disable_existing_loggers"] is False
