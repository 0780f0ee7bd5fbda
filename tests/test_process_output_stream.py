"""Process output on a binary Connect stream (``application/connect+proto``), read off a raw socket:
the path on which the agent hands its output ring's chunks to the socket without copying them
(``OutputChunk`` + ``http_server.ResponseWriter``). Every byte in order with valid chunked framing, a slow
reader that must not make the agent buffer without bound, a client that vanishes mid-stream, and the
JSON stream of the same output beside it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Agent, peak_rss
from sandboxd._proto.process import process_pb2 as pb

CONNECT = {"Connect-Protocol-Version": "1"}

RSS_GROWTH_LIMIT = 64 << 20
"""How much the agent's RSS may grow while a slow client reads 256 MiB of output: the ring (1 MiB),
one batch lent to the transport and uvloop's write buffer, with room for allocator slack; buffering
the output itself would be hundreds of MiB."""

# A child that writes ``blocks`` blocks of a known pattern to stdout, and a numbered line to stderr
# after each block: what arrives can be checked byte for byte, per stream and in order.
PATTERN_CHILD = """
import os, sys
blocks, size = int(sys.argv[1]), int(sys.argv[2])
for i in range(blocks):
    os.write(1, bytes([i % 251]) * 7 + (b"%08d" % i) * ((size - 7) // 8))
    os.write(2, b"stderr line %d\\n" % i)
"""


def expected_stdout(blocks: int, size: int) -> bytes:
    return b"".join(bytes([i % 251]) * 7 + (b"%08d" % i) * ((size - 7) // 8) for i in range(blocks))


@pytest.fixture(scope="module")
def lone_agent(start_agent: Callable[..., Agent]) -> Agent:
    """An agent of this module's own, so its RSS is this module's doing."""
    return start_agent()


class RawStream:
    """One ``process.Process/Start`` in binary proto on a raw socket, parsed by hand: the HTTP head,
    the chunked framing (checked: every chunk ends with CRLF, the body ends with the 0-chunk), the
    Connect envelopes and each ``StartResponse``."""

    def __init__(
        self,
        agent: Agent,
        argv: list[str],
        sock: socket.socket | None = None,
        rcvbuf: int = 0,
        headers: dict[str, str] | None = None,
        connect_pid: int = 0,
        wait: float = 0,
        pty: bool = False,
    ) -> None:
        """``connect_pid``: a ``Connect`` to that process instead of a ``Start`` of ``argv``;
        ``wait``: seconds to sleep after sending the request, before reading anything; ``pty``: the
        process runs on an 80 x 24 PTY (its output comes as ``data.pty``)."""
        self.sock = sock or socket.create_connection(("127.0.0.1", agent.port), timeout=60)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        request: pb.StartRequest | pb.ConnectRequest
        if connect_pid:
            request, method = pb.ConnectRequest(process=pb.ProcessSelector(pid=connect_pid)), "Connect"
        else:
            request = pb.StartRequest(process=pb.ProcessConfig(cmd=argv[0], args=argv[1:]), stdin=False)
            if pty:
                request.pty.size.cols, request.pty.size.rows = 80, 24
            method = "Start"
        body = struct.pack(">BI", 0, request.ByteSize()) + request.SerializeToString()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST /process.Process/{method} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: application/connect+proto\r\nConnect-Protocol-Version: 1\r\n{extra}\r\n"
        )
        self.sock.sendall(head.encode() + body)
        time.sleep(wait)
        self.buffer = bytearray()
        head_bytes = self._until(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK", lines[0]
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert fields["content-type"] == "application/connect+proto"
        assert fields["transfer-encoding"] == "chunked"
        self.body = bytearray()
        self.done = False

    def _recv(self, limit: int = 1 << 20) -> None:
        data = self.sock.recv(limit)
        if not data:
            raise ConnectionError("the agent closed the connection mid-response")
        self.buffer += data

    def _until(self, marker: bytes) -> bytes:
        while (at := self.buffer.find(marker)) < 0:
            self._recv()
        out = bytes(self.buffer[:at])
        del self.buffer[: at + len(marker)]
        return out

    def _chunk(self, limit: int = 1 << 20) -> bool:
        """Moves one chunk of the chunked body (reading at most ``limit`` bytes at a time) into
        ``body``; False at the terminating 0-chunk."""
        size = int(self._until(b"\r\n"), 16)
        while len(self.buffer) < size + 2:
            self._recv(limit)
        assert self.buffer[size : size + 2] == b"\r\n", "a chunk does not end with CRLF"
        if size == 0:
            del self.buffer[:2]
            return False
        self.body += self.buffer[:size]
        del self.buffer[: size + 2]
        return True

    def events(self, limit: int = 1 << 20) -> Iterator[pb.ProcessEvent]:
        """The events as they arrive; ends after the end-stream frame (checked to be ``{}``)."""
        while True:
            while len(self.body) < 5 or len(self.body) < 5 + struct.unpack_from(">I", self.body, 1)[0]:
                assert self._chunk(limit), "the body ended inside an envelope"
            flags, length = struct.unpack_from(">BI", self.body)
            payload = bytes(self.body[5 : 5 + length])
            del self.body[: 5 + length]
            if flags & 0x02:
                assert json.loads(payload) == {}, payload[:300]
                assert not self.body
                assert not self._chunk(), "data after the end-stream frame"
                self.done = True
                return
            yield pb.StartResponse.FromString(payload).event


def drain(stream: RawStream, limit: int = 1 << 20) -> tuple[bytes, bytes, pb.ProcessEvent.EndEvent]:
    stdout, stderr = bytearray(), bytearray()
    end = None
    for event in stream.events(limit):
        if event.HasField("data"):
            stdout += event.data.stdout
            stderr += event.data.stderr
        elif event.HasField("end"):
            end = event.end
    assert end is not None
    return bytes(stdout), bytes(stderr), end


def test_every_byte_arrives_in_order_per_stream_with_valid_framing(lone_agent: Agent) -> None:
    blocks, size = 40, 1 << 20  # 40 MiB: many 1 MiB batches, each several ring chunks
    sock = socket.create_connection(("127.0.0.1", lone_agent.port), timeout=60)
    with sock:
        stream = RawStream(lone_agent, [sys.executable, "-c", PATTERN_CHILD, str(blocks), str(size)], sock)
        stdout, stderr, end = drain(stream)
        assert (end.exited, end.exit_code) == (True, 0)
        assert len(stdout) == len(expected_stdout(blocks, size))
        assert hashlib.sha256(stdout).digest() == hashlib.sha256(expected_stdout(blocks, size)).digest()
        assert stderr == b"".join(b"stderr line %d\n" % i for i in range(blocks))
        # The connection is intact after the stream: a second call on it works.
        again = RawStream(lone_agent, ["/bin/sh", "-c", "printf again"], sock)
        assert drain(again)[0] == b"again"


def test_the_json_stream_of_the_same_output_is_unchanged(lone_agent: Agent) -> None:
    blocks, size = 6, 1 << 20
    request = {"process": {"cmd": sys.executable, "args": ["-c", PATTERN_CHILD, str(blocks), str(size)]}}
    body = json.dumps(request).encode()
    stdout, stderr = bytearray(), bytearray()
    with httpx.stream(
        "POST",
        f"{lone_agent.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={**CONNECT, "Content-Type": "application/connect+json"},
        timeout=60,
    ) as r:
        assert r.headers["content-type"] == "application/connect+json"
        raw = r.read()
    while raw:
        flags, length = struct.unpack_from(">BI", raw)
        message = json.loads(raw[5 : 5 + length])
        raw = raw[5 + length :]
        if flags & 0x02:
            assert message == {} and not raw
            break
        data = message["event"].get("data", {})
        stdout += base64.b64decode(data.get("stdout", ""))
        stderr += base64.b64decode(data.get("stderr", ""))
    assert bytes(stdout) == expected_stdout(blocks, size)
    assert bytes(stderr) == b"".join(b"stderr line %d\n" % i for i in range(blocks))


def test_a_slow_binary_reader_paces_the_process_without_the_agent_buffering(lone_agent: Agent) -> None:
    size = 256 << 20
    stream = RawStream(lone_agent, ["/bin/sh", "-c", f"head -c {size} /dev/zero"], rcvbuf=64 << 10)
    got = 0
    with stream.sock, peak_rss(lone_agent) as rss:
        events = stream.events(limit=64 << 10)
        slow_until = time.monotonic() + 3
        for event in events:  # ~16 MB/s for 3 s (the agent could send ~50x as fast), then at full speed
            got += len(event.data.stdout)
            if time.monotonic() < slow_until:
                # Paced by bytes, not by events: at a fixed pause per event the first few tiny events
                # would hold the agent's next batch back past the stall timeout (2 s), and the agent
                # would rightly drop this client as one that stopped reading.
                time.sleep(len(event.data.stdout) / 16e6)
            elif event.HasField("end"):
                assert (event.end.exited, event.end.exit_code) == (True, 0)
        assert stream.done
    assert got == size
    assert rss[1] - rss[0] < RSS_GROWTH_LIMIT, f"RSS grew {(rss[1] - rss[0]) >> 20} MiB"


def test_a_client_that_vanishes_mid_stream_leaves_the_agent_serving(lone_agent: Agent) -> None:
    pids: list[int] = []
    try:
        for abort in (False, True):  # a plain close, then a reset (SO_LINGER 0) in the middle of a chunk
            stream = RawStream(lone_agent, ["/bin/sh", "-c", "exec cat /dev/zero"])
            got = 0
            for event in stream.events(limit=100_000):
                if event.HasField("start"):
                    pids.append(event.start.pid)
                got += len(event.data.stdout)
                if got > 8 << 20:
                    break
            if abort:
                stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.sock.close()
        # The agent goes on serving: health, and a new binary stream on a new connection.
        assert httpx.get(f"{lone_agent.url}/health", timeout=10).status_code == 204
        assert drain(RawStream(lone_agent, ["/bin/sh", "-c", "printf still-here"]))[0] == b"still-here"
        # As envd, a Start's process outlives its stream: both ``cat``s still run, and can be killed.
        listed = httpx.post(f"{lone_agent.url}/process.Process/List", json={}, headers=CONNECT, timeout=10)
        assert set(pids) <= {info["pid"] for info in listed.json()["processes"]}
    finally:
        for pid in pids:
            httpx.post(
                f"{lone_agent.url}/process.Process/SendSignal",
                json={"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"},
                headers=CONNECT,
                timeout=10,
            )


# ---------------------------------------------------------------------------------------- the hand-off
# A binary stream's data frames are written by a worker thread straight from the ring to the socket
# (``Subscriber.pump``, named ``output-pump`` while it runs); the event loop takes the socket back for
# the end event, a lag, a deadline or a client that left.


def pump_threads(agent: Agent) -> int:
    """How many of the agent's threads are writing a stream now."""
    count = 0
    for comm in (Path(f"/proc/{agent.process.pid}/task")).glob("*/comm"):
        with contextlib.suppress(OSError):
            count += comm.read_text().strip() == "output-pump"
    return count


def test_a_flooding_stream_is_written_by_a_pump_thread(lone_agent: Agent) -> None:
    stream = RawStream(lone_agent, ["/bin/sh", "-c", "head -c 64M /dev/zero; sleep 1; printf tail"])
    seen = 0
    stdout = 0
    with stream.sock:
        for event in stream.events():
            stdout += len(event.data.stdout)
            if not seen:  # (the socket may be refused a few batches while the start event is buffered)
                seen = pump_threads(lone_agent)
        assert stream.done
    assert stdout == (64 << 20) + 4
    assert seen == 1
    deadline = time.monotonic() + 10  # the thread ends with its stream (a moment after its last write)
    while pump_threads(lone_agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pump_threads(lone_agent) == 0


def test_a_pty_flood_arrives_whole_and_in_order_written_by_a_pump_thread(lone_agent: Agent) -> None:
    """A PTY hands over ~4 KiB per read; the agent gathers a flood's reads into larger chunks (the
    reader thread, ``pump_pty``), so it reaches the hand-off like a pipe's, and loses or reorders
    nothing on the way: stdout and stderr share the terminal, in the order written, with the line
    discipline's "\n" → "\r\n"."""
    blocks, size = 24, 1 << 20
    stream = RawStream(lone_agent, [sys.executable, "-c", PATTERN_CHILD, str(blocks), str(size)], pty=True)
    got = bytearray()
    seen = 0
    end = None
    with stream.sock:
        for event in stream.events():
            if event.HasField("data"):
                assert not event.data.stdout and not event.data.stderr
                got += event.data.pty
            elif event.HasField("end"):
                end = event.end
            if not seen:
                seen = pump_threads(lone_agent)
        assert stream.done
    assert end is not None and (end.exited, end.exit_code) == (True, 0)
    written = b"".join(
        bytes([i % 251]) * 7 + (b"%08d" % i) * ((size - 7) // 8) + b"stderr line %d\n" % i for i in range(blocks)
    )
    expected = written.replace(b"\n", b"\r\n")
    assert len(got) == len(expected)
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    assert seen == 1, "the PTY flood was never handed to a pump thread"


def test_a_full_gathered_pty_chunk_is_enough_to_hand_a_stream_off() -> None:
    """The hand-off waits for a batch of ``HAND_OFF_ABOVE`` bytes; a PTY flood's batches are gathered
    chunks, so a bound above the gathering's would leave PTY floods on the loop whenever it keeps up."""
    from sandboxd import _core
    from sandboxd.agent.services.process import HAND_OFF_ABOVE

    assert HAND_OFF_ABOVE <= _core.PTY_GATHER_BYTES


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"GET /health HTTP/1.1\r\nHost: agent\r\n\r\n", b"HTTP/1.1 204"),
        (b"\x16\x03\x01 not HTTP at all\r\n\r\n", b"HTTP/1.1 400"),  # garbage: refused, after the stream
    ],
    ids=["request", "garbage"],
)
def test_a_pipelined_request_sent_during_a_handed_off_stream_is_answered_after_it(
    lone_agent: Agent, sent: bytes, answer: bytes
) -> None:
    stream = RawStream(lone_agent, ["/bin/sh", "-c", "head -c 16M /dev/zero; sleep 0.5; head -c 16M /dev/zero"])
    with stream.sock:
        events = stream.events()
        got = 0
        for event in events:
            got += len(event.data.stdout)
            if got >= 4 << 20 and pump_threads(lone_agent):
                break
        # The next request, sent while the thread owns the socket: it waits in the socket, unread.
        stream.sock.sendall(sent)
        for event in events:
            got += len(event.data.stdout)
        assert stream.done and got == 32 << 20
        head = stream._until(b"\r\n\r\n")
        assert head.startswith(answer), head


def test_a_second_subscriber_gets_the_replay_and_the_rest_through_its_own_pump(lone_agent: Agent) -> None:
    script = "printf first; sleep 1; head -c 16M /dev/zero; printf last"
    start = RawStream(lone_agent, ["/bin/sh", "-c", script])
    with start.sock:
        events = start.events()
        pid = next(events).start.pid
        second = RawStream(lone_agent, [], connect_pid=pid)
        out_first, out_second = bytearray(), bytearray()

        def read_first() -> None:
            for event in events:
                out_first.extend(event.data.stdout)

        reader = threading.Thread(target=read_first)  # both read at once: the ring waits for each
        reader.start()
        with second.sock:
            for event in second.events():
                out_second += event.data.stdout
        reader.join(60)
    expected = b"first" + bytes(16 << 20) + b"last"
    assert bytes(out_second) == expected  # replayed from the ring, then live
    assert bytes(out_first) == expected


def test_keepalives_come_from_the_pump_while_the_process_is_quiet(lone_agent: Agent) -> None:
    # Two keepalives at a 1 s interval need 2 s of quiet; 3.5 s after the client starts reading leaves
    # a loaded host's late timers room (with 2.5 s it saw one, once, at load ~100).
    # The stream must flood for the hand-off: a client that reads as fast as a slowed `head` writes
    # (CI at load ~200 did) sees small batches through the loop, and then no pump at all. So the client
    # waits a second before reading, with a small receive buffer: the socket fills and the ring backs
    # up behind it, as under a flood.
    argv = ["/bin/sh", "-c", "head -c 4M /dev/zero; sleep 4.5; printf b"]
    stream = RawStream(lone_agent, argv, headers={"Keepalive-Ping-Interval": "1"}, rcvbuf=64 << 10, wait=1.0)
    kinds: list[str] = []
    pumping = 0
    with stream.sock:
        for event in stream.events():
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "keepalive" and not pumping:
                pumping = pump_threads(lone_agent)
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2, kinds
    assert pumping == 1


def test_a_deadline_cuts_a_handed_off_stream_with_valid_framing(lone_agent: Agent) -> None:
    """The deadline passes while the thread waits for a client that stopped reading, with a frame
    half written: the rest of that frame, then the ``deadline_exceeded`` end-stream frame."""
    argv = ["/bin/sh", "-c", "exec cat /dev/zero"]
    stream = RawStream(lone_agent, argv, rcvbuf=64 << 10, headers={"Connect-Timeout-Ms": "2500"})
    got = 0
    for event in stream.events(limit=64 << 10):  # reading until the thread has the socket
        got += len(event.data.stdout)
        if got > 4 << 20 and pump_threads(lone_agent):
            break
    time.sleep(3)  # then not reading: the deadline passes with the socket full
    with stream.sock:
        while True:  # every chunk and envelope well formed up to the end-stream frame
            while len(stream.body) < 5 or len(stream.body) < 5 + struct.unpack_from(">I", stream.body, 1)[0]:
                assert stream._chunk(), "the body ended inside an envelope"
            flags, length = struct.unpack_from(">BI", stream.body)
            payload = bytes(stream.body[5 : 5 + length])
            del stream.body[: 5 + length]
            if flags & 0x02:
                assert json.loads(payload)["error"]["code"] == "deadline_exceeded", payload
                break
            assert pb.StartResponse.FromString(payload).event.HasField("data")
        assert not stream._chunk()


@contextlib.contextmanager
def pids_capped(pid: int, room: int) -> Iterator[None]:
    """Runs ``pid`` in a pids cgroup of its own (unique name, removed after) that holds ``room`` tasks
    more than it has now: as a sandbox whose code has used up its pids limit leaves its agent."""
    v1 = Path("/sys/fs/cgroup/pids")
    v2 = Path("/sys/fs/cgroup")
    if (v1 / "cgroup.procs").exists():
        root = v1
    elif "pids" in (v2 / "cgroup.subtree_control").read_text(errors="replace").split():
        root = v2
    else:
        pytest.skip("no pids cgroup controller to cap the agent's tasks with")
    line = next(
        entry
        for entry in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if ":pids:" in entry or entry.startswith("0::")
    )
    home = root / line.split(":", 2)[2].lstrip("/")
    group = root / f"sandboxd-test-pids-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "pids.max").write_text(str(int((group / "pids.current").read_text()) + room))
        yield
    finally:
        (group / "pids.max").write_text("max")
        for task in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # a task that has exited meanwhile
                (home / "cgroup.procs").write_text(task)
        group.rmdir()


def test_a_flooding_stream_falls_back_to_the_loop_when_no_thread_can_be_started(
    start_agent: Callable[..., Agent],
) -> None:
    """Code in a sandbox can use up its pids limit (a fork bomb): the agent then cannot start a pump
    thread, and a flooding stream must still be written whole, by the event loop (which holds no
    thread), not cut with an ``internal`` error."""
    agent = start_agent()
    with pids_capped(agent.process.pid, room=2):  # the child and its reaper; none left for a pump
        stream = RawStream(agent, ["/bin/sh", "-c", "exec head -c 8M /dev/zero"])
        with stream.sock:
            stdout, _, end = drain(stream)
    assert len(stdout) == 8 << 20 and end.exit_code == 0


def test_a_flooding_stream_falls_back_to_the_loop_when_no_descriptor_is_left(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """The hand-off takes two descriptors (its own dup of the socket, the cancel eventfd); an agent at
    its ``RLIMIT_NOFILE`` (many processes' pipes, say) has none to give. The stream must still be
    written whole by the event loop, which needs none, with the connection reading again after it,
    not cut with an ``internal`` error."""
    agent = start_agent()
    go = tmp_path / "go"
    script = f"printf ready; while [ ! -e {go} ]; do sleep 0.05; done; head -c 8M /dev/zero; printf tail"
    stream = RawStream(agent, ["/bin/sh", "-c", script])
    pid = agent.process.pid
    with stream.sock:
        events = stream.events()
        stdout = bytearray()
        while bytes(stdout) != b"ready":
            stdout += next(events).data.stdout
        # Every descriptor the agent may take next is past the limit: the lowest free number is.
        open_fds = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = next(n for n in range(len(open_fds) + 1) if n not in open_fds)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            go.touch()
            end = None
            for event in events:
                stdout += event.data.stdout
                if event.HasField("end"):
                    end = event.end
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert end is not None and end.exit_code == 0
        assert len(stdout) == len(b"ready") + (8 << 20) + len(b"tail") and stdout.endswith(b"tail")
        again = RawStream(agent, ["/bin/sh", "-c", "printf again"], stream.sock)  # the connection goes on
        assert drain(again)[0] == b"again"


def test_past_the_hand_off_cap_a_flooding_stream_goes_through_the_loop_whole(start_agent: Callable[..., Agent]) -> None:
    """Sixteen clients that stop reading hold every pump thread (``MAX_HANDED_OFF``): one more flooding
    stream is refused a thread and written, whole and well framed, by the event loop; the stalled ones'
    threads end when their clients leave."""
    from sandboxd.agent.http_server import MAX_HANDED_OFF

    agent = start_agent()  # its own: the cap counts every stream of the process
    stalled: list[RawStream] = []
    try:
        while len(stalled) < MAX_HANDED_OFF:
            stream = RawStream(agent, ["/bin/sh", "-c", "exec head -c 64M /dev/zero"], rcvbuf=64 << 10)
            stalled.append(stream)
            got = 0
            for event in stream.events(limit=64 << 10):  # until its thread has the socket, then stop
                got += len(event.data.stdout)
                if got >= 2 << 20 and pump_threads(agent) == len(stalled):
                    break
        extra = RawStream(agent, ["/bin/sh", "-c", "head -c 16M /dev/zero; printf end"])
        with extra.sock:
            stdout, _, end = drain(extra)
            assert pump_threads(agent) == MAX_HANDED_OFF
        assert len(stdout) == (16 << 20) + 3 and stdout.endswith(b"end") and end.exit_code == 0
    finally:
        for stream in stalled:
            stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
            stream.sock.close()
    deadline = time.monotonic() + 10
    while pump_threads(agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pump_threads(agent) == 0


def test_two_hundred_short_flooding_streams_leave_no_descriptor_or_thread_behind(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent()
    pid = agent.process.pid

    def one() -> None:
        stream = RawStream(agent, ["/bin/sh", "-c", "exec head -c 1M /dev/zero"])
        with stream.sock:
            stdout, _, _ = drain(stream)
        assert len(stdout) == 1 << 20

    def counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))

    for _ in range(5):  # what stays for good (imports, the loop's own descriptors) is made here
        one()
    time.sleep(0.5)
    before = counts()
    for _ in range(200):
        one()
    deadline = time.monotonic() + 10  # each thread and child reaper ends a moment after its stream
    while (now := counts()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    fds, threads = now
    assert fds <= before[0] and threads <= before[1], (before, (fds, threads))


def test_sigterm_stops_the_agent_within_its_grace_while_a_stalled_stream_is_handed_off(
    start_agent: Callable[..., Agent],
) -> None:
    """A stream whose client stopped reading (its thread waiting for the socket) ends only when the
    client reads or leaves: SIGTERM must not wait for it past the agent's grace."""
    agent = start_agent()
    stream = RawStream(agent, ["/bin/sh", "-c", "exec head -c 1G /dev/zero"], rcvbuf=64 << 10)
    with stream.sock:
        got = 0
        for event in stream.events(limit=64 << 10):
            got += len(event.data.stdout)
            if got >= 4 << 20 and pump_threads(agent):
                break
        started = time.monotonic()
        agent.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.process.wait(15)  # the grace (agent.http_server.SHUTDOWN_GRACE_S) with room to spare
        took = time.monotonic() - started
    assert agent.process.returncode is not None, f"still running {took:.1f} s after SIGTERM"


def test_a_standalone_agent_stopped_by_sigterm_leaves_its_processes_running_as_envd_does(
    start_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """envd has no handler for SIGTERM and gives its commands no process group or parent-death signal:
    they outlive it. So do the agent's (docs/agent.md says so); in a sandbox, its init takes them down."""
    import signal

    agent = start_agent()
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)
    from e2b import Sandbox

    sbx = Sandbox.create()
    pid = sbx.commands.run("exec sleep 1000", background=True).pid
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").read_bytes() != b"sleep\x001000\x00":  # the shell execs it
            assert time.monotonic() < deadline, Path(f"/proc/{pid}/cmdline").read_bytes()
            time.sleep(0.02)
        agent.process.terminate()
        agent.process.wait(15)
        time.sleep(0.2)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        assert state[0] in ("S", "R") and int(state[1]) != agent.process.pid, state  # running, reparented
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


PIDFD_GETFD = 438
"""``pidfd_getfd(2)``'s syscall number (the same on every architecture since Linux 5.6)."""


def agent_side(agent: Agent, client: socket.socket) -> socket.socket:
    """A copy of the agent's own descriptor for ``client``'s connection (``pidfd_getfd``; root), to
    read its socket options."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pid = agent.process.pid
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            sock = socket.socket(fileno=fd)
            with contextlib.suppress(OSError):
                if sock.getpeername() == client.getsockname():
                    return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("no descriptor of the agent's is connected to this client")


def test_the_sockets_notsent_lowat_is_set_while_handed_off_and_restored_after(lone_agent: Agent) -> None:
    from sandboxd.agent.http_server import NOTSENT_LOWAT

    stream = RawStream(lone_agent, ["/bin/sh", "-c", "head -c 16M /dev/zero; sleep 0.3; printf x"])
    during = None
    with stream.sock:
        for _ in stream.events():
            if during is None and pump_threads(lone_agent):
                with agent_side(lone_agent, stream.sock) as theirs:
                    during = theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert stream.done
        with agent_side(lone_agent, stream.sock) as theirs:  # the next request on it gets the socket's own
            after = theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert (during, after) == (NOTSENT_LOWAT, 0)


def test_a_client_that_half_closes_mid_hand_off_has_its_stream_closed_and_frees_the_thread(
    lone_agent: Agent,
) -> None:
    """As through the loop (uvicorn closes a connection whose client shut its sending side), the
    stream ends with the connection; the process goes on; the thread does not stay."""
    stream = RawStream(lone_agent, ["/bin/sh", "-c", "exec head -c 256M /dev/zero"])
    with stream.sock:
        got = 0
        for event in stream.events():
            got += len(event.data.stdout)
            if got >= 4 << 20 and pump_threads(lone_agent):
                break
        stream.sock.shutdown(socket.SHUT_WR)
        stream.sock.settimeout(10)
        while stream.sock.recv(1 << 20):  # what was under way, then the agent's close
            pass
    deadline = time.monotonic() + 10
    while pump_threads(lone_agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pump_threads(lone_agent) == 0
    assert httpx.get(f"{lone_agent.url}/health", timeout=5).status_code == 204
