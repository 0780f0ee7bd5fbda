"""A sandbox's log, as E2B's ``GET /sandboxes/{id}/logs`` and ``/v2/sandboxes/{id}/logs`` serve it.

Two sources, merged by time: the lifecycle events the runtime records (created, paused, resumed,
timeout set, killed, died with its reason, reclaimed; kept after the sandbox ended), and the agent's
own log (``<data dir>/sandboxes/<id>/agent.log``: its stdout and stderr, Python logging lines
``<date> <time>,<ms> <logger> <LEVEL> <message>``; removed with the sandbox's files). Each entry has
E2B's fields: a time, a level (``debug``, ``info``, ``warn``, ``error``), a message, and string
fields (``logger`` says which source; runtime entries add ``event`` and ``reason``).

The agent's log is written from inside the sandbox, so it is hostile input: only its last
:data:`MAX_AGENT_LOG_BYTES` are read (in a thread), lines are cut at :data:`MAX_LINE_CHARS`, bytes
that are not UTF-8 are replaced, and its entries can never pass for the runtime's (their ``logger``
comes from which file they were read from, not from what they say).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

LEVELS = ("debug", "info", "warn", "error")
"""E2B's ``LogLevel``, lowest first."""

WINDOW_MS = 7 * 24 * 3600 * 1000
"""E2B's log retention window (``logsOldestLimit``): a query reaches at most this far from its cursor."""

DEFAULT_LIMIT = 1000
MAX_LIMIT = 1000
"""E2B's default and (v2) maximum number of entries per answer."""

MAX_AGENT_LOG_BYTES = 1 << 20
"""How much of the end of the agent's log is read per request: the agent logs warnings only, so a
megabyte is months of real use, and a sandbox that floods its log costs each request a bounded read."""

MAX_LINE_CHARS = 16 << 10
"""Longer agent log lines are cut (a line is one entry; a runaway one must not make answers huge)."""

_EVENT_LEVELS = {"died": "error"}
"""Runtime events that are not ``info``."""

_PY_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}
_PY_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a sandbox's log."""

    timestamp_ms: int
    level: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


def from_events(sandbox_id: str, events: Iterable[tuple[float, str, str | None]]) -> list[LogEntry]:
    """The runtime's lifecycle events of a sandbox as log entries."""
    entries = []
    for at, kind, reason in events:
        fields = {"logger": "runtime", "event": kind, "sandboxID": sandbox_id}
        message = f"sandbox {kind}"
        if reason:
            fields["reason"] = reason
            message += f": {reason}"
        entries.append(LogEntry(int(at * 1000), _EVENT_LEVELS.get(kind, "info"), message, fields))
    return entries


def read_agent_log(path: Path, sandbox_id: str) -> list[LogEntry]:
    """In a worker thread: the entries of the end of the agent's log (none when it is gone)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(size - MAX_AGENT_LOG_BYTES, 0)
            f.seek(start)
            data = f.read(MAX_AGENT_LOG_BYTES)
            fallback_ms = int(os.fstat(f.fileno()).st_mtime * 1000)
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut by where the read began
    entries: list[LogEntry] = []
    for line in lines:
        line = line[:MAX_LINE_CHARS]
        match = _PY_LINE.fullmatch(line)
        if match is None:
            if entries:  # a traceback or a wrapped message continues the entry before it
                last = entries[-1]
                if len(last.message) < MAX_LINE_CHARS:
                    entries[-1] = LogEntry(
                        last.timestamp_ms, last.level, (last.message + "\n" + line)[:MAX_LINE_CHARS], last.fields
                    )
            elif line.strip():
                entries.append(LogEntry(fallback_ms, "error", line, {"logger": "agent", "sandboxID": sandbox_id}))
            continue
        when, millis, logger, level, message = match.groups()
        try:
            at = datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            continue
        fields = {"logger": "agent", "source": logger, "sandboxID": sandbox_id}
        entries.append(LogEntry(int(at.timestamp()) * 1000 + int(millis), _PY_LEVELS[level], message, fields))
    return entries


FAILURE_MARK = "sandboxd agent failed: "
"""How the line starts that a new sandbox's agent writes last when it exits before it serves
(``.zygote._run_agent``): the reason a create or resume that failed that way gives its client."""

FAILURE_TAIL_BYTES = 4 << 10
"""How much of the end of the agent's log is searched for that line: the agent writes it last."""

MAX_FAILURE_CHARS = 300
"""The longest reason given to a client (it goes into an API error, beside the runtime's words)."""


def agent_failure(path: Path, hide: Iterable[str]) -> str | None:
    """In a worker thread: the reason the agent gave for exiting before it served, from the last
    :data:`FAILURE_MARK` line of the end of its log; None when there is none (or no log).

    The log is written from inside the sandbox, and the reason goes to an API client who may be
    that sandbox's own code: only printable ASCII is kept, each of ``hide`` (the host's paths the
    runtime knows: its data dir, its installation) is replaced by ``<host>``, and the reason is cut
    at :data:`MAX_FAILURE_CHARS`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = os.pread(f.fileno(), FAILURE_TAIL_BYTES, max(size - FAILURE_TAIL_BYTES, 0))
    except OSError:
        return None
    mark = FAILURE_MARK.encode()
    for line in reversed(data.splitlines()):
        if line.startswith(mark):
            text = line[len(mark) :].decode("ascii", errors="replace")
            text = "".join(c if " " <= c <= "~" else "?" for c in text)
            for secret in sorted(hide, key=len, reverse=True):
                if secret:
                    text = text.replace(secret, "<host>")
            text = text.strip()
            if len(text) > MAX_FAILURE_CHARS:
                text = text[: MAX_FAILURE_CHARS - 3] + "..."
            return text or None
    return None


def select(
    entries: list[LogEntry],
    start_ms: int,
    end_ms: int,
    limit: int,
    backward: bool,
    min_level: str | None = None,
    search: str | None = None,
) -> list[LogEntry]:
    """The entries inside ``[start_ms, end_ms]`` at ``min_level`` or above whose message contains
    ``search``, oldest first (newest first when ``backward``), at most ``limit``."""
    lowest = LEVELS.index(min_level) if min_level else 0
    kept = [
        e
        for e in entries
        if start_ms <= e.timestamp_ms <= end_ms
        and LEVELS.index(e.level) >= lowest
        and (search is None or search in e.message)
    ]
    kept.sort(key=lambda e: e.timestamp_ms, reverse=backward)
    return kept[:limit]


def window(cursor_ms: int | None, backward: bool, now_ms: int) -> tuple[int, int]:
    """E2B's query window (``LogQueryWindow``): a week from the cursor in the query's direction,
    never older than a week before now."""
    oldest = now_ms - WINDOW_MS
    start, end = oldest, now_ms
    if cursor_ms is not None:
        if backward:
            end, start = cursor_ms, cursor_ms - WINDOW_MS
        else:
            start, end = cursor_ms, cursor_ms + WINDOW_MS
    start, end = max(start, oldest), max(end, oldest)
    return min(start, end), end
