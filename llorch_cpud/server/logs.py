"""Structured logs: one JSON object per line on stderr.

Every record has `ts` (ISO 8601, UTC), `level`, `logger`, `msg`; fields passed with
`log(msg, **fields)` (job_id, correlation_id, ...) are merged in. Records from other
libraries (uvicorn's own messages), Python warnings (`logging.captureWarnings`) and uncaught
exceptions in threads go through the same formatter, so stderr carries nothing but JSON lines
once the server is configured.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
from datetime import datetime, timezone

LOGGER_NAME = "llorch_cpud.server"

# The X-Correlation-ID of the HTTP request being handled (set by the middleware).
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid is not None:
            out["correlation_id"] = cid
        fields = getattr(record, "fields", None)
        if fields:
            out.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        # ASCII only: a record is one line for every reader (no raw U+2028, NEL ...) and never fails to encode
        return json.dumps(out, ensure_ascii=True, default=str)


def configure() -> None:
    """Route every logger (ours, uvicorn's) to one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "sse_starlette"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the middleware writes its own access line
    logging.captureWarnings(True)  # warnings.warn (numpy's RuntimeWarning ...) -> logger "py.warnings"
    threading.excepthook = lambda args: logging.getLogger(LOGGER_NAME).error(
        "uncaught exception in thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"fields": {"thread": getattr(args.thread, "name", None)}})
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


_logger = logging.getLogger(LOGGER_NAME)


def log(msg: str, level: int = logging.INFO, **fields) -> None:
    _logger.log(level, msg, extra={"fields": fields})
