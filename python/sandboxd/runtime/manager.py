"""Sandbox lifecycle: create, timeouts, pause/resume, kill, death, and re-adoption after a restart.

State is in SQLite (:mod:`.store`); the processes are in the kernel. A sandbox is an init (PID 1
of its pid namespace) with the agent as its only child, forked by the zygote (:mod:`.zygote_client`)
into fresh namespaces, its own user namespace among them, over an overlay whose writable layer is
on the sandbox's own disk (``crates/sandboxd-jail``). Its host id range comes from the host-wide
registry and is kept for the sandbox's whole life (paused to disk included: its files are owned by
that range), and released with it. The runtime holds a handle per live sandbox and watches the
init's pidfd, so a sandbox whose agent died is noticed at once, recorded with its reason, and
reclaimed (processes, cgroup, disk, id range).

Every state transition of a sandbox (create, kill, pause, resume, timeout, death) runs under that
sandbox's lock, so exactly one of them owns the sandbox at a time: a kill racing a timeout or a
death finds the state the other left, never a half-done one. The sandbox limit is a count of slots
taken synchronously, before any await, by creates and resumes, so concurrent requests never
overshoot it.

Pause ``full`` freezes the cgroup (processes stay in memory; resume takes milliseconds).
Pause ``filesystem`` kills the processes and keeps the writable layer; resume starts a fresh agent
on it. Paused time does not count against the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import secrets
import socket
import string
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxd import _core

from . import lifecycle, snapshots
from .agent_client import AGENT_PORT, READY_TIMEOUT_S, init_agent, interpreter_ready, start_template_command
from .disks import DiskPool, discard, make_durable, open_root, released
from .errors import ApiError, not_found
from .lifecycle import RETENTION_S, LifecycleEvent, LifecycleQuery
from .logs import LogEntry, agent_failure, from_events, read_agent_log
from .metrics import SAMPLE_INTERVAL_S, MetricsHistory, Sampler, Target, bucket
from .metrics import MetricsSample as MetricsSample  # re-exported: sandboxd.kube reads it from here
from .network import NetworkConfig, SandboxNetworks
from .network.addressing import Slot
from .observe import Observer
from .sandbox_dirs import DISK_IMAGE as DISK_IMAGE  # a sandbox's disk image, in its directory
from .sandbox_dirs import SandboxDirs
from .secrets import SecretStore
from .store import SandboxRow, Store, TemplateRow
from .templates import Template, Templates
from .trust import TrustLayers
from .volumes import Volumes
from .warm import Warm, WarmPool, renice
from .zygote_client import ZygoteClient

log = logging.getLogger("sandboxd.runtime")

DEFAULT_TIMEOUT_S = 300
"""E2B's default sandbox lifetime."""

REAPER_INTERVAL_S = 0.25
"""How often expired sandboxes are looked for: timeouts are whole seconds, so a quarter second
of lateness is invisible while costing nothing measurable."""

FIRST_SAMPLE_DELAY_S = 0.25
"""How long after its create a sandbox's first metrics sample is taken (:meth:`SandboxManager._first_sample_soon`)."""

FIRST_SAMPLE_MARGIN_S = 0.05
"""How long before the end of the create's 5-second bucket the first sample is taken at the latest, so
that it lands in that bucket."""

CONNECT_TIMEOUT_S = 5.0
"""Connect timeout for a TCP connection into a sandbox (it is local: a refusal is immediate)."""

KEEP_INIT_CONNECTION_S = 30.0
"""How long the connection of a sandbox's ``/init`` is kept for the first request into it (then
closed): a first command normally comes within milliseconds of the create, and this is far below
the agent's own keep-alive timeout (640 s), so the agent never closes it first."""

SNAPSHOT_IMAGE = "snapshot.img"
"""A copy of the disk image while a snapshot is being made of it (removed right after)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What every sandbox gets (``sandboxd serve`` flags; defaults sized from the host by :mod:`.host`)."""

    cpu_count: int = 1
    memory_mb: int = 1024
    disk_mb: int = 10240
    pids_max: int = 4096
    max_sandboxes: int = 256
    max_timeout_s: int = 24 * 3600
    open_files: int | None = None
    """``RLIMIT_NOFILE`` of every process inside."""
    inotify_instances: int | None = None
    """inotify instances per uid inside (the sandbox's ``user.max_inotify_instances``)."""
    inotify_watches: int | None = None
    """inotify watches per uid inside (the sandbox's ``user.max_inotify_watches``)."""
    nested_userns: bool = False
    """Allow user namespaces inside sandboxes (``--allow-nested-userns``; see docs/security.md)."""
    warm_sandboxes: int = 0
    """Sandboxes booted ahead of need (``--warm-sandboxes``; see :mod:`.warm`)."""
    warm_template: str = "base"
    """The template they are of (``--warm-template``)."""
    warm_builds: bool = True
    """Whether the pool builds a built-in template it finds unbuilt (an operator asked for the pool
    with ``--warm-sandboxes``), or waits for a create to build it (the default pool: a runtime started
    with no flags must not fetch Debian's archive before anyone asked for a sandbox)."""
    warm_grows_to: int = 0
    """How far the pool may grow past ``warm_sandboxes`` to follow the bursts of creates it has seen
    (the default pool, :func:`.host.warm_growth_cap`); 0, or not above ``warm_sandboxes``: a fixed
    pool (``--warm-sandboxes N``)."""

    def size(self, template: Template) -> tuple[int, int]:
        """CPUs and memory (MiB) of a sandbox of ``template``: its build's, else these defaults."""
        return template.cpu_count or self.cpu_count, template.memory_mb or self.memory_mb


@dataclass(frozen=True, slots=True)
class HostPlace:
    """Where this runtime's sandboxes live on the host, besides the data dir."""

    instance: str
    """Names the cgroup group ``sandboxd/<instance>`` (see :func:`.host.instance_name`)."""
    ids: _core.IdRegistry
    """The host-wide registry the sandboxes' id ranges are claimed from."""
    disks: DiskPool
    """Disks mounted ahead of need."""


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A validated create body."""

    template: str
    timeout: int | None
    metadata: dict[str, str]
    env_vars: dict[str, str]
    on_timeout: str = "kill"
    pause_memory: bool = True
    auto_resume: bool = False
    network: NetworkConfig = field(default_factory=NetworkConfig)
    volume_mounts: dict[str, str] = field(default_factory=dict)
    """E2B's ``volumeMounts``: path inside the sandbox -> volume name (validated by the API layer)."""
    # Set by a caller that owns the sandbox's identity and size (``sandboxd node``: its Pod's name,
    # a token the control plane derives, the Pod's limits); None means generate / use the defaults.
    sandbox_id: str | None = None
    access_token: str | None = None
    cpu_count: int | None = None
    memory_mb: int | None = None


def validate_timeout(timeout: int, limits: Limits) -> int:
    """A sandbox lifetime a client asked for, checked against the runtime's maximum (400 if not)."""
    if timeout <= 0:
        raise ApiError(400, f"'timeout' must be a positive number of seconds, got {timeout}")
    if timeout > limits.max_timeout_s:
        raise ApiError(400, f"'timeout' {timeout}s exceeds this runtime's maximum of {limits.max_timeout_s}s")
    return timeout


_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_BYTES = 7 * len(_ID_ALPHABET)
"""Random bytes below this (252) map evenly onto the 36 characters (``b % 36``); the rest are dropped."""


def new_id() -> str:
    """20 characters of ``[a-z0-9]``, like E2B's ids, uniformly random. From one ``token_bytes`` (one
    ``getrandom``): ``secrets.choice`` per character cost ~30 µs a create, 20 draws through
    ``random``'s Python code."""
    chars: list[str] = []
    while len(chars) < 20:
        chars += [_ID_ALPHABET[b % 36] for b in secrets.token_bytes(24) if b < _ID_BYTES]
    return "".join(chars[:20])


_HOST_CODE = str(Path(__file__).resolve().parents[2])
"""Where the runtime's code is installed on the host: never named in an error a client reads."""

RESUME_FAULT = os.environ.get("SANDBOXD_FAULT_RESUMED_AGENT") or None
"""A fault hook for tests: when the runtime's own environment (``sandboxd serve``'s, which no sandbox
and no API client can set) has it, every resumed sandbox's agent exits before it listens, giving
this as its reason. The tests' trigger of the fail-at-once path for agents that die before they
listen (:meth:`SandboxManager._agent_up`): what a sandbox breaks of its own files (its trust store,
its ``/etc/resolv.conf``) no longer reaches it, as it is logged and the agent starts."""

CREATE_FAULT = os.environ.get("SANDBOXD_FAULT_CREATED_AGENT") or None
"""The same for every new sandbox's agent (not a warm one's). ``after:SECONDS:REASON`` has the agent
wait that long first: past a create answered early (:func:`answers_early`), so the tests see the
sandbox end after its answer, and its requests get the reason; with no reason (``after:SECONDS:``) the
agent only starts that much later."""


def answers_early(template: Template) -> bool:
    """Whether a create of ``template`` is answered as soon as its agent runs, before its link and its
    ``/init`` are done (the proxy holding its requests until they are): unless the create's answer
    must wait for more than the agent (a start command and its ready check, E2B's ``set_start_cmd``;
    the code interpreter's warm kernel, which the create's answer promises)."""
    return not (template.start_cmd or template.ready_cmd or template.code_interpreter)


def identity_env(row: SandboxRow) -> dict[str, str]:
    """The variables envd reads from Firecracker's metadata service (which sandbox, of which template),
    passed to the agent in ``/init`` with the others; it also writes them under ``/run/e2b``
    (:mod:`sandboxd.agent.identity`). A template's or a create's own variables of these names win."""
    return {"E2B_SANDBOX_ID": row.id, "E2B_TEMPLATE_ID": row.template_id}


def _stop_unless_ok(waiting: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Cancel ``waiting`` when ``done`` failed: it waits for what cannot come without it (the
    interpreter's kernel, up to ``INTERPRETER_READY_S``, when the agent did not start)."""
    if done.cancelled() or done.exception() is not None:
        waiting.cancel()


async def _connect(handle: _core.SandboxHandle, port: int) -> socket.socket:
    """A TCP connection to ``127.0.0.1:port`` inside the sandbox, connected by the event loop. The
    socket is made in the sandbox's network namespace (``handle.socket``: a short-lived helper thread
    enters it, ~30-60 µs) and connected here, non-blocking and with no thread (:func:`connect_numeric`):
    refused at once when nothing listens, at most :data:`CONNECT_TIMEOUT_S` otherwise. This was
    ``handle.connect`` in a worker thread, a thread hop (and that helper thread) per connect: ~0.1 ms
    of the runtime's CPU and up to a millisecond of waiting for the thread on a busy host, once or
    more per create (``/init``, and its retries before the agent listens), and per new connection of
    the proxy.

    Cancelled or failed, the socket is closed at once: a socket in the sandbox's namespace keeps the
    namespace, and its link and slot, alive after a kill. No frame of a failure keeps ``handle`` (an
    exception's traceback holds this frame, and ``handle``'s descriptor of the namespace would pin
    a killed sandbox's link until the cycle collector ran: test_network_reuse); nor is there a task
    holding the exception (``asyncio.timeout``, not ``wait_for``)."""
    sock = socket.socket(fileno=handle.socket())
    del handle
    try:
        sock.setblocking(False)  # it is (SOCK_NONBLOCK); this tells the socket object, which asyncio asks
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await connect_numeric(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_numeric(sock: socket.socket, address: tuple[str, int]) -> None:
    """``loop.sock_connect(sock, address)`` for a non-blocking socket and a numeric address, with no
    thread: a ``connect``, then, if it is in progress, the socket's writability and its ``SO_ERROR``
    (what asyncio's own selector loop does, ``BaseSelectorEventLoop._sock_connect``). Refused at once
    when nothing listens (``ConnectionRefusedError``).

    Why not ``sock_connect``: uvloop's (0.23, the runtime's loop) resolves the address of every
    ``AF_INET`` socket with ``getaddrinfo`` in libuv's thread pool, ``127.0.0.1`` included (its
    no-thread path for numeric addresses needs the socket type, which ``sock_connect`` does not
    pass): a worker thread's wake-up and the loop's own, ~60 µs of CPU a connect, and a wait for a
    CPU that was ~2.6 ms of a cold create's ``/init`` connect on a busy 2-core host, where the new
    agent and the zygote held both (``docs/benchmarks.md``, ``cold18``)."""
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _set_done, writable)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))  # its subclass by errno: ConnectionRefusedError, ...


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _running(handle: _core.SandboxHandle) -> bool:
    """Whether the sandbox's init still runs (one ``waitid``); an init we cannot ask counts as running."""
    try:
        return handle.is_running()
    except OSError:
        return True


def idle(connection: socket.socket) -> bool:
    """Whether a kept connection is open with nothing to read: a peer that closed it, or sent bytes
    nobody asked for, makes it unfit to carry a request."""
    try:
        connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (``/proc/<pid>/stat`` field 22), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class SandboxManager:
    """Owns every sandbox of this runtime."""

    def __init__(
        self,
        store: Store,
        templates: Templates,
        data_dir: Path,
        zygote: ZygoteClient,
        limits: Limits,
        place: HostPlace,
        observer: Observer | None = None,
        networks: SandboxNetworks | None = None,
    ) -> None:
        self.store = store
        self.networks = networks
        """Each sandbox's link and egress rules; None runs sandboxes with loopback only."""
        self.templates = templates
        self.data_dir = str(data_dir.resolve())
        self.place = place
        self.sandboxes_dir = data_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.dirs = SandboxDirs(data_dir, self.sandboxes_dir)
        """Killed sandboxes' directory skeletons, given to new ones (:mod:`.sandbox_dirs`)."""
        self.zygote = zygote
        self.limits = limits
        self.handles: dict[str, _core.SandboxHandle] = {}
        """The live handle of each sandbox whose processes run (running, or paused in memory)."""
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """One lock per sandbox, held by whichever transition owns it; dropped when nobody holds one."""
        self._slots: set[str] = set()
        """Sandboxes counted against --max-sandboxes: running, or being created or resumed."""
        self.creates = 0
        """Creates booting right now, served warm or not: the warm pool's refill runs only while there
        are none, and holds its sandbox frozen while there are (:meth:`.warm.WarmPool._make`)."""
        self.creates_changed = asyncio.Event()
        """Set whenever :attr:`creates` changes (its waiters clear it)."""
        self.create_ended_at = 0.0
        """When the last create ended (``time.monotonic``): its client's first command comes next."""
        self._pausing: dict[str, str] = {}
        """Sandboxes being paused right now, and why (the proxy treats them as gone already)."""
        self._booting: dict[str, asyncio.Task[None]] = {}
        """Sandboxes whose create was answered before their link and ``/init`` (:func:`answers_early`),
        each with the task finishing its boot."""
        self._disk_roots: dict[str, int] = {}
        """The root directory of each sandbox's disk that this run mounted (:func:`.disks.open_root`):
        :meth:`_destroy` shuts it down before a kill that deletes it, and closes it. (Holding it keeps
        the disk mounted after the sandbox's processes are gone, until it is closed.)"""
        self._ending: dict[str, asyncio.Future[None]] = {}
        """Sandboxes whose agent is being started, each done when its init exits (``_init_exited``)."""
        self._init_connections: dict[str, tuple[socket.socket, asyncio.TimerHandle]] = {}
        """Each new sandbox's ``/init`` connection, idle, until the first :meth:`open_socket` of its
        agent's port takes it (or :data:`KEEP_INIT_CONNECTION_S` passes, or the sandbox stops)."""
        self.history = MetricsHistory(data_dir / "metrics.db")
        self.sampler = Sampler()
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_samples: dict[str, tuple[int, SandboxRow]] = {}
        """New sandboxes whose first metrics sample is due, each with its batch (:meth:`_first_sample_soon`)."""
        self._first_batches: dict[int, asyncio.TimerHandle] = {}
        """The batches' timers, by when they fire (unix ms)."""
        self.on_gone: list[Callable[[str], None]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._sampling: asyncio.Task[None] | None = None
        self.observe = observer or Observer()
        """Counts and logs every transition (metrics, structured logs, the log redactor's tokens)."""
        self.warm = WarmPool(
            self, limits.warm_sandboxes, limits.warm_template, builds=limits.warm_builds, grows_to=limits.warm_grows_to
        )
        self.volumes = Volumes(data_dir, limits.disk_mb)
        """E2B's volumes, mounted into the sandboxes that name them (see :mod:`.volumes`)."""
        self.secrets = SecretStore(store.db)
        """E2B's secrets, which sandboxes' egress rules name and never see (see :mod:`.secrets`)."""
        self.trust = TrustLayers(data_dir / "trust")
        """Each template's trust store with the egress CA in it, a lower layer made once (see :mod:`.trust`)."""

    # ------------------------------------------------------------------------------ start/stop

    async def start(self) -> None:
        """Re-adopt what a previous runtime left running or paused, release id ranges claimed for
        sandboxes that never made it into the state (a crash between claim and insert), then start
        the reaper."""
        live = {row.id for row in self.store.live()}
        for base, sandbox_id in self.place.ids.claims_of(self.data_dir):
            if sandbox_id not in live:  # a create cut short, or a warm sandbox of a runtime that died
                await asyncio.to_thread(self._destroy, sandbox_id, None, False, base)
        for row in self.store.live():
            self.observe.secrets.add(row.access_token)  # never logged, whatever becomes of the sandbox
            if row.state == "paused" and row.pause_mode == "filesystem":
                continue  # no processes to adopt: only the writable layer, which is on disk
            if row.booting:
                # Its create was answered, then this runtime's last run ended before the sandbox's
                # link and /init were done (killed: a clean stop waits for them): its agent has no
                # token and no env. It ends, saying so; its client sees that reason.
                reason = "its start was cut short: the runtime stopped before the sandbox's boot was done"
                await self._died(row, reason, "start_failed")
                continue
            if row.init_pid is None or _proc_start_time(row.init_pid) != row.init_start:
                await self._died(row, "its init was gone when the runtime restarted", "gone_after_restart")
                continue
            try:
                self._watch(row.id, _core.SandboxHandle.adopt(self.place.instance, row.id, row.init_pid))
                if self.networks is not None:
                    await self.networks.readopt(row.id, row.init_pid)
            except OSError as exc:
                await self._died(row, f"could not be re-adopted after a restart: {exc}", "not_adoptable")
                continue
            if row.state == "running":
                self._slots.add(row.id)
            self.store.event(row.id, "adopted", "re-adopted after a runtime restart")
            self.observe.adopted(row)
        await self.history.open(row.id for row in self.store.live())
        # No sandbox has a trust layer mounted: collect them (see TrustLayers.forget).
        if not self.handles and (forgotten := await asyncio.to_thread(self.trust.forget)):
            log.info("removed %d trust layer(s) of earlier runs: each is made again when needed", forgotten)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_expired())
        self._sampling = asyncio.get_running_loop().create_task(self._sample_forever())
        self.warm.start()

    async def stop(self) -> None:
        """Stop watching (sandboxes keep running; a restarted runtime re-adopts them; warm ones are killed)."""
        if self._booting:
            # Creates answered already finish their boot first (milliseconds): the sandboxes they
            # named then stay, as any other, for the next runtime to adopt.
            _, stuck = await asyncio.wait(list(self._booting.values()), timeout=READY_TIMEOUT_S)
            # A boot still under way (its own deadline is as long, so this is rare) is cancelled and
            # waited for: its failure path ends the sandbox in the store, which closes after this.
            for task in stuck:
                task.cancel("the runtime stopped before its boot was done")
            if stuck:
                await asyncio.wait(stuck, timeout=READY_TIMEOUT_S)
        await self.warm.stop()
        for background in (self._reaper, self._sampling, *self._tasks):
            if background is not None:
                background.cancel()
        for timer in self._first_batches.values():
            timer.cancel()
        self._first_batches.clear()
        self._first_samples.clear()
        loop = asyncio.get_running_loop()
        for handle in self.handles.values():
            loop.remove_reader(handle.pidfd())
        for sandbox_id in [*self._init_connections]:
            self._drop_init_connection(sandbox_id)
        while self._disk_roots:  # one at a time: a kill's thread may take one meanwhile
            os.close(self._disk_roots.popitem()[1])  # the sandboxes keep their disks mounted
        self.handles.clear()
        await self.history.close()
        self.volumes.close()

    # -------------------------------------------------------------------------------- lookups

    def _row(self, sandbox_id: str) -> SandboxRow:
        row = self.store.get(sandbox_id)
        if row is None:
            raise not_found(sandbox_id)
        if row.state == "ended":
            raise ApiError(404, f'Sandbox "{sandbox_id}" is no longer running: {row.ended_reason or "it ended"}')
        return row

    @contextlib.asynccontextmanager
    async def _owning(self, sandbox_id: str) -> AsyncIterator[None]:
        """Hold the sandbox's lock: the one owner of its state for the duration."""
        async with self._lock(sandbox_id):
            yield

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = self._locks[sandbox_id] = asyncio.Lock()
        return lock

    def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]:
        """The sandbox's lifecycle events (also after it ended), oldest first."""
        if self.store.get(sandbox_id) is None:
            raise not_found(sandbox_id)
        return self.store.events(sandbox_id)

    async def lifecycle(self, query: LifecycleQuery) -> list[LifecycleEvent]:
        """A page of E2B's lifecycle events (:mod:`.lifecycle`), of one sandbox or all (read in a
        worker thread: see :meth:`Store.lifecycle`)."""
        rows = await asyncio.to_thread(
            self.store.lifecycle, query.sandbox_id, query.kinds, query.offset, query.limit, query.ascending
        )
        builds: dict[str, str | None] = {}
        for row in rows:
            if row.template_id is not None and row.template_id not in builds:
                template = self.store.template(row.template_id)
                builds[row.template_id] = None if template is None else template.build_id()
        return [lifecycle.from_stored(row, builds.get(row.template_id or "")) for row in rows]

    async def log_entries(self, sandbox_id: str) -> list[LogEntry]:
        """The sandbox's log: its lifecycle events (also after it ended) and its agent's log (while
        its files exist), unsorted."""
        events = from_events(sandbox_id, self.events(sandbox_id))
        agent_log = self.sandboxes_dir / sandbox_id / "agent.log"
        return events + await asyncio.to_thread(read_agent_log, agent_log, sandbox_id)

    def get(self, sandbox_id: str) -> SandboxRow:
        return self._row(sandbox_id)

    def end_at(self, row: SandboxRow) -> float:
        if row.state == "paused" and row.remaining_s is not None:
            return time.time() + row.remaining_s
        return row.end_at

    def list_page(
        self,
        states: list[str],
        after: tuple[float, str] | None,
        descending: bool,
        limit: int,
        keep: Callable[[SandboxRow], bool],
    ) -> tuple[list[SandboxRow], tuple[float, str] | None]:
        """Up to ``limit`` rows that ``keep`` accepts, after the cursor; and the next cursor if
        more may follow (keyset over (started_at, id), stable while sandboxes come and go)."""
        found: list[SandboxRow] = []
        cursor = after
        while len(found) < limit:
            batch = self.store.page(states, cursor, descending, max(limit, 64))
            if not batch:
                return found, None
            for row in batch:
                cursor = (row.started_at, row.id)
                if keep(row):
                    found.append(row)
                    if len(found) == limit:
                        more = self.store.page(states, cursor, descending, 1)
                        return found, cursor if more else None
        return found, None

    def _validate_timeout(self, timeout: int) -> int:
        return validate_timeout(timeout, self.limits)

    @property
    def slots_taken(self) -> int:
        """Sandboxes counted against --max-sandboxes now: running, or being created or resumed."""
        return len(self._slots)

    def _take_slot(self, sandbox_id: str) -> None:
        """Count a sandbox against --max-sandboxes, or refuse. Synchronous, so check and take are one
        step for the event loop: concurrent creates cannot both see the last free slot."""
        if len(self._slots) >= self.limits.max_sandboxes:
            raise ApiError(
                403,
                f"sandbox limit reached: {len(self._slots)} running sandboxes (the runtime's --max-sandboxes "
                f"is {self.limits.max_sandboxes}); kill or pause one first",
            )
        self._slots.add(sandbox_id)

    # --------------------------------------------------------------------------------- create

    async def create(self, request: CreateRequest) -> SandboxRow:
        started = time.monotonic()
        try:
            row = await self._create(request)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.observe.create_failed(request.template, exc)
            raise
        self.observe.created(row, time.monotonic() - started)
        return row

    async def _create(self, request: CreateRequest) -> SandboxRow:
        template = await self.templates.prepare(request.template)
        timeout = self._validate_timeout(request.timeout if request.timeout is not None else DEFAULT_TIMEOUT_S)
        if self.networks is not None:
            self.networks.check(request.network)
            self.secrets.check_references(request.network)
        elif request.network != NetworkConfig():
            raise ApiError(400, "this runtime runs sandboxes without networking: network settings do not apply")
        traffic_token = secrets.token_urlsafe(24) if request.network.allow_public_traffic is False else None
        for name in request.volume_mounts.values():
            try:
                self.volumes.by_name(name)  # in memory
            except ApiError as exc:
                raise ApiError(400, f"volumeMounts: {exc.message}") from None
        # Only while a slot is free: the slot is taken right below, with no await in between.
        warm = self.warm.take(template, request) if len(self._slots) < self.limits.max_sandboxes else None
        sandbox_id = warm.row.id if warm is not None else request.sandbox_id or new_id()
        self._take_slot(sandbox_id)
        lock = self._lock(sandbox_id)
        await lock.acquire()
        booting: asyncio.Task[None] | None = None  # once set, the rest of the boot owns the lock and the slot
        try:
            try:
                now = time.time()
                cpus, memory_mb = self.limits.size(template)
                row = SandboxRow(
                    id=sandbox_id,
                    template_id=template.id,
                    alias=request.template if request.template != template.id else None,
                    state="running",
                    started_at=now,
                    end_at=now + timeout,
                    access_token=request.access_token or secrets.token_urlsafe(24),
                    cpu_count=request.cpu_count or cpus,
                    memory_mb=request.memory_mb or memory_mb,
                    disk_mb=self.limits.disk_mb,
                    metadata=request.metadata,
                    env_vars=request.env_vars,
                    on_timeout=request.on_timeout,
                    pause_mode="full" if request.pause_memory else "filesystem",
                    auto_resume=request.auto_resume,
                    volume_mounts=dict(request.volume_mounts),
                )
                if warm is not None:
                    row.id_base, row.init_pid, row.init_start = warm.row.id_base, warm.row.init_pid, warm.row.init_start
                self.creates += 1
                self.creates_changed.set()
                network = (request.network, traffic_token)
                created = ("created", f"template {request.template}, timeout {timeout}s")
                try:
                    handle, slot = await self._launch(row, template, False, warm)
                    if answers_early(template):
                        try:
                            if slot is not None and self.networks is not None:
                                # Its settings and traffic token hold from the answer on: the proxy
                                # checks the token of every request, and the info shows the settings.
                                self.networks.record(row.id, slot, request.network, traffic_token)
                            row.booting = True  # cleared once booted: a runtime killed before then
                            self.store.insert(row, created)  # leaves a sandbox nobody may adopt
                        except BaseException:
                            await self._stop_processes(row.id, id_base=row.id_base)
                            raise
                        self._first_sample_soon(row, now)
                        booting = asyncio.get_running_loop().create_task(
                            self._boot_after_answer(row, template, handle, slot, network, warm, lock)
                        )
                        self._booting[row.id] = booting
                        self._tasks.add(booting)
                        booting.add_done_callback(self._tasks.discard)
                        return row
                    await self._finish_boot(row, template, handle, slot, False, network, warm)
                finally:
                    if booting is None:
                        self._create_ended()
                self.store.insert(row, created)
                self._first_sample_soon(row, now)
            finally:
                if booting is None:
                    lock.release()
        except BaseException:
            if booting is None:
                self._slots.discard(sandbox_id)
            raise
        return row

    def _create_ended(self) -> None:
        self.creates -= 1
        self.create_ended_at = time.monotonic()
        self.creates_changed.set()

    async def _boot_after_answer(
        self,
        row: SandboxRow,
        template: Template,
        handle: _core.SandboxHandle,
        slot: Slot | None,
        network: tuple[NetworkConfig, str | None],
        warm: Warm | None,
        lock: asyncio.Lock,
    ) -> None:
        """The rest of a create whose answer went out once its agent ran (:func:`answers_early`): the
        link and ``/init``, holding the sandbox's lock (so a kill, pause or network update waits for
        it) while the proxy holds the sandbox's requests (:meth:`ensure_reachable`). The client's
        answer, its parsing and its first request (~5 ms of the SDK's own) overlap them. If they fail,
        the sandbox ends with the reason, which its held and later requests get."""
        try:
            await self._finish_boot(row, template, handle, slot, False, network, warm)
        except BaseException as exc:
            if isinstance(exc, ApiError):
                reason = exc.message
            elif isinstance(exc, asyncio.CancelledError) and exc.args:
                reason = str(exc)  # stop()'s reason
            else:
                reason = f"{type(exc).__name__}: {exc}"
            # Counted as a death (``start_failed``): its create was counted, and answered, already.
            await asyncio.shield(self._start_failed(row, f"its start failed: {reason}"))
            if not isinstance(exc, Exception):
                raise
        else:
            # Outside the try: a failed write here leaves a running sandbox marked booting (the next
            # start ends it), never one ended whose processes run on.
            row.booting = False
            self.store.update(row.id, booting=False)
        finally:
            del self._booting[row.id]
            self._create_ended()
            lock.release()

    async def _start_failed(self, row: SandboxRow, reason: str) -> None:
        """A create answered already whose link or ``/init`` failed (its processes, disk and link are
        gone already: :meth:`_finish_boot`): it ends, saying why."""
        self.store.update(row.id, state="ended", ended_reason=reason)
        self.store.event(row.id, "died", reason)
        self.observe.died(row, "start_failed", reason)
        self._notify_gone(row.id)
        self._slots.discard(row.id)
        await self._forget_samples(row.id)

    async def _spawn(
        self,
        row: SandboxRow,
        template: Template,
        resuming: bool,
        nice: int = 0,
        cpu_weight: int | None = None,
    ) -> tuple[_core.SandboxHandle, Slot | None]:
        """Fork the sandbox from the zygote into its jail and watch its init; its agent starts
        without a token. Returns its handle and its network slot (reserved, not linked yet). On
        failure nothing is left; a resume keeps its disk and id range. ``nice`` and ``cpu_weight``
        (its cgroup's, against the other sandboxes): a warm sandbox's (:mod:`.warm`), else the
        defaults."""
        self.zygote.check_up()
        # A resumed sandbox has its directory; a new one takes a killed one's skeleton if there is one.
        sandbox_dir = self.sandboxes_dir / row.id
        if resuming:
            if not await released(sandbox_dir / DISK_IMAGE):
                # Its last run's filesystem is alive (see disks.released): a second mount of the image
                # would be a second filesystem writing it, and would miss what the first has not written.
                # 503, not 409: a connect takes a 409 for "resumed meanwhile by another" and answers 200.
                raise _disk_held(row.id, "resume")
            sandbox_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dirs.make(row.id)
        slot = self.networks.reserve() if self.networks is not None else None
        try:
            ca = self.networks.ca_pem if self.networks is not None else None
            trust = await self.trust.layer(template, ca)  # made on the template's first create here
            if row.id_base is None:
                row.id_base = await asyncio.to_thread(self.place.ids.claim, self.data_dir, row.id)
            # Each volume's mount (the runtime keeps it) travels as a descriptor after the disk's,
            # in the order of "volumes".
            mounts = sorted(row.volume_mounts.items())
            try:
                volume_fds = [await asyncio.to_thread(self.volumes.mount_fd_of, name) for _, name in mounts]
            except (ApiError, OSError) as exc:
                detail = exc.message if isinstance(exc, ApiError) else str(exc)
                raise ApiError(500, f"could not mount the sandbox's volumes: {detail}") from None
            image = sandbox_dir / DISK_IMAGE
            try:
                disk = await (self.place.disks.mount(image) if resuming else self.place.disks.take(image))
            except OSError as exc:
                raise ApiError(500, f"could not prepare the sandbox's disk: {exc}") from None
            # A new sandbox finds the CA in its trust store already. A resumed one is given it too, as
            # before: its own copy of the store (what it wrote there) is on its disk, above the layer.
            request = self._zygote_request(row, template, sandbox_dir, trust, ca if trust is None or resuming else None)
            request["nice"] = nice
            if cpu_weight is not None:
                request["cpu_weight"] = cpu_weight
            if resuming and RESUME_FAULT:
                request["fault"] = RESUME_FAULT
            elif not resuming and CREATE_FAULT and nice == 0:  # a warm sandbox's spawn is niced
                request["fault"] = CREATE_FAULT
            request["volumes"] = [target for target, _ in mounts]
            if slot is not None:
                request["files"] = {"/etc/resolv.conf": slot.resolv_conf()}
            try:
                self._disk_roots[row.id] = open_root(disk)
                answer = await self.zygote.create(request, [disk, *volume_fds])
            finally:
                os.close(disk)  # the sandbox has it attached now (or failed and let it go)
            if not answer.get("ok"):
                raise ApiError(500, f"could not start the sandbox: {answer.get('error')}")
            try:
                handle = _core.SandboxHandle.adopt(self.place.instance, row.id, answer["init_pid"])
            except OSError:  # its init is gone already: its agent exited at once
                raise ApiError(500, await self._agent_failure(row.id, None)) from None
        except BaseException:
            if slot is not None and self.networks is not None:
                self.networks.unreserve(slot)
            await asyncio.to_thread(self._destroy, row.id, None, resuming, row.id_base)
            if resuming:
                await asyncio.shield(self._keep_disk(row.id))
            raise
        row.init_pid = handle.init_pid
        row.init_start = _proc_start_time(handle.init_pid)
        self._watch(row.id, handle)
        return handle, slot

    async def _boot(
        self,
        row: SandboxRow,
        template: Template,
        resuming: bool = False,
        network: tuple[NetworkConfig, str | None] | None = None,
        warm: Warm | None = None,
    ) -> None:
        """Fork the sandbox from the zygote (or take ``warm``, forked already), watch its init, link
        its network, and hand the agent its settings. On failure nothing of the sandbox is left
        running; a resume keeps its disk and id range, a create gives them back. ``network``: a new
        sandbox's settings and traffic token (a resume has its own stored)."""
        handle, slot = await self._launch(row, template, resuming, warm)
        await self._finish_boot(row, template, handle, slot, resuming, network, warm)

    async def _launch(
        self, row: SandboxRow, template: Template, resuming: bool, warm: Warm | None
    ) -> tuple[_core.SandboxHandle, Slot | None]:
        """The sandbox forked from the zygote, its agent running (or ``warm``, forked already)."""
        if warm is None:
            return await self._spawn(row, template, resuming)
        return warm.handle, warm.slot

    async def _finish_boot(
        self,
        row: SandboxRow,
        template: Template,
        handle: _core.SandboxHandle,
        slot: Slot | None,
        resuming: bool,
        network: tuple[NetworkConfig, str | None] | None,
        warm: Warm | None,
    ) -> None:
        """Link a launched sandbox's network and hand its agent its settings (see :meth:`_boot`)."""
        try:
            if warm is not None:
                await renice(warm)  # first: a niced agent answers /init late on a busy host
            # The link is made while the agent comes up (the agent needs no network to start).
            agent = asyncio.ensure_future(
                self._agent_up(
                    row.id,
                    handle,
                    init_agent(
                        functools.partial(self._open_now, row.id),
                        row.access_token,
                        {**identity_env(row), **template.env, **row.env_vars},
                        default_user=template.user,
                        default_workdir=template.workdir,
                    ),
                )
            )
            steps: list[Awaitable[object]] = [agent]
            if slot is not None and self.networks is not None:
                config, token = network if network is not None else (None, None)
                linked = warm is not None and warm.linked
                steps.append(self.networks.attach(row.id, slot, handle.init_pid, config, token, linked))
            if template.code_interpreter:  # returns once its Python kernel is warm, so the first runCode is fast
                ready = asyncio.ensure_future(interpreter_ready(functools.partial(self._open_now, row.id), row.id))
                agent.add_done_callback(functools.partial(_stop_unless_ok, ready))  # no agent, no kernel
                steps.append(ready)
            outcomes = await asyncio.gather(*steps, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            if not resuming and (template.start_cmd or template.ready_cmd):  # E2B's set_start_cmd
                await start_template_command(
                    functools.partial(self._open_now, row.id),
                    row.access_token,
                    template.start_cmd,
                    template.ready_cmd,
                    template.user or "root",
                    template.workdir,
                    {**template.env, **row.env_vars},
                )
        except BaseException:
            await self._stop_processes(row.id, keep_files=resuming, id_base=row.id_base)
            raise

    async def _agent_up(
        self, sandbox_id: str, handle: _core.SandboxHandle, init: Coroutine[Any, Any, socket.socket | None]
    ) -> None:
        """``init`` (the agent's ``/init``), unless the sandbox's init exits first: it does when its
        agent does (the agent is its payload; in the tests, by :data:`RESUME_FAULT`). Then the create
        or resume fails at once with the agent's own reason, not after ``READY_TIMEOUT_S`` of connects
        refused. The connection ``init`` kept alive is kept for the first request
        (:meth:`_keep_init_connection`)."""
        loop = asyncio.get_running_loop()
        ending = self._ending[sandbox_id] = loop.create_future()
        if not _running(handle):
            # It exited before this wait began (a create answered early starts its /init a loop turn
            # or more after its init is watched): its pidfd's reader fired with no one to tell.
            ending.set_result(None)
        task = asyncio.ensure_future(init)
        try:
            try:
                await asyncio.wait((task, ending), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if self._ending.get(sandbox_id) is ending:
                    del self._ending[sandbox_id]
                if not task.done():
                    task.cancel()
                    await asyncio.wait((task,))
        except BaseException:
            # Cancelled: a connection init returned has nobody to keep it, whether it came just before
            # the cancel or as init was cancelled (3.11's wait_for returns a result ready by then).
            connection = task.result() if task.done() and not task.cancelled() and task.exception() is None else None
            if connection is not None:
                connection.close()
            raise
        if not task.cancelled() and task.exception() is None:
            connection = task.result()
            if connection is not None:
                self._keep_init_connection(sandbox_id, connection)
            return
        if not ending.done() and _running(handle):  # /init failed, and not because the agent exited
            try:
                await task  # raises its own error
            finally:
                del task, handle  # its traceback holds this frame: no cycle keeping the handle (_connect)
        raise ApiError(500, await self._agent_failure(sandbox_id, handle.exit_code()))

    async def _agent_failure(self, sandbox_id: str, code: int | None) -> str:
        """What a create or resume whose agent exited before it listened answers: the reason the agent
        logged (read in a thread, cleaned for a client who may be the sandbox's own code)."""
        hide = (self.data_dir, str(self.sandboxes_dir), _HOST_CODE, sys.prefix, sys.base_prefix)
        log_file = self.sandboxes_dir / sandbox_id / "agent.log"
        reason = await asyncio.to_thread(agent_failure, log_file, hide)
        status = f" (exit status {code})" if code is not None else ""
        return f"the sandbox's agent exited before it listened{status}: {reason or 'it gave no reason'}"

    def _zygote_request(
        self, row: SandboxRow, template: Template, sandbox_dir: Path, trust: Path | None, ca_bundle: str | None
    ) -> dict[str, Any]:
        """What the zygote needs to build the sandbox (its disk travels beside, as a descriptor).
        ``trust``, the template's trust layer (:mod:`.trust`), goes on top of its layers: in no
        template made from the sandbox (those list the template's layers and the sandbox's disk).
        ``ca_bundle``: the egress CA to add to the trust store before the agent starts
        (.zygote._run_agent)."""
        limits = self.limits
        layers = [str(layer) for layer in template.layers]
        return {
            "id": row.id,
            "instance": self.place.instance,
            "id_base": row.id_base,
            "template_dirs": [str(trust), *layers] if trust is not None else layers,
            "sandbox_dir": str(sandbox_dir),
            "host_usr_ro": template.host_usr,
            "nested_userns": limits.nested_userns,
            "memory_bytes": row.memory_mb << 20,
            "cpu_cores": float(row.cpu_count),
            "pids_max": limits.pids_max,
            "open_files": limits.open_files,
            "inotify_instances": limits.inotify_instances,
            "inotify_watches": limits.inotify_watches,
            "log": str(sandbox_dir / "agent.log"),
            "interpreter": template.code_interpreter,
            "ca_bundle": ca_bundle,
        }

    async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
        """A TCP connection to ``port`` inside the sandbox (its own network namespace): for the
        agent's port, the sandbox's ``/init`` connection while it is kept and still idle. A sandbox
        whose create was answered early is connected to once its boot is done."""
        await self.booted(sandbox_id)
        return await self._open_now(sandbox_id, port)

    async def booted(self, sandbox_id: str) -> None:
        """Return once the boot of a sandbox whose create was answered early is over, done or failed
        (at once for any other). Cancelling the caller does not cancel the boot."""
        booting = self._booting.get(sandbox_id)
        if booting is not None:
            await asyncio.wait((booting,))

    async def _open_now(self, sandbox_id: str, port: int) -> socket.socket:
        handle = self.handles.get(sandbox_id)
        if handle is None:
            raise ConnectionRefusedError(f"sandbox {sandbox_id} is not running")
        if port == AGENT_PORT:
            kept = self._take_init_connection(sandbox_id)
            if kept is not None:
                return kept
        return await _connect(handle, port)

    def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None:
        """The sandbox's kept ``/init`` connection, for the agent's port, once, while still idle; else
        None. The proxy takes it this way to know the connection was used before (the agent may close
        it as it is handed out), and so may send a request that failed on it again, on a fresh one."""
        return self._take_init_connection(sandbox_id) if port == AGENT_PORT else None

    def _keep_init_connection(self, sandbox_id: str, connection: socket.socket) -> None:
        """Keep a new sandbox's ``/init`` connection for the first request into its agent: the SDK's
        first command then needs no connect into the sandbox (a helper thread's ``setns``, a ``connect``).
        Only while the sandbox runs: every way out of it drops the connection
        (:meth:`_drop_init_connection`), as a socket keeps its network namespace alive."""
        self._drop_init_connection(sandbox_id)
        if sandbox_id not in self.handles:
            connection.close()
            return
        timer = asyncio.get_running_loop().call_later(KEEP_INIT_CONNECTION_S, self._drop_init_connection, sandbox_id)
        self._init_connections[sandbox_id] = (connection, timer)

    def _take_init_connection(self, sandbox_id: str) -> socket.socket | None:
        """The kept ``/init`` connection, once, if the agent has neither closed it nor sent anything
        on it since (then it is closed, and the caller connects afresh)."""
        kept = self._init_connections.pop(sandbox_id, None)
        if kept is None:
            return None
        connection, timer = kept
        timer.cancel()
        if idle(connection):
            return connection
        connection.close()
        return None

    def _drop_init_connection(self, sandbox_id: str) -> None:
        kept = self._init_connections.pop(sandbox_id, None)
        if kept is not None:
            kept[1].cancel()
            kept[0].close()

    async def ensure_reachable(self, sandbox_id: str) -> None:
        """For the proxy: running, or resumed now if paused with auto-resume; else a 502 the SDK
        turns into ``SandboxNotRunningException`` (it looks for "was not found"). A sandbox whose
        create was answered early is reachable once its boot is done."""
        await self.booted(sandbox_id)
        pausing = self._pausing.get(sandbox_id)
        if pausing is not None:
            raise ApiError(502, f"The sandbox was not found: {pausing}")
        row = self.store.reach(sandbox_id)  # per proxied request: three columns, not the whole row
        if row is None or row[0] == "ended":
            reason = f": {row[1]}" if row is not None and row[1] else ""
            raise ApiError(502, f"The sandbox was not found{reason}")
        state, _, auto_resume = row
        if state == "paused":
            if auto_resume:
                with contextlib.suppress(ApiError):  # a concurrent request may have resumed it first
                    await self.resume(sandbox_id, None, cause="auto_resume")
                if self._row(sandbox_id).state == "running":
                    return
            raise ApiError(502, "The sandbox was not found: it is paused (Sandbox.connect resumes it)")

    # ---------------------------------------------------------------------------- watch/kill

    def _watch(self, sandbox_id: str, handle: _core.SandboxHandle) -> None:
        self.handles[sandbox_id] = handle
        asyncio.get_running_loop().add_reader(handle.pidfd(), self._init_exited, sandbox_id, handle)

    def _init_exited(self, sandbox_id: str, handle: _core.SandboxHandle) -> None:
        """The init's pidfd is readable: it exited. Whether that is a death is decided under the
        sandbox's lock, after whatever transition holds it now (a kill, a pause) has finished."""
        asyncio.get_running_loop().remove_reader(handle.pidfd())
        ending = self._ending.get(sandbox_id)
        if ending is not None and not ending.done():
            ending.set_result(None)
        self._background(self._check_death(sandbox_id, handle))

    async def _check_death(self, sandbox_id: str, handle: _core.SandboxHandle) -> None:
        async with self._owning(sandbox_id):
            if self.handles.get(sandbox_id) is not handle:
                return  # a kill or pause of ours stopped it, and already took the handle away
            del self.handles[sandbox_id]
            row = self.store.get(sandbox_id)
            if row is None or row.state == "ended":
                return
            code = handle.exit_code()
            detail = f"exit status {code}" if code is not None else "exit status unknown"
            await self._died(row, f"its agent died ({detail})", "agent_exited")

    async def _died(self, row: SandboxRow, reason: str, cause: str) -> None:
        """Record a death with its reason, then reclaim everything the sandbox held on the host."""
        self.store.update(row.id, state="ended", ended_reason=reason)
        self.store.event(row.id, "died", reason)
        self.observe.died(row, cause, reason)
        self._notify_gone(row.id)
        self._slots.discard(row.id)
        self.handles.pop(row.id, None)
        await asyncio.to_thread(self._destroy, row.id, None, False, row.id_base)
        if self.networks is not None:
            await self.networks.detach(row.id, forget=True)
        self.store.event(row.id, "reclaimed", "processes, cgroup, disk and id range freed")
        self.observe.reclaimed(row.id)
        await self._forget_samples(row.id)

    def _notify_gone(self, sandbox_id: str) -> None:
        self._drop_init_connection(sandbox_id)
        for callback in self.on_gone:
            callback(sandbox_id)

    async def _stop_processes(self, sandbox_id: str, keep_files: bool = False, id_base: int | None = None) -> None:
        """Kill every process of the sandbox and free its cgroup; free its disk and id range unless kept."""
        self._drop_init_connection(sandbox_id)
        handle = self.handles.pop(sandbox_id, None)
        if handle is not None:
            asyncio.get_running_loop().remove_reader(handle.pidfd())
        await asyncio.to_thread(self._destroy, sandbox_id, handle, keep_files, id_base)
        if keep_files:
            # Shielded: a cancelled pause still syncs the image, as when this was all _destroy's.
            await asyncio.shield(self._keep_disk(sandbox_id))
        if self.networks is not None:
            await self.networks.detach(sandbox_id, forget=not keep_files)

    async def _keep_disk(self, sandbox_id: str) -> None:
        """After its processes are gone (``_destroy`` with ``keep_files``): a kept sandbox's disk onto
        the host's disk. It had no write barriers (see make_durable); once unmounted (normally with its
        last process; disks.released says when not), all it wrote is in the image. Waited for here, on
        the event loop, not in a worker thread (see disks.released)."""
        image = self.sandboxes_dir / sandbox_id / DISK_IMAGE
        if not await released(image):
            log.warning(
                "sandbox %s's disk is still mounted after its processes ended: a file of it is open"
                " outside it (sent out over a unix socket); it is synced now as it is, and a resume waits"
                " for it to be released",
                sandbox_id,
                extra={"sandbox_id": sandbox_id},
            )
        await asyncio.to_thread(_sync_kept_disk, image, sandbox_id)

    def _destroy(
        self, sandbox_id: str, handle: _core.SandboxHandle | None, keep_files: bool, id_base: int | None
    ) -> None:
        """In a worker thread: processes and cgroup (the disk unmounts when its last process is gone; a
        kept one is synced by :meth:`_keep_disk`), then, unless kept, the sandbox's directory (its disk
        image) and its id range, in that order: no file owned by the range outlives its claim."""
        dead = False  # known dead: every process gone, so none holds a file of its directory open
        root = self._disk_roots.pop(sandbox_id, None)
        try:
            if root is not None and not keep_files:
                discard(root)  # its disk is deleted below: nothing of it is written back
            if handle is not None:
                try:
                    handle.kill()
                    dead = True
                except OSError:
                    _kill_quietly(self.place.instance, sandbox_id)
            else:
                _kill_quietly(self.place.instance, sandbox_id)
        finally:
            if root is not None:
                os.close(root)  # its filesystem's last holder once its processes are gone: unmounted now
        if not keep_files:
            self.dirs.release(sandbox_id, dead)
            if id_base is not None:
                self.place.ids.release(id_base, self.data_dir, sandbox_id)

    async def _forget_samples(self, sandbox_id: str, keep_history: bool = False) -> None:
        """Drop what the sampler keeps of a sandbox; its history too unless it is only paused."""
        self._first_samples.pop(sandbox_id, None)  # its batch skips it
        self.sampler.forget(sandbox_id)
        if not keep_history:
            await self.history.forget(sandbox_id)

    async def kill(self, sandbox_id: str, reason: str, cause: str = "api") -> None:
        """Kill a sandbox; ``cause`` (``api``, ``timeout``) labels the metrics, ``reason`` is recorded."""
        async with self._owning(sandbox_id):
            row = self._row(sandbox_id)
            # Ended first: from the moment its processes start dying, every view of the sandbox (the
            # API, the proxy's 502) already says it is gone, never "running but unreachable".
            self.store.update(sandbox_id, state="ended", ended_reason=reason)
            self._notify_gone(sandbox_id)
            # A sandbox paused with its memory stays frozen: its handle's kill signals every task
            # before it thaws them, so none runs again (thawed first, they ran until the kill came:
            # a paused sandbox wrote on to its volumes while being killed).
            await self._stop_processes(sandbox_id, id_base=row.id_base)
            self._slots.discard(sandbox_id)
            await self._forget_samples(sandbox_id)
            self.store.event(sandbox_id, "killed", reason)
            self.observe.killed(row, cause, reason)

    # ------------------------------------------------------------------------------ timeouts

    async def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        """The sandbox ends ``timeout`` seconds from now. 0 (E2B's minimum; negative values count as 0)
        ends it at once, exactly as an expiring timeout does: killed, or paused with auto-pause. A
        paused sandbox keeps the time for when it resumes; 0 kills it unless it pauses on timeout."""
        row = self._row(sandbox_id)
        timeout = max(timeout, 0)
        if timeout > self.limits.max_timeout_s:
            self._validate_timeout(timeout)
        self.store.event(sandbox_id, "timeout_set", f"{timeout}s from now")
        self.observe.timeout_set(sandbox_id, timeout)
        if row.state == "paused":
            if timeout == 0 and row.on_timeout == "kill":
                await self.kill(sandbox_id, "timed out (timeout set to 0)", cause="timeout")
            elif timeout > 0:
                self.store.update(sandbox_id, remaining_s=float(timeout))
            return
        self.store.update(sandbox_id, end_at=time.time() + timeout)
        if timeout == 0:
            with contextlib.suppress(ApiError):  # a concurrent kill or pause ended it first
                await self._expire(sandbox_id)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            # Only the expired rows' ids: this runs four times a second whatever the number of live
            # sandboxes, and _expire reads the row it acts on again anyway.
            for sandbox_id in self.store.expired(time.time()):
                lock = self._locks.get(sandbox_id)
                if lock is not None and lock.locked():
                    continue  # another transition owns it now; look again on the next tick
                try:
                    await self._expire(sandbox_id)
                except ApiError:
                    pass  # it ended or was paused meanwhile
                except Exception:
                    log.exception("reaping sandbox %s failed", sandbox_id, extra={"sandbox_id": sandbox_id})

    async def _expire(self, sandbox_id: str) -> None:
        row = self._row(sandbox_id)
        if row.state != "running" or row.end_at > time.time():
            return
        if row.on_timeout == "pause":
            await self.pause(sandbox_id, row.pause_mode or "full", "timed out (onTimeout=pause)", cause="timeout")
        else:
            await self.kill(sandbox_id, "timed out", cause="timeout")
        self.observe.timed_out(sandbox_id, row.on_timeout)

    # -------------------------------------------------------------------------- pause/resume

    async def pause(self, sandbox_id: str, mode: str, reason: str, cause: str = "api") -> None:
        async with self._owning(sandbox_id):
            row = self._row(sandbox_id)
            if row.state == "paused":
                raise ApiError(409, f'Sandbox "{sandbox_id}" is already paused')
            remaining = max(row.end_at - time.time(), 1.0)
            # Gone to the proxy from now on (as a kill makes it by recording the end first): a client
            # whose stream the pause cuts, and that probes /health, learns the sandbox stopped.
            self._pausing[sandbox_id] = "it is being paused"
            self._notify_gone(sandbox_id)
            try:
                if mode == "full":
                    await asyncio.to_thread(self.handles[sandbox_id].freeze)
                else:
                    await self._stop_processes(sandbox_id, keep_files=True)
                self._slots.discard(sandbox_id)
                await self._forget_samples(sandbox_id, keep_history=True)
                self.store.update(sandbox_id, state="paused", pause_mode=mode, remaining_s=remaining)
                self.store.event(sandbox_id, "paused", f"{reason} ({mode})")
            finally:
                self._pausing.pop(sandbox_id, None)
            self.observe.paused(sandbox_id, cause, mode)

    async def resume(self, sandbox_id: str, timeout: int | None, cause: str = "api") -> SandboxRow:
        """Resume a paused sandbox; ``cause`` (``api``, ``connect``, ``auto_resume``) labels the metrics."""
        async with self._owning(sandbox_id):
            started = time.monotonic()
            row = self._row(sandbox_id)
            if row.state != "paused":
                raise ApiError(409, f'Sandbox "{sandbox_id}" is already running')
            if timeout is not None:
                self._validate_timeout(timeout)
            remaining = float(timeout) if timeout is not None else (row.remaining_s or DEFAULT_TIMEOUT_S)
            self._take_slot(sandbox_id)
            try:
                handle = self.handles.get(sandbox_id)
                if row.pause_mode == "full" and handle is not None:
                    await asyncio.to_thread(handle.thaw)
                    changes: dict[str, Any] = {}
                else:
                    await self._boot(row, self.templates.resolve(row.template_id), resuming=True)
                    changes = {"init_pid": row.init_pid, "init_start": row.init_start}
            except BaseException:
                self._slots.discard(sandbox_id)
                raise
            changes.update(state="running", end_at=time.time() + remaining, remaining_s=None, pause_mode=None)
            self.store.update(sandbox_id, **changes)
            self.store.event(sandbox_id, "resumed", row.pause_mode)
            self.observe.resumed(sandbox_id, cause, row.pause_mode, time.monotonic() - started)
            return self._row(sandbox_id)

    async def connect(self, sandbox_id: str, timeout: int | None) -> tuple[SandboxRow, bool]:
        """Resume a paused sandbox (True) or extend a running one's timeout, never shortening it."""
        row = self._row(sandbox_id)
        if row.state == "paused":
            try:
                return await self.resume(sandbox_id, timeout, cause="connect"), True
            except ApiError as exc:
                if exc.status != 409:  # 409: a concurrent connect resumed it first
                    raise
        if timeout is not None:
            self._validate_timeout(timeout)
            async with self._owning(sandbox_id):
                row = self._row(sandbox_id)
                if time.time() + timeout > row.end_at:
                    self.store.update(sandbox_id, end_at=time.time() + timeout)
        return self._row(sandbox_id), False

    # ------------------------------------------------------------------------------ snapshots

    async def snapshot(self, sandbox_id: str, name: str | None) -> TemplateRow:
        """E2B's ``create_snapshot``: a template of the sandbox's file system as it is now (see
        :mod:`.snapshots`); ``name`` replaces a template of that name, else it gets a new id. The
        sandbox keeps running (or stays paused)."""
        if name is not None:
            self.templates.check_buildable_name(name)
        async with self._owning(sandbox_id):
            row = self._row(sandbox_id)
            try:
                parent = self.templates.row_of(row.template_id)
            except ApiError:
                raise ApiError(
                    400, f"sandbox {sandbox_id} runs the '{row.template_id}' template, which has no layers to snapshot"
                ) from None
            assert row.id_base is not None
            copy = self.sandboxes_dir / sandbox_id / SNAPSHOT_IMAGE
            handle = self.handles.get(sandbox_id)
            image = self.sandboxes_dir / sandbox_id / DISK_IMAGE
            if handle is None and not await released(image):
                # Paused to disk, its last run's filesystem alive (see disks.released): the image may
                # lack what that filesystem has not written back.
                raise _disk_held(sandbox_id, "snapshot")
            try:
                await asyncio.to_thread(
                    snapshots.copy_disk,
                    image,
                    copy,
                    handle,
                    row.state == "running",
                )
            except OSError as exc:
                raise ApiError(500, f"could not snapshot sandbox {sandbox_id}: {exc}") from None
        # The snapshot's sandboxes get this sandbox's size, as on E2B (whatever its template says now).
        config = {
            **parent.config,
            snapshots.SOURCE_KEY: sandbox_id,
            "cpu_count": row.cpu_count,
            "memory_mb": row.memory_mb,
        }
        try:
            snapshot, info = await asyncio.to_thread(
                self.templates.record_disk_layer,
                name or new_id(),
                copy,
                row.id_base,
                parent.layers,
                config,
                f"snapshot of sandbox {sandbox_id}",
            )
        finally:
            copy.unlink(missing_ok=True)
        self.store.event(sandbox_id, "snapshot", f"template {snapshot.name} ({info.size >> 10} KiB layer)")
        return snapshot

    def mounted_by(self, volume_name: str) -> list[str]:
        """The live sandboxes (running or paused) that mount the volume ``volume_name``."""
        return [row.id for row in self.store.live() if volume_name in row.volume_mounts.values()]

    def snapshot_rows(self, sandbox_id: str | None = None) -> list[TemplateRow]:
        """The snapshots, newest first; of one sandbox when ``sandbox_id`` is given."""
        rows = [row for row in self.templates.db.templates() if row.config.get(snapshots.SOURCE_KEY)]
        if sandbox_id is not None:
            rows = [row for row in rows if row.config.get(snapshots.SOURCE_KEY) == sandbox_id]
        return sorted(rows, key=lambda row: row.created_at, reverse=True)

    # -------------------------------------------------------------------------------- network

    def network_config(self, sandbox_id: str) -> NetworkConfig:
        """The network settings a sandbox was given (defaults when it has none stored)."""
        row = self.networks.info(sandbox_id) if self.networks is not None else None
        return row.config if row is not None else NetworkConfig()

    def traffic_token(self, sandbox_id: str) -> str | None:
        """The token its URLs need (``allow_public_traffic=False``), or None when they are public."""
        row = self.networks.info(sandbox_id) if self.networks is not None else None
        return row.traffic_token if row is not None else None

    async def update_network(self, sandbox_id: str, update: NetworkConfig) -> None:
        """``PUT /sandboxes/{id}/network``: E2B's full replace of a running sandbox's egress."""
        async with self._owning(sandbox_id):
            row = self._row(sandbox_id)
            if row.state != "running":
                raise ApiError(
                    409, f'Sandbox "{sandbox_id}" is {row.state}: only a running sandbox\'s network can be updated'
                )
            if self.networks is None:
                raise ApiError(400, "this runtime runs sandboxes without networking: network settings do not apply")
            self.secrets.check_references(update)
            await self.networks.update(sandbox_id, update)
            self.store.event(sandbox_id, "network_updated", None)

    # -------------------------------------------------------------------------------- metrics

    async def metrics(self, sandbox_id: str, start: int | None, end: int | None) -> list[MetricsSample]:
        """The sandbox's samples inside ``[start, end]`` (unix seconds; from its start to now by
        default). A range that reaches the current 5-second bucket gets that bucket's sample taken
        now, so the newest figures are live and a new sandbox's metrics are never empty."""
        row = self._row(sandbox_id)
        now = time.time()
        start = int(row.started_at) if start is None else start
        end = int(now) if end is None else end
        if start > end:
            raise ApiError(400, f"'start' ({start}) is after 'end' ({end})")
        target = self._target(row)
        if target is not None and end >= bucket(now):
            await self.history.record(await self.sampler.sample([target]))
        return await self.history.query(sandbox_id, start, end)

    def _target(self, row: SandboxRow) -> Target | None:
        handle = self.handles.get(row.id)
        if row.state != "running" or handle is None:
            return None
        counters = functools.partial(self.networks.counters, row.id) if self.networks is not None else None
        return Target(row.id, handle, row.cpu_count, row.memory_mb << 20, row.disk_mb << 20, counters)

    def _first_sample_soon(self, row: SandboxRow, created: float) -> None:
        """Take the create's own sample :data:`FIRST_SAMPLE_DELAY_S` later, or just before its bucket
        ends if that is sooner: not while the client's first request goes through, which comes as the
        create returns (the sample is two worker-thread hops, ~0.3 ms of the runtime's CPU, as
        measured in ``docs/benchmarks.md``). A sandbox killed before then gets none, and its kill
        then has no history to forget.

        Creates close together share one sample: the delay is rounded up to the next multiple of
        :data:`FIRST_SAMPLE_DELAY_S` on the wall clock (so 0.25-0.5 s), and those due at the same
        time are read in one worker-thread trip and written in one transaction (a burst of 100
        creates: ~10 batches, not 100 of each)."""
        now = time.time()
        due = -(-(now + FIRST_SAMPLE_DELAY_S) // FIRST_SAMPLE_DELAY_S) * FIRST_SAMPLE_DELAY_S
        due = min(due, bucket(created) + SAMPLE_INTERVAL_S - FIRST_SAMPLE_MARGIN_S)
        batch = round(due * 1000)
        self._first_samples[row.id] = (batch, row)
        if batch not in self._first_batches:
            self._first_batches[batch] = asyncio.get_running_loop().call_later(
                max(due - now, 0.0), self._first_batch_due, batch
            )

    def _first_batch_due(self, batch: int) -> None:
        del self._first_batches[batch]
        rows = [row for key, row in self._first_samples.values() if key == batch]
        for row in rows:
            del self._first_samples[row.id]
        self._background(self._first_sample(rows))

    async def _first_sample(self, rows: list[SandboxRow]) -> None:
        """The creates' own bucket: a sandbox's history starts when it does (off the create's path)."""
        targets = [t for t in map(self._target, rows) if t is not None]
        samples = await self.sampler.sample(targets)
        # A sandbox killed while it was being read is not recorded after its history went.
        live = {t.sandbox_id for t in targets if self.handles.get(t.sandbox_id) is t.handle}
        await self.history.record([s for s in samples if s[0] in live])

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sample_forever(self) -> None:
        """Every 5 seconds, on the bucket boundary: one sample of every running sandbox."""
        pruned = 0.0
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S - time.time() % SAMPLE_INTERVAL_S)
            try:
                targets = [t for t in map(self._target, self.store.live()) if t is not None]
                samples = await self.sampler.sample(targets)
                # A sandbox killed while it was being read is not recorded after its history went.
                live = {t.sandbox_id for t in targets if self.handles.get(t.sandbox_id) is t.handle}
                await self.history.record([s for s in samples if s[0] in live])
                if time.monotonic() - pruned > 60:
                    pruned = time.monotonic()
                    await self.history.prune(time.time())
                    self.store.forget_before(time.time() - RETENTION_S)
            except Exception:
                log.exception("sampling sandbox metrics failed")

    def disk_used_now(self, sandbox_id: str, may_walk: bool) -> int | None:
        """For a worker thread (a metrics scrape): the bytes used on the sandbox's disk, one
        ``statfs`` (``may_walk`` is moot: nothing is walked), or None when it is not running."""
        handle = self.handles.get(sandbox_id)
        if handle is None:
            return None
        try:
            return handle.disk_usage()[0]
        except OSError:
            return None


def _sync_kept_disk(image: Path, sandbox_id: str) -> None:
    """In a worker thread: a paused sandbox's disk image onto the host's disk (see make_durable)."""
    try:
        make_durable(image)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("could not sync sandbox %s's disk", sandbox_id, extra={"sandbox_id": sandbox_id})


def _kill_quietly(instance: str, sandbox_id: str) -> None:
    """Kill whatever is left in the sandbox's cgroup and remove it; nothing there is fine."""
    with contextlib.suppress(OSError):
        _core.kill_sandbox(instance, sandbox_id)


def _disk_held(sandbox_id: str, action: str) -> ApiError:
    """503 for a resume or snapshot of a paused sandbox whose disk image a file of its last run still
    holds mounted (:func:`.disks.released`): the sandbox stays paused, and ``action`` works once that
    file is closed."""
    return ApiError(
        503,
        f"sandbox {sandbox_id}'s disk is still mounted by its last run: a file of it is held open"
        f" outside it (sent out over a unix socket); {action} it once that file is closed",
    )
