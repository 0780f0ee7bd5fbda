"""Scenario ``watch``: recursive directory watching through the official E2B SDK, beside raw inotify.

* write→event latency: ``time.perf_counter_ns()`` just before creating a uniquely named empty file in
  a subdirectory of a recursive watch, until the consumer sees that file's CREATE. Five consumers,
  each on its own directory, measured in alternating blocks so drift falls on all of them: the SDK's
  async stream (``AsyncSandbox.files.watch_dir(..., recursive=True)``, Connect JSON over HTTP/1.1),
  the SDK's sync polling handle (``get_new_events()`` in a tight loop), the same agent stream read by
  a minimal Connect client of our own (the agent's share, without the SDK's), raw inotify through
  ``inotify_simple`` (a reader thread blocked in ``read``), and ``watchdog``'s Observer (inotify).
* sustained events/s: a separate process creates K empty files as fast as it can; CREATE events
  delivered per second at the consumer: the SDK stream and the minimal client beside ``inotify_simple``.
* the 10k-file burst (``mkdir burst && cd burst && seq 1 10000 | xargs touch``) in a recursive
  watch: delivered, lost, whether the loss was reported (a ``data_loss`` error), and silent loss
  (lost and not reported), through the SDK stream and the sync handle, beside watchdog.

The watched directories are on tmpfs when there is one (see :func:`watch_dir_root`). The SDK runs in
this process, in debug mode (``E2B_DEBUG=true``, ``E2B_SANDBOX_URL``), against an agent of its own
(see :class:`SdkAgent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from .common import (
    Context,
    RemoteAgent,
    Result,
    ScenarioSkipped,
    cpu_meter,
    die_with_parent,
    free_port,
    fs_type,
    median,
    open_for_compare,
    percentile,
    sdk_sandbox,
    stop_process,
    wait_for_http,
)

SAMPLE_TIMEOUT_S = 10.0
"""A latency sample whose event has not arrived after this long fails the scenario (a lost event)."""

QUIET_S = 5.0
"""After the file-making process exits, a consumer with no new event for this long is done."""

GAP_S = 0.001
"""Untimed pause between two latency samples, so each one starts from an idle consumer."""

BLOCK = 25
"""Latency samples per consumer before the next consumer takes its turn."""

WARMUP = 20
"""Untimed latency samples per consumer before the timed ones."""

BURST_FILES = 10_000
BURST_SCRIPT = f"mkdir burst && cd burst && seq 1 {BURST_FILES} | xargs touch"

TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0

# The mask the agent's watcher (crates/sandboxd-watch/src/inotify.rs) asks the kernel for, so the raw
# baseline reads the same events: CREATE MODIFY ATTRIB DELETE DELETE_SELF MOVED_FROM MOVED_TO MOVE_SELF
# EXCL_UNLINK ONLYDIR.
IN_MASK = 0x100 | 0x002 | 0x004 | 0x200 | 0x400 | 0x040 | 0x080 | 0x800 | 0x04000000 | 0x01000000
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000

CREATOR = """
import os, sys, time
d, k = sys.argv[1], int(sys.argv[2])
flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
t0 = time.perf_counter_ns()
for i in range(k):
    os.close(os.open(f"{d}/{i}", flags, 0o644))
print(t0, time.perf_counter_ns())
"""
"""Makes K empty files; prints its start and end on CLOCK_MONOTONIC (``perf_counter_ns`` on Linux, the
same clock in every process, so the consumer's timestamps compare with them)."""


# ------------------------------------------------------------------------------------- the SDK's agent


class SdkAgent:
    """``sandboxd agent`` on a free loopback port WITHOUT ``--access-token``.

    The official SDK in debug mode (``Sandbox.create()`` with ``E2B_DEBUG=true``) makes no API call and
    has no envd access token, so it sends no ``X-Access-Token``: an agent that required one would
    answer 401. The framework's own agent (``ctx.agent``) has a token, so SDK rows use this one."""

    name = "sandboxd agent (no token, for the SDK)"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "sdk-agent.log"
        args = [sys.executable, "-m", "sandboxd", "agent", "--port", str(self.port)]
        args += ["--user", getpass.getuser(), "--workdir", str(workdir)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            wait_for_http(f"{self.url}/health", self.process, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.ps = psutil.Process(self.process.pid)

    def stop(self) -> None:
        stop_process(self.process)


@contextlib.contextmanager
def sdk_agent(workdir: Path) -> Iterator[SdkAgent]:
    """A token-less agent, with the SDK's debug-mode variables pointing at it for the duration."""
    agent = SdkAgent(workdir)
    saved = {k: os.environ.get(k) for k in ("E2B_DEBUG", "E2B_SANDBOX_URL")}
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = agent.url
    try:
        yield agent
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        agent.stop()


def is_data_loss(exc: BaseException | None) -> bool:
    """Whether an SDK error is the agent's explicit ``data_loss`` (events were lost, and said so)."""
    return exc is not None and "data_loss" in str(exc).lower()  # e.g. "Code.DATA_LOSS: events were lost: …"


CREATE_NS: list[int] = []
"""How long each timed ``make_empty`` took (the create syscalls alone), for context."""


def make_empty(path: Path) -> None:
    t0 = time.perf_counter_ns()
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    CREATE_NS.append(time.perf_counter_ns() - t0)


@contextlib.contextmanager
def watch_dir_root(ctx: Context) -> Iterator[Path]:
    """Where the watched directories go: tmpfs (``/dev/shm``) when there is one, else the run's temp dir.

    On a disk, creating a file can cost from 5 µs to over 1 ms depending on other writers (ext4's
    journal; on a 2-core VM shared with compilers we saw 0.7-1 ms p50), and the kernel queues
    IN_CREATE only at the end of that syscall, so the disk's time would swamp the watch path under
    test. inotify behaves the same on both; only the cost of making the file differs."""
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs" and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-watch-", dir=shm))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield ctx.tmp


# ------------------------------------------------------------------------------------------- consumers


class Waiter:
    """Thread-safe hand-over from a consumer thread to the sampling thread: name → arrival time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[int]]] = {}

    def expect(self, name: str) -> tuple[threading.Event, list[int]]:
        slot = (threading.Event(), [0])
        with self._lock:
            self._pending[name] = slot
        return slot

    def seen(self, name: str, t_ns: int) -> None:
        with self._lock:
            slot = self._pending.pop(name, None)
        if slot is not None:
            slot[1][0] = t_ns
            slot[0].set()

    def measure(self, path: Path, name: str) -> int:
        done, t1 = self.expect(name)
        t0 = time.perf_counter_ns()
        make_empty(path)
        if not done.wait(SAMPLE_TIMEOUT_S):
            raise RuntimeError(f"no CREATE event for {name} within {SAMPLE_TIMEOUT_S:.0f}s")
        return t1[0] - t0


@dataclass
class Latency:
    key: str
    label: str
    root: Path
    samples: list[float] = field(default_factory=list)
    """milliseconds"""
    create_us: list[float] = field(default_factory=list)
    """microseconds the create syscalls of each sample took (inside the sample)"""
    extra: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> None:
        raise NotImplementedError

    async def measure(self, name: str) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


@dataclass
class StreamLatency(Latency):
    """The SDK's async stream: ``on_event`` (called on the event loop) resolves the sample's future.

    With ``agent`` set (``--compare-agent``), the SDK talks to that agent instead of ours."""

    agent: RemoteAgent | None = None
    sandbox: Any = None
    handle: Any = None
    waiting: dict[str, asyncio.Future[int]] = field(default_factory=dict)

    def on_event(self, event: Any) -> None:
        t = time.perf_counter_ns()
        if event.type.value == "create":
            future = self.waiting.pop(event.name, None)
            if future is not None and not future.done():
                future.set_result(t)

    async def start(self) -> None:
        from e2b import AsyncSandbox

        if self.agent is not None:
            self.sandbox = sdk_sandbox(self.agent.url, self.agent.token, asynchronous=True)
        else:
            self.sandbox = await AsyncSandbox.create()
        self.handle = await self.sandbox.files.watch_dir(str(self.root), self.on_event, recursive=True, timeout=0)

    async def measure(self, name: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[name] = future
        t0 = time.perf_counter_ns()
        make_empty(self.root / name)
        return await asyncio.wait_for(future, SAMPLE_TIMEOUT_S) - t0

    async def stop(self) -> None:
        await self.handle.stop()


@dataclass
class PollLatency(Latency):
    """The SDK's sync polling handle, polled in a tight loop (the event loop is blocked meanwhile)."""

    sandbox: Any = None
    handle: Any = None
    polls: int = 0

    async def start(self) -> None:
        from e2b import Sandbox

        self.sandbox = Sandbox.create()
        self.handle = self.sandbox.files.watch_dir(str(self.root), recursive=True)

    async def measure(self, name: str) -> int:
        t0 = time.perf_counter_ns()
        make_empty(self.root / name)
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        while time.monotonic() < deadline:
            events = self.handle.get_new_events()
            self.polls += 1
            if any(e.name == name and e.type.value == "create" for e in events):
                return time.perf_counter_ns() - t0
        raise RuntimeError(f"no CREATE event for {name} within {SAMPLE_TIMEOUT_S:.0f}s")

    async def stop(self) -> None:
        self.handle.stop()


class RawInotify:
    """``inotify_simple`` on a directory and given subdirectories, read by a thread blocked in ``read``
    (``poll`` with a 100 ms timeout, only so that it can be stopped). Calls ``on_create(relative name,
    perf_counter_ns)`` for each IN_CREATE; counts overflows."""

    def __init__(self, root: Path, subdirs: list[str], on_create: Any) -> None:
        from inotify_simple import INotify  # type: ignore[import-untyped]

        self.inotify = INotify()
        self.dirs: dict[int, str] = {}
        for rel in ["", *subdirs]:
            wd = self.inotify.add_watch(root / rel if rel else root, IN_MASK)
            self.dirs[wd] = rel
        self.on_create = on_create
        self.events = 0
        self.overflows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raw-inotify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            events = self.inotify.read(timeout=100)
            t = time.perf_counter_ns()
            for event in events:
                self.events += 1
                if event.mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                elif event.mask & IN_CREATE:
                    parent = self.dirs.get(event.wd, "?")
                    self.on_create(f"{parent}/{event.name}" if parent else event.name, t)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.inotify.close()


@dataclass
class RawLatency(Latency):
    waiter: Waiter = field(default_factory=Waiter)
    reader: RawInotify | None = None

    async def start(self) -> None:
        self.reader = RawInotify(self.root, ["sub"], self.waiter.seen)

    async def measure(self, name: str) -> int:
        return self.waiter.measure(self.root / name, name)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.close()


class ConnectStream:
    """``WatchDir`` over Connect JSON with a minimal client of our own (httpx, a reader thread, ``json``):
    the agent's share of the latency, without the SDK's. Calls ``on_create(name, perf_counter_ns)``."""

    def __init__(self, url: str, root: Path, on_create: Any) -> None:
        self.root = root
        self.on_create = on_create
        self.error: dict[str, Any] | None = None
        """the Connect error the stream ended with, if any (``data_loss`` on overflow)"""
        self.ended = threading.Event()
        self._stop = threading.Event()
        self.client = httpx.Client(timeout=None)
        body = json.dumps({"path": str(root), "recursive": True}).encode()
        self._stream = self.client.stream(
            "POST",
            f"{url}/filesystem.Filesystem/WatchDir",
            content=struct.pack(">BI", 0, len(body)) + body,
            headers={"Content-Type": "application/connect+json"},
        )
        response = self._stream.__enter__()
        if response.status_code != 200:
            raise RuntimeError(f"WatchDir: HTTP {response.status_code}")
        self._chunks = response.iter_raw()
        self._buffer = bytearray()
        first = self._next()
        if first is None or "start" not in first:
            raise RuntimeError(f"WatchDir: expected a start message, got {first}")
        self._thread = threading.Thread(target=self._run, name="connect-watch", daemon=True)
        self._thread.start()

    def _next(self) -> dict[str, Any] | None:
        """The next message, or None at the end of the stream."""
        while True:
            if len(self._buffer) >= 5:
                flags, length = struct.unpack_from(">BI", self._buffer)
                if len(self._buffer) >= 5 + length:
                    message = json.loads(bytes(self._buffer[5 : 5 + length]))
                    del self._buffer[: 5 + length]
                    if flags & 0x02:
                        self.error = message.get("error")
                        return None
                    return message  # type: ignore[no-any-return]
            chunk = next(self._chunks, None)
            if chunk is None:
                return None
            self._buffer += chunk

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                message = self._next()
                t = time.perf_counter_ns()
                if message is None:
                    return
                event = message.get("filesystem")
                if event is not None and event.get("type") == "EVENT_TYPE_CREATE":
                    self.on_create(event["name"], t)
        finally:
            self.ended.set()

    def close(self) -> None:
        self._stop.set()
        if not self.ended.is_set():
            make_empty(self.root / f"stop-{time.perf_counter_ns()}")  # wakes the reader, which then sees the flag
        self._thread.join(SAMPLE_TIMEOUT_S)
        self._stream.__exit__(None, None, None)
        self.client.close()


@dataclass
class ConnectLatency(Latency):
    url: str = ""
    waiter: Waiter = field(default_factory=Waiter)
    stream: ConnectStream | None = None

    async def start(self) -> None:
        self.stream = ConnectStream(self.url, self.root, self.waiter.seen)

    async def measure(self, name: str) -> int:
        return self.waiter.measure(self.root / name, name)

    async def stop(self) -> None:
        if self.stream is not None:
            self.stream.close()


class WatchdogLog(logging.Handler):
    """Counts (and keeps off stderr) watchdog's log lines: it logs a warning on an inotify overflow,
    but has no way to tell the application's handler."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.overflows = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.overflows += 1


@contextlib.contextmanager
def watchdog_log() -> Iterator[WatchdogLog]:
    logger = logging.getLogger("watchdog")
    handler = WatchdogLog()
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


def watchdog_observer(root: Path, on_created: Any) -> Any:
    """watchdog's default Observer (inotify on Linux), recursive, calling ``on_created(relative name,
    perf_counter_ns)`` for each file created."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    base = str(root)

    class Handler(FileSystemEventHandler):
        def on_created(self, event: FileSystemEvent) -> None:
            t = time.perf_counter_ns()
            if not event.is_directory:
                on_created(os.path.relpath(os.fsdecode(event.src_path), base), t)

    observer = Observer()
    observer.schedule(Handler(), base, recursive=True)
    observer.start()
    return observer


@dataclass
class WatchdogLatency(Latency):
    waiter: Waiter = field(default_factory=Waiter)
    observer: Any = None

    async def start(self) -> None:
        self.observer = watchdog_observer(self.root, self.waiter.seen)

    async def measure(self, name: str) -> int:
        return self.waiter.measure(self.root / name, name)

    async def stop(self) -> None:
        self.observer.stop()
        self.observer.join()


async def measure_latency(ctx: Context, base: Path, url: str, n: int) -> dict[str, Latency]:
    compare = ctx.compare_agent
    kinds: list[tuple[type[Latency], str, str]] = [
        (StreamLatency, "stream", "SDK async stream"),
        (PollLatency, "poll", "SDK sync handle (tight polling)"),
        (ConnectLatency, "connect", "agent stream, minimal Connect JSON client (no SDK)"),
        (RawLatency, "raw", "inotify_simple (raw inotify, reader thread)"),
        (WatchdogLatency, "watchdog", "watchdog Observer (inotify)"),
    ]
    if compare is not None:
        kinds.append((StreamLatency, "compare", f"{compare.name}, SDK async stream"))
    consumers: list[Latency] = []
    for cls, key, label in kinds:
        root = base / f"latency-{key}"
        (root / "sub").mkdir(parents=True)
        consumer = cls(key, label, root)
        if isinstance(consumer, ConnectLatency):
            consumer.url = url
        if isinstance(consumer, StreamLatency) and key == "compare":
            consumer.agent = compare
            open_for_compare(root, root / "sub")
        await consumer.start()
        consumers.append(consumer)
    try:
        for c in consumers:
            for i in range(WARMUP):
                await c.measure(f"sub/warm-{i}")
                await asyncio.sleep(GAP_S)
        ctx.log(f"latency: {n} samples per consumer, in alternating blocks of {BLOCK}")
        round_no = 0
        while any(len(c.samples) < n for c in consumers):
            shift = round_no % len(consumers)
            for c in consumers[shift:] + consumers[:shift]:
                for i in range(min(BLOCK, n - len(c.samples))):
                    CREATE_NS.clear()
                    c.samples.append(await c.measure(f"sub/r{round_no}-{i}") / 1e6)
                    c.create_us.append(CREATE_NS[0] / 1e3)
                    await asyncio.sleep(GAP_S)
            round_no += 1
    finally:
        for c in consumers:
            await c.stop()
    poll = next(c for c in consumers if isinstance(c, PollLatency))
    poll.extra["get_new_events_calls_per_sample"] = round(poll.polls / (n + WARMUP), 2)
    for c in consumers:
        p50, p99 = percentile(c.samples, 50) or 0.0, percentile(c.samples, 99) or 0.0
        ctx.log(f"  {c.label:<52} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
    return {c.key: c for c in consumers}


def report_latency(ctx: Context, got: dict[str, Latency], fs: str) -> None:
    raw, dog = got["raw"], got["watchdog"]
    rows = [(got["stream"], raw), (got["stream"], dog), (got["poll"], raw), (got["connect"], raw)]
    if "compare" in got:
        rows.insert(2, (got["stream"], got["compare"]))
    for ours, base in rows:
        ctx.report(
            Result(
                name=f"watch: write→event latency, {ours.label}",
                unit="ms (p50)",
                ours=percentile(ours.samples, 50),
                baseline=percentile(base.samples, 50),
                baseline_name=base.label,
                better="lower",
                p50=percentile(ours.samples, 50),
                p99=percentile(ours.samples, 99),
                samples={"ours": ours.samples, "baseline": base.samples},
                extra={
                    "n": len(ours.samples),
                    "filesystem": fs,
                    "baseline_p99": percentile(base.samples, 99),
                    "ours_max": max(ours.samples),
                    "file": "empty, created in a subdirectory of a recursive watch",
                    "create_syscalls_p50_us": percentile(ours.create_us, 50),
                    "create_syscalls_p99_us": percentile(ours.create_us, 99),
                    **ours.extra,
                },
            )
        )


# ----------------------------------------------------------------------------------------- sustained


@dataclass
class Count:
    """CREATE events delivered for names under a prefix, with the time of the last one."""

    prefix: str
    delivered: set[str] = field(default_factory=set)
    events: int = 0
    last_ns: int = 0
    reported_loss: bool = False
    error: str | None = None
    stalled: bool = False
    """the maker exited, not everything arrived, nothing came for QUIET_S and the stream did not end"""
    agent_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    """CPU of this (the bench's) process: the consumer, plus the other idle consumers' threads"""

    def on_create(self, name: str, t_ns: int) -> None:
        if name.startswith(self.prefix):
            self.delivered.add(name)
            self.last_ns = t_ns


async def wait_for(count: Count, proc: subprocess.Popen[bytes], expected: int, ended: Any = None) -> None:
    """Until ``expected`` names arrived, or ``ended()``, or the maker exited and nothing came for QUIET_S."""
    quiet_since = time.monotonic()
    seen = -1
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(count.delivered) >= expected or (ended is not None and ended()):
            return
        if len(count.delivered) != seen or proc.poll() is None:
            seen, quiet_since = len(count.delivered), time.monotonic()
        elif time.monotonic() - quiet_since > QUIET_S:
            count.stalled = True
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"watch consumer still receiving after 300 s ({len(count.delivered)}/{expected})")


def finish_maker(proc: subprocess.Popen[bytes], what: str) -> bytes:
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out


def start_creator(directory: Path, k: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CREATOR, str(directory), str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@dataclass
class Target:
    """What a sustained or burst run needs to know about an agent: where it is, what to meter."""

    url: str
    ps: psutil.Process | None
    token: str | None = None
    sdk_debug_env: bool = True
    """True: ours, reached through ``AsyncSandbox.create()`` in debug mode (``E2B_SANDBOX_URL``);
    False: the compare agent, reached through :func:`common.sdk_sandbox`"""

    async def sandbox(self) -> Any:
        from e2b import AsyncSandbox

        if self.sdk_debug_env:
            return await AsyncSandbox.create()
        return sdk_sandbox(self.url, self.token, asynchronous=True)


async def sdk_stream(root: Path, count: Count, start: Any, expected: int, agent: Target) -> subprocess.Popen[bytes]:
    """Runs ``start()`` (a maker) inside a recursive SDK stream on ``root`` until ``count`` is done."""
    ended = asyncio.Event()

    def on_event(event: Any) -> None:
        count.events += 1
        if event.type.value == "create":
            count.on_create(event.name, time.perf_counter_ns())

    def on_exit(error: Exception | None) -> None:
        count.reported_loss = is_data_loss(error)
        count.error = None if error is None else str(error)[:300]
        ended.set()

    sandbox = await agent.sandbox()
    handle = await sandbox.files.watch_dir(str(root), on_event, on_exit=on_exit, recursive=True, timeout=0)
    proc: subprocess.Popen[bytes] = start()
    try:
        await wait_for(count, proc, expected, ended.is_set)
    finally:
        await handle.stop()  # type: ignore[no-untyped-call]
    return proc


async def sustained_run(
    key: str, root: Path, k: int, agent: Target, compare: Target | None
) -> tuple[Count, tuple[int, int]]:
    count = Count("sub/")
    cpu0 = time.process_time()
    metered = compare.ps if key == "compare" and compare is not None else agent.ps
    with cpu_meter(metered) as agent_cpu:
        if key == "stream":
            proc = await sdk_stream(root, count, lambda: start_creator(root / "sub", k), k, agent)
        elif key == "compare" and compare is not None:
            open_for_compare(root, root / "sub")
            proc = await sdk_stream(root, count, lambda: start_creator(root / "sub", k), k, compare)
        elif key == "connect":
            stream = ConnectStream(agent.url, root, count.on_create)
            proc = start_creator(root / "sub", k)
            try:
                await wait_for(count, proc, k, stream.ended.is_set)
            finally:
                stream.close()
            if stream.error is not None:
                count.reported_loss = stream.error.get("code") == "data_loss"
                count.error = str(stream.error)[:300]
        else:
            reader = RawInotify(root, ["sub"], count.on_create)
            proc = start_creator(root / "sub", k)
            try:
                await wait_for(count, proc, k)
            finally:
                reader.close()
            count.events = reader.events
            count.reported_loss = reader.overflows > 0
    count.agent_cpu_s = round(agent_cpu[0], 3)
    count.client_cpu_s = round(time.process_time() - cpu0, 3)
    t0, t1 = map(int, finish_maker(proc, "file creator").split())
    return count, (t0, t1)


SUSTAINED = {
    "stream": "SDK async stream",
    "connect": "agent stream, minimal Connect JSON client (no SDK)",
    "raw": "inotify_simple (raw inotify, reader thread)",
}


async def measure_sustained(ctx: Context, base: Path, agent: Target, k: int, runs: int, compare: Target | None) -> None:
    ctx.log(f"sustained: {runs} x {k:,} files made by a separate process, per consumer, alternating")
    labels = dict(SUSTAINED)
    if compare is not None and ctx.compare_agent is not None:
        labels["compare"] = f"{ctx.compare_agent.name}, SDK async stream"
    measured: dict[str, list[tuple[Count, tuple[int, int]]]] = {key: [] for key in labels}
    keys = list(labels)
    for i in range(runs):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            root = base / f"sustained-{key}-{i}"
            (root / "sub").mkdir(parents=True)
            count, span = await sustained_run(key, root, k, agent, compare)
            measured[key].append((count, span))
            maker = k / ((span[1] - span[0]) / 1e9)
            ctx.log(
                f"  {key:<8} {len(count.delivered):>7,}/{k:,} delivered {rate_of(count, span):>9,.0f} CREATE/s"
                f"  (maker {maker:>7,.0f} files/s; agent CPU {count.agent_cpu_s:.2f} s, bench process CPU"
                f" {count.client_cpu_s:.2f} s; loss reported: {count.reported_loss})"
            )

    def summary(key: str) -> tuple[list[float], dict[str, Any]]:
        runs_ = measured[key]
        return [rate_of(c, s) for c, s in runs_], {
            "delivered": [len(c.delivered) for c, _ in runs_],
            "loss_reported": [c.reported_loss for c, _ in runs_],
            "stalled": [c.stalled for c, _ in runs_],
            "error": next((c.error for c, _ in runs_ if c.error), None),
            "maker_files_per_s": [round(k / ((s[1] - s[0]) / 1e9)) for _, s in runs_],
            "drain_after_maker_ms": [round((c.last_ns - s[1]) / 1e6, 1) + 0.0 for c, s in runs_],
            "agent_cpu_s": [c.agent_cpu_s for c, _ in runs_],
            "bench_process_cpu_s": [c.client_cpu_s for c, _ in runs_],
        }

    pairs = [("stream", "raw"), ("connect", "raw")]
    if "compare" in labels:
        pairs.insert(1, ("stream", "compare"))
    for key, base_key in pairs:
        rates, extra = summary(key)
        base_rates, base_extra = summary(base_key)
        ctx.report(
            Result(
                name=f"watch: sustained {k:,} creates, {SUSTAINED[key]}",
                unit="CREATE events/s",
                ours=median(rates),
                baseline=median(base_rates),
                baseline_name=labels[base_key],
                better="higher",
                samples={"ours": rates, "baseline": base_rates},
                extra={
                    "runs": runs,
                    "files": k,
                    "how": "CREATEs delivered / (last delivery - maker's first create)",
                    "ours": extra,
                    "baseline": base_extra,
                },
            )
        )
        # Whole delivery is the point of the drain thread: the fewest files any run delivered, beside
        # raw inotify's fewest (a reader thread doing nothing else, so normally all of them).
        ctx.report(
            Result(
                name=f"watch: sustained {k:,} creates, files delivered (fewest of {runs}), {SUSTAINED[key]}",
                unit="files",
                ours=float(min(extra["delivered"])),
                baseline=float(min(base_extra["delivered"])),
                baseline_name=labels[base_key],
                better="higher",
                samples={
                    "ours": [float(n) for n in extra["delivered"]],
                    "baseline": [float(n) for n in base_extra["delivered"]],
                },
                extra={"files": k, "loss_reported": extra["loss_reported"]},
            )
        )


def rate_of(count: Count, span: tuple[int, int]) -> float:
    if not count.delivered or count.last_ns <= span[0]:
        return 0.0
    return len(count.delivered) / ((count.last_ns - span[0]) / 1e9)


# --------------------------------------------------------------------------------------------- burst


def start_burst(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", BURST_SCRIPT], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def burst_stream(root: Path, log: WatchdogLog, agent: Target) -> Count:
    count = Count("burst/")
    proc = await sdk_stream(root, count, lambda: start_burst(root), BURST_FILES, agent)
    finish_maker(proc, "burst")
    return count


async def burst_poll(root: Path, log: WatchdogLog, agent: Target) -> Count:
    """The sync handle, polled in a tight loop; a ``data_loss`` error is noted and polling goes on
    (the agent's polling watcher rescans and continues after telling the client once)."""
    from e2b import Sandbox

    count = Count("burst/")
    sandbox = Sandbox.create()
    handle = sandbox.files.watch_dir(str(root), recursive=True)
    proc = start_burst(root)
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 300
    try:
        while len(count.delivered) < BURST_FILES:
            if time.monotonic() > deadline:
                raise RuntimeError("sync handle still receiving after 300 s")
            try:
                events = handle.get_new_events()
            except Exception as exc:
                if not is_data_loss(exc):
                    raise
                count.reported_loss = True
                count.error = str(exc)[:300]
                continue
            t = time.perf_counter_ns()
            for e in events:
                count.events += 1
                if e.type.value == "create":
                    count.on_create(e.name, t)
            if events or proc.poll() is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > QUIET_S:
                count.stalled = True
                break
    finally:
        handle.stop()
    finish_maker(proc, "burst")
    return count


async def burst_watchdog(root: Path, log: WatchdogLog, agent: Target) -> Count:
    count = Count("burst/")
    before = log.overflows
    observer = watchdog_observer(root, count.on_create)
    proc = start_burst(root)
    try:
        await wait_for(count, proc, BURST_FILES)
    finally:
        observer.stop()
        observer.join()
    count.stalled = False  # watchdog has no end to wait for: quiet is its normal end
    count.error = f"logged {log.overflows - before} overflow warning(s)" if log.overflows > before else None
    finish_maker(proc, "burst")
    return count


async def measure_burst(ctx: Context, base: Path, runs: int, agent: Target, compare: Target | None) -> list[int]:
    """Returns the silent losses of our two consumers (for the targets line)."""
    ctx.log(f"burst: {runs} x `{BURST_SCRIPT}` per consumer, alternating")
    kinds = {"stream": burst_stream, "poll": burst_poll, "watchdog": burst_watchdog}
    if compare is not None:
        kinds["compare"] = burst_stream
    got: dict[str, list[Count]] = {k: [] for k in kinds}
    keys = list(kinds)
    with watchdog_log() as log:
        for i in range(runs):
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                root = base / f"burst-{key}-{i}"
                root.mkdir()
                target = compare if key == "compare" and compare is not None else agent
                if key == "compare":
                    open_for_compare(root)
                count = await kinds[key](root, log, target)
                got[key].append(count)
                missing = BURST_FILES - len(count.delivered)
                ctx.log(
                    f"  {key:<8} delivered {len(count.delivered):>6,}  lost {missing:>6,}  loss reported: "
                    f"{count.reported_loss!s:<5}  events {count.events:,}{'  (stalled)' if count.stalled else ''}"
                    f"{'  ' + count.error if count.error else ''}"
                )
    dog = got["watchdog"]
    dog_delivered = [float(len(c.delivered)) for c in dog]
    silent: list[int] = []
    for key, label in (("stream", "SDK async stream"), ("poll", "SDK sync handle")):
        runs_ = got[key]
        delivered = [float(len(c.delivered)) for c in runs_]
        lost = [BURST_FILES - len(c.delivered) for c in runs_]
        silent_lost = [n if not c.reported_loss else 0 for n, c in zip(lost, runs_, strict=True)]
        silent.extend(silent_lost)
        ctx.report(
            Result(
                name=f"watch: 10k burst, files delivered, {label}",
                unit="files",
                ours=min(delivered),
                baseline=min(dog_delivered),
                baseline_name="watchdog Observer (cannot report overflow)",
                better="higher",
                samples={"ours": delivered, "baseline": dog_delivered},
                extra={
                    "runs": runs,
                    "figure": "the worst run",
                    "lost": lost,
                    "loss_reported": [c.reported_loss for c in runs_],
                    "silent_loss": silent_lost,
                    "stalled": [c.stalled for c in runs_],
                    "events_total": [c.events for c in runs_],
                    "error": next((c.error for c in runs_ if c.error), None),
                    "watchdog_lost": [BURST_FILES - len(c.delivered) for c in dog],
                    "watchdog_log": [c.error for c in dog],
                },
            )
        )
        if key == "stream" and "compare" in got and ctx.compare_agent is not None:
            theirs = got["compare"]
            ctx.report(
                Result(
                    name=f"watch: 10k burst, files delivered, {label}",
                    unit="files",
                    ours=min(delivered),
                    baseline=float(min(len(c.delivered) for c in theirs)),
                    baseline_name=f"{ctx.compare_agent.name}, SDK async stream",
                    better="higher",
                    samples={"ours": delivered, "baseline": [float(len(c.delivered)) for c in theirs]},
                    extra={
                        "runs": runs,
                        "figure": "the worst run",
                        "baseline_loss_reported": [c.reported_loss for c in theirs],
                        "baseline_error": next((c.error for c in theirs if c.error), None),
                        "baseline_stalled": [c.stalled for c in theirs],
                    },
                )
            )
        ctx.report(
            Result(
                name=f"watch: 10k burst, silent loss, {label}",
                unit="files",
                ours=float(max(silent_lost)),
                baseline=float(max(BURST_FILES - len(c.delivered) for c in dog)),
                baseline_name="watchdog's loss (never reported to the handler)",
                better="lower",
                extra={"runs": runs, "figure": "the worst run; silent = lost and no data_loss error"},
            )
        )
    return silent


# ----------------------------------------------------------------------------------------------- scenario


def run(ctx: Context) -> None:
    try:
        import e2b  # noqa: F401
        import inotify_simple  # noqa: F401
        import watchdog  # noqa: F401
    except ImportError as exc:
        raise ScenarioSkipped(f"{exc.name} is not installed (pip install e2b inotify_simple watchdog)") from None
    n = 300 if ctx.quick else 3000
    k = 5_000 if ctx.quick else 50_000
    runs = ctx.runs or (1 if ctx.quick else 3)
    with sdk_agent(ctx.tmp) as agent, watch_dir_root(ctx) as base:
        ctx.log(f"watched directories under {base} ({fs_type(base)})")
        compare = None
        if ctx.compare_agent is not None:
            c = ctx.compare_agent
            compare = Target(c.url, c.ps, c.token, sdk_debug_env=False)
            open_for_compare(base)
            ctx.log(f"also through the SDK against {c.name} ({c.url})")
        asyncio.run(_run(ctx, base, Target(agent.url, agent.ps), n, k, runs, compare))


async def _run(ctx: Context, base: Path, agent: Target, n: int, k: int, runs: int, compare: Target | None) -> None:
    latency = await measure_latency(ctx, base, agent.url, n)
    report_latency(ctx, latency, fs_type(base))
    await measure_sustained(ctx, base, agent, k, runs, compare)
    silent = await measure_burst(ctx, base, runs, agent, compare)
    stream = latency["stream"].samples
    p50, p99 = percentile(stream, 50) or 0.0, percentile(stream, 99) or 0.0
    ctx.log(
        "targets (issue): SDK stream "
        f"p50 {p50:.3f} ms (≤ {TARGET_P50_MS:g} ms: {'met' if p50 <= TARGET_P50_MS else 'NOT met'}), "
        f"p99 {p99:.3f} ms (≤ {TARGET_P99_MS:g} ms: {'met' if p99 <= TARGET_P99_MS else 'NOT met'}); "
        f"10k burst silent loss {max(silent)} (= 0: {'met' if max(silent) == 0 else 'NOT met'})"
    )
