"""What this host can give sandboxes: the budgets all sandboxes share (with a reserve the host keeps),
per-sandbox defaults sized from the host at start, and the instance name of this runtime.

Per-sandbox limits alone add up past the host's: 8 sandboxes x 4096 pids is a whole ``pid_max`` of
32768, and the old default of 2 CPUs per sandbox was every core of a 2-core host. So every runtime
writes the host-wide budget (host total minus a reserve) on the cgroup ``sandboxd/`` that holds all
sandboxes of all runtimes, and its own on ``sandboxd/<instance>/``; the kernel then refuses a fork
or an allocation that would cross it, whichever sandbox asks.

Open files are kernel memory: every ``struct file``, descriptor table, pipe and socket is charged to
the opener's memory cgroup (measured: ~250 bytes per open file), so the memory budget bounds them.
``fs.file-max`` is a host-wide *count* that only unprivileged processes hit, which is every process
in a sandbox: left below what the memory budget can hold, one sandbox could make every other
sandbox's ``open`` fail with ENFILE. The runtime therefore raises it (never lowers it) to the count
the budget can hold plus what the host uses now, as systemd does on most distributions. Each
process is also held to ``RLIMIT_NOFILE``, whose hard limit nothing inside can raise.

inotify instances and watches are per-user kernel counters. Each sandbox's user namespace is
created by its own host uid, so the whole sandbox is charged as that uid against the host's
per-user limits (never against host root's or another sandbox's), and each uid inside is capped at
half of those by the sandbox's own ``user.max_inotify_*``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import leftovers
from .disks import DiskPool
from .manager import HostPlace, Limits
from .templates import HOST, Templates

log = logging.getLogger("sandboxd.runtime")

MEMORY_RESERVE_FRACTION = 8
"""The host keeps 1/8 of its memory (and at least :data:`MIN_MEMORY_RESERVE`) from sandboxes."""

MIN_MEMORY_RESERVE = 512 << 20
"""Enough for the runtime, sshd and a shell on a small host."""

PID_RESERVE_FRACTION = 8
"""The host keeps 1/8 of ``kernel.pid_max`` (and at least :data:`MIN_PID_RESERVE`) from sandboxes."""

MIN_PID_RESERVE = 1024
"""Room for a login and its tools when sandboxes have used everything else."""

BYTES_PER_OPEN_FILE = 232
"""The smallest memory-cgroup charge of one open file (``struct file``; measured ~250 bytes with the
descriptor table), so the memory budget can hold at most budget / 232 open files."""

FILE_MAX_RESERVE = 65536
"""Open files left to the host above what the sandboxes' memory budget can hold."""

DEFAULT_MEMORY_MB = 1024
"""Per-sandbox memory where the host has room for it (E2B's sandboxes have 512 MiB to a few GiB)."""

DEFAULT_PIDS = 4096
"""Per-sandbox tasks where the host has room for it: far more than any build or test run needs."""

DEFAULT_DISK_MB = 10240
"""Per-sandbox disk quota where the data dir has room for it (sparse: only what is written is used)."""

DEFAULT_OPEN_FILES = 65536
"""Per-process ``RLIMIT_NOFILE`` in sandboxes (capped at what the runtime itself may grant)."""


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the kernel says about this host."""

    cpus: int
    memory_bytes: int
    pid_max: int
    file_max: int
    files_open: int
    inotify_instances: int
    inotify_watches: int
    nofile_hard: int
    data_free_mb: int


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits on all sandboxes together."""

    memory_bytes: int
    pids_max: int


def _read_int(path: str, default: int) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def cpus_and_memory() -> tuple[int, int]:
    """The CPUs this process may run on and the host's memory in bytes (``MemTotal``)."""
    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:"))
    return len(os.sched_getaffinity(0)), mem_kb << 10


def read_host(data_dir: Path) -> HostFacts:
    """The host's CPUs, memory, pid and file limits, inotify limits and the data dir's free space."""
    cpus, memory_bytes = cpus_and_memory()
    file_nr = Path("/proc/sys/fs/file-nr").read_text().split()
    return HostFacts(
        cpus=cpus,
        memory_bytes=memory_bytes,
        pid_max=_read_int("/proc/sys/kernel/pid_max", 32768),
        file_max=_read_int("/proc/sys/fs/file-max", 0),
        files_open=int(file_nr[0]),
        inotify_instances=_read_int("/proc/sys/fs/inotify/max_user_instances", 128),
        inotify_watches=_read_int("/proc/sys/fs/inotify/max_user_watches", 8192),
        nofile_hard=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        data_free_mb=shutil.disk_usage(data_dir).free >> 20,
    )


def budget(host: HostFacts) -> Budget:
    """What all sandboxes together may use: the host's memory and pids less the host's reserve."""
    memory_reserve = max(host.memory_bytes // MEMORY_RESERVE_FRACTION, MIN_MEMORY_RESERVE)
    pid_reserve = max(host.pid_max // PID_RESERVE_FRACTION, MIN_PID_RESERVE)
    return Budget(
        memory_bytes=max(host.memory_bytes - memory_reserve, host.memory_bytes // 2),
        pids_max=max(host.pid_max - pid_reserve, host.pid_max // 2),
    )


def default_cpus(host: HostFacts) -> int:
    """Half the host's cores, 1 to 2: a sandbox never gets every core of a small host."""
    return max(1, min(2, host.cpus // 2))


def default_memory_mb(host: HostFacts) -> int:
    """:data:`DEFAULT_MEMORY_MB`, or a quarter of the budget on a small host."""
    return max(64, min(DEFAULT_MEMORY_MB, (budget(host).memory_bytes >> 20) // 4))


def default_pids(host: HostFacts) -> int:
    """:data:`DEFAULT_PIDS`, or an eighth of the budget (so one sandbox cannot take it all)."""
    return max(64, min(DEFAULT_PIDS, budget(host).pids_max // 8))


def default_disk_mb(host: HostFacts) -> int:
    """:data:`DEFAULT_DISK_MB`, or a quarter of the data dir's free space."""
    return max(64, min(DEFAULT_DISK_MB, host.data_free_mb // 4))


DEFAULT_WARM_SANDBOXES = 4
"""``sandboxd serve``'s warm pool at most when ``--warm-sandboxes`` is not given (see
:func:`default_warm_sandboxes`)."""

WARM_MEMORY_PER_SANDBOX = 2 << 30
"""One default warm sandbox per this much of the sandboxes' memory budget: a warm sandbox holds ~8-10
MiB of PSS (its pages are mostly the zygote's, shared; ``benches/runtime``'s idle-sandbox row), so
the default pool costs under 0.5 % of that budget."""


WARM_GROWTH_MAX = 128
"""The default pool grows to at most this many warm sandboxes after the bursts it has seen (see
:func:`warm_growth_cap` and :class:`.warm.WarmPool`): a burst of 100, issue 16's target, is then
served warm the second time."""

WARM_GROWTH_MEMORY_PER_SANDBOX = 128 << 20
"""A grown pool holds at most one warm sandbox per this much of the sandboxes' memory budget: a warm
sandbox's ~8-10 MiB of PSS is then under 8 % of the budget (128 of them ~1.1 GiB on a host with 16
GiB or more for sandboxes)."""


def warm_growth_cap(host: HostFacts, max_sandboxes: int) -> int:
    """How far the default pool may grow to follow the bursts it has seen: :data:`WARM_GROWTH_MAX`,
    one per :data:`WARM_GROWTH_MEMORY_PER_SANDBOX` of the budget, never more than ``max_sandboxes``
    (the pool also grows only into the network slots and ``--max-sandboxes`` room that running
    sandboxes leave, :attr:`.warm.WarmPool.size`)."""
    return _warm_count(host, WARM_GROWTH_MAX, WARM_GROWTH_MEMORY_PER_SANDBOX, max_sandboxes)


def default_warm_sandboxes(host: HostFacts, max_sandboxes: int) -> int:
    """The warm pool a runtime keeps unless told otherwise: a user's first creates, and a create
    after a quiet moment, find a sandbox already booted (create→first command ~15 ms instead of
    ~30 on this project's 2-core VM). Small, because each is memory, a disk and a network slot held
    for nobody, and its refill's CPU is spent whether or not a create comes: :data:`DEFAULT_WARM_SANDBOXES`,
    one per :data:`WARM_MEMORY_PER_SANDBOX` of the budget (none under 2 GiB), never more than
    ``max_sandboxes``. After a burst larger than that it grows, for a while, to the burst's size
    (:func:`warm_growth_cap`); a fixed size is the operator's ``--warm-sandboxes``."""
    return _warm_count(host, DEFAULT_WARM_SANDBOXES, WARM_MEMORY_PER_SANDBOX, max_sandboxes)


def _warm_count(host: HostFacts, most: int, memory_each: int, max_sandboxes: int) -> int:
    """``most`` warm sandboxes, no more than one per ``memory_each`` bytes of the sandboxes' memory
    budget, nor than ``max_sandboxes``."""
    return max(0, min(most, budget(host).memory_bytes // memory_each, max_sandboxes))


def open_files(host: HostFacts) -> int:
    """Per-process open files in sandboxes: at most what the runtime's own hard limit allows."""
    return min(DEFAULT_OPEN_FILES, host.nofile_hard)


def inotify_limits(host: HostFacts) -> tuple[int, int]:
    """(instances, watches) per uid inside a sandbox: half the host's per-user limits."""
    return max(1, host.inotify_instances // 2), max(1, host.inotify_watches // 2)


def file_max_needed(host: HostFacts, memory_budget: int) -> int:
    """The ``fs.file-max`` at which the sandboxes' memory budget, not the count, bounds open files."""
    return host.files_open + memory_budget // BYTES_PER_OPEN_FILE + FILE_MAX_RESERVE


def raise_file_max(host: HostFacts, memory_budget: int) -> None:
    """Raise ``fs.file-max`` to :func:`file_max_needed` when it is lower (see the module docs)."""
    needed = file_max_needed(host, memory_budget)
    if host.file_max >= needed:
        return
    try:
        Path("/proc/sys/fs/file-max").write_text(str(needed))
    except OSError as exc:
        log.warning(
            "fs.file-max is %d, below the %d open files the sandboxes' memory budget can hold, and could "
            "not be raised (%s): one sandbox could exhaust it for every other",
            host.file_max,
            needed,
            exc,
        )
        return
    log.info("raised fs.file-max from %d to %d (the sandboxes' memory budget bounds open files)", host.file_max, needed)


def instance_name(data_dir: Path, node: str | None = None) -> str:
    """This runtime's instance: its sandboxes' cgroups are ``sandboxd/<instance>/<id>``. Derived from
    the data dir, so a restarted runtime finds its sandboxes and two runtimes never share a group;
    and for a ``sandboxd node``, from ``node`` too (see :func:`sandboxd.kube.node.node_key`)."""
    key = str(data_dir.resolve()) if node is None else f"{data_dir.resolve()}\0{node}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"d-{digest[:16]}"


@dataclass(frozen=True, slots=True)
class SandboxFlags:
    """``sandboxd serve``'s per-sandbox flags; ``None`` means "sized from the host"."""

    cpus: int | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    max_sandboxes: int = 256
    max_timeout_s: int = 24 * 3600
    nested_userns: bool = False
    warm_sandboxes: int | None = None
    """``None``: :func:`default_warm_sandboxes`, of a template already built (it never starts a build)."""
    warm_template: str = "base"


def sandbox_limits(host: HostFacts, flags: SandboxFlags) -> Limits:
    """What every sandbox gets: the flags given, the host-sized defaults for the rest."""
    instances, watches = inotify_limits(host)
    return Limits(
        cpu_count=flags.cpus if flags.cpus is not None else default_cpus(host),
        memory_mb=flags.memory_mb if flags.memory_mb is not None else default_memory_mb(host),
        disk_mb=flags.disk_mb if flags.disk_mb is not None else default_disk_mb(host),
        pids_max=default_pids(host),
        max_sandboxes=flags.max_sandboxes,
        max_timeout_s=flags.max_timeout_s,
        open_files=open_files(host),
        inotify_instances=instances,
        inotify_watches=watches,
        nested_userns=flags.nested_userns,
        warm_sandboxes=(
            flags.warm_sandboxes
            if flags.warm_sandboxes is not None
            else default_warm_sandboxes(host, flags.max_sandboxes)
        ),
        warm_template=flags.warm_template,
        warm_builds=flags.warm_sandboxes is not None,
        warm_grows_to=(
            warm_growth_cap(host, flags.max_sandboxes)
            if flags.warm_sandboxes is None and default_warm_sandboxes(host, flags.max_sandboxes) > 0
            else 0
        ),
    )


def require_isolation(templates: Templates, command: str) -> None:
    """Exit with the reason if this host cannot isolate sandboxes: user namespaces, and idmapped
    mounts of the template store's filesystem (it holds every template's layers)."""
    from sandboxd import _core

    try:
        _core.check_isolation_support(str(templates.resolve(HOST).layers[0]))
    except OSError as exc:
        sys.exit(f"{command}: this host cannot isolate sandboxes: {exc}")


def prepare(data_dir: Path, registry: Path, node: str | None = None) -> HostFacts:
    """At a runtime's (or node's) start: write the host-wide budgets (all runtimes, and this one's
    instance), raise ``fs.file-max`` if needed, and free id ranges that runtimes whose data dir is gone
    left claimed. Returns what the host offers, to size the sandboxes from."""
    from sandboxd import _core

    facts = read_host(data_dir)
    leftovers.sweep(_table_remover(), _core.remove_left_instance, sandboxes=_CgroupSandboxes())
    shared = budget(facts)
    _core.configure_budget(
        instance_name(data_dir, node),
        host_memory_bytes=shared.memory_bytes,
        host_pids_max=shared.pids_max,
        memory_bytes=shared.memory_bytes,
        pids_max=shared.pids_max,
    )
    raise_file_max(facts, shared.memory_bytes)
    freed = _core.IdRegistry(str(registry)).reclaim_stale()
    if freed:
        log.info("reclaimed %d id ranges of runtimes whose data dir is gone", len(freed))
    return facts


async def open_place(data_dir: Path, registry: Path, disk_mb: int, node: str | None = None) -> HostPlace:
    """This runtime's place on the host: its instance, the id registry, and a started disk pool."""
    from sandboxd import _core

    disks = DiskPool(data_dir, disk_mb)
    await disks.start()
    return HostPlace(instance=instance_name(data_dir, node), ids=_core.IdRegistry(str(registry)), disks=disks)


def _table_remover() -> Callable[[str], None] | None:
    """How a gone runtime's nftables table is removed here; ``None`` on a host without libnftables."""
    from .network.firewall import Nft

    try:
        Nft().close()
    except OSError:
        return None

    def remove(table: str) -> None:
        nft = Nft()
        try:
            nft.run(f"table {table}\ndelete table {table}\n")
        finally:
            nft.close()

    return remove


class _CgroupSandboxes:
    """A gone runtime's sandboxes, for :func:`.leftovers.sweep`: found and killed through their cgroups."""

    def ids(self, instance: str) -> list[str]:
        from sandboxd import _core

        return _core.list_sandboxes(instance)

    def kill(self, instance: str, sandbox_id: str) -> None:
        from sandboxd import _core

        _core.kill_sandbox(instance, sandbox_id)


def remove_instance_if_empty(data_dir: Path, node: str | None = None) -> None:
    """At a runtime's end, however its start went (interrupted, failed, or served): remove the
    instance's cgroup group, made by :func:`prepare`, if no sandbox is in it."""
    from sandboxd import _core

    with contextlib.suppress(OSError):
        _core.remove_instance_if_empty(instance_name(data_dir, node))


def sandboxes_left(data_dir: Path, node: str | None = None) -> bool:
    """Whether a sandbox of this runtime still has a group (a clean stop leaves them running); yes
    when the cgroup tree cannot be read."""
    from sandboxd import _core

    try:
        return bool(_core.list_sandboxes(instance_name(data_dir, node)))
    except OSError:
        return True


async def close_place(place: HostPlace) -> None:
    """At stop: unmount the pool's disks; remove the instance's cgroup group if no sandbox is left."""
    from sandboxd import _core

    await place.disks.stop()
    with contextlib.suppress(OSError):
        _core.remove_instance_if_empty(place.instance)
