"""Logging set-up that never lets a token into a log line.

URLs are logged with their query string replaced, and anything shaped like a JWT is masked,
whoever logs it (uvicorn's access and error lines included).
"""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any

REDACTED = "[redacted]"
_QUERY_IN_URL = re.compile(r"(/[^\s\"'?]*)\?[^\s\"']*")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_TICKET = re.compile(r"mrt_[A-Za-z0-9_-]{8,}")  # engine.identity.tickets.TICKET_PREFIX


def redact(text: str) -> str:
    """The text with URL query strings, JWT-shaped strings and tickets removed."""
    text = _QUERY_IN_URL.sub(rf"\1?{REDACTED}", text)
    return _TICKET.sub(REDACTED, _JWT.sub(REDACTED, text))


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message; attached to handlers so it sees every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when set: the traceback is redacted like the message.
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_TRACEBACKS = logging.Formatter()


class ClientFaultFilter(logging.Filter):
    """One line instead of a traceback for a text frame with invalid UTF-8.

    uvicorn logs that with `logger.exception` (a traceback of its own decode call) before it
    closes with 1007: the client's fault, not the server's, and a client could otherwise add
    a traceback to the log per connection it opens.
    """

    UVICORN_MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.UVICORN_MESSAGE and record.exc_info:
            record.msg, record.args = "invalid UTF-8 in a client's text frame: closing 1007", None
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A dictConfig for the engine and uvicorn with redaction on every handler."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "plain",
                "filters": ["redact"],
            },
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
        },
    }


def install_redaction(level: str = "INFO") -> None:
    """Make sure every handler redacts; configure plain stderr logging if none is set up."""
    root = logging.getLogger()
    if not root.handlers:
        logging.config.dictConfig(logging_config(level))
        return
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def install_log_filters() -> None:
    """What `serve` logs through: redaction on every handler, `ClientFaultFilter` on
    uvicorn's error logger (each attached once)."""
    install_redaction()
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientFaultFilter) for f in logger.filters):
        logger.addFilter(ClientFaultFilter())
