"""Each sandbox's resource history: a sample every 5 seconds from create to kill, kept in SQLite.

E2B's API keeps sandbox metrics in 5-second buckets and answers ``GET /sandboxes/{id}/metrics?start=&end=``
with the buckets inside ``[start, end]`` (unix seconds), coarser for long ranges (30 s past an hour, up
to 15 min past a week, so an answer stays under a thousand points), ``[]`` for a range with none.
Here a sampler reads every running sandbox's cgroup on a 5-second tick and records one row per
sandbox per bucket; a read that reaches the current bucket takes that bucket's sample on demand, so
the newest figures are live and a sandbox's metrics are never empty right after its create.

Nothing here runs on the event loop: cgroup reads and the disk's ``statfs`` (each sandbox has its own
filesystem, its quota, so its usage is one system call whatever it holds) go to threads, and the
history has its own SQLite file and connection, used only by its own worker thread (so neither its
writes nor a long-range query ever wait on, or hold up, the state database). The history is bounded
by :data:`HISTORY_S`: at most 17,280 rows (~0.7 MiB on disk) per sandbox; in memory, a sandbox costs
one small tuple (its previous CPU reading).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sandboxd import _core

SAMPLE_INTERVAL_S = 5
"""E2B's bucket: one sample per sandbox every 5 seconds."""

HISTORY_S = 24 * 3600
"""Samples older than this are dropped even while the sandbox runs: a day of 5-second buckets
(17,280 rows per sandbox) bounds the file whatever a sandbox's lifetime."""

PRUNE_EVERY_S = 60.0
"""How often the retention is enforced (a cheap indexed delete)."""

STEPS = ((3600, 5), (6 * 3600, 30), (12 * 3600, 60), (24 * 3600, 120), (7 * 24 * 3600, 300))
"""(range shorter than, bucket) in seconds, as E2B's API picks its step; 900 s beyond a week."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sandbox_id    TEXT NOT NULL,
    at            INTEGER NOT NULL,         -- start of the 5-second bucket, unix seconds
    cpu_count     INTEGER NOT NULL,
    cpu_used_pct  REAL NOT NULL,
    mem_used      INTEGER NOT NULL,
    mem_total     INTEGER NOT NULL,
    disk_used     INTEGER NOT NULL,
    disk_total    INTEGER NOT NULL,
    net_in_bytes  INTEGER NOT NULL DEFAULT 0,   -- over the sandbox's link since it was made
    net_out_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sandbox_id, at)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_by_age ON samples (at);
"""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MetricsSample:
    """One resource sample of a sandbox (formatted for the wire by the API layer)."""

    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int
    net_in_bytes: int = 0
    """Bytes the sandbox received over its network link since it started (or resumed from disk)."""
    net_out_bytes: int = 0
    """Bytes the sandbox sent over its network link."""


@dataclass(frozen=True, slots=True)
class Target:
    """What the sampler needs of one running sandbox."""

    sandbox_id: str
    handle: _core.SandboxHandle
    cpu_count: int
    mem_total: int
    disk_total: int
    """Its quota, reported while its disk cannot be read (it is ending)."""
    counters: Callable[[], tuple[int, int] | None] | None = None
    """Its link's (bytes in, bytes out), blocking (a netlink exchange); None without networking."""


def bucket(ts: float) -> int:
    """The start of the 5-second bucket ``ts`` falls in."""
    return int(ts) // SAMPLE_INTERVAL_S * SAMPLE_INTERVAL_S


def step_for(span_s: int) -> int:
    """E2B's bucket for a query range of ``span_s`` seconds."""
    return next((step for longer, step in STEPS if span_s < longer), 900)


class MetricsHistory:
    """The samples of every live sandbox, in ``<data dir>/metrics.db``, used from one worker thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sandboxd-metrics")
        self._db: sqlite3.Connection | None = None
        """Opened, used and closed by the pool's one thread only."""
        self._kept: set[str] = set()
        """Sandboxes that may have rows: :meth:`forget` of any other needs no thread (a sandbox
        killed before its first sample, as most short-lived ones are)."""

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(self._path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        return self._db

    async def open(self, live: Iterable[str]) -> None:
        """Create the table, and drop what belongs to sandboxes that ended while nobody recorded it."""
        keep = list(live)
        self._kept.update(keep)

        def work() -> None:
            db = self._conn()
            db.execute("CREATE TEMP TABLE IF NOT EXISTS live (id TEXT PRIMARY KEY)")
            db.execute("DELETE FROM live")
            db.executemany("INSERT OR IGNORE INTO live VALUES (?)", [(i,) for i in keep])
            db.execute("DELETE FROM samples WHERE sandbox_id NOT IN (SELECT id FROM live)")

        await self._run(work)

    async def close(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(work)
        self._pool.shutdown(wait=True)

    async def record(self, samples: list[tuple[str, MetricsSample]]) -> None:
        """One row per (sandbox, bucket); a second sample in the same bucket replaces the first."""
        if not samples:
            return
        rows = [
            (
                sandbox_id,
                bucket(s.timestamp),
                s.cpu_count,
                s.cpu_used_pct,
                s.mem_used,
                s.mem_total,
                s.disk_used,
                s.disk_total,
                s.net_in_bytes,
                s.net_out_bytes,
            )
            for sandbox_id, s in samples
        ]
        self._kept.update(sandbox_id for sandbox_id, _ in samples)

        def work() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

        await self._run(work)

    async def query(self, sandbox_id: str, start: int, end: int) -> list[MetricsSample]:
        """The buckets that overlap ``[start, end]`` (a sample taken at 17 s is in the bucket of 15 s,
        and E2B selects samples by their own time), oldest first; per coarser step, the highest of each
        figure (as E2B's query takes them)."""
        step = step_for(end - start)

        def work() -> list[MetricsSample]:
            cur = self._conn().execute(
                "SELECT at / ? * ? AS ts, MAX(cpu_count), MAX(cpu_used_pct), MAX(mem_used), MAX(mem_total),"
                " MAX(disk_used), MAX(disk_total), MAX(net_in_bytes), MAX(net_out_bytes) FROM samples"
                " WHERE sandbox_id = ? AND at > ? AND at <= ? GROUP BY ts ORDER BY ts",
                (step, step, sandbox_id, start - SAMPLE_INTERVAL_S, end),
            )
            return [MetricsSample(float(r[0]), *r[1:]) for r in cur.fetchall()]

        result: list[MetricsSample] = await self._run(work)
        return result

    async def forget(self, sandbox_id: str) -> None:
        if sandbox_id not in self._kept:
            return
        self._kept.discard(sandbox_id)

        def work() -> None:
            self._conn().execute("DELETE FROM samples WHERE sandbox_id = ?", (sandbox_id,))

        await self._run(work)

    async def prune(self, now: float) -> None:
        def work() -> None:
            self._conn().execute("DELETE FROM samples WHERE at < ?", (int(now) - HISTORY_S,))

        await self._run(work)


class Sampler:
    """Reads sandboxes' cgroups and disks (in a thread) into samples; keeps each one's previous CPU
    reading, to report use between two samples."""

    def __init__(self) -> None:
        self._cpu: dict[str, tuple[float, int]] = {}

    def forget(self, sandbox_id: str) -> None:
        self._cpu.pop(sandbox_id, None)

    async def sample(self, targets: list[Target]) -> list[tuple[str, MetricsSample]]:
        """One sample of each target."""
        if not targets:
            return []
        now = time.time()
        stats = await asyncio.to_thread(_read_stats, targets)
        samples = []
        for target, (stat, disk, net) in zip(targets, stats, strict=True):
            cpu = self._cpu_pct(target.sandbox_id, stat.cpu_usage_ns, target.cpu_count) if stat else 0.0
            sample = MetricsSample(
                timestamp=now,
                cpu_count=target.cpu_count,
                cpu_used_pct=cpu,
                mem_used=(stat.memory_bytes or 0) if stat else 0,
                mem_total=target.mem_total,
                disk_used=disk[0] if disk else 0,
                disk_total=disk[1] if disk else target.disk_total,
                net_in_bytes=net[0] if net else 0,
                net_out_bytes=net[1] if net else 0,
            )
            samples.append((target.sandbox_id, sample))
        return samples

    def _cpu_pct(self, sandbox_id: str, usage_ns: int | None, cpus: int) -> float:
        """CPU use since the previous sample, in percent of the sandbox's cores."""
        if usage_ns is None:
            return 0.0
        now = time.monotonic()
        previous = self._cpu.get(sandbox_id)
        self._cpu[sandbox_id] = (now, usage_ns)
        if previous is None or now <= previous[0]:
            return 0.0
        return round(100 * (usage_ns - previous[1]) / 1e9 / (now - previous[0]) / max(cpus, 1), 2)


Reading = tuple[_core.SandboxStats | None, tuple[int, int] | None, tuple[int, int] | None]
"""A sandbox's cgroup counters, its disk's (used, total) and its link's (in, out); None for what is gone."""


def _read_stats(targets: list[Target]) -> list[Reading]:
    """In a worker thread: each sandbox's cgroup counters (a few small files), its disk (one
    ``statfs``, as ``df /`` inside shows it) and its link's counters."""
    out: list[Reading] = []
    for target in targets:
        try:
            stats = target.handle.stats()
        except OSError:
            stats = None  # it ended meanwhile
        try:
            disk = target.handle.disk_usage()
        except OSError:
            disk = None
        try:
            net = target.counters() if target.counters is not None else None
        except OSError:
            net = None
        out.append((stats, disk, net))
    return out
