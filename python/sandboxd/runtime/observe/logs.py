"""The runtime's logs: ``--log-format json|text``, a request id on every line a request causes, the
last errors kept for ``sandboxd status``, and redaction that no call site can forget.

Every record that reaches an output passes :class:`Redactor` first: it is a filter on each handler
:func:`configure` installs (a filter on a logger would miss the records its children propagate), and
it rewrites the record itself (message, arguments, extra fields, exception text) before any
formatter sees it. It removes two kinds of secret:

* values the runtime knows: the API key and every live sandbox's access token (:class:`Secrets`,
  kept current by the lifecycle hooks), wherever they appear;
* shapes, for secrets the runtime never saw: header and field assignments (``X-Access-Token: …``,
  ``"envdAccessToken": "…"``, ``signature=…`` of a signed URL, ``Authorization: Bearer …``) and
  E2B-style keys (``e2b_`` + 40 hex digits).

JSON lines carry ``time`` (RFC 3339, UTC), ``level``, ``event`` (a dotted name such as
``sandbox.created`` or ``request.failed``; a record without one gets its logger's name),
``message``, ``sandbox_id`` and ``request_id`` (null where they do not apply), and the record's
other ``extra`` fields.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import re
import sys
import threading
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("sandboxd_request_id", default=None)
"""The id of the HTTP request being served; asyncio copies it into every task a request starts."""

REDACTED = "[redacted]"

MIN_SECRET_LEN = 8
"""Shorter values are not registered: replacing every ``"1"`` in a line would destroy it, and no
secret the runtime generates or accepts is that short."""

RECENT_ERRORS = 20
"""Warnings and errors kept for ``sandboxd status`` (it shows the last few; a screen holds no more)."""

_SHAPES = re.compile(
    r"""(?ix)
    (
      (?:x-api-key|x-access-token|e2b-traffic-access-token|authorization|proxy-authorization
        |envd_?access_?token|traffic_?access_?token|access_?token|api_?key|signature|password|secret)
      ["']?\s*[:=]\s*["']?
      (?:(?:bearer|basic|token)\s+)?
    )
    [^\s"'&,;}\]]+
    |\be2b_[0-9a-f]{40}\b
    |\bsk_e2b_[0-9a-z]{20,}\b
    """
)
"""Secret-bearing shapes, for values the runtime never registered (group 1 keeps the name)."""

_MAY_HOLD_SHAPE = re.compile(r"[:=]|e2b_", re.IGNORECASE)
"""What every match of :data:`_SHAPES` contains: a name's ``:`` or ``=``, or ``e2b_`` (the same
case-insensitive matching). A text without any is left as it is, without running :data:`_SHAPES`:
most fields of most lines (an event's name, a sandbox's id, a template's name, a message like
``created from template base in 21 ms``) have none, and ``_SHAPES.sub`` tries its ~15 names at
every position of the text (measured in ``docs/benchmarks.md``, `cold17`)."""

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
"""Attributes every record has; anything else on a record came from ``extra=``."""


class Secrets:
    """Values that must never appear in a log line. Safe to use from any thread: the set is
    replaced, never changed in place, so a reader scans one consistent snapshot."""

    def __init__(self) -> None:
        self._values: tuple[frozenset[str], int] = (frozenset(), 0)
        """The values and the length of the shortest, replaced together (one snapshot for a reader)."""
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        if value and len(value) >= MIN_SECRET_LEN:
            with self._lock:
                self._values = _with_shortest(self._values[0] | {value})

    def discard(self, value: str | None) -> None:
        if value and value in self._values[0]:
            with self._lock:
                self._values = _with_shortest(self._values[0] - {value})

    def scrub(self, text: str) -> str:
        values, shortest = self._values
        # A text shorter than every value holds none: the loop is one substring search per live
        # sandbox (its token), for each field of each line, which most fields (an id, a name) skip.
        if values and len(text) >= shortest:
            for value in values:
                if value in text:
                    text = text.replace(value, REDACTED)
        if _MAY_HOLD_SHAPE.search(text) is None:
            return text
        return _SHAPES.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def _with_shortest(values: frozenset[str]) -> tuple[frozenset[str], int]:
    return values, min(map(len, values), default=0)


class Redactor(logging.Filter):
    """Rewrites each record so that nothing in :class:`Secrets` or of a secret's shape is left in
    it, and gives it the fields every line carries (``event``, ``sandbox_id``, ``request_id``)."""

    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self.secrets = secrets
        self._exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_sandboxd_redacted", False):
            return True  # a second handler sees the same, already rewritten, record
        scrub = self.secrets.scrub
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self._exceptions.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, scrub(value))
        if not getattr(record, "event", None):
            record.event = record.name
        if not hasattr(record, "sandbox_id"):
            record.sandbox_id = None
        if not hasattr(record, "request_id"):  # a caller may say None: not caused by the request in context
            record.request_id = REQUEST_ID.get()
        record._sandboxd_redacted = True
        return True


class JsonLines(JsonFormatter):
    """One JSON object per line (python-json-logger), with an RFC 3339 UTC time."""

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{event}{message}{sandbox_id}{request_id}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level"},
            reserved_attrs=[*_RECORD_FIELDS, "_sandboxd_redacted"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _rfc3339(record.created)


class TextLines(logging.Formatter):
    """``<time> <LEVEL> <event> <message> key=value…`` for a person reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(event)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _rfc3339(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _RECORD_FIELDS and key not in ("event", "_sandboxd_redacted") and value is not None
        ]
        if not fields:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(fields)}{sep}{rest}"


class RecentErrors(logging.Handler):
    """The last :data:`RECENT_ERRORS` warnings and errors, for ``GET /status``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(
            {
                "time": _rfc3339(record.created),
                "level": record.levelname,
                "event": getattr(record, "event", record.name),
                "message": record.getMessage(),
                "sandbox_id": getattr(record, "sandbox_id", None),
                "request_id": getattr(record, "request_id", None),
            }
        )


def configure(log_format: str, secrets: Secrets, level: int = logging.INFO) -> RecentErrors:
    """Send every log record of this process to stderr in ``log_format`` (``json`` or ``text``),
    redacted; returns the handler that keeps the recent errors."""
    if log_format not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {log_format!r}")
    redactor = Redactor(secrets)
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(JsonLines() if log_format == "json" else TextLines())
    recent = RecentErrors()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in (output, recent):
        handler.addFilter(redactor)
        root.addHandler(handler)
    root.setLevel(level)
    return recent


def adopt_uvicorn() -> None:
    """uvicorn configures its own loggers and handlers when its Config is built; route them through
    ours instead, so its lines are formatted and redacted like every other."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _rfc3339(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
