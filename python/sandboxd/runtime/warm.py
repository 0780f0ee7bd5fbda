"""Warm sandboxes: a few sandboxes of one template (``base`` by default) forked and jailed ahead of
need, whose agent is already listening, so a create only gives one its identity.

Why: the profile in ``docs/benchmarks.md`` puts ~75 % of create→first command in two serial steps
inside the new sandbox, the jail's set-up and the agent's start-up; neither can overlap the other,
so the only way to take them off a create's path is to do them before the create arrives.

What a warm sandbox has before it is claimed, and why none of it tells one sandbox from another:
its id (random, as every id is, and known to nobody: it is named in no answer until the claim),
hence its hostname, cgroup, directory and host id range; a fresh boot id; its disk from the disk
pool; a network slot (its ``/etc/resolv.conf`` names the slot's gateway) and its veth pair, but no
rules and no row (the claim adds both before the sandbox's id is named to anyone, so before any
code of a user's can run in it; until then only the agent and the warm-up's ``true`` run there);
an agent **without** access token, environment or CA bundle (the zygote never holds a secret). The
claim does what a create does after the fork, in the same code (``SandboxManager._boot``): the
agent's ``POST /init`` with the new token, the template's and the request's env vars and defaults;
the network link with the request's rules; the row, with ``startedAt``, metadata and timeout, from
the claim. Only sandboxes of the warm template (``--warm-template``, at its size: a sandbox made
before its template was rebuilt with another size is discarded), with no size and no id set by the
caller, are served warm; anything else is created as before. A ``code-interpreter-v1``
sandbox is warm with its Python kernel too (a create otherwise waits ~0.5 s or more for it), started
at nice 10: it joins the pool only once that kernel is ready. Its interpreter's spare kernel (for
``create_code_context``) starts after the claimed sandbox's first cell, as in a cold sandbox.

Cost, bounded by ``--warm-sandboxes N``: N idle sandboxes (~8-10 MiB of PSS each,
``benches/runtime``; a ``code-interpreter-v1`` one ~120 MiB: its interpreter server ~20 MiB and its
default ipykernel ~70 MiB, measured), N disks and N network slots, not counted against
``--max-sandboxes`` until claimed, and each refill's CPU (a create's, spent only in the gaps between
creates: its sandbox is frozen while creates boot, and runs at :data:`CPU_WEIGHT`). Without the flag
the runtime keeps a small pool sized from the host's memory (:func:`.host.default_warm_sandboxes`: 4
on a host with 8 GiB or more for sandboxes, none under 2 GiB), of a template already built: that
pool never starts a build of ``base`` (a runtime nobody has asked for a sandbox yet fetches nothing),
it waits for a create to build it. A warm sandbox that dies is dropped and replaced; the runtime's
stop kills them all (they have no row to be re-adopted from), and its start kills any a crashed
runtime left; if it is not started again, the next runtime to start on the host does (:mod:`.leftovers`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sandboxd import _core

from .agent_client import init_agent, interpreter_ready, run_command
from .errors import ApiError
from .store import SandboxRow

if TYPE_CHECKING:
    from .manager import CreateRequest, SandboxManager
    from .network.addressing import Slot
    from .templates import Template

log = logging.getLogger("sandboxd.runtime")

NICE = 10
"""The niceness a warm sandbox boots with, reset to 0 when it is claimed: booting one takes a few tens
of ms of CPU, and right after a claim that would compete, as an equal, with the claimed sandbox's
first command (measured: the first command went from 37 to 65 ms p50 on 2 busy cores). It weighs
the sandbox's processes against each other and against the zygote and the runtime (its "A" runs in
the zygote's cgroup until it joins its own), not against other sandboxes: see :data:`CPU_WEIGHT`."""

CPU_WEIGHT = 1
"""The warm sandbox's cgroup CPU weight until its claim (cgroup v2 ``cpu.weight`` 1, v1
``cpu.shares`` 10; the kernel's default is :data:`DEFAULT_CPU_WEIGHT`): ~1 % of a default
sandbox's share while both want the CPU. CFS weighs sibling cgroups before the tasks inside them, so
with :data:`NICE` alone a refill's boot (its jail, its agent's start, the warm-up's ``bash -l``) was
an equal of every busy sandbox beside it. The weight does not shield a create from a refill: most of
a create runs in the runtime and the zygote, outside the sandboxes' group, against which that group
competes at its full share whichever child runs (measured, ``docs/benchmarks.md``, ``pool2``); the
refill's sandbox is frozen while creates boot for that (:meth:`WarmPool._frozen_while_creating`)."""

DEFAULT_CPU_WEIGHT = 100
"""The kernel's default cgroup CPU weight, which the claim gives a warm sandbox back."""

REFILL_DELAY_S = 0.1
"""A refill starts this long after the last claim, so that booting the next warm sandbox does not
compete with the claimed sandbox's first command; an empty pool refills at once (a steady stream
of creates, one every <0.1 s, would otherwise keep postponing the refill and starve the pool)."""

FIRST_COMMAND_GRACE_S = 0.05
"""A refill waits this long after the last create ended, frozen, before it runs: the created
sandbox's first command comes then (a few ms on a quiet host), and a refill beside it took the CPU it
waited for (measured, pool2: paced creates 0.25 s apart from a grown pool, p50 37.5 against 25.2 ms
for main's pool, whose refill waited 0.1 s after each claim)."""

RETRY_S = 2.0
"""Wait before trying again when making a warm sandbox failed (a template being built, no disk)."""


GROWTH_WINDOW_S = 2.0
"""Creates of the warm template that come within this long of each other are one burst: the default
pool grows to the largest burst it has seen (bounded, :attr:`WarmPool.size`), so that the next burst
of that size is served warm (a burst of 100 took 0.71-0.86 s from a pool of 100 against 1.6-4.3 s
cold, ``docs/benchmarks.md``, ``cold8``). Paced creates count too: 4 a second make a pool of 8."""


def _decay_s(value: str | None) -> float:
    """``SANDBOXD_WARM_DECAY_S`` as seconds: a finite number above 0, else ``sandboxd serve`` stops
    at start with a message naming it (``nan`` would keep a grown pool for ever, silently)."""
    if not value:
        return 600.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SystemExit(f"SANDBOXD_WARM_DECAY_S must be a number of seconds above 0, not {value!r}")
    return seconds


DECAY_S = _decay_s(os.environ.get("SANDBOXD_WARM_DECAY_S"))
"""How long a grown pool keeps the size of a burst after it: it shrinks back to its default size when
no burst as large has come for this long, its extra sandboxes killed. The runtime's environment
(``sandboxd serve``'s, which no sandbox and no client can set) may shorten it: the tests do."""

UNBUILT_RETRY_S = 5.0
"""How often the default pool, which never starts a build, looks again for its template built."""


class _NotBuilt(Exception):
    """The default pool's template is not built yet: it waits, quietly, for a create to build it."""


@dataclass
class _Hold:
    """A sandbox being made for the pool: whether it is frozen, and whether its maker is done with it."""

    frozen: bool = False
    stop: bool = False
    failed: bool = False


@dataclass
class Warm:
    """A booted sandbox waiting for its identity."""

    row: SandboxRow
    """Its id, id range, size and init; the rest is filled in by the claim."""
    template: Template
    handle: _core.SandboxHandle
    slot: Slot | None
    linked: bool = False
    """Its veth pair is made (no rules: those come with the claim, before anything can run in it)."""


class WarmPool:
    """Keeps up to :attr:`size` warm sandboxes of ``template``: ``base``, or, for a pool that
    ``grows_to`` more (the default pool), up to the largest burst of creates it has seen within
    :data:`DECAY_S`."""

    def __init__(
        self, manager: SandboxManager, base: int, template: str, builds: bool = True, grows_to: int = 0
    ) -> None:
        self.manager = manager
        self.base = base
        self.grows_to = grows_to if base > 0 else 0
        """At most this many after a burst; not above ``base``: a fixed pool."""
        self.template = template
        self.builds = builds
        """Whether making a warm sandbox may start its built-in template's build (``--warm-sandboxes``
        given), or waits for one built (the default pool)."""
        self.ready: list[Warm] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._taken_at = 0.0
        self._arrivals: collections.deque[float] = collections.deque()
        """When the creates it could serve came, those of the last :data:`GROWTH_WINDOW_S`."""
        self._peaks: collections.deque[tuple[float, int]] = collections.deque()
        """(when, how many creates had come within :data:`GROWTH_WINDOW_S`) over the last
        :data:`DECAY_S`, each smaller than the one before it: the first is the largest burst of the
        window (a sliding maximum, O(1) a create)."""

    @property
    def size(self) -> int:
        """How many warm sandboxes the pool keeps now: ``base``, or the largest burst of the last
        :data:`DECAY_S` up to ``grows_to``, and never more than the running sandboxes leave of
        ``--max-sandboxes`` (so every warm sandbox still has a network slot: the runtime's block
        holds ``--max-sandboxes`` + ``base``)."""
        if self.grows_to <= self.base:
            return self.base
        horizon = time.monotonic() - DECAY_S
        while self._peaks and self._peaks[0][0] < horizon:
            self._peaks.popleft()
        if not self._peaks:
            return self.base
        room = self.base + max(0, self.manager.limits.max_sandboxes - len(self.manager._slots))
        return max(self.base, min(self._peaks[0][1], self.grows_to, room))

    def _demand(self, now: float) -> None:
        """Count a create this pool could serve (warm or not: a burst past the pool counts whole)."""
        if self.grows_to <= self.base:
            return
        arrivals = self._arrivals
        arrivals.append(now)
        while arrivals[0] < now - GROWTH_WINDOW_S:
            arrivals.popleft()
        while self._peaks and self._peaks[-1][1] <= len(arrivals):
            self._peaks.pop()
        self._peaks.append((now, len(arrivals)))

    def start(self) -> None:
        if self.base > 0:
            self._task = asyncio.get_running_loop().create_task(self._fill())

    async def stop(self) -> None:
        """Kill every warm sandbox: none has a row, so nothing could re-adopt it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.ready:
            await self._discard(self.ready.pop())

    def take(self, template: Template, request: CreateRequest) -> Warm | None:
        """A live warm sandbox for this create, or None when it must be made from scratch."""
        if request.template != self.template or request.sandbox_id is not None:
            return None  # another template, or an id the caller owns (sandboxd node)
        if request.cpu_count is not None or request.memory_mb is not None:
            return None  # not the default size
        if request.volume_mounts:
            return None  # volumes are mounted as the sandbox is made
        self._taken_at = time.monotonic()
        self._demand(self._taken_at)
        while self.ready:
            warm = self.ready.pop(0)
            self._wake.set()
            resized = (warm.row.cpu_count, warm.row.memory_mb) != self.manager.limits.size(template)
            if warm.template.id != template.id or resized or self.manager.handles.get(warm.row.id) is not warm.handle:
                self.manager._background(self._discard(warm))  # its template was rebuilt since, or it died
                continue
            return warm  # reniced by the claim (renice), before its /init
        self._wake.set()
        return None

    async def _fill(self) -> None:
        waited = False
        target = self.base
        while True:
            size = self.size
            if size != target:
                if size > target:
                    burst = self._peaks[0][1] if self._peaks else size
                    log.info("the warm pool grows to %d: %d creates came within %gs", size, burst, GROWTH_WINDOW_S)
                else:
                    log.info("the warm pool shrinks to %d: no burst as large for %gs", size, DECAY_S)
                target = size
            if len(self.ready) > size:  # a grown pool after its quiet period
                await self._discard(self.ready.pop())
                continue
            if len(self.ready) >= size:
                self._wake.clear()
                # A grown pool looks again when its largest burst leaves the window (it may shrink).
                timeout = self._peaks[0][0] + DECAY_S - time.monotonic() + 0.01 if size > self.base else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            wait = self._taken_at + REFILL_DELAY_S - time.monotonic()
            if wait > 0 and self.ready:  # an empty pool refills at once: else steady creates starve it
                await asyncio.sleep(wait)
                continue
            if self._busy_for() > 0:
                # Not while creates boot (a burst past the pool's size, or one served warm): a refill
                # is a create's work, and part of it (the zygote's fork, the disk, the link, the
                # warm-up's requests) runs in the runtime and the zygote at full priority, so it would
                # take the CPU those creates are waiting for (3 refills were made during a burst of
                # 100 against a pool of 4). Creates one after another leave gaps between them, where
                # the refill starts.
                await self._gap()
                continue
            try:
                self.ready.append(await self._make())
            except asyncio.CancelledError:
                raise
            except _NotBuilt:
                if not waited:
                    log.info("the warm pool waits for template %s to be built by a create", self.template)
                    waited = True
                await asyncio.sleep(UNBUILT_RETRY_S)
            except Exception as exc:
                detail = exc.message if isinstance(exc, ApiError) else repr(exc)
                log.info("could not make a warm sandbox (retrying in %gs): %s", RETRY_S, detail)
                await asyncio.sleep(RETRY_S)

    async def _make(self) -> Warm:
        manager = self.manager
        if self.builds:
            template = await manager.templates.prepare(self.template)
        elif (built := manager.templates.built(self.template)) is not None:
            template = built
        else:
            raise _NotBuilt
        from .manager import new_id  # the manager imports this module

        limits = manager.limits
        cpus, memory_mb = limits.size(template)
        now = time.time()
        row = SandboxRow(
            id=new_id(),
            template_id=template.id,
            alias=None,
            state="running",
            started_at=now,
            end_at=now,
            access_token="",
            cpu_count=cpus,
            memory_mb=memory_mb,
            disk_mb=limits.disk_mb,
        )
        handle, slot = await manager._spawn(row, template, resuming=False, nice=NICE, cpu_weight=CPU_WEIGHT)
        warm = Warm(row, template, handle, slot)
        hold = _Hold()
        holding = asyncio.ensure_future(self._frozen_while_creating(handle, hold))
        try:
            try:
                if slot is not None and manager.networks is not None:
                    # The veth pair, ahead of the claim: making it is the claim's largest cost in the
                    # kernel (~2-5 ms of a worker thread, py-spy over a burst of 64 warm creates).
                    await self._gap()
                    await manager.networks.link(slot, handle.init_pid)
                    warm.linked = True
                await self._gap()
                await self._warm_up(warm)
            finally:
                # Never pooled frozen (a claim must find it running), nor left to a freeze still in
                # a worker thread: the holder ends after its last freeze or thaw, thawed.
                hold.stop = True
                self.manager.creates_changed.set()
                await asyncio.shield(holding)
            if hold.failed:
                raise ApiError(500, "a sandbox being made for the warm pool could not be frozen or thawed")
        except BaseException:
            await self._discard(warm)
            raise
        return warm

    def _busy_for(self) -> float:
        """How long a refill must still hold back: while creates boot (``inf``), and for
        :data:`FIRST_COMMAND_GRACE_S` after the last one ended; 0 in a gap."""
        manager = self.manager
        if manager.creates:
            return math.inf
        return max(0.0, manager.create_ended_at + FIRST_COMMAND_GRACE_S - time.monotonic())

    async def _changed(self, busy_for: float) -> None:
        """Until the creates change, or ``busy_for`` has passed."""
        changed = self.manager.creates_changed
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), None if busy_for == math.inf else busy_for + 0.001)

    async def _gap(self) -> None:
        """Until a gap between creates (:meth:`_busy_for`)."""
        while (busy_for := self._busy_for()) > 0:
            await self._changed(busy_for)

    async def _frozen_while_creating(self, handle: _core.SandboxHandle, hold: _Hold) -> None:
        """While the sandbox is being made for the pool: frozen (its cgroup's freezer) whenever creates
        are booting (and :data:`FIRST_COMMAND_GRACE_S` after), thawed in the gaps between them. Its
        agent's start and warm-up run in its own cgroup, whose :data:`CPU_WEIGHT` counts only against
        sibling sandboxes: at the top of the hierarchy the runtime's group of sandboxes competes with
        the runtime and the zygote (where most of a create's work runs) at its full weight whichever
        of its children runs, so a sandbox burning 2 CPUs beside back-to-back creates took ~1 CPU at
        weight 1 as at 100 (``docs/benchmarks.md``, ``pool2``); frozen, none. A frozen task stops only at a safe point
        (returning to user space, a freezable sleep), never holding a kernel lock a create needs.
        Ends, thawed, once ``hold.stop`` is set (and :attr:`.SandboxManager.creates_changed` with it);
        a sandbox that cannot be frozen or thawed (it died, or a task would not stop) ends it too,
        with ``hold.failed``: it is discarded."""
        while True:
            busy_for = self._busy_for()
            busy = busy_for > 0 and not hold.stop
            if busy != hold.frozen:
                try:
                    await asyncio.to_thread(handle.freeze if busy else handle.thaw)
                except OSError:
                    hold.failed = True  # its freezer state unknown: the pool discards it
                    return
                hold.frozen = busy
                continue
            if hold.stop:
                return
            await self._changed(busy_for)

    async def _warm_up(self, warm: Warm) -> None:
        """What every create's first moments would otherwise pay for, done before the claim and with
        nothing that tells one sandbox from another (the runtime's egress CA is in the trust store
        already: every sandbox gets it before its agent starts): one ``POST /init`` with nothing in
        it, so the claim's finds the agent's request path warm; and one ``true`` as the template's
        user runs through the agent's process service, so the first command finds its code paths,
        the user lookup and the login shell's files paged in. No token is set (the agent has none
        until the claim) and no environment."""
        manager = self.manager
        open_socket = functools.partial(manager.open_socket, warm.row.id)
        connection = await init_agent(open_socket, None, None)
        if connection is not None:
            connection.close()  # the claim's own /init connection is the one kept for its first command
        template = warm.template
        result = await run_command(
            open_socket, "", "true", template.user or "root", template.workdir, {}, lambda _stream, _line: None
        )
        if result.exit_code != 0:
            raise ApiError(500, f"a warm sandbox's warm-up command failed: {result.status}")
        if template.code_interpreter:
            # In the pool only once its Python kernel is warm: taken earlier, the claim waited for the
            # rest of the kernel's start-up (~0.5 s of CPU), reniced to 0, beside the next warm
            # sandbox's boot. Past INTERPRETER_READY_S it is pooled anyway; the claim waits again.
            # The spare kernel (create_code_context's) waits for the claimed sandbox's first cell,
            # as in a cold sandbox: not started in the pool, nor beside the first runCode.
            await interpreter_ready(open_socket, warm.row.id, spares_on_use=True)

    async def _discard(self, warm: Warm) -> None:
        manager = self.manager
        if warm.slot is not None and manager.networks is not None:
            manager.networks.unreserve(warm.slot)
        with contextlib.suppress(Exception):
            await manager._stop_processes(warm.row.id, id_base=warm.row.id_base)


async def renice(warm: Warm) -> None:
    """A claimed warm sandbox back to the default priority, its cgroup's CPU weight and its threads'
    niceness, in a worker thread, before its ``/init`` (at nice 10 on a loaded host its agent answered
    seconds late): on the event loop this took ~1 ms a claim, a quarter of the runtime's CPU in a
    burst of warm creates (py-spy, 64 claims). A sandbox that died in the pool since
    :meth:`WarmPool.take` checked it fails the create with a 500 that says so (the create's clean-up
    then runs as for any failed create)."""
    try:
        await asyncio.to_thread(_renice, warm.handle)
    except OSError as exc:
        raise ApiError(500, f"the warm sandbox taken for this create stopped before its claim ({exc}); retry") from None


def _renice(handle: _core.SandboxHandle) -> None:
    """Back to the default priority: the cgroup's weight first (one write: what it weighs against
    the other sandboxes), then every thread of every process in the sandbox, found from its init
    down (its agent, and in a code-interpreter sandbox the interpreter and its kernels; nobody else
    can have started a process: the agent has no token yet). Niceness is per thread, and the agent's
    event loop starts its worker threads while niced. A handful of system calls and short reads.
    Raises OSError when the sandbox's processes or its cgroup are gone (it died: the claim fails as
    a create would)."""
    handle.set_cpu_weight(DEFAULT_CPU_WEIGHT)
    pending = [handle.init_pid]
    while pending:
        pid = pending.pop()
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pending.extend(map(int, f.read().split()))
