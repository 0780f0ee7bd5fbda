"""Run the agent: uvicorn's httptools protocol on a server of our own (``.serving``), and optionally grpcio."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxd import ENVD_VERSION, __version__, _core

from .app import AgentApp
from .http_server import ConnectionLimits, limit_connections
from .idle import IdleTrim
from .lean import openssl_blocked
from .methods import build_methods, filesystem_later, process_methods
from .rpc import Method
from .serving import AgentServer, ServerSettings, agent_settings
from .state import AgentState
from .users import default_user_name

log = logging.getLogger("sandboxd.agent")

OOM_SCORE_ADJ = -900
"""The agent's own OOM score: user processes (envd sets them to 100) die first under memory pressure."""


@dataclass
class AgentOptions:
    """``sandboxd agent`` flags."""

    host: str = "127.0.0.1"
    port: int = 49983
    user: str | None = None
    workdir: str | None = None
    access_token: str | None = None
    grpc_port: int | None = None
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    listener: socket.socket | None = None
    """A socket bound to ``host:port`` and listening already (the zygote binds it first thing in a new
    sandbox, so the runtime's first connect succeeds while the agent starts); None binds here."""
    prepared: Prepared | None = None
    """The state and server settings built ahead (:func:`prepare`; the zygote's), else built here."""


@dataclass
class Prepared:
    """The agent's state, services and uvicorn settings, built before :func:`serve` runs: the zygote
    builds them once and every sandbox's agent starts from its own copy. Built in a fresh fork of the
    zygote they took 2.5-4.0 ms of every create, reused 0.8 ms (``docs/benchmarks.md``). They hold
    nothing of a sandbox: no token, and :func:`serve` sets the default user and the connection limit
    inside it."""

    state: AgentState
    methods: list[Method]
    idle: IdleTrim
    config: ServerSettings
    server: AgentServer
    """The server for ``config``, not started."""


def prepare(host: str, port: int, connections: ConnectionLimits | None = None, *, lazy: bool = False) -> Prepared:
    """Build the agent's state (its default user to be set by :func:`serve`) and server settings.
    ``lazy``: the filesystem and watch services are built on their first request
    (``methods.filesystem_later``), and ``methods`` holds the process service's alone."""
    state = AgentState(default_user="root")
    later = filesystem_later(state) if lazy else None
    methods = process_methods(state) if lazy else build_methods(state)
    idle = IdleTrim()  # what tune_allocator's trim threshold keeps after a big request, given back when idle
    state.freed = idle.freed
    config = agent_settings(idle.wrap(AgentApp(state, methods, later)), host, port, connections)
    return Prepared(state, methods, idle, config, AgentServer(config))


MALLOC_MMAP_THRESHOLD = 8 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
MALLOC_TOP_PAD = 16 << 20
MALLOC_ARENA_MAX = 1
"""One malloc arena for every thread. By default each thread that allocates while another holds the
main arena gets its own (the output reader, the file workers), and keeps its free memory resident.
Measured with the same build, two agents alternating, 6 rounds (medians): RSS after the runs 37 vs 41
MiB, and 29.2 vs 32.1 MiB idle after a round of requests; pipe output 482 vs 331 MB/s, uploads 203 vs
183 MB/s, ``Start /bin/true`` 2.9 vs 3.2 ms: no cost from the shared lock beyond the noise."""


def tune_allocator() -> None:
    """Keep glibc from returning and re-faulting the megabyte buffers that streaming allocates.

    Output and file streams allocate and free ~1 MiB buffers many times a second. By default glibc
    serves each from a fresh ``mmap`` and unmaps it on free, so every buffer is page-faulted in again:
    the benchmark measured 57% of the agent's streaming time in the kernel, mostly faults. Serving
    them from the heap, and trimming it only past 64 MiB, raised pipe output from ~0.6 to ~1 GB/s for
    a few MiB of extra RSS. And every thread shares one arena (:data:`MALLOC_ARENA_MAX`); that
    holds only when set before a second thread allocates, so :func:`serve` calls this first.
    (Through the extension rather than ``ctypes``, whose import costs 0.45 MiB.) On a C library other
    than glibc the allocator keeps its defaults.
    """
    _core.tune_malloc(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, MALLOC_TOP_PAD, MALLOC_ARENA_MAX)


def collect_start_garbage() -> None:
    """Collect, once before the first request, the reference cycles the imports and the set-up left.
    The collector's own thresholds would leave them for a long while (a full collection waits for
    the long-lived objects to grow by a quarter); freed now, their blocks are reused by the requests'
    objects and the heap's freed chunks go back with the idle trim. Measured in the standalone agent
    after 20 ``Start``s and the idle trim (medians of 3 starts alternating): 0.3 MiB of RSS (``[heap]``
    0.2, pymalloc's arenas 0.1), for one full collection at start."""
    gc.collect()


def protect_from_oom() -> None:
    """Lower our OOM score when allowed (root); silently keep it otherwise."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass


async def serve(options: AgentOptions) -> None:
    """Serve until cancelled or signalled."""
    tune_allocator()
    prepared = options.prepared
    if prepared is None:
        # the gRPC server registers every method at its start; Connect alone builds the filesystem's on use
        prepared = prepare(options.host, options.port, options.connections, lazy=options.grpc_port is None)
    else:  # built in the zygote: the connection cap follows this process's RLIMIT_NOFILE, not the zygote's
        limit_connections(prepared.config, options.connections)
    state, methods, idle = prepared.state, prepared.methods, prepared.idle
    state.default_user = default_user_name(options.user)
    state.default_workdir = options.workdir
    state.access_token = options.access_token or os.environ.get("SANDBOXD_ACCESS_TOKEN") or None
    state.user()  # fail fast on an unknown --user
    protect_from_oom()
    if options.prepared is None:  # standalone: the zygote collected before it froze its heap and forked us
        collect_start_garbage()
    grpc_server = None
    if options.grpc_port is not None:
        from .grpc_server import start_grpc

        grpc_server = await start_grpc(state, methods, options.host, options.grpc_port)
    grpc = f", gRPC on {options.host}:{options.grpc_port}" if grpc_server else ""
    start_line(
        f"sandboxd agent {__version__} (envd {ENVD_VERSION}) on http://{options.host}:{options.port}{grpc}, "
        f"default user {state.default_user}"
    )
    try:
        await prepared.server.serve([options.listener] if options.listener is not None else None)
    finally:
        idle.close()
        if grpc_server is not None:
            await grpc_server.stop(grace=1)


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging() -> None:
    """The agent's log lines (``<date> <time>,<ms> <logger> <LEVEL> <message>``, the time in UTC,
    which is how the runtime's ``sandbox logs`` reads it), warnings and up, on stderr; once (later
    calls change nothing). The zygote calls it after its preload, so a sandbox's agent does not build
    the handler (~0.4 ms in a fresh fork).

    UTC, not the local time ``logging`` writes by default: an agent forked from the zygote keeps the
    zone the zygote's C library loaded from the host (``localtime_r`` never reads it again), and a
    standalone agent has its template's ``/etc/localtime``; read as UTC, either zone put the agent's
    lines hours away from the runtime's own on a host or template that is not on UTC."""
    global _HANDLER
    root = logging.getLogger()
    if root.handlers:
        return
    _HANDLER = logging.StreamHandler()
    formatter = logging.Formatter(LOG_FORMAT)
    formatter.converter = time.gmtime
    _HANDLER.setFormatter(formatter)
    root.addHandler(_HANDLER)
    root.setLevel(logging.WARNING)


_HANDLER: logging.StreamHandler[Any] | None = None
"""The handler :func:`configure_logging` made, if it made one (a process that embeds the agent may
have configured ``logging`` its own way first)."""


def start_line(message: str) -> None:
    """The agent's one line at every start, as :func:`configure_logging` writes a warning (the
    runtime's ``sandbox logs`` shows it), in one ``write`` of its own rather than through ``logging``:
    the first record in a fresh fork of the zygote touches enough of ``logging``'s objects (each a
    copy-on-write fault there) to take ~0.3-0.4 ms of the agent's start, and so of every cold create's
    first command, where this write takes ~0.01 (``docs/benchmarks.md``, ``cold20``). A later
    warning pays that, off that path. Through ``logging`` after all where it is not configured as
    :func:`configure_logging` leaves it (a process that embeds the agent, a test's capture)."""
    handler = _HANDLER
    if handler is None or logging.getLogger().handlers != [handler] or not log.isEnabledFor(logging.WARNING):
        log.warning("%s", message)
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    line = f"{stamp},{int(now * 1000) % 1000:03d} {log.name} WARNING {message}\n"
    with contextlib.suppress(OSError, ValueError):  # as logging's: a closed stream loses the line, not the agent
        os.write(handler.stream.fileno(), line.encode(errors="backslashreplace"))


def run(options: AgentOptions, *, exits_after: bool = False) -> None:
    """Run :func:`serve` on uvloop, or on asyncio's own loop in a process without OpenSSL (uvloop
    imports ``ssl``; see :mod:`sandboxd.agent.lean`).

    ``exits_after``: the caller ends the process when this returns (the zygote's fork, with
    ``os._exit``), so the loop is run directly, without ``asyncio.Runner``'s set-up and its clean-up
    at the end (cancelling what is left, waiting for the default executor's threads): in a fresh fork
    of the zygote that was ~100 of the agent's ~1,400 page faults and ~0.5 ms of its start's CPU (100
    forks each way, alternating)."""
    configure_logging()
    if openssl_blocked():
        asyncio.run(serve(options))
        return
    import uvloop

    if exits_after:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(options))
        return
    uvloop.run(serve(options))
