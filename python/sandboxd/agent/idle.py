"""Give the allocator's free memory back to the kernel once the agent has gone idle.

The agent keeps glibc from trimming its heap below 64 MiB free (``server.tune_allocator``: streaming
allocates and frees megabyte buffers many times a second, and re-faulting them cost more than half
its time). The price is what a big request leaves behind: after 256 MiB of pipe output a standalone
agent stayed at 27.9 MiB of RSS, 24.5 after a ``malloc_trim(0)`` (measured by calling it from gdb).
:class:`IdleTrim` makes that call itself, once per quiet spell: when no request has been in flight for
:data:`IDLE_TRIM_S` after some were served.

The trim runs on the event loop, not a worker thread: with one malloc arena (``MALLOC_ARENA_MAX``) it
holds the lock every allocation needs for its whole walk, so the loop would wait for it as soon as it
allocated anyway. It takes ~2 ms per 60 MiB freed (10 ms for 240 MiB, measured on this 2-core VM),
and only when nothing is in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sandboxd import _core

App = Callable[[Any, Any, Any], Awaitable[None]]
"""An ASGI application: ``await app(scope, receive, send)``."""

IDLE_TRIM_S = 1.0
"""Quiet time before the trim. Long enough that the requests of one client's sequence (SDK calls a few
milliseconds apart) do not trim in between; short enough that an agent gives memory back soon after
a burst."""


class IdleTrim:
    """Counts the requests in flight (:meth:`begin`, :meth:`end`) and calls ``trim`` once every time
    none has been for ``delay`` seconds after at least one was served. Per request it costs a counter
    and, for the one that ends a busy spell, reading the loop's clock; one timer per quiet spell."""

    def __init__(self, delay: float = IDLE_TRIM_S, trim: Callable[[], object] = _core.trim_malloc) -> None:
        self.delay = delay
        self.trim = trim
        self.active = 0
        self.trims = 0
        """How many times ``trim`` ran (for tests and probes)."""
        self._served = False
        self._last_end = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A request started."""
        self.active += 1
        self._served = True

    def end(self) -> None:
        """A request ended (whatever its outcome). Call it from the event loop's thread."""
        self.active -= 1
        if self.active == 0:
            self._quiet_from_now()

    def freed(self) -> None:
        """Memory was freed outside any request: give it back once the agent is quiet, as after a
        request. The process table forgets an exited process 30 s after its end (``RETAIN_EXITED_S``),
        long after the trim that followed its requests: without this, an agent that ran 4,000 commands
        kept 6 MiB more RSS at idle for good, of which a trim gave back 4. Call it from the event
        loop's thread; while a request is in flight, the one that ends the spell arms the check."""
        self._served = True
        if self.active == 0:
            self._quiet_from_now()

    def _quiet_from_now(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_end = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.active or not self._served:
            return  # a request is in flight: the one that ends the spell arms the next check
        loop = asyncio.get_running_loop()
        remaining = self._last_end + self.delay - loop.time()
        if remaining > 0:  # requests came and went since the timer was set
            self._timer = loop.call_later(remaining, self._check)
            return
        self._served = False
        self.trims += 1
        self.trim()

    def wrap(self, app: App) -> App:
        """``app`` with each of its requests counted (lifespan and other non-HTTP scopes are not),
        those it serves on the server's direct path (its ``direct``, see ``AgentApp.direct``) too."""
        return _Counted(self, app)

    async def count(self, request: Awaitable[None]) -> None:
        """Awaits ``request``, counted as a request in flight."""
        self.begin()
        try:
            await request
        finally:
            self.end()

    def close(self) -> None:
        """Cancel a pending check (the server is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Counted:
    """An app whose requests an :class:`IdleTrim` counts (:meth:`IdleTrim.wrap`)."""

    __slots__ = ("_app", "_idle", "direct")

    def __init__(self, idle: IdleTrim, app: App) -> None:
        self._idle = idle
        self._app = app
        inner = getattr(app, "direct", None)
        if inner is not None:
            self.direct = lambda scope, writer: self._direct(inner, scope, writer)

    def _direct(self, inner: Any, scope: Any, writer: Any) -> Any:
        serve = inner(scope, writer)
        return None if serve is None else self._idle.count(serve)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        self._idle.begin()
        try:
            await self._app(scope, receive, send)
        finally:
            self._idle.end()
