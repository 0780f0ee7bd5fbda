"""How the agent's responses reach the socket, counted with strace on the real agent: a unary reply
(ok and error) and a REST download go out in one write, head and body together, and a stream's
head goes out with its first message. Two writes would let a client whose deadline falls between
them read a head announcing a body it then records as empty (a Connect conformance ``Timeouts``
case once failed so), and cost a syscall and a wake-up on each reply."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Agent, require
from sandboxd._proto.process import process_pb2 as pb

_CALL = re.compile(r"^\d+\s+(write|writev|sendto|sendmsg)\((\d+), (.*)$")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


@pytest.fixture(scope="module")
def traced_agent(start_agent: Callable[..., Agent]) -> Agent:
    """An agent of this module's own: no other test's connections write while it is traced."""
    return start_agent()


def _tracer_pids(pid: int) -> set[int]:
    tracers = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    tracers.add(int(line.split()[1]))
    return tracers


@contextlib.contextmanager
def traced_writes(pid: int, log: Path) -> Iterator[dict[int, list[bytes]]]:
    """The bytes of each write syscall (``write``, ``writev``, ``send*``) of process ``pid`` while
    the block runs, by file descriptor, in order; filled when the block ends."""
    writes: dict[int, list[bytes]] = {}
    strace = require("strace", "it counts the agent's write syscalls")
    args = [strace, "-f", "-xx", "-s", "65536", "-e", "trace=write,writev,sendto,sendmsg", "-o", str(log)]
    tracer = subprocess.Popen([*args, "-p", str(pid)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _tracer_pids(pid) != {tracer.pid}:  # every thread attached
            assert tracer.poll() is None and time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        yield writes
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches, and writes out what it has
        tracer.wait(10)
    for line in log.read_text().splitlines():
        if match := _CALL.match(line):
            data = b"".join(bytes.fromhex(s.replace("\\x", "")) for s in _STRING.findall(match.group(3)))
            writes.setdefault(int(match.group(2)), []).append(data)


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Sends ``request`` and reads one whole response (``content-length`` or chunked) off ``sock``."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while (len(body) < int(length.group(1))) if length else not body.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "the agent closed the connection mid-response"
        body += chunk
    return data[: len(head) + 4] + body


def post(path: str, content_type: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: {content_type}\r\nConnect-Protocol-Version: 1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_replies_go_out_head_and_body_in_one_write(traced_agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"twelve bytes")
    start = pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/sh", args=["-c", "exit 3"]), stdin=False)
    requests = {
        "unary ok": post(
            "/filesystem.Filesystem/Stat", "application/json", json.dumps({"path": str(tmp_path)}).encode()
        ),
        "unary error": post(
            "/filesystem.Filesystem/Stat", "application/json", json.dumps({"path": str(tmp_path / "nope")}).encode()
        ),
        "download": f"GET /files?path={tmp_path / 'small'} HTTP/1.1\r\nHost: agent\r\n\r\n".encode(),
        "stream": post(
            "/process.Process/Start",
            "application/connect+proto",
            struct.pack(">BI", 0, start.ByteSize()) + start.SerializeToString(),
        ),
    }
    socks = {name: socket.create_connection(("127.0.0.1", traced_agent.port), timeout=10) for name in requests}
    try:
        exchange(socks["unary ok"], requests["unary ok"])  # a first request, not traced: imports and the like
        with traced_writes(traced_agent.process.pid, tmp_path / "strace.log") as writes:
            received = {name: exchange(socks[name], request) for name, request in requests.items()}
            time.sleep(0.1)  # the stream's last write happens before the client reads it, but let strace see it
    finally:
        for sock in socks.values():
            sock.close()

    # Each connection's writes, found by what they carry (the agent's other descriptors write too).
    by_response = {
        name: [calls for calls in writes.values() if calls[0] == received[name][: len(calls[0])]] for name in requests
    }
    assert received["unary ok"].startswith(b"HTTP/1.1 200 ")
    assert received["unary error"].startswith(b"HTTP/1.1 404 ") and b'"not_found"' in received["unary error"]
    assert received["download"].startswith(b"HTTP/1.1 200 ") and received["download"].endswith(b"twelve bytes")
    for name in ("unary ok", "unary error", "download"):
        assert [[received[name]]] == by_response[name], f"{name}: {writes}"

    # The stream: head and the start event in the first write, then the end event with the end of
    # the stream (Method.last) in the second.
    stream = received["stream"]
    assert stream.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in stream
    (calls,) = by_response["stream"]
    assert b"".join(calls) == stream
    head_end = stream.index(b"\r\n\r\n") + 4
    assert len(calls[0]) > head_end, f"the head went out alone: {calls[0]!r}"
    chunk = calls[0][head_end:]
    size, _, rest = chunk.partition(b"\r\n")
    flags, length = struct.unpack_from(">BI", rest)
    assert flags == 0 and pb.StartResponse.FromString(rest[5 : 5 + length]).event.HasField("start")
    assert int(size, 16) == 5 + length  # the first chunk is the start event's envelope
    assert len(calls) == 2, calls
    assert calls[1].endswith(b"0\r\n\r\n") and b"\x02\x00\x00\x00\x02{}" in calls[1]
