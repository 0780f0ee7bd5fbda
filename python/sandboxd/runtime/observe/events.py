"""What the lifecycle manager reports: each transition of a sandbox, counted and logged in one call.

The manager calls :class:`Observer` where a transition completes (the same places it records the
event in SQLite), with a *cause* from a fixed set (``api``, ``timeout``, ``connect``...) for the
metrics' labels and, where it has one, the free-text reason for the log line. The observer also
keeps the log redactor's list of live access tokens current: a token is registered when its sandbox
is created or re-adopted and dropped when the sandbox ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import ApiError
from .logs import Secrets
from .metrics import (
    DEATH_REASONS,
    KILL_REASONS,
    PAUSE_MODES,
    PAUSE_REASONS,
    RESUME_REASONS,
    TIMEOUT_ACTIONS,
    RuntimeMetrics,
    bounded,
)

if TYPE_CHECKING:
    from ..store import SandboxRow

log = logging.getLogger("sandboxd.runtime.lifecycle")


def _after_answer(line: Callable[[], None]) -> None:
    """Write ``line`` on the event loop's next turn: a handler calls this as its transition is done
    and then answers without waiting for anything, so the line goes out once the answer is written,
    while the client reads it. A log record (redaction, formatting, the write to stderr) is ~30 µs
    of CPU, more on a loaded host, that a create spent before its answer.
    The line keeps the request's id (``call_soon`` runs it in a copy of the current context)."""
    try:
        asyncio.get_running_loop().call_soon(line)
    except RuntimeError:  # no loop (a caller outside the runtime's server): now
        line()


_CREATE_RESULT = {400: "bad_request", 404: "not_found", 403: "limit", 503: "unavailable"}


class Observer:
    """Counts and logs the lifecycle of every sandbox of one runtime."""

    def __init__(self, metrics: RuntimeMetrics | None = None, secrets: Secrets | None = None) -> None:
        self.metrics = metrics or RuntimeMetrics()
        self.secrets = secrets or Secrets()

    def _line(self, level: int, event: str, sandbox_id: str, message: str, **fields: object) -> None:
        log.log(level, message, extra={"event": event, "sandbox_id": sandbox_id, **fields})

    def created(self, row: SandboxRow, seconds: float) -> None:
        """The token is a secret and the counts are up at once; the log line is written after the
        create's answer (:func:`_after_answer`)."""
        self.secrets.add(row.access_token)
        self.metrics.creates.labels("ok").inc()
        self.metrics.create_seconds.observe(seconds)
        _after_answer(
            functools.partial(
                self._line,
                logging.INFO,
                "sandbox.created",
                row.id,
                f"created from template {row.alias or row.template_id} in {seconds * 1000:.0f} ms",
                template=row.alias or row.template_id,
                duration_ms=round(seconds * 1000, 1),
            )
        )

    def create_failed(self, template: str, error: BaseException) -> None:
        status = error.status if isinstance(error, ApiError) else 500
        self.metrics.creates.labels(_CREATE_RESULT.get(status, "error")).inc()
        message = error.message if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(
            level,
            f"create failed ({status}): {message}",
            extra={"event": "sandbox.create_failed", "status": status, "template": template[:64]},
        )

    def adopted(self, row: SandboxRow) -> None:
        self._line(logging.INFO, "sandbox.adopted", row.id, f"re-adopted ({row.state}) after a runtime restart")

    def killed(self, row: SandboxRow, cause: str, reason: str) -> None:
        self.secrets.discard(row.access_token)
        self.metrics.kills.labels(bounded(cause, KILL_REASONS)).inc()
        self._line(logging.INFO, "sandbox.killed", row.id, reason, reason=cause)

    def timed_out(self, sandbox_id: str, action: str) -> None:
        self.metrics.timeouts.labels(bounded(action, TIMEOUT_ACTIONS)).inc()
        self._line(logging.INFO, "sandbox.timed_out", sandbox_id, f"reached its timeout: {action}", action=action)

    def timeout_set(self, sandbox_id: str, seconds: int) -> None:
        self._line(logging.INFO, "sandbox.timeout_set", sandbox_id, f"timeout set to {seconds}s from now")

    def paused(self, sandbox_id: str, cause: str, mode: str) -> None:
        self.metrics.pauses.labels(bounded(cause, PAUSE_REASONS), bounded(mode, PAUSE_MODES)).inc()
        self._line(logging.INFO, "sandbox.paused", sandbox_id, f"paused ({mode})", reason=cause, mode=mode)

    def resumed(self, sandbox_id: str, cause: str, mode: str | None, seconds: float) -> None:
        mode_label = bounded(mode or "", PAUSE_MODES)
        self.metrics.resumes.labels(bounded(cause, RESUME_REASONS), mode_label).inc()
        self.metrics.resume_seconds.labels(mode_label).observe(seconds)
        self._line(
            logging.INFO,
            "sandbox.resumed",
            sandbox_id,
            f"resumed ({mode}) in {seconds * 1000:.0f} ms",
            reason=cause,
            mode=mode,
            duration_ms=round(seconds * 1000, 1),
        )

    def died(self, row: SandboxRow, cause: str, reason: str) -> None:
        self.secrets.discard(row.access_token)
        self.metrics.deaths.labels(bounded(cause, DEATH_REASONS)).inc()
        # No request causes a death: the watch that noticed it may still carry the create's context.
        self._line(logging.WARNING, "sandbox.died", row.id, reason, reason=cause, request_id=None)

    @contextlib.contextmanager
    def template_build(self, template: str) -> Iterator[None]:
        """The hook for template builds: ``with observer.template_build(name): build()`` counts the
        build by result, times a successful one, and logs one line either way."""
        started = time.monotonic()
        try:
            with self.metrics.template_build():
                yield
        except Exception as exc:
            log.error(
                f"building template {template} failed: {exc}",
                extra={"event": "template.build_failed", "template": template},
            )
            raise
        seconds = time.monotonic() - started
        log.info(
            f"template {template} built in {seconds:.1f} s",
            extra={"event": "template.built", "template": template, "duration_ms": round(seconds * 1000, 1)},
        )

    def reclaimed(self, sandbox_id: str) -> None:
        message = "processes, cgroup and writable layer removed"
        self._line(logging.INFO, "sandbox.reclaimed", sandbox_id, message, request_id=None)
