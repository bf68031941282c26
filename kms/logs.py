"""Log lines of the kms processes: a UTC timestamp with milliseconds, the level and the logger on every line, as text
or as one JSON object per line, with the request's context (request id, caller, method) added to every record
logged while a call is handled.

Text: ``2026-12-01T16:40:00.123Z INFO kms.server.frame: refused ... [request_id=... principal=... method=...]``.
JSON: ``{"time": ..., "level": ..., "logger": ..., "message": ..., "request_id": ..., "principal": ..., ...}``.

``configure`` sets the serving process up (``kms serve --log-format --log-level``) and exports the choice to the
processes it starts (``KMS_LOG_FORMAT``, ``KMS_LOG_LEVEL``), which call ``configure_from_env`` (the domain workers):
their lines look the same. Logs go to stderr; stdout keeps what scripts read (``kms: serving on port N``).

The request context is a contextvar: ``bind`` for the span of a call (kms.server.frame's interceptor), ``note`` to
add to it (an error's class, once known). Nothing here decides what may be logged: callers never log PINs, keys,
components or clear PANs (tests/server/test_logging.py runs a canary over every line of a full flow).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

from kms.errors import ConfigError

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
ENV_FORMAT = "KMS_LOG_FORMAT"
ENV_LEVEL = "KMS_LOG_LEVEL"
#: The request context's fields, in the order text lines show them.
CONTEXT_FIELDS = ("request_id", "principal", "method", "domain", "error", "code", "event")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("kms_log_context", default=None)

# The attributes every LogRecord has; anything else on a record came from ``extra=`` or the context.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def bind(**fields: Any) -> contextvars.Token[dict[str, Any] | None]:
    """Start a request context with these fields (every record logged in it carries them); ``unbind`` ends it."""
    return _context.set({k: v for k, v in fields.items() if v is not None})


def unbind(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _context.reset(token)


def note(**fields: Any) -> None:
    """Add fields to the current request context (nothing outside a call)."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


def context() -> Mapping[str, Any]:
    """The current request context (empty outside a call)."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Puts the request context's fields on each record (unless the call's ``extra=`` set them already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not key.startswith("_") and not hasattr(record, key):
                setattr(record, key, value)
        return True


def timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-12-01T16:40:00.123Z."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields: the context's first, in order, then any other ``extra=``."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    ordered = {k: extra.pop(k) for k in CONTEXT_FIELDS if k in extra}
    ordered.update(sorted(extra.items()))
    return ordered


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info).rstrip()
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info).rstrip()
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback is the ``exception`` field (newlines escaped, so still one line)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"time": timestamp(record.created), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage(), "pid": record.process}
        doc.update(_fields(record))
        if record.exc_info:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str, ensure_ascii=False)


def handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``fmt`` lines to ``stream`` (stderr), with the request context."""
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    made = logging.StreamHandler(stream if stream is not None else sys.stderr)
    made.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    made.addFilter(ContextFilter())
    return made


def level_number(level: str) -> int:
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return int(getattr(logging, level.upper()))


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None, *, export: bool = True) -> None:
    """The process's logging: the root logger's handlers replaced by one ``handler(fmt, stream)`` at ``level``.
    With ``export``, the processes this one starts (workers, the audit signer) log the same way."""
    made = handler(fmt, stream)
    number = level_number(level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(made)
    root.setLevel(number)
    if export:
        os.environ[ENV_FORMAT] = fmt
        os.environ[ENV_LEVEL] = level.lower()


def configure_from_env() -> None:
    """In a process kms started (a domain worker): log as the parent set up (``kms serve``), or text at warning
    level (a parent that set nothing up: another command, a test)."""
    fmt = os.environ.get(ENV_FORMAT, "text")
    level = os.environ.get(ENV_LEVEL, "warning")
    try:
        configure(level, fmt, export=False)
    except ConfigError:
        configure("warning", "text", export=False)
