"""Downloads sent by a worker thread with ``sendfile(2)`` (``FileReader.send_to`` through the
server's ``ResponseWriter.hand_off``), over real sockets to the real agent on both event loops:
byte-exact whole files and ranges, the connection's next request after one, a file that shrinks
while it is sent, clients that leave midway, and the replies that keep the loop's path."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Agent
from sandboxd.agent.files import GZIP_MAX_SIZE
from test_files_raw_body import MiB, connection, launched, pattern, read_response


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with launched(request.param, tmp_path_factory) as started:
        yield started


def open_files(agent: Agent) -> list[str]:
    fds = f"/proc/{agent.process.pid}/fd"
    found = []
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"{fds}/{fd}"))
    return sorted(found)


def get(path: Path, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} /files?path={path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_whole_files_and_ranges_arrive_byte_exact_and_the_connection_goes_on(agent: Agent, workdir: Path) -> None:
    data = pattern(7 * MiB + 333)
    target = workdir / "big.bin"
    target.write_bytes(data)
    with connection(agent) as (s, f):
        s.sendall(get(target))
        status, headers, body = read_response(f)
        assert (status, headers["content-length"], body == data) == (200, str(len(data)), True)
        # A range past the first chunk, then a HEAD and a small range, pipelined behind it.
        s.sendall(
            get(target, "Range: bytes=1000-5001000\r\n")
            + get(target, method="HEAD")
            + get(target, "Range: bytes=-10\r\n")
        )
        status, headers, body = read_response(f)
        assert status == 206 and body == data[1000:5001001]
        assert headers["content-range"] == f"bytes 1000-5001000/{len(data)}"
        status_line = f.readline()  # type: ignore[attr-defined]  # HEAD: a head, no body
        assert status_line.startswith(b"HTTP/1.1 200")
        while f.readline() != b"\r\n":  # type: ignore[attr-defined]
            pass
        status, _, body = read_response(f)
        assert status == 206 and body == data[-10:]


def test_the_sdk_reads_a_large_file_whole(agent: Agent, workdir: Path) -> None:
    data = os.urandom(5 * MiB)
    (workdir / "sdk.bin").write_bytes(data)
    r = httpx.get(f"{agent.url}/files", params={"path": str(workdir / "sdk.bin")}, timeout=30)
    assert r.status_code == 200 and r.content == data


def test_large_compressible_files_are_sent_whole_to_the_sdks_accept_encoding(agent: Agent, workdir: Path) -> None:
    """The SDK's httpx client sends its default ``Accept-Encoding: gzip, deflate`` on every read, even
    with ``gzip=False``. Past ``GZIP_MAX_SIZE`` the agent answers identity with a ``Content-Length``
    (the ``sendfile`` path) however well the file compresses: E2B's envd gzips such a file, and the
    SDK then reads 64 MiB at 36 MB/s instead of ~300 (docs/benchmarks.md, sdkread)."""
    sdk_accepts = httpx.Client().headers["accept-encoding"]
    assert "gzip" in sdk_accepts  # else this test no longer asks what the SDK asks
    text = b"compressible line\n" * (GZIP_MAX_SIZE // 18 + 1000)
    (workdir / "big.txt").write_bytes(text)
    params = {"path": str(workdir / "big.txt")}
    r = httpx.get(f"{agent.url}/files", params=params, headers={"accept-encoding": sdk_accepts}, timeout=30)
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert r.headers["content-length"] == str(len(text)) and r.content == text


def test_a_file_that_shrinks_while_it_is_sent_ends_the_connection(agent: Agent, workdir: Path) -> None:
    target = workdir / "shrinks.bin"
    target.write_bytes(pattern(64 * MiB))
    with connection(agent) as (s, f):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the sender waits on us
        s.sendall(get(target))
        assert f.readline().startswith(b"HTTP/1.1 200")  # type: ignore[attr-defined]
        while f.readline() != b"\r\n":  # type: ignore[attr-defined]
            pass
        assert len(f.read(2 * MiB)) == 2 * MiB  # type: ignore[attr-defined]
        os.truncate(target, 3 * MiB)
        got = 2 * MiB
        s.settimeout(10)
        while chunk := f.read1(1 << 20):  # type: ignore[attr-defined]
            got += len(chunk)
    assert 3 * MiB <= got < 64 * MiB  # what the file still had, then the end: no hang, no padding
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_clients_that_leave_midway_free_the_senders(agent: Agent, workdir: Path) -> None:
    """More leaving clients than senders at once (MAX_HANDED_OFF, 16): each sender must notice and
    end, or later downloads would find the cap used up (and the files' descriptors held)."""
    target = workdir / "left.bin"
    target.write_bytes(pattern(32 * MiB))
    fds_before = open_files(agent)
    for _ in range(24):
        with connection(agent) as (s, f):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(get(target))
            f.read(3 * MiB)  # type: ignore[attr-defined]
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
            f.close()  # type: ignore[attr-defined]  # else the socket outlives close() (makefile's reference)
    deadline = time.monotonic() + 10
    while len(open_files(agent)) > len(fds_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(open_files(agent)) <= len(fds_before), (fds_before, open_files(agent))
    r = httpx.get(f"{agent.url}/files", params={"path": str(target)}, timeout=30)
    assert r.status_code == 200 and r.content == pattern(32 * MiB)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_stops_reading_is_given_up_on_after_the_idle_timeout(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """A client that asks for a large file, reads a little and then nothing, connection open: the
    sender waited for room with no deadline, holding its thread (one of MAX_HANDED_OFF, which
    process output streams share) and the file's descriptor for as long as the client liked. It
    gives up after the connection's idle timeout with no byte taken, and the connection is closed."""
    target = workdir / "stalled.bin"
    target.write_bytes(pattern(64 * MiB))
    with launched(loop, tmp_path_factory, "--idle-timeout", "1") as agent, connection(agent) as (s, f):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(get(target))
        assert f.readline().startswith(b"HTTP/1.1 200")  # type: ignore[attr-defined]
        while f.readline() != b"\r\n":  # type: ignore[attr-defined]
            pass
        assert len(f.read(2 * MiB)) == 2 * MiB  # type: ignore[attr-defined]
        assert str(target) in open_files(agent)  # being sent: then the client reads no more
        deadline = time.monotonic() + 20
        while str(target) in open_files(agent) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert str(target) not in open_files(agent), "the sender still holds the file"
        s.settimeout(10)
        got = 2 * MiB
        with contextlib.suppress(ConnectionResetError):
            while chunk := f.read1(1 << 20):  # type: ignore[attr-defined]
                got += len(chunk)
        assert got < 64 * MiB  # what the buffers held, then the end: the connection is closed


def test_a_slow_reader_gets_every_byte_while_others_download(agent: Agent, workdir: Path) -> None:
    data = pattern(6 * MiB)
    (workdir / "slow.bin").write_bytes(data)
    got: list[bytes] = []

    def slow() -> None:
        with connection(agent) as (s, f):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
            s.sendall(get(workdir / "slow.bin"))
            status, _, body = read_response(f)
            assert status == 200
            got.append(body)

    reader = threading.Thread(target=slow)
    reader.start()
    for _ in range(5):
        r = httpx.get(f"{agent.url}/files", params={"path": str(workdir / "slow.bin")}, timeout=30)
        assert r.content == data
    reader.join(30)
    assert got == [data]


@pytest.mark.parametrize("kind", ["gzip", "proc", "small"])
def test_replies_that_keep_the_loops_path(agent: Agent, workdir: Path, kind: str) -> None:
    if kind == "proc":
        r = httpx.get(f"{agent.url}/files", params={"path": "/proc/self/status"}, timeout=30)
        assert r.status_code == 200 and b"Name:" in r.content
        return
    text = b"compressible line\n" * (400_000 if kind == "gzip" else 1000)
    (workdir / "t.txt").write_bytes(text)
    encoding = "gzip" if kind == "gzip" else "identity"
    r = httpx.get(f"{agent.url}/files", params={"path": str(workdir / "t.txt")}, headers={"accept-encoding": encoding})
    assert r.status_code == 200 and r.content == text  # httpx inflates
    assert r.headers.get("content-encoding") == ("gzip" if kind == "gzip" else None)
