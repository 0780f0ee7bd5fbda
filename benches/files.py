"""Scenario ``files``: 1 GiB download and upload through the agent with curl, beside nginx on the same file.

* download: agent ``GET /files?path=…`` (identity) vs nginx ``GET /<file>`` with sendfile.
* upload raw: agent ``POST /files?path=…`` with an ``application/octet-stream`` body (``curl -T``).
* upload multipart: agent ``POST /files`` with ``-F file=@src;filename=<target>``, as the SDKs send it.
  Both uploads are set beside nginx's DAV ``PUT`` of the same file (nginx has no multipart upload).
* peak RSS of the agent's process tree during each kind of transfer, at two sizes, beside its idle RSS
  just before that transfer: flat rows mean the agent streams rather than buffers.

Throughput is curl's own average (``speed_download`` / ``speed_upload``, bytes over the whole
transfer) in MB/s (10^6 bytes/s), the median of the runs; runs alternate ours-first and
baseline-first. Every transfer's size is checked, and each upload's content once by SHA-256, outside
the timed part.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil

from .common import (
    Context,
    GiB,
    MiB,
    Result,
    RssSampler,
    ScenarioSkipped,
    cpu_meter,
    median,
    open_for_compare,
    which,
)
from .nginx import Nginx, nginx

CURL_TIMEOUT = 600
"""Seconds: a transfer that takes longer than this fails the scenario instead of hanging the run."""


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size % GiB == 0 else f"{size // MiB} MiB"


# -------------------------------------------------------------------------------------------------- curl


@dataclass
class CurlRun:
    status: int
    speed: float
    """bytes per second, curl's average over the whole transfer"""
    size: int
    curl_cpu: float


def curl(binary: str, args: list[str], upload: bool) -> CurlRun:
    fmt = "%{http_code} %{speed_upload} %{size_upload}" if upload else "%{http_code} %{speed_download} %{size_download}"
    cmd = [binary, "-s", "--noproxy", "*", "--max-time", str(CURL_TIMEOUT), "-o", "/dev/null", "-w", fmt, *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=CURL_TIMEOUT + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"curl exited {proc.returncode}: {proc.stderr.strip()} ({' '.join(cmd)})")
    status, speed, size = proc.stdout.split()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return CurlRun(int(status), float(speed), int(size), cpu)


# ------------------------------------------------------------------------------------------------ endpoints


@dataclass
class Endpoint:
    """A server that can be downloaded from / uploaded to with curl."""

    name: str
    proc: psutil.Process | None
    """for CPU accounting (None: not ours to watch)"""
    download: Callable[[Path], list[str]]
    """curl arguments to GET a file"""
    upload: Callable[[Path, Path], list[str]]
    """curl arguments to send ``src`` so that it lands at ``target``"""
    ok: tuple[int, ...]
    """HTTP statuses that mean success for an upload"""


def agent_endpoints(name: str, url: str, token: str | None, proc: psutil.Process | None) -> dict[str, Endpoint]:
    auth = ["-H", f"X-Access-Token: {token}"] if token else []

    def download(path: Path) -> list[str]:
        return [*auth, "-H", "Accept-Encoding: identity", f"{url}/files?path={quote(str(path))}"]

    def upload_raw(src: Path, target: Path) -> list[str]:
        return [
            *auth,
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            str(src),
            "-X",
            "POST",
            f"{url}/files?path={quote(str(target))}",
        ]

    def upload_multipart(src: Path, target: Path) -> list[str]:
        return [*auth, "-F", f"file=@{src};filename={target}", f"{url}/files"]

    return {
        "download": Endpoint(name, proc, download, upload_raw, (200,)),
        "upload raw": Endpoint(name, proc, download, upload_raw, (200,)),
        "upload multipart": Endpoint(name, proc, download, upload_multipart, (200,)),
    }


def nginx_endpoint(server: Nginx) -> Endpoint:
    return Endpoint(
        name=f"nginx {server.version}",
        proc=server.ps,
        download=lambda path: [server.url_for(path)],
        upload=lambda src, target: ["-T", str(src), server.url_for(target)],
        ok=(201, 204),
    )


# ------------------------------------------------------------------------------------------------ transfers


@dataclass
class Measured:
    mbps: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    curl_cpu: list[float] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)
    """(idle, peak) bytes per run of the server's process tree (when it is ours to watch)"""


@dataclass
class Files:
    curl: str
    data: Path
    sha: dict[Path, str] = field(default_factory=dict)

    def digest(self, path: Path) -> str:
        if path not in self.sha:
            with path.open("rb") as f:
                self.sha[path] = hashlib.file_digest(f, "sha256").hexdigest()
        return self.sha[path]

    def transfer(self, kind: str, ep: Endpoint, src: Path, into: Measured, *, check_hash: bool) -> None:
        size = src.stat().st_size
        upload = kind != "download"
        target = self.data / f"up-{kind.replace(' ', '-')}.bin"
        if upload:
            target.unlink(missing_ok=True)
            os.sync()  # no dirty pages from the previous run get written back during this one
        args = ep.upload(src, target) if upload else ep.download(src)
        sampler = RssSampler(ep.proc) if ep.proc is not None else None
        with cpu_meter(ep.proc) as cpu:
            if sampler is not None:
                with sampler:
                    run = curl(self.curl, args, upload)
            else:
                run = curl(self.curl, args, upload)
        expected = (200,) if not upload else ep.ok
        if run.status not in expected:
            raise RuntimeError(f"{ep.name} {kind}: HTTP {run.status} (expected {expected})")
        if not upload and run.size != size:
            raise RuntimeError(f"{ep.name} {kind}: received {run.size} bytes, expected {size}")
        if upload:
            got = target.stat().st_size if target.exists() else -1
            if got != size:
                raise RuntimeError(f"{ep.name} {kind}: {target} has {got} bytes, expected {size}")
            if check_hash:
                with target.open("rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != self.digest(src):
                        raise RuntimeError(f"{ep.name} {kind}: {target} differs from {src}")
            target.unlink()
        into.mbps.append(run.speed / 1e6)
        into.server_cpu.append(cpu[0])
        into.curl_cpu.append(run.curl_cpu)
        if sampler is not None:
            into.rss.append((sampler.idle, sampler.peak))


def make_file(path: Path, size: int) -> None:
    """Random (incompressible) bytes, written in 8 MiB chunks."""
    chunk = 8 * MiB
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


def peak_mib(m: Measured) -> float | None:
    return round(max(peak for _, peak in m.rss) / MiB, 1) if m.rss else None


def per_gib(seconds: list[float], size: int) -> float | None:
    m = median(seconds)
    return None if m is None else round(m * GiB / size, 3)


# ----------------------------------------------------------------------------------------------- scenario


def run(ctx: Context) -> None:
    curl_bin = which("curl")
    if curl_bin is None:
        raise ScenarioSkipped("curl is not installed: `sudo apt-get install curl` (or run benches/install_deps.sh)")
    size = 256 * MiB if ctx.quick else GiB
    small = 64 * MiB if ctx.quick else 256 * MiB
    runs = ctx.runs or (1 if ctx.quick else 3)
    data = ctx.tmp / "data"
    data.mkdir()
    big = data / f"src-{size_label(size).replace(' ', '')}.bin"
    little = data / f"src-{size_label(small).replace(' ', '')}.bin"
    ctx.log(f"writing {size_label(size)} and {size_label(small)} of random data under {data}")
    make_file(big, size)
    make_file(little, small)
    warm_page_cache(big)
    warm_page_cache(little)
    files = Files(curl_bin, data)
    agent = ctx.agent
    ours_eps = agent_endpoints(agent.name, agent.url, agent.token, agent.ps)
    compare_eps = (
        agent_endpoints(ctx.compare_agent.name, ctx.compare_agent.url, ctx.compare_agent.token, ctx.compare_agent.ps)
        if ctx.compare_agent
        else None
    )
    if ctx.compare_agent is not None:
        open_for_compare(ctx.tmp, data)

    with nginx(root=data, work=ctx.tmp / "nginx") as server:
        nginx_ep = nginx_endpoint(server) if server else None
        for kind in ("download", "upload raw", "upload multipart"):
            ours = ours_eps[kind]
            baselines = [ep for ep in (nginx_ep, compare_eps[kind] if compare_eps else None) if ep is not None]
            ctx.log(f"{kind}: {size_label(small)} once for RSS, one untimed warm-up, then {runs} x {size_label(size)}")

            # the smaller size first: it is also the agent's warm-up for this kind of transfer
            small_run = Measured()
            files.transfer(kind, ours, little, small_run, check_hash=False)

            # one untimed full-size transfer per server: fresh page-cache pages and disk extents make a
            # first upload slower, and that should not fall on whichever server happens to go first
            for ep in [ours, *baselines]:
                files.transfer(kind, ep, big, Measured(), check_hash=False)

            measured = {ep.name: Measured() for ep in [ours, *baselines]}
            for i in range(runs):
                order = [ours, *baselines] if i % 2 == 0 else [*baselines, ours]
                for ep in order:
                    files.transfer(kind, ep, big, measured[ep.name], check_hash=i == 0)
                    m = measured[ep.name]
                    server_cpu = f"{m.server_cpu[-1]:5.2f} s" if ep.proc is not None else "    n/a"
                    ctx.log(
                        f"  {ep.name:<16} {m.mbps[-1]:6.0f} MB/s   server CPU {server_cpu}"
                        f"   curl CPU {m.curl_cpu[-1]:5.2f} s"
                    )

            label = size_label(size)
            mine = measured[ours.name]
            rows: list[Endpoint | None] = [*baselines] if baselines else [None]
            for base in rows:
                theirs = measured[base.name] if base else Measured()
                base_name = (
                    "nginx (not installed)"
                    if base is None
                    else f"{base.name} {'sendfile' if kind == 'download' else 'PUT (dav)'}"
                    if base is nginx_ep
                    else base.name
                )
                ctx.report(
                    Result(
                        name=f"files: {kind} {label}",
                        unit="MB/s",
                        ours=median(mine.mbps),
                        baseline=median(theirs.mbps),
                        baseline_name=base_name,
                        better="higher",
                        samples={"ours": mine.mbps, "baseline": theirs.mbps},
                        extra={
                            "runs": runs,
                            "bytes": size,
                            "client": "curl",
                            "ours_cpu_s_per_GiB": per_gib(mine.server_cpu, size),
                            "baseline_cpu_s_per_GiB": per_gib(theirs.server_cpu, size) if base and base.proc else None,
                            "curl_cpu_s_per_GiB": per_gib(mine.curl_cpu, size),
                            "baseline_peak_rss_MiB": peak_mib(theirs),
                        },
                    )
                )
            for n, m in ((small, small_run), (size, mine)):
                idle, peak = max(m.rss, key=lambda pair: pair[1])
                ctx.report(
                    Result(
                        name=f"files: {kind} peak RSS, {size_label(n)}",
                        unit="MiB",
                        ours=peak / MiB,
                        baseline=idle / MiB,
                        baseline_name="agent idle RSS just before",
                        better="lower",
                        extra={"process_tree": True, "sample_interval_s": 0.02},
                    )
                )
