"""The agent's HTTP server: uvicorn's httptools protocol (:class:`~.http_server.GuardedHttpToolsProtocol`)
on the event loop's own TCP server, without ``uvicorn.config`` and ``uvicorn.server``.

The agent used uvicorn's ``Config`` and ``Server`` for what the protocol reads of them (a dozen settings,
a set of connections and tasks) and for starting, stopping on a signal and draining; everything else
in them is for options it does not set (TLS, reload, workers, lifespan, proxy headers, WSGI and ASGI 2
apps, log configuration, the ``Date`` header's tick). Importing them brought ``uvicorn._types`` (ASGI's
TypedDicts and Protocols, built by ``typing`` at import), uvicorn's middleware (with ``a2wsgi``), its
importer and lifespan modules: 0.3 MiB of a standalone ``sandboxd agent``'s RSS at start (22.98 →
22.66 MiB, medians of 3 starts alternating; ``docs/benchmarks.md``, ``rss5``). :class:`ServerSettings`
and :class:`AgentServer` are what is left, with uvicorn's behaviour where it matters:

* the protocol gets the same settings as from ``Config(ws="none", lifespan="off", access_log=False,
  server_header=False, date_header=False, proxy_headers=False)``: the app unwrapped (an ASGI 3 app,
  no proxy-headers middleware), no WebSocket upgrade, no default headers, the keep-alive timeout and
  backlog from :func:`~.http_server.limit_connections`;
* SIGINT and SIGTERM stop the server (``signal.signal``, the handlers found restored after, and the
  signal raised again then, as uvicorn does: the process ends by it); a second SIGINT forces the exit;
* a stop closes the listeners, asks every connection to close after its answer, waits for requests in
  flight up to ``timeout_graceful_shutdown`` and cancels what is left, as ``uvicorn.Server.shutdown``;
* a port that cannot be bound is logged and exits with status 3 (uvicorn's ``STARTUP_FAILURE``).

The runtime's and the code interpreter's servers keep uvicorn's ``Config`` and ``Server``
(:func:`~.http_server.server_config`): the runtime serves TLS through it. In the standalone agent,
:func:`sandboxd.agent.lean.uvicorn_package_without_cli` imports the protocol without them."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.signal without its wrapper (see _capture_signals)
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from typing import Any

from .http_server import (
    SHUTDOWN_GRACE_S,
    ConnectionLimits,
    GuardedHttpToolsProtocol,
    limit_connections,
    log_like_uvicorn,
)

log = logging.getLogger("uvicorn.error")  # uvicorn's logger, as its server's messages

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

STARTUP_FAILURE = 3
"""The exit status when the port cannot be bound (uvicorn's ``STARTUP_FAILURE``)."""

DRAIN_POLL_S = 0.1
"""How often a stop checks whether the connections and requests in flight are done (uvicorn's)."""


class ServerSettings:
    """What uvicorn's ``HttpToolsProtocol`` and :class:`GuardedHttpToolsProtocol` read of a server's
    ``Config``, with the values the agent's ``uvicorn.Config`` had (see the module documentation)."""

    loaded = True  # the protocol calls ``load()`` otherwise
    ws_protocol_class = None  # ``ws="none"``: an upgrade request is answered as plain HTTP
    root_path = ""
    asgi_version = "3.0"
    limit_concurrency: int | None = None  # the guard caps connections instead
    reset_contextvars = False
    ssl = None

    def __init__(self, app: Any, host: str, port: int, http: type[GuardedHttpToolsProtocol]) -> None:
        self.app = self.loaded_app = app
        self.host = host
        self.port = port
        self.http = http
        """The protocol class, with its :class:`~.http_server.ConnectionGuard` (``limit_connections``)."""
        self.backlog = 2048
        self.timeout_keep_alive = 5
        self.timeout_graceful_shutdown: float | None = SHUTDOWN_GRACE_S  # as server_config's, every server's

    def load(self) -> None:
        """Nothing to load (uvicorn's ``Config.load`` wraps and checks the app; the agent's needs neither)."""


def agent_settings(app: Any, host: str, port: int, limits: ConnectionLimits | None = None) -> ServerSettings:
    """The agent's server settings: :class:`GuardedHttpToolsProtocol` for ``app``, its connections
    capped (:func:`~.http_server.limit_connections`, which raises ``RLIMIT_NOFILE`` first), and
    uvicorn's loggers set up as the agent's ``uvicorn.Config`` left them (:func:`log_like_config`)."""
    log_like_config()
    protocol = type("ServerProtocol", (GuardedHttpToolsProtocol,), {})  # its own guard
    settings = ServerSettings(app, host, port, protocol)
    limit_connections(settings, limits)
    return settings


TRACE_LOG_LEVEL = 5
"""uvicorn's ``TRACE`` level, which its protocols compare their logger's level with."""


def log_like_config() -> None:
    """uvicorn's loggers as ``uvicorn.Config(log_level="warning", access_log=False)`` with its default
    ``log_config`` leaves them (:func:`~.http_server.log_like_uvicorn`, then the levels and the access
    logger silenced): the protocol logs an app's exception through ``uvicorn.error``, and logs each
    request only when ``uvicorn.access`` has a handler anywhere up its chain."""
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    log_like_uvicorn()
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False


class ServerState:
    """What the protocol shares between connections (uvicorn's ``ServerState``)."""

    def __init__(self) -> None:
        self.total_requests = 0
        self.connections: set[Any] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.default_headers: list[tuple[bytes, bytes]] = []


class AgentServer:
    """Serves :class:`ServerSettings` until SIGINT or SIGTERM, then drains (see the module
    documentation). Built ahead and started later (the zygote builds the agent's, ``agent.server.prepare``).
    Sleeps while it serves: no tick (uvicorn's main loop wakes every 100 ms for its ``Date`` header)."""

    def __init__(self, config: ServerSettings) -> None:
        self.config = config
        self.server_state = ServerState()
        self.servers: list[asyncio.base_events.Server] = []
        self.started = False
        self.should_exit = False
        self.force_exit = False
        self._captured_signals: list[int] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serves on ``sockets`` (listening already) or on the settings' host and port, until stopped."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        with self._capture_signals():
            await self._startup(sockets)
            if not self.should_exit:
                await self._stop.wait()
            if self.started:
                await self._shutdown(sockets)

    def _protocol(self, _loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
        return self.config.http(config=self.config, server_state=self.server_state, app_state={}, _loop=_loop)

    async def _startup(self, sockets: list[socket.socket] | None) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        if sockets is not None:
            for sock in sockets:
                self.servers.append(await loop.create_server(self._protocol, sock=sock, backlog=config.backlog))
        else:
            try:
                server = await loop.create_server(
                    self._protocol, host=config.host, port=config.port, backlog=config.backlog
                )
            except OSError as exc:
                log.error(exc)
                sys.exit(STARTUP_FAILURE)
            self.servers.append(server)
        self.started = True

    async def _shutdown(self, sockets: list[socket.socket] | None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(DRAIN_POLL_S)
        try:
            await asyncio.wait_for(self._drained(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            log.error("Cancel %s running task(s), timeout graceful shutdown exceeded", len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")

    async def _drained(self) -> None:
        # Polled, as uvicorn's server polls them: the protocol changes these sets and tells no one.
        state = self.server_state
        while state.connections and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        while state.tasks and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        for server in self.servers:
            await server.wait_closed()

    @contextlib.contextmanager
    def _capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        # ``_signal``'s, not ``signal.signal``: that wrapper turns the old handler into an enum member,
        # and for a handler that is none (asyncio.Runner's SIGINT handler, a partial holding the main
        # task) builds a ValueError whose message holds its repr, which formats the task's callbacks
        # with ``inspect``: the one use of it in the agent's start (see sandboxd.agent.lean.DEFERRED).
        original = {sig: _signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                _signal.signal(sig, handler)
        # Ended by a signal: now that the old handlers are back, it takes its course (the default ends
        # the process by that signal, as an agent without this server would have ended).
        for captured in reversed(self._captured_signals):
            signal.raise_signal(captured)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """The signal handler: a stop; a second SIGINT during one forces it (no more waiting)."""
        self._captured_signals.append(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        if self._stop is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
