"""Scenario ``sdk-files``: file transfers through the official SDK, beside curl on the same agent and bytes.

* upload: ``sandbox.files.write(path, data)`` with ``data`` a ``bytes`` object held in memory (the
  SDK sends it as ``multipart/form-data``, its default for bytes), beside ``curl -F
  'file=@src;filename=<target>'`` to the same agent: the same form, streamed from a file.
* download: ``sandbox.files.read(path, format="bytes")`` (the whole body into a ``bytearray``) and
  ``format="stream"`` (the body as an iterator of chunks, counted and dropped), beside ``curl`` ``GET
  /files`` to the same agent, written to ``/dev/null``.
* listing: ``sandbox.files.list(dir)`` of 10,000 files, beside ``ls -la`` of the same directory.
* small files: ``sandbox.files.write_files`` of 100 files of 100 bytes, beside this process writing
  them (temporary file, rename).

The SDK runs in this process in debug mode (``E2B_DEBUG=true``, ``E2B_SANDBOX_URL``) against a token-less
agent of its own (:func:`watch.sdk_agent`), so ``ours / curl`` is what the SDK's client side costs on top
of the agent. With ``--compare-agent``, each SDK row is also set beside the same SDK call against that
agent. MB/s is bytes over the call's wall time (10^6 bytes/s), the median of the runs; runs alternate;
each size is checked, and each upload's SHA-256 once, outside the timed part.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .common import (
    Context,
    MiB,
    Result,
    RssSampler,
    ScenarioSkipped,
    cpu_meter,
    median,
    open_for_compare,
    sdk_sandbox,
    which,
)
from .files import agent_endpoints, curl, make_file, size_label, warm_page_cache
from .watch import sdk_agent

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Runs:
    mbps: list[float] = field(default_factory=list)
    agent_cpu_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    """CPU of this process (the SDK client); curl's own CPU for the curl rows"""
    agent_peak_rss: list[int] = field(default_factory=list)


@dataclass
class Step:
    """One kind of transfer through one client: ``run(target)`` returns (seconds, client CPU seconds)."""

    name: str
    proc: psutil.Process | None
    run: Callable[[Path], tuple[float, float]]
    upload: bool


def sdk_steps(sandbox: Any, label: str, src: Path, payload: bytes, proc: psutil.Process | None) -> dict[str, Step]:
    size = len(payload)

    def write(target: Path) -> tuple[float, float]:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        info = sandbox.files.write(str(target), payload, request_timeout=REQUEST_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        if info.path != str(target):
            raise RuntimeError(f"{label} write: the SDK reported {info.path}, expected {target}")
        return seconds, time.process_time() - cpu0

    def read_bytes(target: Path) -> tuple[float, float]:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        data = sandbox.files.read(str(src), format="bytes", request_timeout=REQUEST_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        if len(data) != size:
            raise RuntimeError(f"{label} read(bytes): {len(data)} bytes, expected {size}")
        return seconds, time.process_time() - cpu0

    def read_stream(target: Path) -> tuple[float, float]:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        n = 0
        with sandbox.files.read(str(src), format="stream", request_timeout=REQUEST_TIMEOUT_S) as chunks:
            for chunk in chunks:
                n += len(chunk)
        seconds = time.perf_counter() - t0
        if n != size:
            raise RuntimeError(f"{label} read(stream): {n} bytes, expected {size}")
        return seconds, time.process_time() - cpu0

    return {
        "upload": Step(label, proc, write, upload=True),
        "download bytes": Step(label, proc, read_bytes, upload=False),
        "download stream": Step(label, proc, read_stream, upload=False),
    }


def curl_steps(curl_bin: str, url: str, token: str | None, src: Path, proc: psutil.Process | None) -> dict[str, Step]:
    size = src.stat().st_size
    endpoints = agent_endpoints("curl", url, token, proc)

    def upload(target: Path) -> tuple[float, float]:
        got = curl(curl_bin, endpoints["upload multipart"].upload(src, target), upload=True)
        if got.status != 200:
            raise RuntimeError(f"curl multipart upload: HTTP {got.status}")
        return size / got.speed, got.curl_cpu

    def download(target: Path) -> tuple[float, float]:
        got = curl(curl_bin, endpoints["download"].download(src), upload=False)
        if got.status != 200 or got.size != size:
            raise RuntimeError(f"curl download: HTTP {got.status}, {got.size} bytes (expected 200, {size})")
        return size / got.speed, got.curl_cpu

    return {"upload": Step("curl", proc, upload, upload=True), "download": Step("curl", proc, download, upload=False)}


LIST_FILES = 10_000
"""Entries in the directory :func:`listing` lists."""


def _rotate(
    calls: dict[str, Callable[[], object]],
    runs: int,
    check: Callable[[str, object], None],
    before: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Each call ``runs`` times after one untimed round, the order rotated every round: ms per call.
    ``before`` runs ahead of each call, untimed; ``check(key, result)`` after it, untimed."""
    got: dict[str, list[float]] = {key: [] for key in calls}
    for i in range(runs + 1):
        for key in list(calls)[i % len(calls) :] + list(calls)[: i % len(calls)]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            result = calls[key]()
            elapsed = (time.perf_counter() - t0) * 1e3
            check(key, result)
            if i:  # the first round: untimed
                got[key].append(elapsed)
    return got


def _report_p50(ctx: Context, name: str, got: dict[str, list[float]], bases: list[tuple[str, str]]) -> None:
    """A row per baseline that was measured: ours beside it, ms p50, lower is better."""
    for key, base_name in bases:
        if key in got:
            ctx.report(
                Result(
                    name=name,
                    unit="ms (p50)",
                    ours=median(got["ours"]),
                    baseline=median(got[key]),
                    baseline_name=base_name,
                    better="lower",
                    samples={"ours": got["ours"], "baseline": got[key]},
                    p50=median(got["ours"]),
                )
            )


def listing(ctx: Context, sandbox: Any, data: Path, compare: Any) -> None:
    """``files.list`` of a directory of 10,000 files (one ``ListDir``: every entry stat-ed, its owner
    and group named, its metadata read), beside ``ls -la`` of the same directory (coreutils, its own
    process: the same facts, printed), and with ``--compare-agent`` beside the same SDK call to that
    agent. Alternating; ms per call."""
    ls_bin = which("ls")
    directory = data / "listed"
    directory.mkdir()
    for i in range(LIST_FILES):
        (directory / f"file-{i:05d}.txt").write_bytes(b"x")
    if compare is not None:
        open_for_compare(ctx.tmp, directory)
    calls: dict[str, Callable[[], object]] = {"ours": lambda: len(sandbox.files.list(str(directory)))}
    if ls_bin is not None:
        ls = [ls_bin, "-la", "--time-style=full-iso", str(directory)]
        calls["ls"] = lambda: len(subprocess.run(ls, capture_output=True, check=True).stdout.splitlines()) - 3
    if compare is not None:
        theirs = sdk_sandbox(compare.url, compare.token)
        calls["compare"] = lambda: len(theirs.files.list(str(directory)))

    def check(key: str, n: object) -> None:
        if n != LIST_FILES:
            raise RuntimeError(f"{key} listed {n} entries of {LIST_FILES}")

    got = _rotate(calls, 5 if ctx.quick else 15, check)
    ctx.log("files.list of 10,000 files: " + ", ".join(f"{k} p50 {median(v):.1f} ms" for k, v in got.items()))
    bases = [("ls", "ls -la of the same directory (coreutils, a process of its own)")]
    if compare is not None:
        bases.append(("compare", f"{compare.name}, SDK files.list"))
    _report_p50(ctx, f"sdk-files: files.list of a directory of {LIST_FILES:,} files, SDK", got, bases)
    shutil.rmtree(directory)


SMALL_FILES = 100
SMALL_BYTES = 100
"""What :func:`small_files` writes in one call: 100 files of 100 bytes (a project's sources, say)."""


def small_files(ctx: Context, sandbox: Any, data: Path, compare: Any) -> None:
    """``files.write_files`` of 100 files of 100 bytes into one directory (one multipart request, a
    part per file), beside the same files written by this process as the agent writes them (each to
    a temporary file, then renamed: the kernel's part of the work), and with ``--compare-agent``
    beside the same SDK call to that agent. Alternating; ms per call, every file checked after each."""
    directory = data / "small"
    directory.mkdir()
    if compare is not None:
        open_for_compare(ctx.tmp, directory)
    payloads = [os.urandom(SMALL_BYTES // 2).hex().encode() for _ in range(SMALL_FILES)]
    paths = [directory / f"module_{i:03d}.py" for i in range(SMALL_FILES)]
    entries = [{"path": str(path), "data": payload} for path, payload in zip(paths, payloads, strict=True)]

    def direct() -> None:
        for path, payload in zip(paths, payloads, strict=True):
            temp = path.with_name(f".{path.name}.tmp")
            with open(temp, "wb") as f:
                f.write(payload)
            os.rename(temp, path)

    calls: dict[str, Callable[[], object]] = {"ours": lambda: sandbox.files.write_files(entries), "direct": direct}
    if compare is not None:
        theirs = sdk_sandbox(compare.url, compare.token)
        calls["compare"] = lambda: theirs.files.write_files(entries)

    def fresh() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def check(key: str, _: object) -> None:
        if [path.read_bytes() for path in paths] != payloads:
            raise RuntimeError(f"{key}: write_files left other bytes than it was given")

    got = _rotate(calls, 10 if ctx.quick else 30, check, before=fresh)
    ctx.log("write_files of 100 small files: " + ", ".join(f"{k} p50 {median(v):.1f} ms" for k, v in got.items()))
    bases = [("direct", "the same files written by this process (temporary file, rename), no transport")]
    if compare is not None:
        bases.append(("compare", f"{compare.name}, SDK write_files"))
    _report_p50(ctx, f"sdk-files: write_files of {SMALL_FILES} files of {SMALL_BYTES} B, SDK", got, bases)
    shutil.rmtree(directory)


@dataclass
class Transfers:
    data: Path
    src_sha: str
    size: int

    def once(self, step: Step, into: Runs, kind: str, check: bool) -> None:
        target = self.data / f"up-{kind.replace(' ', '-')}-{step.name.replace(' ', '-')}.bin"
        if step.upload:
            target.unlink(missing_ok=True)
            os.sync()  # no writeback from the previous run during this one
        sampler = RssSampler(step.proc)
        with cpu_meter(step.proc) as agent_cpu, sampler:
            seconds, client_cpu = step.run(target)
        if step.upload:
            got = target.stat().st_size if target.exists() else -1
            if got != self.size:
                raise RuntimeError(f"{step.name} {kind}: {target} has {got} bytes, expected {self.size}")
            if check:
                with target.open("rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != self.src_sha:
                        raise RuntimeError(f"{step.name} {kind}: {target} differs from the source")
            target.unlink()
        into.mbps.append(self.size / seconds / 1e6)
        into.agent_cpu_s.append(agent_cpu[0])
        into.client_cpu_s.append(client_cpu)
        into.agent_peak_rss.append(sampler.peak)


def run(ctx: Context) -> None:
    try:
        import e2b  # noqa: F401
    except ImportError:
        raise ScenarioSkipped("the official SDK is not installed (pip install e2b)") from None
    curl_bin = which("curl")
    size = 64 * MiB if ctx.quick else 256 * MiB
    runs = ctx.runs or (1 if ctx.quick else 3)
    label = size_label(size)
    data = ctx.tmp / "data"
    data.mkdir()
    src = data / f"src-{label.replace(' ', '')}.bin"
    ctx.log(f"writing {label} of random data to {src}")
    make_file(src, size)
    warm_page_cache(src)
    payload = src.read_bytes()
    src_sha = hashlib.sha256(payload).hexdigest()
    compare = ctx.compare_agent
    if compare is not None:
        open_for_compare(ctx.tmp, data)
        src.chmod(0o644)

    with sdk_agent(ctx.tmp) as agent:
        from e2b import Sandbox

        sandbox = Sandbox.create()
        ours = sdk_steps(sandbox, "ours", src, payload, agent.ps)
        # clients per kind: ours (SDK) first, then what it is set beside
        clients: dict[str, dict[str, Step]] = {kind: {"ours": step} for kind, step in ours.items()}
        if curl_bin is not None:
            by_curl = curl_steps(curl_bin, agent.url, None, src, agent.ps)
            clients["upload"]["curl"] = by_curl["upload"]
            clients["download bytes"]["curl"] = by_curl["download"]
            clients["download stream"]["curl"] = by_curl["download"]
        else:
            ctx.log("SKIP curl rows: curl is not installed (benches/install_deps.sh)")
        if compare is not None:
            theirs = sdk_steps(sdk_sandbox(compare.url, compare.token), compare.name, src, payload, compare.ps)
            for kind, step in theirs.items():
                clients[kind]["compare"] = step

        listing(ctx, sandbox, data, compare)
        small_files(ctx, sandbox, data, compare)
        transfers = Transfers(data, src_sha, size)
        measured: dict[str, dict[str, Runs]] = {}
        curl_download: Runs | None = None
        for kind, steps in clients.items():
            ctx.log(f"{kind}: one untimed, then {runs} x {label} per client, alternating")
            got = {key: Runs() for key in steps}
            # curl's download is the same transfer for both download rows: measure it once
            if kind == "download stream" and curl_download is not None:
                got["curl"] = curl_download
                steps = {k: v for k, v in steps.items() if k != "curl"}
            for step in steps.values():
                transfers.once(step, Runs(), kind, check=False)
            keys = list(steps)
            for i in range(runs):
                for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                    transfers.once(steps[key], got[key], kind, check=i == 0)
                    r = got[key]
                    ctx.log(
                        f"  {key:<8} {r.mbps[-1]:7,.0f} MB/s   agent CPU {r.agent_cpu_s[-1]:5.2f} s   "
                        f"client CPU {r.client_cpu_s[-1]:5.2f} s"
                    )
            if kind == "download bytes" and "curl" in got:
                curl_download = got["curl"]
            measured[kind] = got

    calls = {
        "upload": "files.write(bytes) (multipart)",
        "download bytes": 'files.read(format="bytes")',
        "download stream": 'files.read(format="stream")',
    }
    curl_names = {
        "upload": "curl -F file=@… (multipart, same agent)",
        "download bytes": "curl GET /files (same agent)",
        "download stream": "curl GET /files (same agent)",
    }
    for kind, got in measured.items():
        mine = got["ours"]
        name = f"sdk-files: {kind.split()[0]} {label}, SDK {calls[kind]}"
        bases: list[tuple[Runs | None, str]] = []
        if "curl" in got:
            bases.append((got["curl"], curl_names[kind]))
        if "compare" in got and compare is not None:
            bases.append((got["compare"], f"{compare.name}, SDK {calls[kind]}"))
        if not bases:
            bases.append((None, "curl (not installed)"))
        for theirs_runs, base_name in bases:
            ctx.report(
                Result(
                    name=name,
                    unit="MB/s",
                    ours=median(mine.mbps),
                    baseline=median(theirs_runs.mbps) if theirs_runs else None,
                    baseline_name=base_name,
                    better="higher",
                    samples={"ours": mine.mbps, "baseline": theirs_runs.mbps if theirs_runs else []},
                    extra={
                        "runs": runs,
                        "bytes": size,
                        "client": "official SDK (e2b), sync, debug mode",
                        "agent_cpu_s": [round(x, 2) for x in mine.agent_cpu_s],
                        "sdk_client_cpu_s": [round(x, 2) for x in mine.client_cpu_s],
                        "agent_peak_rss_MiB": round(max(mine.agent_peak_rss) / MiB, 1),
                        "baseline_client_cpu_s": [round(x, 2) for x in theirs_runs.client_cpu_s]
                        if theirs_runs
                        else None,
                    },
                )
            )
