"""Scenario ``runtime``: a real ``sandboxd serve`` driven by the official SDK, beside the raw cost of isolation.

The bench starts ``sandboxd serve`` itself (a free loopback port, a temporary data dir, a random
``--api-key``) and points the SDK at it the way a user would: ``E2B_API_KEY``, ``E2B_API_URL`` and
``E2B_SANDBOX_URL`` (the runtime's URL; no debug mode). Then:

* create→first command: ``Sandbox.create()`` then ``commands.run("true")``, one sandbox at a time,
  each killed afterwards (the kill is timed separately and not counted);
* a burst of concurrent ``AsyncSandbox.create()`` under ``asyncio.gather``: wall time, successes,
  each create's latency, and where the CPU went (runtime, zygote, sandboxes, the SDK client);
* resume: ``pause()`` (untimed), then ``Sandbox.connect()`` and ``commands.run("true")``, for pause
  mode ``full`` (the default: the cgroup is frozen) and ``filesystem`` (the processes are stopped
  and the sandbox reboots on its files);
* the memory each additional idle sandbox costs: RSS and PSS summed over the runtime, the zygote
  and every process in the sandboxes' cgroups, before and after creating N idle sandboxes. PSS
  splits each shared page among the processes that map it, so it is the honest figure when the
  agents are forks of one zygote; RSS counts shared pages once per process. Processes that share
  one memory (the agent, a ``CLONE_VM`` clone of its init) count it once.

The baseline, measured in the same run: ``crates/sandboxd-jail/examples/isolation_cost.rs``
(built here with cargo, release): the raw cost of today's isolation (a user namespace created by
the range's uid + an idmapped template under overlayfs + the seccomp filter + exec ``/bin/true``)
beside the raw cost before user namespaces (``unshare(pid, mnt, ipc, uts, net)`` + overlay +
exec), and the jail's own ``spawn_sandbox`` (which adds the cgroup, /proc, /sys, /dev,
``pivot_root`` and the init), with its disk mounted on the create path or ahead of need (the
runtime's pool). It prints percentiles only, so the chart draws it as lines.

Needs root (namespaces, overlayfs, cgroups); skipped otherwise. Every sandbox the bench made is
killed at the end, also on errors and Ctrl-C, and the runtime is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import platform
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
from sandboxd.runtime.host import instance_name

from .common import (
    REPO,
    Agent,
    Context,
    MiB,
    Result,
    ScenarioSkipped,
    die_with_parent,
    ensure_base,
    free_port,
    median,
    percentile,
    stop_process,
    tree_rss,
    wait_for_http,
    which,
)

TARGET_P50_MS = 25.0
TARGET_P99_MS = 60.0
TARGET_BURST = 100
TARGET_BURST_WALL_S = 1.0
TARGET_CORES = 2

WARMUP = 3


def default_pool(max_sandboxes: int) -> int:
    """The warm pool ``sandboxd serve`` keeps on this host without ``--warm-sandboxes`` (the second
    runtime's, measured beside the first: the same calls, same run)."""
    from sandboxd.runtime.host import default_warm_sandboxes, read_host

    return default_warm_sandboxes(read_host(Path("/")), max_sandboxes)


PACE_S = 0.25
"""The gap between creates in the paced runs (4 creates a second, one after another): a warm pool
refills between creates at this pace, and back to back it drains after its size in creates.
Both runtimes are measured at this pace, so the ratio compares like with like."""
"""Untimed creates (or resumes) before the timed ones: the first ones pay for cold caches."""

SETTLE_S = 1.0
"""Pause before a memory reading, so the new agents have finished starting up."""

IDLE_CPU_WINDOW_S = 2.0
"""How long the idle sandboxes' CPU is watched."""

ISOLATION_EXAMPLE = REPO / "target" / "release" / "examples" / "isolation_cost"
CARGO_HINT = "install Rust (https://rustup.rs), then `cargo build --release -p sandboxd-jail --example isolation_cost`"

RAW_BEFORE = "raw_unshare_overlay_exec_true"
RAW = "raw_userns_idmap_overlay_seccomp_exec_true"
JAIL = "spawn_sandbox_with_pooled_disk_until_exec"
DISK_ON_PATH = "spawn_sandbox_with_disk_until_exec"
RAW_BEFORE_NAME = "raw unshare(pid,mnt,ipc,uts,net) + overlay + exec true, no user namespace (isolation_cost)"
RAW_NAME = "raw userns + idmapped overlay + seccomp + exec true (isolation_cost)"
JAIL_NAME = "sandboxd-jail spawn_sandbox until exec (+cgroup, devices, /proc, pivot_root, init, disk)"
DISK_POOLED_NAME = "the same with the disk mounted ahead of need (the runtime's pool)"


# --------------------------------------------------------------------------------------- the baseline


@dataclass
class Isolation:
    """What ``isolation_cost`` printed: ``{name: {"p50_ms", "p99_ms", "min_ms"}}`` and the cgroup version."""

    runs: int
    cgroup: str
    figures: dict[str, dict[str, float]]

    def p50(self, key: str) -> float | None:
        return self.figures.get(key, {}).get("p50_ms")

    def p99(self, key: str) -> float | None:
        return self.figures.get(key, {}).get("p99_ms")


def find_cargo() -> str | None:
    found = which("cargo")
    if found is None:
        home = Path.home() / ".cargo" / "bin" / "cargo"
        found = str(home) if home.exists() else None
    return found


def isolation_baseline(ctx: Context, runs: int) -> Isolation | None:
    """Build (once; cargo is incremental) and run the Rust example; None when cargo is missing."""
    cargo = find_cargo()
    if cargo is None:
        ctx.log(f"SKIP isolation baseline: cargo is not installed; {CARGO_HINT}")
        return None
    env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "target")}
    command = [cargo, "build", "--release", "-q", "-p", "sandboxd-jail", "--example", "isolation_cost"]
    ctx.log(f"baseline: {' '.join(command[1:])} (CARGO_TARGET_DIR=target)")
    t0 = time.monotonic()
    built = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        preexec_fn=die_with_parent,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building isolation_cost failed (exit {built.returncode}):\n{built.stderr[-3000:]}")
    ctx.log(f"  built in {time.monotonic() - t0:.0f}s; running it ({runs} runs of each figure, as root)")
    ran = subprocess.run(
        [str(ISOLATION_EXAMPLE), str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        preexec_fn=die_with_parent,
    )
    if ran.returncode != 0:
        raise RuntimeError(f"isolation_cost exited {ran.returncode}: {ran.stderr[-2000:]}")
    data = json.loads(ran.stdout.strip().splitlines()[-1])
    if "error" in data:
        raise RuntimeError(f"isolation_cost: {data['error']}")
    figures = {k: v for k, v in data.items() if isinstance(v, dict)}
    iso = Isolation(int(data["runs"]), str(data.get("cgroup")), figures)
    for key, value in figures.items():
        ctx.log(f"  {key:<32} p50 {value['p50_ms']:7.3f} ms   p99 {value['p99_ms']:7.3f} ms")
    return iso


# ----------------------------------------------------------------------------------------- the runtime


class Runtime:
    """``sandboxd serve`` as a subprocess (its own session, killed with the bench), with its data dir
    under the scenario's temp dir. :meth:`stop` kills every sandbox it made, then the runtime."""

    def __init__(self, work: Path, max_sandboxes: int, extra: tuple[str, ...] = (), warm: int | None = 0) -> None:
        """``warm``: its ``--warm-sandboxes`` (0, none, unless a row is about a pool); None gives it no
        flag, so that it keeps the pool ``sandboxd serve`` keeps by default (:func:`default_pool`)."""
        self.port = free_port()
        self.api_key = "bench_" + secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / "runtime-data"
        global _GROUP
        _GROUP = Path("sandboxd") / instance_name(self.data_dir)
        self.log_path = work / "serve.log"
        self.created: set[str] = set()
        args = [
            sys.executable,
            "-m",
            "sandboxd",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--api-key",
            self.api_key,
            "--max-sandboxes",
            str(max_sandboxes),
            *(("--warm-sandboxes", str(warm)) if warm is not None else ()),
            *extra,
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            wait_for_http(f"{self.url}/health", self.process, self.log_path, timeout=120)
        except BaseException:
            self.stop()
            raise
        self.ps = psutil.Process(self.process.pid)

    def zygote(self) -> psutil.Process | None:
        with contextlib.suppress(psutil.Error):
            for child in self.ps.children():
                with contextlib.suppress(psutil.Error):
                    if "sandboxd.runtime.zygote" in " ".join(child.cmdline()):
                        return child
        return None

    def sandbox_ids(self) -> set[str]:
        """Every sandbox this runtime may still hold: the ones we saw, and every writable layer left
        in its data dir (a kill removes it; a create that failed on the client side may still have one)."""
        ids = set(self.created)
        with contextlib.suppress(OSError):
            ids.update(p.name for p in (self.data_dir / "sandboxes").iterdir())
        return ids

    def kill_all(self) -> None:
        """Kill every sandbox through the API, as a user would."""
        ids = self.sandbox_ids()
        if self.process.poll() is None and ids:
            with httpx.Client(headers={"X-API-KEY": self.api_key}, timeout=30) as client:
                for sandbox_id in ids:
                    with contextlib.suppress(httpx.HTTPError):
                        client.delete(f"{self.url}/sandboxes/{sandbox_id}")

    def sweep(self) -> None:
        """After the runtime has stopped (it leaves sandboxes running, to re-adopt them): kill directly
        whatever a create still in flight at the end left behind."""
        leftover = [i for i in self.sandbox_ids() if cgroup_pids(i)]
        if leftover:
            from sandboxd import _core

            for sandbox_id in leftover:
                with contextlib.suppress(OSError):
                    _core.kill_sandbox(_GROUP.name, sandbox_id)

    def stop(self) -> None:
        try:
            self.kill_all()
        finally:
            stop_process(self.process, grace=15)
            self.sweep()


@contextlib.contextmanager
def sdk_env(rt: Runtime) -> Iterator[None]:
    """Point the official SDK at the runtime, as its documentation says (and not in debug mode)."""
    values = {"E2B_API_KEY": rt.api_key, "E2B_API_URL": rt.url, "E2B_SANDBOX_URL": rt.url}
    saved = {k: os.environ.get(k) for k in [*values, "E2B_DEBUG"]}
    os.environ.update(values)
    os.environ.pop("E2B_DEBUG", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------ cgroups/memory


_GROUP = Path("sandboxd")
"""Where the runtime's sandboxes have their cgroups, under the cgroup root: ``sandboxd/<instance>``
(set when the runtime starts; the instance is derived from its data dir)."""


def _cgroup_dirs(sandbox_id: str) -> list[Path]:
    """The sandbox's cgroup directories that list its processes: v2 first, then v1's memory and cpuacct."""
    root = Path("/sys/fs/cgroup")
    return [root / _GROUP / sandbox_id, root / "memory" / _GROUP / sandbox_id]


def cgroup_pids(sandbox_id: str) -> list[int]:
    for directory in _cgroup_dirs(sandbox_id):
        with contextlib.suppress(OSError):
            return [int(x) for x in (directory / "cgroup.procs").read_text().split()]
    return []


def cgroup_cpu_s(sandbox_id: str) -> float:
    """CPU seconds the sandbox's cgroup has used (v1 cpuacct.usage, v2 cpu.stat usage_usec)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/sys/fs/cgroup/cpuacct/{_GROUP}/{sandbox_id}/cpuacct.usage").read_text()) / 1e9
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/sys/fs/cgroup/{_GROUP}/{sandbox_id}/cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    return 0.0


def cgroup_parent() -> Path:
    """The directory that lists every sandbox's cgroup on this host (v2, else v1's memory hierarchy)."""
    v2 = Path("/sys/fs/cgroup") / _GROUP
    return v2 if (Path("/sys/fs/cgroup/cgroup.controllers")).exists() else Path("/sys/fs/cgroup/memory") / _GROUP


class SpawnTimeline:
    """When each new sandbox cgroup appeared, polled every 2 ms in a thread: if sandboxes are set up one
    at a time, the cgroups appear at a steady interval, and that interval times N is a floor for a burst."""

    def __init__(self) -> None:
        self.parent = cgroup_parent()
        self.before = set(self._list())
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spawn-timeline", daemon=True)

    def _list(self) -> list[str]:
        try:
            return [e.name for e in os.scandir(self.parent) if e.is_dir()]
        except OSError:
            return []

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            now = time.perf_counter()
            for name in self._list():
                if name not in self.before and name not in self.seen:
                    self.seen[name] = now

    def __enter__(self) -> SpawnTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def interval_ms(self, ids: set[str]) -> float | None:
        """The median gap between two consecutive sandboxes' cgroups appearing (ours only)."""
        times = sorted(t for name, t in self.seen.items() if name in ids)
        gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
        return percentile(gaps, 50)


def cgroup_memory(sandbox_id: str) -> int | None:
    """The cgroup's own memory charge (v1 memory.usage_in_bytes, v2 memory.current): includes page cache."""
    for path in (
        Path(f"/sys/fs/cgroup/sandboxd/{sandbox_id}/memory.current"),
        Path(f"/sys/fs/cgroup/memory/sandboxd/{sandbox_id}/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
    return None


def rss_pss(pid: int) -> tuple[int, int | None]:
    """(RSS, PSS) in bytes from ``/proc/<pid>/smaps_rollup``; PSS None when the kernel cannot say."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        try:
            return psutil.Process(pid).memory_info().rss, None
        except psutil.Error:
            return 0, None
    fields = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields.get("Rss", 0), fields.get("Pss")


@dataclass
class Memory:
    rss: int = 0
    pss: int = 0
    processes: int = 0
    by_role: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """role → [(rss, pss)] per process: runtime, zygote, sandbox init, sandbox agent"""


_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_VM = 1


def same_memory(pid1: int, pid2: int) -> bool:
    """Whether two processes share one memory (kcmp(2) ``KCMP_VM``); False when the kernel cannot say."""
    if _KCMP is None:
        return False
    return bool(ctypes.CDLL(None, use_errno=True).syscall(_KCMP, pid1, pid2, _KCMP_VM, 0, 0) == 0)


def measure_memory(rt: Runtime, sandbox_ids: list[str]) -> Memory:
    """RSS and PSS summed over the runtime, the zygote and every process in the sandboxes' cgroups."""
    roles: dict[int, str] = {rt.ps.pid: "runtime"}
    zygote = rt.zygote()
    if zygote is not None:
        roles[zygote.pid] = "zygote"
        with contextlib.suppress(psutil.Error):
            # Its spare fork (sandboxd.runtime.zygote._spare) shares the zygote's pages: left out, the
            # pages it shares would move from "before" into the sandboxes' share "after".
            for child in zygote.children():
                roles[child.pid] = "zygote spare"
    shared: set[int] = set()
    for sandbox_id in sandbox_ids:
        pids = cgroup_pids(sandbox_id)
        for i, pid in enumerate(pids):
            roles.setdefault(pid, "sandbox init" if i == 0 else "sandbox process")
            # The agent is a CLONE_VM clone of the init (crates/sandboxd-jail/src/init.rs): one memory,
            # whose RSS and PSS each of them reports in full. Counted once, with the init.
            if any(same_memory(pid, earlier) for earlier in pids[:i]):
                shared.add(pid)
    got = Memory()
    for pid, role in roles.items():
        if pid in shared:
            continue
        rss, pss = rss_pss(pid)
        got.rss += rss
        got.pss += pss or 0
        got.processes += 1
        got.by_role.setdefault(role, []).append((rss, pss or 0))
    return got


# ------------------------------------------------------------------------------------------------ phases


@dataclass
class Sequential:
    total_ms: list[float] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    kill_ms: list[float] = field(default_factory=list)


def sequential(ctx: Context, rt: Runtime, n: int, pace_s: float = 0.0) -> Sequential:
    """``n`` timed creates, each with its first command and its kill, back to back or ``pace_s`` apart."""
    from e2b import Sandbox

    paced = f", {pace_s:g} s apart" if pace_s else ""
    ctx.log(
        f'create→first command: {WARMUP} untimed, then {n} x Sandbox.create() + commands.run("true") + kill(){paced}'
    )
    got = Sequential()
    for i in range(WARMUP + n):
        time.sleep(pace_s)
        t0 = time.perf_counter()
        sbx = Sandbox.create()
        rt.created.add(sbx.sandbox_id)
        t1 = time.perf_counter()
        result = sbx.commands.run("true")
        t2 = time.perf_counter()
        killed = sbx.kill()
        t3 = time.perf_counter()
        if result.exit_code != 0 or killed is not True:
            raise RuntimeError(f"sandbox {sbx.sandbox_id}: run('true') exit {result.exit_code}, kill() {killed}")
        if i >= WARMUP:
            got.total_ms.append((t2 - t0) * 1e3)
            got.create_ms.append((t1 - t0) * 1e3)
            got.first_ms.append((t2 - t1) * 1e3)
            got.kill_ms.append((t3 - t2) * 1e3)
    ctx.log(
        f"  create→first command p50 {percentile(got.total_ms, 50):.1f} ms, p99 {percentile(got.total_ms, 99):.1f} ms"
        f" (create {percentile(got.create_ms, 50):.1f} + first command {percentile(got.first_ms, 50):.1f} ms p50);"
        f" kill p50 {percentile(got.kill_ms, 50):.1f} ms"
    )
    return got


_DIRECT_CLIENT = """
import json, sys, time
from e2b import Sandbox
from e2b.connection_config import ConnectionConfig
from packaging.version import Version
sandbox_id, version, token = sys.argv[1:4]
headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}
config = ConnectionConfig(api_key="unused", sandbox_url="http://127.0.0.1:49983", extra_sandbox_headers=headers)
sbx = Sandbox(sandbox_id=sandbox_id, envd_version=Version(version), envd_access_token=token, sandbox_domain=None,
              connection_config=config)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        sbx.commands.run("true")
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(times), flush=True)
"""
"""The same SDK call straight to a sandbox's agent: run in the sandbox's network namespace (``nsenter -n``,
nothing else of the sandbox), on its loopback, with the sandbox's own token: the proxy's hop taken out."""

_INSIDE = (
    "import subprocess, time\n"
    "for _ in range({n}):\n"
    "    t0 = time.perf_counter(); subprocess.run(['bash', '-l', '-c', 'true']); "
    "print((time.perf_counter() - t0) * 1e3)\n"
)
"""What ``run("true")`` has the agent spawn, timed inside the sandbox (python3 there): the sandbox's floor."""


@dataclass
class Steady:
    proxied_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    """The same call to the sandbox's agent from inside its network namespace (empty if that failed)."""
    inside_ms: list[float] = field(default_factory=list)
    """``bash -l -c true`` run by python3 inside the sandbox."""


def steady_run_true(ctx: Context, rt: Runtime, n: int) -> Steady:
    """``commands.run("true")`` on a sandbox that is already running: what a command costs without a
    resume, through the runtime's proxy and, alternating in rounds of 10, the same SDK call straight to
    the sandbox's agent; then ``bash -l -c true`` inside the sandbox (what the agent spawns)."""
    from e2b import Sandbox

    got = Steady()
    sbx = Sandbox.create()
    rt.created.add(sbx.sandbox_id)
    direct: subprocess.Popen[str] | None = None
    try:
        pids = cgroup_pids(sbx.sandbox_id)
        token = sbx._envd_access_token or ""
        if pids:
            args = [str(sbx._envd_version), token]
            direct = subprocess.Popen(
                ["nsenter", "-t", str(pids[0]), "-n", sys.executable, "-c", _DIRECT_CLIENT, sbx.sandbox_id, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

        def direct_round(k: int) -> list[float]:
            if direct is None or direct.stdin is None or direct.stdout is None:
                return []
            direct.stdin.write(f"{k}\n")
            direct.stdin.flush()
            line = direct.stdout.readline()
            return [float(x) for x in json.loads(line)] if line else []

        for _ in range(WARMUP):
            sbx.commands.run("true")
        direct_round(WARMUP)
        while len(got.proxied_ms) < n:
            for _ in range(10):
                t0 = time.perf_counter()
                sbx.commands.run("true")
                got.proxied_ms.append((time.perf_counter() - t0) * 1e3)
            got.direct_ms += direct_round(10)
        inside = sbx.commands.run(f'python3 -c "{_INSIDE.format(n=n)}"', timeout=120)
        got.inside_ms = [float(x) for x in inside.stdout.split()]
    finally:
        if direct is not None:
            with contextlib.suppress(OSError):
                if direct.stdin is not None:
                    direct.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                direct.wait(10)
            if direct.poll() is None:
                direct.kill()
        sbx.kill()
    line = (
        f'  commands.run("true") on a running sandbox: p50 {percentile(got.proxied_ms, 50):.2f} ms through the runtime'
    )
    if got.direct_ms:
        line += f", {percentile(got.direct_ms, 50):.2f} ms straight to its agent"
    if got.inside_ms:
        line += f"; bash -l -c true inside it {percentile(got.inside_ms, 50):.2f} ms"
    ctx.log(line)
    return got


@dataclass
class Resumes:
    total_ms: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)


def resumes(ctx: Context, rt: Runtime, mode: Literal["full", "filesystem"], n: int) -> Resumes:
    from e2b import Sandbox

    got = Resumes()
    sbx = Sandbox.create()
    rt.created.add(sbx.sandbox_id)
    sbx.files.write("/home/user/kept.txt", "kept across pauses")
    try:
        for i in range(1 + n):
            tp = time.perf_counter()
            if sbx.pause(mode=mode) is not True:
                raise RuntimeError(f"pause(mode={mode!r}) of {sbx.sandbox_id} did not pause it")
            t0 = time.perf_counter()
            sbx = Sandbox.connect(sbx.sandbox_id)
            t1 = time.perf_counter()
            result = sbx.commands.run("true")
            t2 = time.perf_counter()
            if result.exit_code != 0:
                raise RuntimeError(f"run('true') after resume exited {result.exit_code}")
            if i >= 1:
                got.total_ms.append((t2 - t0) * 1e3)
                got.connect_ms.append((t1 - t0) * 1e3)
                got.pause_ms.append((t0 - tp) * 1e3)
        if sbx.files.read("/home/user/kept.txt") != "kept across pauses":
            raise RuntimeError(f"a file written before pause({mode!r}) did not survive the resumes")
    finally:
        sbx.kill()
    ctx.log(
        f"  resume ({mode}): connect + first command p50 {percentile(got.total_ms, 50):.1f} ms,"
        f" p99 {percentile(got.total_ms, 99):.1f} ms (connect {percentile(got.connect_ms, 50):.1f} ms;"
        f" pause itself {percentile(got.pause_ms, 50):.1f} ms)"
    )
    return got


@dataclass
class Footprint:
    n: int
    before: Memory
    after: Memory
    cgroup_bytes: list[int]
    idle_cpu: float
    """CPU seconds per second that one idle sandbox uses (its cgroup), over IDLE_CPU_WINDOW_S"""

    def per_sandbox(self, attr: Literal["rss", "pss"]) -> float:
        grew: int = getattr(self.after, attr) - getattr(self.before, attr)
        return grew / self.n / MiB


def _zygote_settled(rt: Runtime, timeout_s: float = 5.0) -> None:
    """Wait (at most ``timeout_s``) until the zygote has one child, its spare fork, and no other: a
    fork on its way out of an earlier create or kill, caught by one snapshot and gone by the next,
    moved its pages from "before" to nowhere (one run counted 8 new processes for 5 sandboxes, and
    half the PSS). One, not none: the spare is forked a moment after the last create's fork has
    exited (``zygote.SPARE_DELAY_S``), and one forked between the snapshots would count as theirs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        zygote = rt.zygote()
        with contextlib.suppress(psutil.Error):
            if zygote is None or len(zygote.children()) == 1:
                return
        time.sleep(0.05)


def footprint(ctx: Context, rt: Runtime, n: int) -> Footprint:
    from e2b import Sandbox

    ctx.log(f"memory: {n} idle sandboxes; RSS and PSS of the runtime, the zygote and every sandbox process")
    time.sleep(SETTLE_S)
    _zygote_settled(rt)
    before = measure_memory(rt, [])
    sandboxes = []
    try:
        for _ in range(n):
            sbx = Sandbox.create()
            rt.created.add(sbx.sandbox_id)
            sandboxes.append(sbx)
        time.sleep(SETTLE_S)
        _zygote_settled(rt)
        ids = [s.sandbox_id for s in sandboxes]
        after = measure_memory(rt, ids)
        charged = [c for c in (cgroup_memory(i) for i in ids) if c is not None]
        cpu0, t0 = sum(cgroup_cpu_s(i) for i in ids), time.perf_counter()
        time.sleep(IDLE_CPU_WINDOW_S)
        idle_cpu = (sum(cgroup_cpu_s(i) for i in ids) - cpu0) / (time.perf_counter() - t0) / n
    finally:
        for sbx in sandboxes:
            with contextlib.suppress(Exception):
                sbx.kill()
    got = Footprint(n, before, after, charged, idle_cpu)
    ctx.log(
        f"  per idle sandbox: RSS {got.per_sandbox('rss'):.1f} MiB, PSS {got.per_sandbox('pss'):.1f} MiB"
        f" ({after.processes - before.processes} more processes for {n} sandboxes);"
        f" idle CPU {idle_cpu * 1e3:.2f} ms per second"
    )
    if after.processes - before.processes != 2 * n:  # each sandbox is an init and an agent: say who differs
        counts = {when: {r: len(p) for r, p in m.by_role.items()} for when, m in (("before", before), ("after", after))}
        ctx.log(f"  processes by role, not 2 per sandbox: {counts}")
    return got


@dataclass
class Burst:
    n: int
    wall_s: float
    ok: int
    errors: list[str]
    create_ms: list[float]
    kill_s: float
    cpu_s: dict[str, float]
    spawn_interval_ms: float | None
    """median gap between two sandboxes' cgroups appearing: the serial part of a create"""


async def _burst(rt: Runtime, n: int) -> Burst:
    from e2b import AsyncSandbox

    async def one() -> tuple[Any, float]:
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create()
        rt.created.add(sbx.sandbox_id)
        return sbx, (time.perf_counter() - t0) * 1e3

    zygote = rt.zygote()
    procs = {"runtime (process)": rt.ps, "zygote": zygote}
    before = {k: _cpu(p) for k, p in procs.items()}
    client0 = time.process_time()
    with SpawnTimeline() as timeline:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        wall = time.perf_counter() - t0
    cpu = {k: round(_cpu(p) - before[k], 2) for k, p in procs.items()}
    cpu["SDK client (bench process)"] = round(time.process_time() - client0, 2)
    made = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if isinstance(r, BaseException)]
    cpu["sandboxes (cgroups)"] = round(sum(cgroup_cpu_s(s.sandbox_id) for s, _ in made), 2)
    k0 = time.perf_counter()
    await asyncio.gather(*(s.kill() for s, _ in made), return_exceptions=True)
    kill_s = time.perf_counter() - k0
    interval = timeline.interval_ms({s.sandbox_id for s, _ in made})
    return Burst(n, wall, len(made), errors, [ms for _, ms in made], kill_s, cpu, interval)


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return t.user + t.system
    return 0.0


def burst_succeeded(b: Burst, label: str) -> Result:
    """The row of how many of a burst's creates succeeded (``label``: what the runtime had)."""
    return Result(
        name=f"runtime: burst of {b.n} concurrent AsyncSandbox.create(), succeeded{label}",
        unit="sandboxes",
        ours=float(b.ok),
        baseline=float(b.n),
        baseline_name="requested",
        better="higher",
        extra={"errors": b.errors[:5]},
    )


def burst(ctx: Context, rt: Runtime, n: int) -> Burst:
    ctx.log(f"burst: {n} x AsyncSandbox.create() under asyncio.gather")
    got = asyncio.run(_burst(rt, n))
    cpu = ", ".join(f"{k} {v:.2f} s" for k, v in got.cpu_s.items())
    ctx.log(
        f"  {got.ok}/{n} created in {got.wall_s:.2f} s; each create p50 {percentile(got.create_ms, 50) or 0:.0f} ms,"
        f" max {max(got.create_ms, default=0):.0f} ms; all killed in {got.kill_s:.2f} s"
    )
    ctx.log(f"  CPU during the burst: {cpu} (wall {got.wall_s:.2f} s x {os.cpu_count()} cores)")
    if got.spawn_interval_ms is not None:
        ctx.log(
            f"  the sandboxes' cgroups appeared one every {got.spawn_interval_ms:.1f} ms (median gap): "
            f"{n} x that = {n * got.spawn_interval_ms / 1e3:.2f} s of serial set-up"
        )
    for error in got.errors[:3]:
        ctx.log(f"  failed create: {error}")
    return got


# ------------------------------------------------------------------------------------------------- proxy


@dataclass
class Proxied:
    through_proxy: list[float] = field(default_factory=list)
    """MB/s per download through the runtime's proxy, into a sandbox's agent."""
    direct: list[float] = field(default_factory=list)
    """MB/s per download of the same size from a standalone agent on the host."""


def _curl_mb_s(args: list[str]) -> float:
    cmd = ["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"curl got HTTP {out[0]} ({' '.join(cmd)})")
    return float(out[1]) / 1e6


def proxied_download(ctx: Context, rt: Runtime, size: int, runs: int) -> Proxied:
    """curl downloads of ``size`` random bytes from a sandbox's agent through the runtime's proxy,
    beside the same download from a standalone agent on the host: what the proxy (the hop into the
    sandbox's network namespace, HTTP relayed both ways) costs a transfer."""
    from e2b import Sandbox

    got = Proxied()
    sbx = Sandbox.create()
    rt.created.add(sbx.sandbox_id)
    agent = Agent(ctx.tmp)
    try:
        sbx.commands.run(f"head -c {size} /dev/urandom > /home/user/proxied.bin", timeout=300)
        local = ctx.tmp / "proxied.bin"
        with local.open("wb") as out:
            out.write(os.urandom(size))
        token = httpx.get(f"{rt.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": rt.api_key}).json()[
            "envdAccessToken"
        ]
        proxied = [
            f"{rt.url}/files?path=/home/user/proxied.bin",
            "-H", f"E2b-Sandbox-Id: {sbx.sandbox_id}", "-H", f"X-Access-Token: {token}",
        ]  # fmt: skip
        direct = [f"{agent.url}/files?path={local}", "-H", f"X-Access-Token: {agent.token}"]
        for _ in range(runs):
            got.through_proxy.append(_curl_mb_s(proxied))
            got.direct.append(_curl_mb_s(direct))
        local.unlink()
    finally:
        agent.stop()
        sbx.kill()
    return got


TEXT_READ_SIZE = 2 * MiB
"""The text file :func:`sdk_text_reads` reads: a CSV log, as a user's program leaves one."""


def _csv_text(size: int) -> bytes:
    rows = (
        f"{i},{i * 7919 % 100_003},user{i % 97},2026-12-04T{i % 24:02}:{i % 60:02}Z,ok\n" for i in range(size // 30)
    )
    return "".join(rows).encode()[:size]  # rows of 40-odd bytes: more than enough


def sdk_text_reads(ctx: Context, rt: Runtime, runs: int) -> tuple[list[float], list[float]]:
    """``files.read(format="bytes")`` of a 2 MiB text file through the runtime's proxy (ms per call):
    as the SDK reads by default (it sends ``Accept-Encoding: gzip, deflate``, which the proxy drops for
    a client on this host), beside the same call with ``gzip=True`` (gzipped: what envd answers the
    SDK's default). Alternating; returns (default, gzip=True)."""
    from e2b import Sandbox

    sbx = Sandbox.create()
    rt.created.add(sbx.sandbox_id)
    text = _csv_text(TEXT_READ_SIZE)
    plain: list[float] = []
    zipped: list[float] = []
    try:
        sbx.files.write("/home/user/log.csv", text)
        for i in range(runs + 1):
            for gz, into in ((False, plain), (True, zipped))[:: 1 if i % 2 else -1]:
                t0 = time.perf_counter()
                got = sbx.files.read("/home/user/log.csv", format="bytes", gzip=gz)
                elapsed = (time.perf_counter() - t0) * 1e3
                if len(got) != len(text):
                    raise RuntimeError(f"read {len(got)} bytes of {len(text)} (gzip={gz})")
                if i:  # the first of each: untimed
                    into.append(elapsed)
    finally:
        sbx.kill()
    return plain, zipped


# ----------------------------------------------------------------------------------------------- scenario


def run(ctx: Context) -> None:
    if os.geteuid() != 0:
        raise ScenarioSkipped(
            "needs root: sandboxd serve builds sandboxes from namespaces, overlayfs and cgroups "
            "(run the bench as root, e.g. `sudo make bench`)"
        )
    try:
        import e2b  # noqa: F401
    except ImportError:
        raise ScenarioSkipped("the official SDK is not installed (pip install e2b)") from None
    n_seq = 15 if ctx.quick else 50
    n_burst = 30 if ctx.quick else TARGET_BURST
    n_resume = 5 if ctx.quick else 20
    n_idle = 5 if ctx.quick else 20
    iso_runs = 50 if ctx.quick else 200

    iso: Isolation | None = None
    iso_error: Exception | None = None
    try:
        iso = isolation_baseline(ctx, iso_runs)
    except Exception as exc:  # reported at the end, after our own rows
        iso_error = exc
        ctx.log(f"isolation baseline failed: {str(exc).splitlines()[0]}")

    ensure_base(ctx)  # sandboxes start from the Debian base, built once into the shared store
    ctx.log("starting sandboxd serve")
    rt = Runtime(ctx.tmp, max_sandboxes=max(256, n_burst + 16))
    try:
        with sdk_env(rt):
            cold = measure(ctx, rt, iso, n_seq, n_burst, n_resume, n_idle)
    finally:
        rt.stop()
    max_sandboxes = max(256, n_burst + 16)
    runs: list[tuple[int | None, str, Callable[[Runtime], None]]] = [
        (None, "defaults", lambda rt: measure_warm(ctx, rt, cold, n_seq, default_pool(max_sandboxes), n_burst)),
        (n_burst, "warm-burst", lambda rt: measure_warm_burst(ctx, rt, cold[1], n_burst)),
    ]
    for warm, where, measure_it in runs:
        ctx.log(f"starting sandboxd serve {'with its defaults' if warm is None else f'--warm-sandboxes {warm}'}")
        (ctx.tmp / where).mkdir()
        rt = Runtime(ctx.tmp / where, max_sandboxes, warm=warm)
        try:
            with sdk_env(rt):
                measure_it(rt)
        finally:
            rt.stop()
    if iso_error is not None:
        raise iso_error


def measure(
    ctx: Context, rt: Runtime, iso: Isolation | None, n_seq: int, n_burst: int, n_resume: int, n_idle: int
) -> tuple[Sequential, Burst, Sequential]:
    seq = sequential(ctx, rt, n_seq)
    p50, p99 = percentile(seq.total_ms, 50) or 0.0, percentile(seq.total_ms, 99) or 0.0
    if iso is not None and iso.p50(RAW) is not None:
        rows = (
            ("isolation: raw userns (range-owned) + idmapped overlay + seccomp + exec true", RAW, RAW_BEFORE,
             RAW_BEFORE_NAME),
            ("isolation: spawn_sandbox with its disk mounted on the create path", DISK_ON_PATH, JAIL,
             DISK_POOLED_NAME),
        )  # fmt: skip
        for row_name, key, base_key, base_name in rows:
            ctx.report(
                Result(
                    name=row_name,
                    unit="ms (p50)",
                    ours=iso.p50(key),
                    baseline=iso.p50(base_key),
                    baseline_name=base_name,
                    better="lower",
                    p50=iso.p50(key),
                    p99=iso.p99(key),
                    extra={"baseline_p99": iso.p99(base_key), "runs": iso.runs},
                )
            )
    common_extra = {
        "n": n_seq,
        "create_p50_ms": percentile(seq.create_ms, 50),
        "first_command_p50_ms": percentile(seq.first_ms, 50),
        "kill_p50_ms": percentile(seq.kill_ms, 50),
        "target": f"p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms",
        "target_met": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS,
    }
    name = 'runtime: create→first command (Sandbox.create + commands.run("true"))'
    for key, base_name in ((RAW, RAW_NAME), (JAIL, JAIL_NAME)):
        ctx.report(
            Result(
                name=name,
                unit="ms (p50)",
                ours=p50,
                baseline=iso.p50(key) if iso else None,
                baseline_name=base_name if iso else "isolation_cost (cargo not available)",
                better="lower",
                p50=p50,
                p99=p99,
                samples={"ours": seq.total_ms, "baseline": []},
                extra={
                    **common_extra,
                    "baseline_p99": iso.p99(key) if iso else None,
                    "baseline_runs": iso and iso.runs,
                },
            )
        )
    ctx.report(
        Result(
            name="runtime: Sandbox.kill() (not counted above)",
            unit="ms (p50)",
            ours=percentile(seq.kill_ms, 50),
            baseline=None,
            baseline_name="-",
            better="lower",
            p50=percentile(seq.kill_ms, 50),
            p99=percentile(seq.kill_ms, 99),
            samples={"ours": seq.kill_ms},
            extra={"n": n_seq, "jail_lifecycle_p50_ms": iso.p50("sandbox_lifecycle") if iso else None},
        )
    )

    got_steady = steady_run_true(ctx, rt, max(20, n_resume * 2))
    steady = got_steady.proxied_ms
    proxied, direct = percentile(steady, 50), percentile(got_steady.direct_ms, 50)
    if proxied is not None and direct is not None:
        inside = percentile(got_steady.inside_ms, 50)
        ctx.report(
            Result(
                name='runtime: commands.run("true") on a running sandbox, through the runtime\'s proxy',
                unit="ms (p50)",
                ours=proxied,
                baseline=direct,
                baseline_name="the same SDK call straight to the sandbox's agent (from its network namespace)",
                better="lower",
                p50=proxied,
                p99=percentile(steady, 99),
                samples={"ours": steady, "baseline": got_steady.direct_ms},
                extra={
                    "n": len(steady),
                    "proxy_ms": round(proxied - direct, 2),
                    "inside_bash_l_p50_ms": inside,
                    "over_inside_ms": round(proxied - inside, 2) if inside is not None else None,
                    "direct_over_inside_ms": round(direct - inside, 2) if inside is not None else None,
                },
            )
        )
    for mode in ("full", "filesystem"):
        got = resumes(ctx, rt, mode, n_resume)
        if mode == "full":
            base, base_name, base_samples, base_p99 = (
                percentile(steady, 50),
                'commands.run("true") on a running sandbox (no pause)',
                steady,
                percentile(steady, 99),
            )
        else:
            base, base_name, base_samples, base_p99 = (
                iso.p50(RAW) if iso else None,
                RAW_NAME if iso else "isolation_cost (cargo not available)",
                [],
                iso.p99(RAW) if iso else None,
            )
        ctx.report(
            Result(
                name=f'runtime: resume, pause(mode="{mode}") → Sandbox.connect + commands.run("true")',
                unit="ms (p50)",
                ours=percentile(got.total_ms, 50),
                baseline=base,
                baseline_name=base_name,
                better="lower",
                p50=percentile(got.total_ms, 50),
                p99=percentile(got.total_ms, 99),
                samples={"ours": got.total_ms, "baseline": base_samples},
                extra={
                    "n": n_resume,
                    "connect_p50_ms": percentile(got.connect_ms, 50),
                    "pause_p50_ms": percentile(got.pause_ms, 50),
                    "baseline_p99": base_p99,
                    "create_to_first_command_p50_ms": p50,
                },
            )
        )

    fp = footprint(ctx, rt, n_idle)
    standalone_rss, standalone_pss = rss_pss(ctx.agent.ps.pid)
    standalone_tree = tree_rss(ctx.agent.ps)
    roles = {
        role: {
            "processes": len(values),
            "rss_MiB_mean": round(sum(r for r, _ in values) / len(values) / MiB, 1),
            "pss_MiB_mean": round(sum(p for _, p in values) / len(values) / MiB, 1),
        }
        for role, values in fp.after.by_role.items()
    }
    mem_extra: dict[str, Any] = {
        "n": n_idle,
        "before_MiB": {"rss": round(fp.before.rss / MiB, 1), "pss": round(fp.before.pss / MiB, 1)},
        "after_MiB": {"rss": round(fp.after.rss / MiB, 1), "pss": round(fp.after.pss / MiB, 1)},
        "after_by_role": roles,
        "cgroup_charge_MiB_mean": round(sum(fp.cgroup_bytes) / len(fp.cgroup_bytes) / MiB, 1)
        if fp.cgroup_bytes
        else None,
        "how": "(sum over runtime + zygote + sandbox cgroups after - before) / N, from /proc/<pid>/smaps_rollup",
        "idle_cpu_ms_per_s_per_sandbox": round(fp.idle_cpu * 1e3, 3),
    }
    for kind, ours, base in (
        ("RSS", fp.per_sandbox("rss"), standalone_tree / MiB),
        ("PSS", fp.per_sandbox("pss"), (standalone_pss or 0) / MiB or None),
    ):
        ctx.report(
            Result(
                name=f"runtime: memory per idle sandbox, {kind} (N={n_idle})",
                unit="MiB",
                ours=ours,
                baseline=base,
                baseline_name=f"one standalone `sandboxd agent` process, {kind} (no zygote to share pages with)",
                better="lower",
                extra={**mem_extra, "standalone_agent_rss_MiB": round(standalone_rss / MiB, 1)}
                if kind == "PSS"
                else {"n": n_idle, "details": "in the PSS row"},
            )
        )

    plain, zipped = sdk_text_reads(ctx, rt, 15 if ctx.quick else 40)
    ctx.log(f"  SDK files.read of 2 MiB of text: p50 {median(plain):.2f} ms as sent, {median(zipped):.2f} ms gzip=True")
    ctx.report(
        Result(
            name='runtime: SDK files.read(format="bytes") of a 2 MiB text file through the proxy',
            unit="ms (p50)",
            ours=median(plain),
            baseline=median(zipped),
            baseline_name="the same read gzipped (gzip=True: what envd answers the SDK's default Accept-Encoding)",
            better="lower",
            samples={"ours": plain, "baseline": zipped},
            p50=median(plain),
            p99=percentile(plain, 99),
        )
    )

    size = (64 if ctx.quick else 256) * MiB
    proxy = proxied_download(ctx, rt, size, 1 if ctx.quick else (ctx.runs or 3))
    ours, base = median(proxy.through_proxy), median(proxy.direct)
    ctx.report(
        Result(
            name=f"runtime: download {size // MiB} MiB from a sandbox through the proxy (curl)",
            unit="MB/s",
            ours=ours,
            baseline=base,
            baseline_name="the same download from a standalone agent on the host (curl)",
            better="higher",
            samples={"ours": proxy.through_proxy, "baseline": proxy.direct},
            extra={"runs": len(proxy.through_proxy)},
        )
    )

    seq_create = percentile(seq.create_ms, 50) or 0.0
    b = burst(ctx, rt, n_burst)
    burst_extra = {
        "n": n_burst,
        "succeeded": b.ok,
        "errors": b.errors[:5],
        "create_p50_ms": percentile(b.create_ms, 50),
        "create_max_ms": max(b.create_ms, default=None),
        "kill_all_s": round(b.kill_s, 2),
        "cpu_s": b.cpu_s,
        "spawn_interval_ms_p50": b.spawn_interval_ms,
        "cores": os.cpu_count(),
        "target": f"{TARGET_BURST}/{TARGET_BURST} within {TARGET_BURST_WALL_S:g} s on {TARGET_CORES} cores",
    }
    ctx.report(
        Result(
            name=f"runtime: burst of {n_burst} concurrent AsyncSandbox.create(), wall time",
            unit="s",
            ours=b.wall_s,
            baseline=n_burst * seq_create / 1e3,
            baseline_name=f"{n_burst} creates one at a time ({n_burst} x sequential Sandbox.create p50)",
            better="lower",
            extra=burst_extra,
        )
    )
    ctx.report(burst_succeeded(b, ""))
    ctx.report(
        Result(
            name=f"runtime: each create's latency inside the burst of {n_burst}",
            unit="ms (p50)",
            ours=percentile(b.create_ms, 50),
            baseline=seq_create,
            baseline_name="Sandbox.create() one at a time (the sequential runs above)",
            better="lower",
            p50=percentile(b.create_ms, 50),
            p99=percentile(b.create_ms, 99),
            samples={"ours": b.create_ms, "baseline": seq.create_ms},
            extra={"baseline_p99": percentile(seq.create_ms, 99)},
        )
    )

    # -------------------------------------------------------------------------------- targets
    cores = os.cpu_count()
    met = "met" if p50 <= TARGET_P50_MS else "NOT met"
    met99 = "met" if p99 <= TARGET_P99_MS else "NOT met"
    if n_burst == TARGET_BURST:
        ok = b.ok == TARGET_BURST and b.wall_s <= TARGET_BURST_WALL_S
        burst_line = (
            f"burst {b.ok}/{n_burst} in {b.wall_s:.2f} s (≤ {TARGET_BURST_WALL_S:g} s: {'met' if ok else 'NOT met'})"
        )
    else:
        burst_line = (
            f"burst {b.ok}/{n_burst} in {b.wall_s:.2f} s (the target is {TARGET_BURST} within"
            f" {TARGET_BURST_WALL_S:g} s: run the full suite)"
        )
    ctx.log(
        f"targets (issue, on {TARGET_CORES} cores; this machine has {cores}): create→first command "
        f"p50 {p50:.1f} ms (≤ {TARGET_P50_MS:g}: {met}), p99 {p99:.1f} ms (≤ {TARGET_P99_MS:g}: {met99}); {burst_line}"
    )
    raw = iso.p50(RAW) if iso else None
    if raw:
        ctx.log(f"  create→first command is {p50 / raw:.1f}x the raw isolation cost ({raw:.2f} ms p50)")
    return seq, b, sequential(ctx, rt, n_seq, PACE_S)


def measure_warm(
    ctx: Context, rt: Runtime, cold: tuple[Sequential, Burst, Sequential], n_seq: int, pool: int, n_burst: int
) -> None:
    """The same sequential creates (back to back, and paced) and the same burst on a runtime started
    with ``sandboxd serve``'s defaults, whose warm pool holds ``pool`` sandboxes, beside the cold ones:
    what a user who passes no flag gets."""
    cold_seq, cold_burst, cold_paced = cold
    if pool == 0:
        ctx.log("  sandboxd serve keeps no warm pool by default on this host (under 2 GiB for sandboxes)")
    label = f"serve's defaults (a warm pool of {pool})"
    runs = (("", cold_seq, "back to back"), (f", creates {PACE_S:g} s apart", cold_paced, "paced"))
    for suffix, base, how in runs:
        fill_pool(rt, pool)
        seq = sequential(ctx, rt, n_seq, PACE_S if base is cold_paced else 0.0)
        row = pooled_result(f"{label}{suffix}", seq, base, how)
        ctx.report(row)
        ctx.log(f"  {label}, {how}: create→first command p50 {row.p50:.1f} ms, p99 {row.p99:.1f} ms")
        if base is cold_seq and pool > 0:
            second_stream(ctx, rt, n_seq, pool, label, cold_seq)
    fill_pool(rt, pool)
    b = burst(ctx, rt, n_burst)
    ctx.report(
        Result(
            name=f"runtime: burst of {n_burst} concurrent AsyncSandbox.create(), wall time, {label}",
            unit="s",
            ours=b.wall_s,
            baseline=cold_burst.wall_s,
            baseline_name="the same burst without warm sandboxes (same run)",
            better="lower",
            extra={"n": n_burst, "succeeded": b.ok, "cpu_s": b.cpu_s, "create_p50_ms": percentile(b.create_ms, 50)},
        )
    )
    ctx.report(burst_succeeded(b, f", {label}"))
    second_burst(ctx, rt, n_burst, label, cold_burst)


def second_burst(ctx: Context, rt: Runtime, n_burst: int, label: str, cold_burst: Burst) -> None:
    """The same burst again on the same runtime, once its default pool has grown to the first burst
    (it keeps the largest burst it has seen for ``warm.DECAY_S``) and refilled in the quiet after it:
    what a user whose creates come in bursts gets from ``sandboxd serve`` with no flag, from the
    second burst on. The first is a fresh pool's (its few warm sandboxes, then cold creates)."""
    target = warm_gauge(rt, "sandboxd_warm_target")
    if target is None or target < n_burst:
        ctx.log(f"  the pool did not grow to the burst of {n_burst} (target {target}): no second burst")
        return
    b, _ = pooled_burst(
        ctx, rt, n_burst, f"{label}, a second burst", cold_burst, "(the pool grown to the first)", pool_grown_to=target
    )
    ctx.log(f"  {label}, a second burst (the pool grown to {target:g}): {b.ok}/{n_burst} in {b.wall_s:.2f} s")


def pooled_burst(
    ctx: Context, rt: Runtime, n_burst: int, label: str, cold_burst: Burst, more: str = "", **extra: object
) -> tuple[Burst, bool]:
    """The burst on a runtime whose pool is filled to it first, and its two rows (wall time beside
    the cold runtime's burst, and successes): ``label`` names the runtime, ``more`` adds to the wall
    time row's name. Returns the burst and whether it met the issue's target."""
    fill_pool(rt, n_burst)
    b = burst(ctx, rt, n_burst)
    ok = b.ok == n_burst and b.wall_s <= TARGET_BURST_WALL_S
    ctx.report(
        Result(
            name=f"runtime: burst of {n_burst} concurrent AsyncSandbox.create(), wall time, {label}"
            + (f" {more}" if more else ""),
            unit="s",
            ours=b.wall_s,
            baseline=cold_burst.wall_s,
            baseline_name="the same burst without warm sandboxes (same run)",
            better="lower",
            extra={
                "succeeded": b.ok,
                "errors": b.errors[:5],
                "cpu_s": b.cpu_s,
                "create_p50_ms": percentile(b.create_ms, 50),
                "baseline_succeeded": cold_burst.ok,
                **extra,
                "target": f"{TARGET_BURST}/{TARGET_BURST} within {TARGET_BURST_WALL_S:g} s on {TARGET_CORES} cores",
                "target_met": ok if n_burst == TARGET_BURST else None,
            },
        )
    )
    ctx.report(burst_succeeded(b, f", {label}"))
    return b, ok


def pooled_result(label: str, seq: Sequential, base: Sequential, how: str, **extra: object) -> Result:
    """The row of a pooled runtime's sequential creates, beside the cold runtime's ``base`` run ``how``."""
    p50, p99 = percentile(seq.total_ms, 50), percentile(seq.total_ms, 99)
    return Result(
        name=f'runtime: create→first command (Sandbox.create + commands.run("true")), {label}',
        unit="ms (p50)",
        ours=p50,
        baseline=percentile(base.total_ms, 50),
        baseline_name=f"the same without warm sandboxes ({how}, same run)",
        better="lower",
        p50=p50,
        p99=p99,
        samples={"ours": seq.total_ms, "baseline": base.total_ms},
        extra={
            "n": len(seq.total_ms),
            **extra,
            "create_p50_ms": percentile(seq.create_ms, 50),
            "first_command_p50_ms": percentile(seq.first_ms, 50),
            "baseline_create_p50_ms": percentile(base.create_ms, 50),
            "baseline_first_command_p50_ms": percentile(base.first_ms, 50),
            "baseline_p99": percentile(base.total_ms, 99),
            "target": f"p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms",
            "target_met": (p50 or 0) <= TARGET_P50_MS and (p99 or 0) <= TARGET_P99_MS,
        },
    )


def second_stream(ctx: Context, rt: Runtime, n_seq: int, pool: int, label: str, cold_seq: Sequential) -> None:
    """The same back-to-back stream again, once the pool has grown to the first (a default pool grows to
    the largest burst of creates it has seen, ``warm.GROWTH_WINDOW_S``) and refilled in the quiet after
    it: what a user's second stream gets, e.g. a test suite run again. The first stream's row is a fresh
    pool's: its ``WARMUP`` untimed creates take most of it, and the rest are cold creates with the
    pool's refills in their gaps (the same in mean as no pool, and its cold creates slower at p50)."""
    target = warm_gauge(rt, "sandboxd_warm_target")
    if target is None or target <= pool:
        ctx.log(f"  the pool did not grow after {WARMUP + n_seq} creates (target {target}): no second stream")
        return
    fill_pool(rt, int(target))
    seq = sequential(ctx, rt, n_seq)
    label_second = f"{label}, a second stream back to back (the pool grown to the first)"
    row = pooled_result(label_second, seq, cold_seq, "back to back", pool_grown_to=target)
    ctx.report(row)
    ctx.log(f"  {label}, a second stream (the pool grown to {target:g}): p50 {row.p50:.1f} ms, p99 {row.p99:.1f} ms")


def warm_gauge(rt: Runtime, name: str) -> float | None:
    """One of the runtime's warm-pool gauges (``sandboxd_warm_sandboxes``, ``sandboxd_warm_target``)."""
    answer = httpx.get(f"{rt.url}/metrics", headers={"Authorization": f"Bearer {rt.api_key}"}, timeout=30)
    lines = [line for line in answer.text.splitlines() if line.startswith(f"{name} ")]
    return float(lines[0].split()[1]) if lines else None


def fill_pool(rt: Runtime, n: int) -> None:
    """Wait until a runtime's pool holds ``n`` warm sandboxes booted and warmed up (its
    ``sandboxd_warm_sandboxes`` gauge), then until the host is quiet (:func:`quiet_host`): the pool's
    rows are about a create that comes after a quiet moment. With a fixed 0.5 s instead, CI's run at
    18:08 caught the teardown of the runs before still going: the first 8 of 15 paced creates took
    30-48 ms, the other 7 12-14 ms."""
    deadline = time.monotonic() + 60 + n
    while time.monotonic() < deadline:
        if (warm_gauge(rt, "sandboxd_warm_sandboxes") or 0) >= n:
            break
        time.sleep(0.2)
    quiet_host()


def quiet_host(busy: float = 0.1, window_s: float = 0.25, limit_s: float = 15.0) -> None:
    """Wait (at most ``limit_s``) until the host's CPUs were busy less than ``busy`` of a
    ``window_s`` window (``/proc/stat``), and at least 0.5 s."""
    time.sleep(0.5)
    deadline = time.monotonic() + limit_s

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        return sum(fields) - idle, sum(fields)

    while time.monotonic() < deadline:
        busy0, total0 = sample()
        time.sleep(window_s)
        busy1, total1 = sample()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy:
            return


def measure_warm_burst(ctx: Context, rt: Runtime, cold_burst: Burst, n_burst: int) -> None:
    """The burst on a runtime whose pool holds as many warm sandboxes as the burst asks for: every
    create only gives one its identity (``/init``, link and rules, row). The pool is filled ahead,
    as an operator sizes ``--warm-sandboxes`` for the bursts they expect."""
    b, ok = pooled_burst(ctx, rt, n_burst, f"--warm-sandboxes {n_burst}", cold_burst)
    met = "met" if ok else "NOT met"
    if n_burst != TARGET_BURST:
        met = f"the target is {TARGET_BURST}: run the full suite"
    ctx.log(f"  warm burst {b.ok}/{n_burst} in {b.wall_s:.2f} s (≤ {TARGET_BURST_WALL_S:g} s: {met})")
