"""One log format for every component and replica: text (the default) or one JSON object per line.

``INFEROXY_LOG_FORMAT=json`` makes every line a JSON object with ``time`` (UTC, ISO 8601), ``level``,
``component``, ``model`` (when known), ``request_id`` (when the line is about one request),
``request_ids`` (a replica's lines while it computes a batch: one per item), ``logger``, ``message`` and
``exception`` (a traceback's text); a replica's lines add ``replica``. Text lines keep their format and
end with ``[request ID]`` when they are about requests, so both formats name the id.

Which request a line is about comes from the record (``log.debug(..., extra={"request_id": rid})``) or,
without one, from ``REQUEST_IDS``: the REST and gRPC handlers set it for their request, the replica
runtime for the batch it computes (every line its model logs meanwhile carries the batch's ids).

Runs inside model images too (the replica runtime's logging): standard library only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any, overload


class BatchIds(Sequence[str]):
    """A batch's request ids (each item's ``rid``), read from its items only when a line is logged: most batches
    log nothing, and walking 64 items costs more than the rest of what the id adds to a batch."""

    __slots__ = ("_items", "_ids")

    def __init__(self, items: object) -> None:
        self._items = items
        self._ids: tuple[str, ...] | None = None

    def _read(self) -> tuple[str, ...]:
        if self._ids is None:
            items = self._items if isinstance(self._items, list) else ()
            self._ids = tuple(rid for item in items
                              if isinstance(item, dict) and isinstance(rid := item.get("rid"), str))
        return self._ids

    def __len__(self) -> int:
        return len(self._read())

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._read()[index]


# The request (one id) or batch (one id per item) the code running now works for.
REQUEST_IDS: ContextVar[str | Sequence[str] | None] = ContextVar("inferoxy_request_ids", default=None)

# What a replica's JSON line may say about itself when the task manager passes it on (LogTail): the task
# manager sets component and replica itself, so model code cannot pass its lines off as a component's.
FORWARDED_FIELDS = ("time", "level", "model", "request_id", "request_ids", "logger", "message", "exception")
LEVELS = frozenset(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
# A replica line's field longer than this is cut (the process runtime already cuts lines at 4096 characters).
MAX_FIELD_CHARS = 4096
MAX_FORWARDED_IDS = 1024


def current_request_id() -> str | None:
    """The one request the code running now works for (a bridge's handler), if any."""
    ids = REQUEST_IDS.get()
    return ids if isinstance(ids, str) else None


def request_ids_of(record: logging.LogRecord) -> str | Sequence[str] | None:
    ids = getattr(record, "request_id", None)
    return ids if ids is not None else REQUEST_IDS.get()


def iso_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (the fields in the module docstring); non-ASCII is escaped, so a line is ASCII."""

    def __init__(self, component: str, *, model: str | None = None, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.component = component
        self.model = model
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        forwarded = getattr(record, "forwarded", None)
        if isinstance(forwarded, dict):
            return self._forwarded(record, forwarded)
        entry: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname,
                                 "component": self.component, **self.static}
        model = getattr(record, "model", None) or self.model
        if model:
            entry["model"] = model
        ids = request_ids_of(record)
        if isinstance(ids, str):
            entry["request_id"] = ids
        elif ids:
            entry["request_ids"] = list(ids)
            if len(ids) == 1:
                entry["request_id"] = ids[0]
        entry["logger"] = record.name
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)

    def _forwarded(self, record: logging.LogRecord, fields: dict[str, Any]) -> str:
        # A replica's own line, passed on by the task manager: its fields, but component and replica are ours.
        entry = {"time": iso_time(record.created), "level": "INFO", **fields, "component": "replica",
                 "replica": getattr(record, "replica", None)}
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, plus ``[request ID]`` (or ``[requests A B ...]``) at the end of a line about requests."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = request_ids_of(record)
        if not ids:
            return text
        if isinstance(ids, str):
            return f"{text} [request {ids}]"
        return f"{text} [request{'s' if len(ids) > 1 else ''} {' '.join(ids)}]"


def formatter(log_format: str, component: str, *, text_format: str | None = None, model: str | None = None,
              static: Mapping[str, str] | None = None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(component, model=model, static=static)
    return TextFormatter(text_format or f"%(asctime)s %(levelname)-7s [{component}] %(name)s: %(message)s")


def setup_logging(level: str, component: str, log_format: str = "text", *, text_format: str | None = None,
                  model: str | None = None, static: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, component, text_format=text_format, model=model, static=static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print a line per request: far too much at thousands per second.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    if log_format == "json":
        # What Python itself would print raw (warnings, an uncaught exception, a thread's) becomes a JSON line too.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("inferoxy").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("inferoxy").critical("uncaught exception in thread %s", name,
                                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def forwarded_fields(line: str) -> dict[str, Any] | None:
    """A replica's JSON log line as the fields the task manager passes on (``FORWARDED_FIELDS``, checked and
    cut to size), or None when the line is not a JSON object (a print, a traceback a library wrote)."""
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    fields: dict[str, Any] = {}
    for key in FORWARDED_FIELDS:
        value = parsed.get(key)
        if key == "request_ids":
            if isinstance(value, list):
                fields[key] = [str(item)[:MAX_FIELD_CHARS] for item in value[:MAX_FORWARDED_IDS]]
        elif key == "level":
            if value in LEVELS:
                fields[key] = value
        elif isinstance(value, str):
            fields[key] = value[:MAX_FIELD_CHARS]
    return fields
