"""Shared pieces of the benchmarks: result records, the agent under test, RSS/CPU sampling, reports.

A scenario is a function ``run(ctx: Context) -> None`` that measures something of ours beside a
baseline in the same run and hands each figure to :meth:`Context.report` as soon as it has it, so a
scenario that fails halfway still leaves its earlier figures in the report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_JSON_SAMPLES = 1000
"""Per-sample lists longer than this are left out of the JSON (they stay available to charts in memory)."""

MiB = 1 << 20
GiB = 1 << 30


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    """One figure of ours beside its baseline. ``ratio`` is always ours / baseline; ``better`` says
    which direction is good for this figure."""

    name: str
    unit: str
    ours: float | None
    baseline: float | None
    baseline_name: str
    better: Literal["higher", "lower"]
    p50: float | None = None
    p99: float | None = None
    samples: dict[str, list[float]] | None = None
    """Optional per-run or per-request values, keyed "ours" / "baseline" (for charts)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Optional context a reader may want (CPU seconds, sizes, notes); kept small."""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "ours": _round(self.ours),
            "baseline": _round(self.baseline),
            "baseline_name": self.baseline_name,
            "ratio": _round(self.ratio, 4),
            "better": self.better,
            "p50": _round(self.p50),
            "p99": _round(self.p99),
        }
        if self.samples and all(len(v) <= MAX_JSON_SAMPLES for v in self.samples.values()):
            record["samples"] = {k: [_round(x) for x in v] for k, v in self.samples.items()}
        if self.extra:
            record["extra"] = self.extra
        return record


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def samples_row(
    name: str,
    unit: str,
    ours: list[float],
    baseline: list[float],
    baseline_name: str,
    *,
    tail: bool = True,
    extra: dict[str, Any] | None = None,
) -> Result:
    """A lower-is-better row from two sample lists: their p50s side by side, both lists kept;
    ``tail``: our p99 and the baseline's (in ``extra``) too."""
    return Result(
        name=name,
        unit=unit,
        ours=percentile(ours, 50),
        baseline=percentile(baseline, 50),
        baseline_name=baseline_name,
        better="lower",
        p50=percentile(ours, 50),
        p99=percentile(ours, 99) if tail else None,
        samples={"ours": ours, "baseline": baseline},
        extra={**(extra or {}), **({"baseline_p99": percentile(baseline, 99)} if tail else {})},
    )


def extension_build() -> str:
    """``release`` or ``debug``: which cargo profile built the installed ``sandboxd._core`` (a debug build
    carries ``.debug_info``; the release profile strips it). ``unknown`` when it cannot be read."""
    import struct

    try:
        import sandboxd._core as core

        data = Path(str(core.__file__)).read_bytes()
        if data[:4] != b"\x7fELF" or data[4] != 2:  # ELF64 only
            return "unknown"
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        (strtab_off,) = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
        for i in range(shnum):
            (name_off,) = struct.unpack_from("<I", data, shoff + i * shentsize)
            end = data.index(b"\0", strtab_off + name_off)
            if data[strtab_off + name_off : end] == b".debug_info":
                return "debug"
        return "release"
    except (ImportError, OSError, ValueError, struct.error):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory": f"{psutil.virtual_memory().total / GiB:.1f} GiB",
        "extension": extension_build(),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(machine: dict[str, Any], results: list[Result], errors: list[dict[str, str]], stamp: str) -> str:
    lines = [
        f"## sandboxd benchmarks, {stamp}",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory']}, Linux {machine['kernel']};"
        f" sandboxd's Rust extension: {machine.get('extension', 'unknown')} build",
        "",
        "| scenario | unit | ours | baseline | baseline is | ours/baseline | better | p50 | p99 |",
        "|---|---|--:|--:|---|--:|---|--:|--:|",
    ]
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.name} | {r.unit} | {_fmt(r.ours)} | {_fmt(r.baseline)} | {r.baseline_name} | {ratio} | {r.better}"
            f" | {_fmt(r.p50)} | {_fmt(r.p99)} |"
        )
    lines.append("")
    lines.append("ours/baseline > 1 is good where better is higher, < 1 where better is lower. See benches/README.md.")
    for err in errors:
        lines.append(f"\n**{err['scenario']} failed:** `{err['error']}`")
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], errors: list[dict[str, str]], args: dict[str, Any]) -> tuple[Path, str]:
    """Write ``results/<UTC stamp>.json`` and ``.md``; return the JSON path and the Markdown."""
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    RESULTS_DIR.mkdir(exist_ok=True)
    payload: dict[str, Any] = {
        "machine": machine,
        "started": now.isoformat(timespec="seconds"),
        "args": args,
        "results": [r.to_json() for r in results],
    }
    if errors:
        payload["errors"] = errors
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown_table(machine, results, errors, now.strftime("%Y-%m-%d %H:%M UTC"))
    path.with_suffix(".md").write_text(md)
    return path, md


# ------------------------------------------------------------------------------------------------ context


class ScenarioSkipped(Exception):
    """A scenario cannot run here at all (not an error: the run still succeeds)."""


@dataclass
class Context:
    """What a scenario gets: the run's options, a private temp dir, the agent under test, a sink for results."""

    quick: bool
    runs: int | None
    """``--runs``: repetitions of each timed measurement, overriding the scenario's default"""
    tmp: Path
    agent: Agent
    compare_agent: RemoteAgent | None
    sink: Callable[[Result], None]

    def report(self, result: Result) -> None:
        self.sink(result)

    def log(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)


def pick_tmp_root(preferred: str | None) -> Path:
    """A directory on a real disk (not tmpfs), so file benchmarks measure what the agent would see."""
    if preferred:
        return Path(preferred)
    candidates = [Path(tempfile.gettempdir()), Path.home() / ".cache" / "sandboxd-bench", RESULTS_DIR]
    for candidate in candidates:
        with contextlib.suppress(OSError):
            candidate.mkdir(parents=True, exist_ok=True)
            if fs_type(candidate) not in ("tmpfs", "ramfs"):
                return candidate
    return candidates[0]


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_http(url: str, process: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 30) -> None:
    """Poll ``url`` until it answers at all (any HTTP status counts as up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    shown = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s\n{shown}")


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGKILL to the child if the bench dies without cleaning up."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5) -> None:
    """Stop a process we started in its own session, with its children: ``sig``, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace)


# -------------------------------------------------------------------------------------------------- agent


class Agent:
    """``sandboxd agent`` as a subprocess on a free loopback port with an access token; stopped by :meth:`stop`."""

    name = "sandboxd agent"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "agent.log"
        args = [
            sys.executable,
            "-m",
            "sandboxd",
            "agent",
            "--port",
            str(self.port),
            "--access-token",
            self.token,
            "--user",
            getpass.getuser(),
            "--workdir",
            str(workdir),
        ]
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


@dataclass
class RemoteAgent:
    """An already-running envd-compatible agent on this machine (``--compare-agent``), sharing its filesystem.

    ``ps`` is the process listening on its port when this machine shows it (we run as root, or as its
    owner), so its RSS and CPU can be measured like ours; None otherwise."""

    url: str
    token: str | None
    name: str = "compare agent"
    ps: psutil.Process | None = None

    @classmethod
    def at(cls, url: str, token: str | None) -> RemoteAgent:
        url = url.rstrip("/")
        agent = cls(url, token, f"compare agent {urllib.parse.urlsplit(url).netloc}")
        port = urllib.parse.urlsplit(url).port or 80
        with contextlib.suppress(psutil.Error, OSError):
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                    agent.ps = psutil.Process(conn.pid)
                    break
        return agent

    def check(self) -> None:
        """Fail early, with a clear message, when nothing answers at the URL."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                pass
        except urllib.error.HTTPError:
            pass
        except OSError as exc:
            raise SystemExit(f"--compare-agent {self.url}: GET /health failed: {exc}") from None


# -------------------------------------------------------------------------------------- the official SDK

ENVD_PORT = 49983


def sdk_sandbox(url: str, token: str | None, asynchronous: bool = False) -> Any:
    """The official SDK's ``Sandbox`` (or ``AsyncSandbox``) for the agent at ``url``, built the way the
    SDK builds it in debug mode (``Sandbox.create()`` with ``E2B_DEBUG=true``: no API call), with the
    agent's access token sent as ``X-Access-Token`` when there is one, as ``Sandbox.connect`` does for
    a real sandbox. Debug mode alone cannot send a token; this is the SDK's own constructor path."""
    from e2b import AsyncSandbox, ConnectionConfig, Sandbox
    from e2b.envd.versions import ENVD_DEBUG_FALLBACK

    headers = {"E2b-Sandbox-Id": "debug_sandbox_id", "E2b-Sandbox-Port": str(ENVD_PORT)}
    if token:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(debug=True, sandbox_url=url, extra_sandbox_headers=headers)
    cls = AsyncSandbox if asynchronous else Sandbox
    return cls(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=ENVD_DEBUG_FALLBACK,
        envd_access_token=token,
        connection_config=config,
        traffic_access_token=None,
    )


def open_for_compare(*paths: Path) -> None:
    """Let a compare agent that runs as another user (E2B's envd runs as ``user``) into our temp dirs."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.chmod(0o777)


# ---------------------------------------------------------------------------------------------- sampling


def tree_rss(proc: psutil.Process, children: list[psutil.Process] | None = None) -> int:
    """RSS of a process and its descendants (``children``: a list found earlier, to skip the /proc scan)."""
    total = 0
    for p in [proc, *(_children(proc) if children is None else children)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_cpu(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its descendants: the live ones' own, and those
    already reaped through their reapers' children times (a command that exited during a measured
    block, such as the PTY row's ``head``, counts; once reaped it is in no live process's own times)."""
    total = 0.0
    for p in [proc, *_children(proc)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


class RssSampler:
    """Samples a process tree's RSS every ``interval`` seconds in a thread; ``peak`` after the ``with``.

    Reading one process's RSS costs ~20 µs, but finding its descendants scans all of /proc (~1 ms), so
    the list of children is refreshed only every ``children_every`` seconds. Run it around the baseline
    too, so its small CPU cost falls on both sides. ``proc=None`` (an agent whose process we cannot
    see) samples nothing: ``idle`` and ``peak`` stay 0."""

    def __init__(self, proc: psutil.Process | None, interval: float = 0.02, children_every: float = 0.25) -> None:
        self.proc = proc
        self.interval = interval
        self.children_every = children_every
        self.idle = tree_rss(proc) if proc is not None else 0
        self.peak = self.idle
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        if self.proc is None:
            return
        children = _children(self.proc)
        refreshed = time.monotonic()
        while not self._stop.wait(self.interval):
            if time.monotonic() - refreshed >= self.children_every:
                children = _children(self.proc)
                refreshed = time.monotonic()
            self.peak = max(self.peak, tree_rss(self.proc, children))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.proc is not None:
            self.peak = max(self.peak, tree_rss(self.proc))


@contextlib.contextmanager
def cpu_meter(proc: psutil.Process | None) -> Iterator[list[float]]:
    """Yields a one-element list that holds the CPU seconds ``proc`` (and children) used inside the block."""
    out = [0.0]
    before = tree_cpu(proc) if proc is not None else 0.0
    try:
        yield out
    finally:
        out[0] = (tree_cpu(proc) - before) if proc is not None else 0.0


def which(program: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (nginx lives in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(program, path=path)


# ---------------------------------------------------------------------------------------- templates


def template_store() -> Path:
    """The template store every runtime of the benches shares (the Makefile and the tests use the same
    default), so the Debian ``base`` is built once, not per run."""
    return Path(os.environ.setdefault("SANDBOXD_TEMPLATE_STORE", str(REPO / ".cache" / "templates")))


def _ensure_built(ctx: Context, name: str, key: str, build: Callable[[Any, Callable[[str], None]], object]) -> bool:
    """Build a built-in template into the shared store unless its recipe is there; False where it
    cannot be built here."""
    from sandboxd.runtime import debian
    from sandboxd.runtime.layers import LayerStore

    store = LayerStore(template_store())
    if store.cached(key) is not None:
        return True
    ctx.log(f"building the {name} template into {store.root} (once)")
    try:
        build(store, lambda line: ctx.log(f"  {line}"))
    except debian.BuildUnavailable as exc:
        ctx.log(f"  cannot build it here: {exc}")
        return False
    return True


def _interpreter_recipe() -> Any:
    from sandboxd.runtime import code_interpreter, debian

    base = debian.Recipe(mirror=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or debian.DEFAULT_MIRROR)
    return code_interpreter.Recipe(base, os.environ.get("SANDBOXD_PYPI_INDEX") or code_interpreter.DEFAULT_INDEX)


def ensure_base(ctx: Context) -> bool:
    """``base`` in the shared store; False where it cannot be built here (runtimes then fall back to
    the ``host`` template)."""
    from sandboxd.runtime import debian

    recipe = _interpreter_recipe().base
    return _ensure_built(
        ctx, "base", recipe.key(), lambda store, report: debian.build(store, recipe, debian.BuildProgress(), report)
    )


def ensure_interpreter_template(ctx: Context) -> bool:
    """``code-interpreter-v1`` (``base`` first) in the shared store; False where it cannot be built
    here (no archive or package index in reach)."""
    from sandboxd.runtime import code_interpreter, debian

    recipe = _interpreter_recipe()
    return _ensure_built(
        ctx,
        "code-interpreter-v1",
        recipe.key(),
        lambda store, report: code_interpreter.build(store, recipe, debian.BuildProgress(), report),
    )
