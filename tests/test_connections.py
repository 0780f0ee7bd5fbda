"""Connection floods against the real servers on loopback (issue 11, item 2): slow-loris heads, silent
and idle connections, oversized heads. Each flood is bounded in count and time; while it lasts,
``/health`` and a real request still answer, a request in progress is never cut, and the server's
file descriptors stay near its connection cap."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Agent, Runtime

CAP = 64
HEAD_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
FLOOD = 300
"""Connections per flood: several times the cap, so eviction must happen, yet few enough for a
shared CI machine."""


@pytest.fixture(scope="module")
def guarded(start_agent: Callable[..., Agent]) -> Agent:
    return start_agent(
        "--max-connections", str(CAP), "--header-timeout", str(HEAD_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT)
    )


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def flood(port: int, count: int, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send ``first_bytes`` (maybe nothing) and then wait."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if first_bytes:
                with contextlib.suppress(OSError):
                    s.sendall(first_bytes)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(s: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing ``s`` within ``within`` seconds, or None if still open."""
    s.settimeout(within)
    received = b""
    try:
        while chunk := s.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def _what_it_was_doing(agent: Agent) -> dict[str, object]:
    """For a failure's message: the agent's descriptors by kind, its threads' states and kernel wait
    channels, the load average and the end of its log."""
    pid = agent.process.pid
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            kind = os.readlink(f"/proc/{pid}/fd/{fd}").split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
            threads[tid] = f"{stat} {wchan}"
    return {
        "fds": kinds,
        "threads": threads,
        "loadavg": Path("/proc/loadavg").read_text().strip(),
        "log": agent.log.read_text(errors="replace")[-2000:],
    }


def timed_health(url: str) -> float:
    started = time.monotonic()
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.status_code in (200, 204)
    return time.monotonic() - started


def test_slow_loris_and_silent_connections_do_not_block_health_or_requests(guarded: Agent) -> None:
    slow = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
    with flood(guarded.port, FLOOD // 2, slow) as loris, flood(guarded.port, FLOOD // 2, b"") as silent:
        # Settled: asyncio's loop (the standalone agent's) accepts a batch of connections before
        # their protocols run and close the ones beyond the cap, so the count peaks for a moment.
        # On a loaded CI machine that moment passed 2 s once (138 descriptors at the deadline) and
        # 10 s once (142, not reproduced in dozens of runs since, where it settles within 1 s); the
        # bound is what is checked, not how soon it holds, and a failure says what the agent was doing.
        # One reading decides: the flood's connections do not all arrive at once (those that found
        # the listen queue full complete their handshake when the kernel's retransmitted SYN-ACKs
        # get through, 1, 3, 7, 15 s later), so a second reading after the one that ended the wait
        # could land on a fresh batch's peak. CI at f78a43d failed with 136 descriptors, maybe so.
        deadline = time.monotonic() + 30
        while (held := open_fds(guarded.process.pid)) >= CAP + 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        if held >= CAP + 64:
            # Printed whole: captured output is shown with a failure, the assertion's message is cut.
            print("descriptors still held:", _what_it_was_doing(guarded))
        assert held < CAP + 64, ("connections beyond the cap hold descriptors", _what_it_was_doing(guarded))
        assert timed_health(guarded.url) < 1.0
        r = httpx.post(
            f"{guarded.url}/filesystem.Filesystem/Stat",
            json={"path": "/"},
            headers={"content-type": "application/json"},
            timeout=5,
        )
        assert r.status_code == 200, r.text
        # Evicted or timed out: by the head deadline every flood connection is closed.
        time.sleep(HEAD_TIMEOUT + 0.5)
        for s in [*loris, *silent]:
            assert closed_by_server(s, within=0.5) is not None, "a flood connection outlived the head deadline"
    assert timed_health(guarded.url) < 1.0


def test_a_slow_head_gets_408_at_the_deadline_and_not_before(guarded: Agent) -> None:
    with flood(guarded.port, 10, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ") as slow:
        time.sleep(HEAD_TIMEOUT / 2)
        assert closed_by_server(slow[0], within=0.01) is None
        answers = [closed_by_server(s, within=HEAD_TIMEOUT + 2) for s in slow]
    assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), answers


def test_a_request_in_progress_is_never_evicted(guarded: Agent, tmp_path: Path) -> None:
    body = json.dumps({"path": str(tmp_path)}).encode()
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{guarded.url}/filesystem.Filesystem/WatchDir",
            content=struct.pack(">BI", 0, len(body)) + body,
            headers={"content-type": "application/connect+json"},
        ) as stream,
    ):
        frames = stream.iter_raw()
        assert next(frames)  # the start event: the stream is in progress
        with flood(guarded.port, FLOOD, b""):
            assert timed_health(guarded.url) < 1.0
            (tmp_path / "still-watched").write_text("x")
            seen = b""
            while b"still-watched" not in seen:
                seen += next(frames)


def test_an_oversized_head_is_431(guarded: Agent) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(100):
                s.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        answer = closed_by_server(s, within=5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431"), answer


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(guarded: Agent) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 204")
        started = time.monotonic()
        assert closed_by_server(s, within=IDLE_TIMEOUT + 3) == b""
        assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5


def test_a_later_response_moves_the_idle_deadline(guarded: Agent) -> None:
    """The keep-alive timer is set once per connection and kept across its requests: when it fires
    for an earlier response it must set itself again for the idle timeout after the latest one."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 204")
        time.sleep(IDLE_TIMEOUT * 0.6)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 204")
        last = time.monotonic()
        time.sleep(IDLE_TIMEOUT * 0.6)  # past the first response's idle deadline
        assert closed_by_server(s, within=0.01) is None, "closed by the first response's idle deadline"
        assert closed_by_server(s, within=IDLE_TIMEOUT + 3) == b""
        assert time.monotonic() - last >= IDLE_TIMEOUT - 0.5


def test_a_kept_alive_connection_s_next_head_gets_its_own_deadline(guarded: Agent) -> None:
    """The head timer is left set when a head completes: when it fires during a later head it must
    set itself again for that head's deadline, neither cutting it early nor letting it run on."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 204")
        time.sleep(HEAD_TIMEOUT * 0.6)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        time.sleep(HEAD_TIMEOUT * 0.6)  # past the first head's deadline
        assert closed_by_server(s, within=0.01) is None, "cut at the first head's deadline"
        answer = closed_by_server(s, within=HEAD_TIMEOUT + 2)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started >= HEAD_TIMEOUT - 0.3


def test_open_file_limit_is_raised_to_the_hard_limit(guarded: Agent) -> None:
    limits = Path(f"/proc/{guarded.process.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line


@pytest.mark.root
def test_runtime_is_guarded_the_same_way(start_runtime: Callable[..., Runtime]) -> None:
    runtime = start_runtime("--max-connections", str(CAP), "--header-timeout", str(HEAD_TIMEOUT))
    port = runtime.port
    with flood(port, FLOOD // 2, b"GET /health HTTP/1.1\r\n"), flood(port, FLOOD // 2, b""):
        assert timed_health(runtime.url) < 1.0
        r = httpx.get(f"{runtime.url}/v2/sandboxes", headers={"X-API-KEY": runtime.api_key}, timeout=5)
        assert r.status_code == 200, r.text
