"""Scenario ``commands``: process round trips and output throughput, through pipes and a PTY.

* ``commands.run("true")`` through the official sync SDK, beside the floor: ``/bin/bash -l -c true``
  spawned directly with ``subprocess.run``, with the environment the agent gives its children (read
  from the agent itself) and the same working directory. The agent runs ``/bin/bash -l -c <cmd>`` as
  envd does. Both sides get ``HOME`` pointed at an empty directory (the SDK through ``envs``), so the
  login shell reads the system's profile only: a developer's own ``~/.profile`` (on the CI machine,
  pyenv's and cargo's set-up, 120-280 ms a shell) would otherwise be most of the floor and its
  spread would hide the few milliseconds this row is about.
* output throughput of ``head -c <size> /dev/zero``:
  - with a binary-proto Connect client written here on a plain socket (``application/connect+proto``,
    one ``StartRequest`` envelope, the response envelopes parsed and the stdout/pty bytes counted;
    see :class:`ConnectClient` for why not httpx);
  - through the official SDK (Connect JSON, bytes as base64): ``commands.run(cmd, on_stdout=...)``
    for the pipe; for the PTY ``sandbox.pty.create()`` (an interactive ``bash -i -l``), then, once its
    prompt is out, ``pty.send_stdin("head -c <size> /dev/zero; exit\\n")`` and the output read through
    the handle until the end event: that is how the SDK's users drive a PTY;
  - baselines in the same run: ``bash -c 'head -c <size> /dev/zero > /dev/null'`` (no transport at
    all), the same command's stdout read directly from a pipe, and its output read directly from
    the master side of a fresh PTY.
* the agent's RSS idle, and its peak during the binary client's pipe runs.

The binary client talks to the framework's agent (with its access token); the SDK in debug mode
sends no token, so SDK rows use a second agent started without one (see ``watch.SdkAgent``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    percentile,
    samples_row,
    sdk_sandbox,
    tree_rss,
)
from .files import size_label
from .watch import sdk_agent

STREAM_TIMEOUT_S = 600.0
TARGET_PIPE_MBPS = 2000.0
TARGET_OVER_FLOOR_MS = 1.0
PTY_COLS, PTY_ROWS = 80, 24
PTY_RUNS = 5
"""Timed PTY runs per client, in quick and full runs alike (unless ``--runs``). A PTY moves ~4 KiB
per turn of a wake-up cycle (the writer, the tty's flush worker, the reader), so on 2 shared cores
a single 64 MiB run is mostly the scheduler's luck: with one run each the row read 0.68x and 1.10x
in two CI runs started a minute apart, and in one A/B (16 rounds, load 41 to 62) one round's ratio
went from 0.24x to 4.9x. Five rounds, the order rotating, give medians and the median of the
rounds' ratios (``extra.paired_ratio_median``); see docs/benchmarks.md, `pty3`."""
PTY_WARM_UP = 16 << 20
"""One untimed PTY run of this size per client before the timed ones, as the pipe runs get one: no
timed run is a client's first PTY (the SDK's first ``pty.create``, the agent's first PTY stream)."""
READ_BYTES = 1 << 20
"""Bytes per ``read`` for the direct baselines (a pipe gives up to 64 KiB per read, a PTY ~4 KiB)."""
RECV_BYTES = READ_BYTES
"""The binary client's receive buffer: as the direct baseline's read size, so neither side is
handicapped by many small reads."""


# ------------------------------------------------------------------------------------ binary Connect client


@dataclass
class Run:
    """One throughput run."""

    nbytes: int
    seconds: float
    agent_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    """CPU of the bench process (the client)"""
    frames: int = 0
    peak_rss: int = 0
    idle_rss: int = 0

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


@dataclass
class Started:
    stdout: int = 0
    pty: int = 0
    frames: int = 0
    exit_code: int | None = None
    data: bytearray = field(default_factory=bytearray)
    """stdout kept when asked (small outputs only)"""


class ConnectClient:
    """A minimal HTTP/1.1 client for one Connect server-stream call at a time, on a kept-alive socket.

    Written for this bench instead of httpx: httpx (h11 underneath) parses the response in pure
    Python, 64 KiB per read, and on this machine topped out near 450 MB/s with its process on a
    whole core (client CPU ≈ wall time), while the agent used half a core: the row measured the
    client. Here the body is read with ``recv_into`` straight into the buffer of the Connect
    envelope being read (:class:`Body`), so each byte is copied once by the kernel, as the direct
    baseline's ``os.read``, and once more when the envelope is parsed as a ``StartResponse``. Handles
    ``Transfer-Encoding: chunked`` (uvicorn, Go's net/http), ``Content-Length`` and close-delimited
    bodies, so it also drives ``--compare-agent``."""

    def __init__(self, timeout: float = STREAM_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._socks: dict[tuple[str, int], socket.socket] = {}
        # Kept for the client's next calls, not made per call: a fresh ``bytearray`` is zeroed, and
        # the 1 MiB receive buffer made per ``Start`` cost this client ~0.1 ms of every round trip
        # (the `Start /bin/true` row measured it beside ``subprocess.run``, which makes none).
        self._buffer = memoryview(bytearray(0))
        self._scratch = bytearray(Body.SCRATCH)

    def buffer(self, size: int) -> memoryview:
        """A buffer of at least ``size`` bytes, the same one call after call (one call at a time:
        nothing may hold a view of it past its call)."""
        if len(self._buffer) < size:
            self._buffer = memoryview(bytearray(size))
        return self._buffer

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def __enter__(self) -> ConnectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self, host: str, port: int) -> socket.socket:
        sock = self._socks.get((host, port))
        if sock is None:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[(host, port)] = sock
        return sock

    @contextlib.contextmanager
    def post_stream(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> Iterator[Body]:
        """POSTs ``body`` and gives the response body to read (status 200 only); the connection is
        kept for the next call only when the body was read to its end."""
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        sock = self._socket(host, port)
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        response: Body | None = None
        try:
            response = Body(sock, self._scratch)
            yield response
        finally:
            if response is None or not response.done or response.close_after:
                sock.close()
                self._socks.pop((host, port), None)


class Body:
    """The body of one HTTP/1.1 response, read into the caller's buffers. Bytes of the body go from
    the socket straight into the buffer given to :meth:`readinto` (``recv_into``); only the head, the
    chunk-size lines and what arrives with them pass through a small scratch buffer."""

    SCRATCH = 64 << 10
    FRAMING_READ = 256
    """Bytes asked for when looking for a chunk-size line: little, so that few body bytes are read
    into the scratch buffer (and copied out of it) rather than straight into the caller's."""

    def __init__(self, sock: socket.socket, scratch: bytearray | None = None) -> None:
        self.sock = sock
        self.buf = bytearray(self.SCRATCH) if scratch is None else scratch  # the client's own, reused
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # unread scratch bytes: buf[start:end]
        while (eoh := self.buf.find(b"\r\n\r\n", self.start, self.end)) < 0:
            self._fill(self.SCRATCH)
        lines = bytes(self.buf[:eoh]).decode("latin-1").split("\r\n")
        self.start = eoh + 4
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.close_after = fields.get("connection", "").lower() == "close"
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {bytes(self.buf[self.start : self.end])[:300]!r}")
        self.chunked = fields.get("transfer-encoding", "").lower() == "chunked"
        length = fields.get("content-length")
        self.left = 0 if self.chunked else int(length) if length is not None else -1  # -1: until closed
        if length is None and not self.chunked:
            self.close_after = True
        self.done = self.left == 0 and not self.chunked
        self._first_chunk = True

    def _fill(self, want: int) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # move the unread tail to the front
            self.buf[: self.end - self.start] = self.buf[self.start : self.end]
            self.start, self.end = 0, self.end - self.start
        n = self.sock.recv_into(self.view[self.end : min(len(self.buf), self.end + want)])
        if n == 0:
            raise ConnectionError("the server closed the connection mid-response")
        self.end += n

    def _line(self) -> bytes:
        while (eol := self.buf.find(b"\r\n", self.start, self.end)) < 0:
            self._fill(self.FRAMING_READ)
        line = bytes(self.buf[self.start : eol])
        self.start = eol + 2
        return line

    def readinto(self, into: memoryview) -> int:
        """Reads up to ``len(into)`` bytes of the body into ``into``; 0 at its end."""
        if self.done or not len(into):
            return 0
        if self.chunked and self.left == 0:
            if not self._first_chunk and self._line() != b"":  # the CRLF after the last chunk's data
                raise RuntimeError("a chunk does not end with CRLF")
            self._first_chunk = False
            self.left = int(self._line().split(b";")[0], 16)
            if self.left == 0:
                while self._line():  # trailers, if any, up to the empty line
                    pass
                self.done = True
                return 0
        want = len(into) if self.left < 0 else min(len(into), self.left)
        if self.start < self.end:  # bytes that came with the framing: copy them out
            n = min(want, self.end - self.start)
            into[:n] = self.view[self.start : self.start + n]
            self.start += n
        else:
            n = self.sock.recv_into(into[:want])
            if n == 0:
                if self.left < 0:
                    self.done = True
                    return 0
                raise ConnectionError("the server closed the connection mid-response")
        if self.left > 0:
            self.left -= n
            self.done = self.left == 0 and not self.chunked
        return n

    def read_exact(self, into: memoryview) -> bool:
        """Fills ``into``; False if the body ended before its first byte, an error if inside it."""
        got = 0
        while got < len(into):
            n = self.readinto(into[got:])
            if n == 0:
                if got == 0:
                    return False
                raise RuntimeError(f"the body ended {len(into) - got} bytes short of a Connect envelope")
            got += n
        return True

    def drain(self) -> None:
        """Reads the rest of the body (the chunked terminator), so the connection can be reused."""
        scratch = memoryview(bytearray(4096))
        while self.readinto(scratch):
            pass


def connect_start(
    client: ConnectClient, url: str, token: str | None, args: list[str], pty: bool = False, keep: bool = False
) -> Started:
    """``process.Process/Start`` of ``/bin/bash <args>`` (or ``args[0]`` when it is absolute and not
    bash) in binary proto; counts the output bytes until the end-stream frame (flag 0x02). Each
    envelope is read into one reused buffer and parsed there as a ``StartResponse``."""
    from sandboxd._proto.process import process_pb2 as pb

    cmd, rest = ("/bin/bash", args) if not args[0].startswith("/") else (args[0], args[1:])
    request = pb.StartRequest(process=pb.ProcessConfig(cmd=cmd, args=rest), stdin=False)
    if pty:
        request.pty.size.cols = PTY_COLS
        request.pty.size.rows = PTY_ROWS
    body = request.SerializeToString()
    headers = {"Content-Type": "application/connect+proto"}
    if token:
        headers["X-Access-Token"] = token
    got = Started()
    header = memoryview(bytearray(5))
    payload = client.buffer(RECV_BYTES + 64)
    with client.post_stream(url, "/process.Process/Start", struct.pack(">BI", 0, len(body)) + body, headers) as r:
        while r.read_exact(header):
            flags, length = struct.unpack(">BI", header)
            if length > len(payload):
                payload = client.buffer(length)
            message = payload[:length]
            r.read_exact(message)
            got.frames += 1
            if flags & 0x02:
                end = bytes(message)
                if end not in (b"{}", b""):
                    raise RuntimeError(f"Start ended with {end[:300]!r}")
                r.drain()
                return got
            event = pb.StartResponse.FromString(message).event  # type: ignore[arg-type]  # any buffer
            if event.HasField("data"):
                got.stdout += len(event.data.stdout)
                got.pty += len(event.data.pty)
                if keep:
                    got.data += event.data.stdout
            elif event.HasField("end"):
                got.exit_code = event.end.exit_code
    raise RuntimeError("Start: the stream ended without an end-stream frame")


def binary_output(
    client: ConnectClient, url: str, token: str | None, agent: psutil.Process | None, size: int, pty: bool
) -> Run:
    sampler = RssSampler(agent)
    cpu0 = time.process_time()
    with cpu_meter(agent) as cpu, sampler:
        t0 = time.perf_counter()
        got = connect_start(client, url, token, ["-c", f"head -c {size} /dev/zero"], pty=pty)
        seconds = time.perf_counter() - t0
    n = got.pty if pty else got.stdout
    if n != size or got.exit_code != 0:
        raise RuntimeError(f"binary client: {n} bytes, exit {got.exit_code} (expected {size}, 0)")
    return Run(n, seconds, cpu[0], time.process_time() - cpu0, got.frames, sampler.peak, sampler.idle)


# -------------------------------------------------------------------------------------------------- the SDK


def sdk_pipe_output(sandbox: Any, agent: psutil.Process | None, size: int) -> Run:
    count = [0]

    def on_stdout(text: str) -> None:
        count[0] += len(text)  # /dev/zero's NULs decode one character per byte

    sampler = RssSampler(agent)
    cpu0 = time.process_time()
    with cpu_meter(agent) as cpu, sampler:
        t0 = time.perf_counter()
        sandbox.commands.run(f"head -c {size} /dev/zero", on_stdout=on_stdout, retain_output=False, timeout=0)
        seconds = time.perf_counter() - t0
    if count[0] != size:
        raise RuntimeError(f"SDK pipe: {count[0]} characters, expected {size}")
    return Run(size, seconds, cpu[0], time.process_time() - cpu0, 0, sampler.peak, sampler.idle)


def sdk_pty_output(sandbox: Any, agent: psutil.Process | None, size: int) -> Run:
    """``pty.create`` (``bash -i -l``), wait for its first output (the prompt, after the login
    profile), then time ``send_stdin("head -c <size> /dev/zero; exit")`` to the end event."""
    from e2b import PtySize

    handle = sandbox.pty.create(PtySize(rows=PTY_ROWS, cols=PTY_COLS), timeout=0)
    events = iter(handle)
    for _, _, first in events:
        if first:
            break
    sampler = RssSampler(agent)
    cpu0 = time.process_time()
    n = 0
    with cpu_meter(agent) as cpu, sampler:
        t0 = time.perf_counter()
        sandbox.pty.send_stdin(handle.pid, f"head -c {size} /dev/zero; exit\n".encode())
        for _, _, chunk in events:
            if chunk is not None:
                n += len(chunk)
        seconds = time.perf_counter() - t0
    if n < size:
        raise RuntimeError(f"SDK PTY: {n} bytes, expected at least {size}")
    return Run(size, seconds, cpu[0], time.process_time() - cpu0, 0, sampler.peak, sampler.idle)


# ---------------------------------------------------------------------------------------------- baselines


def devnull_output(size: int, env: dict[str, str], cwd: Path) -> Run:
    t0 = time.perf_counter()
    subprocess.run(["/bin/bash", "-c", f"head -c {size} /dev/zero > /dev/null"], env=env, cwd=cwd, check=True)
    return Run(size, time.perf_counter() - t0)


def direct_pipe_output(size: int, env: dict[str, str], cwd: Path) -> Run:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["/bin/bash", "-c", f"head -c {size} /dev/zero"], stdout=subprocess.PIPE, env=env, cwd=cwd, bufsize=0
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    n = 0
    while chunk := os.read(fd, READ_BYTES):
        n += len(chunk)
    proc.wait()
    seconds = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"direct pipe: {n} bytes, expected {size}")
    return Run(n, seconds, 0.0, time.process_time() - cpu0)


def direct_pty_output(size: int, env: dict[str, str], cwd: Path) -> Run:
    """The same command with a fresh PTY's slave as stdout and stderr (default termios, as the agent
    leaves it), read from the master until EIO. An :class:`RssSampler` runs around it as around the
    agent's runs (here on this process's own tree): its thread takes this process's GIL every 20 ms
    and scans /proc every 0.25 s, a cost the binary client's runs pay, so the direct read pays it too."""
    master, slave = os.openpty()
    cpu0 = time.process_time()
    n = 0
    try:
        with RssSampler(psutil.Process()):
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                ["/bin/bash", "-c", f"head -c {size} /dev/zero"],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
            os.close(slave)
            slave = -1
            while True:
                try:
                    chunk = os.read(master, READ_BYTES)
                except OSError:  # EIO: the slave side is closed
                    break
                if not chunk:
                    break
                n += len(chunk)
            proc.wait()
            seconds = time.perf_counter() - t0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    if n != size:
        raise RuntimeError(f"direct PTY: {n} bytes, expected {size}")
    return Run(n, seconds, 0.0, time.process_time() - cpu0)


# ----------------------------------------------------------------------------------------------- scenario


def agent_environment(client: ConnectClient, url: str, token: str | None) -> dict[str, str]:
    """The environment the agent gives a child, read by running ``/usr/bin/env -0`` through it."""
    got = connect_start(client, url, token, ["/usr/bin/env", "-0"], keep=True)
    pairs = (item.split("=", 1) for item in got.data.decode().split("\0") if "=" in item)
    return dict(pairs)


def login_home(ctx: Context) -> Path:
    """An empty directory for ``HOME`` in the ``run("true")`` rows (see the module's docstring)."""
    home = ctx.tmp / "login-home"
    home.mkdir(exist_ok=True)
    return home


def round_trips(ctx: Context, sandbox: Any, env: dict[str, str], cwd: Path, n: int) -> None:
    ctx.log(f'run("true"): {n} SDK round trips alternating with {n} `bash -l -c true` spawned directly')
    floor_cmd = ["/bin/bash", "-l", "-c", "true"]
    home = str(login_home(ctx))
    env = {**env, "HOME": home}

    def ours() -> float:
        t0 = time.perf_counter()
        sandbox.commands.run("true", envs={"HOME": home})
        return (time.perf_counter() - t0) * 1e3

    def floor() -> float:
        t0 = time.perf_counter()
        subprocess.run(floor_cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=True)
        return (time.perf_counter() - t0) * 1e3

    a, b = paired(ours, floor, n)
    p50, base50 = percentile(a, 50) or 0.0, percentile(b, 50) or 0.0
    over = p50 - base50
    ctx.log(
        f"  SDK p50 {p50:.2f} ms p99 {percentile(a, 99) or 0:.2f} ms; floor p50 {base50:.2f} ms p99 "
        f"{percentile(b, 99) or 0:.2f} ms; difference {over:+.2f} ms"
    )
    ctx.report(
        Result(
            name='commands: run("true") round trip, sync SDK',
            unit="ms (p50)",
            ours=p50,
            baseline=base50,
            baseline_name="bash -l -c true, subprocess.run, agent's env, empty HOME",
            better="lower",
            p50=p50,
            p99=percentile(a, 99),
            samples={"ours": a, "baseline": b},
            extra={
                "n": n,
                "baseline_p99": percentile(b, 99),
                "difference_p50_ms": round(over, 3),
                "target": f"p50 <= floor + {TARGET_OVER_FLOOR_MS:g} ms",
                "target_met": over <= TARGET_OVER_FLOOR_MS,
                "env": sorted(env),
            },
        )
    )
    ctx.log(
        f"  target (issue): p50 ≤ floor + {TARGET_OVER_FLOOR_MS:g} ms: "
        f"{'met' if over <= TARGET_OVER_FLOOR_MS else 'NOT met'} ({over:+.2f} ms)"
    )


def spawn_round_trips(
    ctx: Context, client: ConnectClient, url: str, token: str | None, env: dict[str, str], n: int
) -> None:
    """``/bin/true`` without bash: the agent's own cost per process, which the login profile's
    jitter (tens of ms) hides in the ``run("true")`` row."""

    def ours() -> float:
        t0 = time.perf_counter()
        got = connect_start(client, url, token, ["/bin/true"])
        if got.exit_code != 0:
            raise RuntimeError(f"/bin/true through the agent exited {got.exit_code}")
        return (time.perf_counter() - t0) * 1e3

    def floor() -> float:
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)
        return (time.perf_counter() - t0) * 1e3

    a, b = paired(ours, floor, n)
    p50, base50 = percentile(a, 50) or 0.0, percentile(b, 50) or 0.0
    ctx.log(f"  /bin/true: binary client p50 {p50:.2f} ms; subprocess.run p50 {base50:.2f} ms")
    ctx.report(
        Result(
            name="commands: Start /bin/true round trip, binary Connect client",
            unit="ms (p50)",
            ours=p50,
            baseline=base50,
            baseline_name="subprocess.run(['/bin/true']), pipes captured",
            better="lower",
            p50=p50,
            p99=percentile(a, 99),
            samples={"ours": a, "baseline": b},
            extra={"n": n, "baseline_p99": percentile(b, 99), "difference_p50_ms": round(p50 - base50, 3)},
        )
    )


def paired(ours: Any, floor: Any, n: int) -> tuple[list[float], list[float]]:
    """``n`` samples of each, alternating which goes first, after three untimed of each."""
    for _ in range(3):
        ours()
        floor()
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            a.append(ours())
            b.append(floor())
        else:
            b.append(floor())
            a.append(ours())
    return a, b


def throughput_row(name: str, ours: list[Run], base: list[Run], base_name: str, extra: dict[str, Any]) -> Result:
    # Runs of the same round (``alternate``) ran back to back, under the same load: the median of
    # their ratios is less swayed by a round that a neighbour slowed than the ratio of the medians.
    paired = [a.mbps / b.mbps for a, b in zip(ours, base, strict=True)] if len(ours) == len(base) else []
    return Result(
        name=name,
        unit="MB/s",
        ours=median([r.mbps for r in ours]),
        baseline=median([r.mbps for r in base]),
        baseline_name=base_name,
        better="higher",
        samples={"ours": [r.mbps for r in ours], "baseline": [r.mbps for r in base]},
        extra={
            "runs": len(ours),
            "bytes": ours[0].nbytes,
            "agent_cpu_s": [round(r.agent_cpu_s, 2) for r in ours],
            "client_cpu_s": [round(r.client_cpu_s, 2) for r in ours],
            "seconds": [round(r.seconds, 2) for r in ours],
            "agent_peak_rss_MiB": round(max(r.peak_rss for r in ours) / MiB, 1) if ours[0].peak_rss else None,
            "paired_ratio_median": round(median(paired) or 0.0, 3) if paired else None,
            **extra,
        },
    )


def compare_round_trips(ctx: Context, ours_sdk: Any, theirs_sdk: Any, client: ConnectClient, n: int) -> None:
    """``--compare-agent``: the same round trips against the other agent, paired with ours."""
    compare = ctx.compare_agent
    assert compare is not None
    agent = ctx.agent

    def timed(f: Any) -> Any:
        def sample() -> float:
            t0 = time.perf_counter()
            f()
            return (time.perf_counter() - t0) * 1e3

        return sample

    ctx.log(f'run("true") and Start /bin/true: {n} round trips each, ours alternating with {compare.name}')
    envs = {"HOME": str(login_home(ctx))}
    rows = [
        (
            'commands: run("true") round trip, sync SDK',
            timed(lambda: ours_sdk.commands.run("true", envs=envs)),
            timed(lambda: theirs_sdk.commands.run("true", envs=envs)),
            f"{compare.name}, sync SDK",
        ),
        (
            "commands: Start /bin/true round trip, binary Connect client",
            timed(lambda: connect_start(client, agent.url, agent.token, ["/bin/true"])),
            timed(lambda: connect_start(client, compare.url, compare.token, ["/bin/true"])),
            f"{compare.name}, binary Connect client",
        ),
    ]
    for name, ours, theirs, base_name in rows:
        a, b = paired(ours, theirs, n)
        ctx.log(f"  {name}: ours p50 {percentile(a, 50) or 0:.2f} ms; theirs p50 {percentile(b, 50) or 0:.2f} ms")
        ctx.report(samples_row(name, "ms (p50)", a, b, base_name, extra={"n": n}))


IDLE_SETTLE_S = 1.5
"""How long both agents are left without a request before their idle RSS is read: an agent that is
idle has had a quiet moment (ours gives the allocator's free memory back 1 s after its last request,
`agent/idle.py`; Go's runtime returns memory on its own schedule, so envd gets the same wait)."""


def agent_rss(proc: psutil.Process | None) -> float | None:
    """RSS of an agent's process tree in MiB (None when we cannot see its process)."""
    return None if proc is None else tree_rss(proc) / MiB


def run(ctx: Context) -> None:
    try:
        import e2b  # noqa: F401
    except ImportError:
        raise ScenarioSkipped("the official SDK is not installed (pip install e2b)") from None
    n = 50 if ctx.quick else 500
    pipe_size = 256 * MiB if ctx.quick else GiB
    pty_size = 64 * MiB if ctx.quick else 256 * MiB
    runs = ctx.runs or (1 if ctx.quick else 3)
    agent = ctx.agent
    compare = ctx.compare_agent
    cwd = ctx.tmp
    with ConnectClient() as client, sdk_agent(ctx.tmp) as sdk:
        from e2b import Sandbox

        env = agent_environment(client, agent.url, agent.token)
        sandbox = Sandbox.create()
        theirs = sdk_sandbox(compare.url, compare.token) if compare is not None else None
        round_trips(ctx, sandbox, env, cwd, n)
        spawn_round_trips(ctx, client, agent.url, agent.token, env, n)
        if theirs is not None:
            compare_round_trips(ctx, sandbox, theirs, client, n)

        # ----------------------------------------------------------------------- idle RSS
        time.sleep(IDLE_SETTLE_S)  # idle means quiet for a moment, for both agents alike
        # `make install` compiles the .opt-2.pyc files a standalone agent re-runs itself under -OO with
        # (sandboxd/agent/optimized.py): without them it holds every docstring, ~0.65 MiB more.
        optimized = agent.ps is not None and "-OO" in agent.ps.cmdline()
        if not optimized:
            ctx.log("  the agent runs without -OO (no .opt-2.pyc files: `make install` writes them): its RSS is higher")
        idle = agent_rss(agent.ps) or 0.0
        ctx.report(
            Result(
                name="agent RSS idle",
                unit="MiB",
                ours=idle,
                baseline=agent_rss(compare.ps) if compare is not None else None,
                baseline_name=f"{compare.name} idle RSS" if compare is not None else "-",
                better="lower",
                extra={
                    "process": "the framework's agent (process tree), after the round trips and a quiet "
                    f"{IDLE_SETTLE_S:g} s, before any output run",
                    "sdk_agent_MiB": agent_rss(sdk.ps),
                    "under_OO": optimized,
                },
            )
        )

        # ------------------------------------------------------------------------------ pipe
        label = size_label(pipe_size)
        ctx.log(f"pipe output: {runs} x {label} per client, alternating, after one untimed {size_label(64 * MiB)}")
        binary_output(client, agent.url, agent.token, agent.ps, 64 * MiB, pty=False)
        sdk_pipe_output(sandbox, sdk.ps, 64 * MiB)
        steps = {
            "binary": lambda: binary_output(client, agent.url, agent.token, agent.ps, pipe_size, pty=False),
            "sdk": lambda: sdk_pipe_output(sandbox, sdk.ps, pipe_size),
            "devnull": lambda: devnull_output(pipe_size, env, cwd),
            "direct": lambda: direct_pipe_output(pipe_size, env, cwd),
        }
        if compare is not None and theirs is not None:
            cps = compare.ps
            binary_output(client, compare.url, compare.token, cps, 64 * MiB, pty=False)
            sdk_pipe_output(theirs, cps, 64 * MiB)
            steps["cmp_binary"] = lambda: binary_output(client, compare.url, compare.token, cps, pipe_size, pty=False)
            steps["cmp_sdk"] = lambda: sdk_pipe_output(theirs, cps, pipe_size)
        pipe: dict[str, list[Run]] = {key: [] for key in steps}
        alternate(ctx, steps, pipe, runs)
        base_direct = "bash -c 'head … ' read from a pipe directly (Python, os.read 1 MiB)"
        base_null = "bash -c 'head … > /dev/null' (no transport)"
        binary_name = f"commands: pipe output {label}, binary Connect client (proto, raw socket)"
        sdk_name = f"commands: pipe output {label}, official SDK commands.run (JSON+base64)"
        for base_key, base_name in (("devnull", base_null), ("direct", base_direct)):
            ctx.report(
                throughput_row(
                    binary_name,
                    pipe["binary"],
                    pipe[base_key],
                    base_name,
                    {"frames": [r.frames for r in pipe["binary"]]},
                )
            )
        if compare is not None:
            ctx.report(
                throughput_row(
                    binary_name, pipe["binary"], pipe["cmp_binary"], f"{compare.name}, binary Connect client", {}
                )
            )
        ctx.report(
            throughput_row(
                sdk_name,
                pipe["sdk"],
                pipe["direct"],
                base_direct,
                {"note": "includes bash -l's login profile once (see the round-trip floor)"},
            )
        )
        if compare is not None:
            ctx.report(throughput_row(sdk_name, pipe["sdk"], pipe["cmp_sdk"], f"{compare.name}, official SDK", {}))
        binary_mbps = median([r.mbps for r in pipe["binary"]]) or 0.0
        ctx.log(
            f"  target (issue): pipe output ≥ {TARGET_PIPE_MBPS:,.0f} MB/s with the binary client: "
            f"{'met' if binary_mbps >= TARGET_PIPE_MBPS else 'NOT met'} ({binary_mbps:,.0f} MB/s)"
        )
        peak = max(pipe["binary"], key=lambda r: r.peak_rss)
        theirs_peak = max(pipe["cmp_binary"], key=lambda r: r.peak_rss) if "cmp_binary" in pipe else None
        ctx.report(
            Result(
                name=f"agent RSS under load: peak during {label} pipe output (binary client)",
                unit="MiB",
                ours=peak.peak_rss / MiB,
                baseline=peak.idle_rss / MiB,
                baseline_name="agent RSS just before",
                better="lower",
                extra={
                    "process_tree": True,
                    "sample_interval_s": 0.02,
                    "sdk_agent_peak_rss_MiB": round(max(r.peak_rss for r in pipe["sdk"]) / MiB, 1),
                    "see_also": "files: <kind> peak RSS rows (transfers); sdk-files: agent_peak_rss_MiB",
                },
            )
        )
        if compare is not None and theirs_peak is not None and compare.ps is not None:
            ctx.report(
                Result(
                    name=f"agent RSS under load: peak during {label} pipe output (binary client)",
                    unit="MiB",
                    ours=peak.peak_rss / MiB,
                    baseline=theirs_peak.peak_rss / MiB,
                    baseline_name=f"{compare.name}, peak during the same runs",
                    better="lower",
                    extra={"baseline_idle_MiB": round(theirs_peak.idle_rss / MiB, 1)},
                )
            )

        # ------------------------------------------------------------------------------- PTY
        label = size_label(pty_size)
        pty_runs = ctx.runs or PTY_RUNS
        ctx.log(
            f"PTY output: {pty_runs} x {label} per client, alternating, "
            f"after one untimed {size_label(PTY_WARM_UP)} each"
        )
        binary_output(client, agent.url, agent.token, agent.ps, PTY_WARM_UP, pty=True)
        sdk_pty_output(sandbox, sdk.ps, PTY_WARM_UP)
        direct_pty_output(PTY_WARM_UP, env, cwd)
        if theirs is not None:
            sdk_pty_output(theirs, compare.ps if compare is not None else None, PTY_WARM_UP)
        tty_steps = {
            "binary": lambda: binary_output(client, agent.url, agent.token, agent.ps, pty_size, pty=True),
            "sdk": lambda: sdk_pty_output(sandbox, sdk.ps, pty_size),
            "direct": lambda: direct_pty_output(pty_size, env, cwd),
        }
        if compare is not None and theirs is not None:
            tty_steps["cmp_sdk"] = lambda: sdk_pty_output(theirs, compare.ps, pty_size)
        tty: dict[str, list[Run]] = {key: [] for key in tty_steps}
        alternate(ctx, tty_steps, tty, pty_runs)
        base_pty = "the same command's PTY master read directly (Python, os.read)"
        ctx.report(
            throughput_row(
                f"commands: PTY output {label}, binary Connect client (proto, raw socket)",
                tty["binary"],
                tty["direct"],
                base_pty,
                {"frames": [r.frames for r in tty["binary"]]},
            )
        )
        pty_name = f"commands: PTY output {label}, official SDK pty.create + send_stdin (JSON+base64)"
        how = {"how": "bash -i -l in the PTY; timed from send_stdin (after the prompt) to the end event"}
        ctx.report(throughput_row(pty_name, tty["sdk"], tty["direct"], base_pty, how))
        if compare is not None:
            ctx.report(throughput_row(pty_name, tty["sdk"], tty["cmp_sdk"], f"{compare.name}, official SDK", how))


def alternate(ctx: Context, steps: dict[str, Any], into: dict[str, list[Run]], runs: int) -> None:
    keys = list(steps)
    for i in range(runs):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            r = steps[key]()
            into[key].append(r)
            cpu = f"agent CPU {r.agent_cpu_s:5.2f} s, " if r.agent_cpu_s else ""
            load = os.getloadavg()[0]
            ctx.log(
                f"  {key:<8} {r.mbps:8,.0f} MB/s  {r.seconds:6.2f} s  ({cpu}client CPU {r.client_cpu_s:5.2f} s, "
                f"load {load:.1f})"
            )
