"""Raw uploads moved socket → file by a worker thread (issue 16): the server's ``RawBody`` and
``AtomicWriter.receive_from`` (``splice(2)``), over real sockets to the real agent. Byte-exact
bodies, the connection's next request (kept alive or pipelined) after one, clients that leave or
stall midway, and the bodies that keep the event loop's path (gzip, chunked, small)."""

from __future__ import annotations

import contextlib
import gzip
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Agent, free_port, wait_healthy

IDLE_TIMEOUT = 1.5
MiB = 1 << 20


@contextlib.contextmanager
def launched(loop: str, tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Iterator[Agent]:
    """A standalone agent on asyncio's own loop (``sandboxd agent`` keeps OpenSSL out, so it cannot
    use uvloop) or on uvloop (as the sandboxes' agents: a process that has imported ``ssl``)."""
    port = free_port()
    launcher = ["-m", "sandboxd"] if loop == "asyncio" else ["-c", "import ssl; from sandboxd.cli import main; main()"]
    args = [sys.executable, *launcher, "agent", "--port", str(port), *flags]
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        yield Agent(process, port, None, None, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent whose connections give up after IDLE_TIMEOUT seconds without a byte."""
    with launched(request.param, tmp_path_factory, "--idle-timeout", str(IDLE_TIMEOUT)) as started:
        yield started


def pattern(size: int) -> bytes:
    """Bytes that differ at every offset modulo 251 (a misplaced or lost piece shows)."""
    block = bytes(range(251)) * ((1 << 16) // 251 + 1)
    out = bytearray()
    while len(out) < size:
        out += block[len(out) % 251 :][: size - len(out)]
    return bytes(out)


def head(target: Path, length: int, extra: str = "") -> bytes:
    return (
        f"POST /files?path={target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(f: socket.SocketIO | object) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a buffered socket file."""
    reader = f  # a BufferedReader from socket.makefile("rb")
    status_line = reader.readline()  # type: ignore[attr-defined]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):  # type: ignore[attr-defined]
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))  # type: ignore[attr-defined]
    return int(status_line.split()[1]), headers, body


@contextlib.contextmanager
def connection(agent: Agent) -> Iterator[tuple[socket.socket, object]]:
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    try:
        yield s, s.makefile("rb")
    finally:
        s.close()


def settled_listing(directory: Path, expected: list[str], within: float = 5) -> list[str]:
    deadline = time.monotonic() + within
    while sorted(os.listdir(directory)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(os.listdir(directory))


def test_a_raw_upload_of_several_mib_arrives_byte_exact(agent: Agent, workdir: Path) -> None:
    body = pattern(9 * MiB + 12345)
    target = workdir / "exact.bin"
    r = httpx.post(
        f"{agent.url}/files",
        params={"path": str(target)},
        content=body,
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"path": str(target), "name": "exact.bin", "type": "file"}]
    assert target.read_bytes() == body
    assert os.listdir(workdir) == ["exact.bin"]


def test_the_connection_goes_on_kept_alive_and_pipelined(agent: Agent, workdir: Path) -> None:
    first, second = pattern(4 * MiB), pattern(3 * MiB)[::-1]
    with connection(agent) as (s, f):
        # Kept alive: a second upload after the first one's answer, on the same connection.
        s.sendall(head(workdir / "a.bin", len(first)) + first)
        status, _, _ = read_response(f)
        assert status == 200
        s.sendall(head(workdir / "b.bin", len(second)) + second)
        status, _, _ = read_response(f)
        assert status == 200
        # Pipelined: an upload, a health probe and one more small upload in one send, the next
        # requests' bytes right behind the body (the worker thread must leave them to the parser).
        pipelined = (
            head(workdir / "c.bin", len(first))
            + first
            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            + head(workdir / "d.bin", 5)
            + b"small"
        )
        s.sendall(pipelined)
        answers = [read_response(f) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 204, 200], answers
    assert (workdir / "a.bin").read_bytes() == first
    assert (workdir / "b.bin").read_bytes() == second
    assert (workdir / "c.bin").read_bytes() == first
    assert (workdir / "d.bin").read_bytes() == b"small"


def test_expect_100_continue_is_answered_before_the_body(agent: Agent, workdir: Path) -> None:
    body = pattern(2 * MiB)
    with connection(agent) as (s, f):
        s.sendall(head(workdir / "expect.bin", len(body), "Expect: 100-continue\r\n"))
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"  # type: ignore[attr-defined]
        assert f.readline() == b"\r\n"  # type: ignore[attr-defined]
        s.sendall(body)
        status, _, _ = read_response(f)
    assert status == 200
    assert (workdir / "expect.bin").read_bytes() == body


def test_a_client_that_closes_halfway_leaves_no_file(agent: Agent, workdir: Path) -> None:
    target = workdir / "half.bin"
    target.write_bytes(b"old")
    with connection(agent) as (s, _):
        s.sendall(head(target, 8 * MiB) + pattern(3 * MiB))
        s.shutdown(socket.SHUT_WR)  # an orderly end of the body, 5 MiB early
        s.settimeout(5)
        assert s.recv(100) == b""  # the server closes without an answer
    assert settled_listing(workdir, ["half.bin"]) == ["half.bin"]
    assert target.read_bytes() == b"old"
    # Its worker thread is free again: uploads still move.
    body = pattern(2 * MiB)
    r = httpx.post(
        f"{agent.url}/files", params={"path": str(target)}, content=body, headers={"content-type": "x"}, timeout=10
    )
    assert r.status_code == 400  # an unsupported content type is still refused before any body
    r = httpx.post(
        f"{agent.url}/files",
        params={"path": str(target)},
        content=body,
        headers={"content-type": "application/octet-stream"},
        timeout=10,
    )
    assert r.status_code == 200 and target.read_bytes() == body


def test_a_client_that_stalls_midway_is_cut_off_at_the_idle_timeout(agent: Agent, workdir: Path) -> None:
    target = workdir / "stalled.bin"
    with connection(agent) as (s, f):
        s.sendall(head(target, 6 * MiB) + pattern(2 * MiB))
        started = time.monotonic()
        status, headers, body = read_response(f)
        waited = time.monotonic() - started
        assert f.read() == b""  # type: ignore[attr-defined]  # and the connection is closed
    assert status == 408, body
    assert b"no part of the request body arrived" in body
    assert headers.get("connection") == "close"
    assert IDLE_TIMEOUT * 0.9 <= waited < IDLE_TIMEOUT + 5
    assert settled_listing(workdir, []) == []
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_a_body_dripped_a_byte_at_a_time_is_cut_off_and_leaves_no_file(agent: Agent, workdir: Path) -> None:
    """The slow drip: one byte per half idle timeout keeps every wait under the idle timeout, so a
    client could hold a files thread for Content-Length times that (16 such clients, every raw
    upload's thread). Past the first idle timeout the body must average 4 KiB/s: 408, no file."""
    target = workdir / "drip.bin"
    target.write_bytes(b"old")
    with connection(agent) as (s, f):
        s.sendall(head(target, 4 * MiB) + b"x")
        started = time.monotonic()
        while not select.select([s], [], [], IDLE_TIMEOUT / 2)[0]:
            assert time.monotonic() - started < IDLE_TIMEOUT + 10, "the drip still holds the thread"
            with contextlib.suppress(OSError):
                s.send(b"x")
        status, headers, body = read_response(f)
    assert status == 408, body
    assert b"on average" in body and headers.get("connection") == "close"
    assert settled_listing(workdir, ["drip.bin"]) == ["drip.bin"]
    assert target.read_bytes() == b"old"
    assert httpx.get(f"{agent.url}/health").status_code == 204


@pytest.mark.parametrize("framing", ["gzip", "chunked", "small"])
def test_gzip_chunked_and_small_bodies_keep_the_loops_path(agent: Agent, workdir: Path, framing: str) -> None:
    body = pattern(3 * MiB) if framing != "small" else pattern(100_000)
    target = workdir / f"{framing}.bin"
    headers = {"content-type": "application/octet-stream"}
    content: bytes | Iterator[bytes] = body
    if framing == "gzip":
        content = gzip.compress(body, 1)
        headers["content-encoding"] = "gzip"
    elif framing == "chunked":
        content = iter([body[:MiB], body[MiB:]])  # no length: httpx sends it chunked
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, content=content, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert target.read_bytes() == body


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5000000\r\nContent-Length: 6000000\r\n",
        "Content-Length: 5000000\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: -5000000\r\n",
        "Content-Length: 5e6\r\n",
    ],
)
def test_ambiguous_or_bad_lengths_are_a_4xx(agent: Agent, workdir: Path, framing: str) -> None:
    request = (
        f"POST /files?path={workdir / 'bad.bin'} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/octet-stream\r\n{framing}\r\n"
    ).encode()
    with connection(agent) as (s, f):
        s.sendall(request + b"x" * 1000)
        status, _, _ = read_response(f)
    assert 400 <= status < 500
    assert settled_listing(workdir, []) == []


@pytest.mark.parametrize("room", ["4k", "2m"])
def test_a_full_disk_is_507_closes_the_connection_and_leaves_no_file(agent: Agent, tmp_path: Path, room: str) -> None:
    """4 KiB: the disk fills while the bytes uvicorn had buffered are written, before the worker
    thread's move; 2 MiB: during the move."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / f"full-{uuid.uuid4().hex[:8]}"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(small)], check=False).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        os.chmod(small, 0o777)
        with connection(agent) as (s, f):
            with contextlib.suppress(OSError):  # the server may close before it has read it all
                s.sendall(head(small / "big.bin", 6 * MiB) + pattern(6 * MiB))
            status, headers, body = read_response(f)
            assert headers.get("connection") == "close"  # the body's rest is unread: nothing can follow
            with contextlib.suppress(ConnectionResetError):
                assert f.read() == b""  # type: ignore[attr-defined]
        assert status == 507, body
        assert os.listdir(small) == []
        assert httpx.get(f"{agent.url}/health").status_code == 204
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_more_bodies_at_once_than_threads_for_them_all_arrive(agent: Agent, workdir: Path) -> None:
    """Past MAX_RAW_BODIES moving at once, bodies take the event loop's path: all arrive whole."""
    from concurrent.futures import ThreadPoolExecutor

    count = 24
    bodies = [pattern(2 * MiB + i) for i in range(count)]

    def upload(i: int) -> int:
        r = httpx.post(
            f"{agent.url}/files",
            params={"path": str(workdir / f"many-{i}.bin")},
            content=bodies[i],
            headers={"content-type": "application/octet-stream"},
            timeout=60,
        )
        return r.status_code

    with ThreadPoolExecutor(count) as pool:
        assert list(pool.map(upload, range(count))) == [200] * count
    for i, body in enumerate(bodies):
        assert (workdir / f"many-{i}.bin").read_bytes() == body


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stalled_body_does_not_hold_up_the_agents_exit(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """SIGTERM during a body that stopped arriving (idle timeout: the default 640 s): the worker
    thread is woken at once, the temporary file removed, and the agent exits."""
    with launched(loop, tmp_path_factory) as started, connection(started) as (s, _):
        s.sendall(head(workdir / "stuck.bin", 8 * MiB) + pattern(2 * MiB))
        time.sleep(0.5)  # the worker thread is waiting for the rest
        assert len(os.listdir(workdir)) == 1  # the temporary file
        began = time.monotonic()
        started.process.terminate()
        started.process.wait(8)
        assert time.monotonic() - began < 8
    assert os.listdir(workdir) == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_streaming_fast_does_not_hold_up_the_agents_exit(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """SIGTERM while a client streams as fast as it can: the socket always has bytes queued, so
    shutting its reading down does not stop the worker thread (the kernel hands out what is queued);
    the thread checks its stop flag between pieces, the temporary file is removed, the agent exits."""
    with launched(loop, tmp_path_factory) as started, connection(started) as (s, _):
        s.sendall(head(workdir / "stream.bin", 1 << 40))
        chunk = pattern(MiB)
        streaming = True

        def stream() -> None:
            with contextlib.suppress(OSError):
                while streaming:
                    s.sendall(chunk)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            time.sleep(0.5)  # the worker thread is moving the body
            assert len(os.listdir(workdir)) == 1  # the temporary file
            began = time.monotonic()
            started.process.terminate()
            started.process.wait(8)
            assert time.monotonic() - began < 8
        finally:
            streaming = False
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            sender.join(10)
    assert os.listdir(workdir) == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_many_stalled_bodies_at_once_leave_the_files_threads_free(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """MAX_RAW_BODIES holds even when many bodies arrive at once: a body's slot is taken when its
    route takes it, not later (after a thread hop), so 40 uploads that all stall midway hold at most
    16 of the files pool's threads, and a download still gets one at once."""
    small = workdir / "small.txt"
    small.write_bytes(b"still served")
    with launched(loop, tmp_path_factory, "--idle-timeout", "60") as started, contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.create_connection(("127.0.0.1", started.port), timeout=10)) for _ in range(40)
        ]
        time.sleep(0.5)
        # All at once: every route takes its body while the others still write their buffered bytes.
        for i, s in enumerate(sockets):
            s.sendall(head(workdir / f"stall-{i}.bin", 8 * MiB) + pattern(64 << 10))
        time.sleep(2)  # every route has taken its body (or chosen the event loop's path)
        r = httpx.get(f"http://127.0.0.1:{started.port}/files", params={"path": str(small)}, timeout=10)
        assert r.status_code == 200 and r.content == b"still served"


def test_an_urgent_byte_midway_neither_spins_nor_stalls_the_body(agent: Agent, workdir: Path) -> None:
    """TCP urgent data (``MSG_OOB``) in the middle of a body: ``splice(2)`` stops at the urgent mark
    and says EAGAIN while ``poll(2)`` says readable, so a thread that only splices spins at full CPU,
    never reaching the idle timeout. The byte is out of band: as on the event loop's path (``recv``
    steps over it), the body is the in-band bytes, and it arrives whole."""
    body = pattern(4 * MiB)
    target = workdir / "urgent.bin"
    with connection(agent) as (s, f):
        s.sendall(head(target, len(body)) + body[: 2 * MiB])
        time.sleep(0.3)  # the worker thread is moving the body
        s.send(b"!", socket.MSG_OOB)
        s.sendall(body[2 * MiB :])
        status, _, answer = read_response(f)
    assert status == 200, answer
    assert target.read_bytes() == body


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_taken_after_sigterm_does_not_hold_up_the_agents_exit(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """SIGTERM after the route took its body but before the worker thread began to move it (its
    first write waits for a files thread: 32 downloads of FIFOs hold them all): uvicorn's shutdown finds
    no move to cancel, and the move that follows must neither wait out the idle timeout (640 s) for
    a client that goes quiet, nor put back the keep-alive that the shutdown took away."""
    fifos = [workdir / f"fifo-{i}" for i in range(33)]
    writers: dict[Path, int] = {}
    for fifo in fifos:
        os.mkfifo(fifo)
        writers[fifo] = os.open(fifo, os.O_RDWR)  # a writer: the download's read(2) waits for data

    def release(fifo: Path) -> None:
        """The download reads a byte, then EOF."""
        fd = writers.pop(fifo)
        os.write(fd, b"x")
        os.close(fd)

    with launched(loop, tmp_path_factory) as started, contextlib.ExitStack() as stack:

        def download(fifo: Path) -> None:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", started.port), timeout=10))
            s.sendall(f"GET /files?path={fifo} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

        for fifo in fifos[:32]:
            download(fifo)
        time.sleep(0.5)  # every files thread waits in read(2) for a byte
        s, f = stack.enter_context(connection(started))
        body = pattern(3 * MiB)
        s.sendall(head(workdir / "late.bin", len(body)) + body[: 64 << 10])
        time.sleep(0.3)  # its file's open queues...
        download(fifos[32])  # ...ahead of this one
        time.sleep(0.3)
        release(fifos[0])  # the freed thread opens the upload's file, then blocks on fifo-32
        time.sleep(0.5)  # the route has taken the body; its first write waits for a thread
        began = time.monotonic()
        started.process.terminate()
        time.sleep(0.5)  # uvicorn's shutdown has asked each connection to close after its answer
        for fifo in fifos[1:]:
            release(fifo)
        with contextlib.suppress(OSError):
            s.sendall(body[64 << 10 :])
        with contextlib.suppress(OSError, AssertionError):
            _, headers, _ = read_response(f)  # an answer, if the body arrived before the cut
            assert headers.get("connection") == "close"
        # The client keeps its end open, as a connection pool does.
        try:
            started.process.wait(10)
        finally:
            for fd in writers.values():
                os.close(fd)
        assert time.monotonic() - began < 10


def test_a_client_that_half_closes_after_its_body_gets_the_answer(agent: Agent, workdir: Path) -> None:
    """A client may end its side (``shutdown(SHUT_WR)``) once the request is sent and wait for the
    answer. On the event loop's path reading stays paused after the body until the answer is out, so
    the end-of-file is seen only then; the socket path must not read on at once and take the
    end-of-file for a client gone (the file committed, the answer dropped)."""
    body = pattern(3 * MiB)
    target = workdir / "halfclosed.bin"
    with connection(agent) as (s, f):
        s.sendall(head(target, len(body)) + body)
        s.shutdown(socket.SHUT_WR)
        status, _, answer = read_response(f)
    assert status == 200, answer
    assert target.read_bytes() == body
