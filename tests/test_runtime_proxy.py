"""The runtime's sandbox proxy is a faithful pipe (issue 11 item 4, issue 12 items 6, 9, 10 and 12): client
aborts reach the sandbox at once, an upstream that dies mid-answer resets the client (so the SDK says the
sandbox was killed), upgrades (WebSockets and others) are carried both ways, signed ``/files`` URLs find
their sandbox without naming it, and Host routing works over TLS with ``--domain``. Real runtime, real
sandboxes, real servers inside them, the official SDK."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Agent, Runtime
from e2b import Sandbox
from e2b.exceptions import TimeoutException

WS_ECHO_SERVER = r"""
import asyncio, base64, hashlib, struct, sys

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

async def serve(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
    )
    accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + MAGIC).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Seen-Host: " + headers.get(b"host", b"") + b"\r\n\r\n"
    )
    while True:
        first, second = await reader.readexactly(2)
        opcode, length = first & 0x0F, second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        mask = await reader.readexactly(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(length)))
        if opcode == 8:  # close: answer it and end
            writer.write(b"\x88\x02\x03\xe8")
            await writer.drain()
            writer.close()
            return
        reply = b"echo: " + data
        size = len(reply)
        prefix = bytes([0x80 | opcode]) + (
            bytes([size]) if size < 126 else b"\x7e" + struct.pack("!H", size) if size < 65536
            else b"\x7f" + struct.pack("!Q", size)
        )
        writer.write(prefix + reply)
        await writer.drain()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

ANSWERING_SERVER = r"""
import socket, sys, threading, time

def answer(conn):
    if conn.recv(65536):
        conn.sendall(b"HTTP/1.1 200 OK\r\n%s\r\n" % HEAD)
        conn.sendall(BODY)
        if STALL:
            time.sleep(3600)
        conn.close()

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
while True:
    threading.Thread(target=answer, args=(srv.accept()[0],), daemon=True).start()
"""
"""A server that answers each request with the head lines ``HEAD``, then ``BODY``, then, with
``STALL``, nothing more (the connection kept open), else the end: the settings go first."""

SHORT_BODY_SERVER = (
    f"HEAD, BODY, STALL = b'Content-Length: {64 << 20}\\r\\n', b'x' * (4 << 20), False\n"  # 4 of 64 MiB
    + ANSWERING_SERVER
)
STALLING_SERVER = (
    f"HEAD, BODY, STALL = b'Content-Length: {64 << 20}\\r\\n', b's' * (2 << 20), True\n" + ANSWERING_SERVER
)
PARTIAL_ANSWER_SERVER = (
    # the rest of the answer never comes: the sandbox is killed first
    "HEAD, BODY, STALL = b'Transfer-Encoding: chunked\\r\\n', b'5\\r\\nhello\\r\\n', True\n" + ANSWERING_SERVER
)


HTTPS_SERVER = r"""
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = bytes(range(256)) * (3 << 12) if self.path == "/big" else b"over tls: " + self.path.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tmp/tls/cert.pem", "/tmp/tls/key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

PLAIN_HTTP_SERVER = r"""
import http.server, sys
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

WSS_ECHO_SERVER = WS_ECHO_SERVER.replace(
    'asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))',
    'asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), ssl=TLS)',
).replace(
    "async def main():",
    "import ssl\nTLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
    'TLS.load_cert_chain("/tmp/tls/cert.pem", "/tmp/tls/key.pem")\n\nasync def main():',
)


@pytest.fixture
def sdk(e2b_env: Runtime) -> Iterator[Runtime]:
    yield e2b_env


def _serve_in(sbx: Sandbox, script: str, port: int) -> None:
    """Start ``script`` (Python, stdlib only) in the sandbox on ``port``; wait until it listens."""
    sbx.files.write(f"/tmp/server-{port}.py", script)
    sbx.commands.run(f"python3 /tmp/server-{port}.py {port}", background=True, timeout=0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\""
        if sbx.commands.run(f"{probe} && echo up || true").stdout.strip() == "up":
            return
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} in the sandbox never listened")


def _fds(pid: int) -> int:
    """``pid``'s sockets, pipes and other kernel objects (what a relay holds), not its files: the disk
    pool's mounted disks come and go with its refills (25 ms after a create took one, and then the
    copy and the mount), which a count of every descriptor caught between two snapshots (CI73)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(("socket:", "pipe:", "anon_inode:")):
                count += 1
    return count


def _sandbox_sockets(pid: int) -> set[str]:
    """``pid``'s sockets that its own network namespace does not list: those into sandboxes (the
    runtime's connections to agents and servers). Its API clients' connections do not count."""
    own = set()
    for table in ("tcp", "tcp6", "udp", "udp6", "unix", "netlink", "raw", "packet"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                # unix: Inode is the 7th column; netlink, packet: the last; tcp, udp, raw: the 10th
                own.add(fields[6] if table == "unix" else fields[-1] if table in ("netlink", "packet") else fields[9])
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target[8:-1] not in own:
            found.add(target)
    return found


def _boot_done(runtime: Runtime, sandbox_id: str) -> None:
    """Return once the sandbox's boot is done, its kept ``/init`` connection made, without a request
    into it (``Runtime.booted``'s would take that connection): a create is answered before its
    ``/init``, and its row says ``booting`` until the boot is done."""
    import sqlite3

    deadline = time.monotonic() + 60
    db = sqlite3.connect(f"file:{runtime.data_dir / 'sandboxd.db'}?mode=ro", uri=True, timeout=5)
    try:
        while db.execute("SELECT booting FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the sandbox's boot never finished"
            time.sleep(0.01)
    finally:
        db.close()


# ------------------------------------------------------------------------------------- kill


def test_killing_a_sandbox_under_a_running_command_raises_timeout(sdk: Runtime) -> None:
    sbx = Sandbox.create()
    cmd = sbx.commands.run("sleep 30", background=True)
    started = time.monotonic()
    assert Sandbox.kill(sbx.sandbox_id) is True
    with pytest.raises(TimeoutException) as raised:
        cmd.wait()
    assert "killed or reached its end of life" in str(raised.value), raised.value
    assert time.monotonic() - started < 10
    health = httpx.get(f"{sdk.url}/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
    assert health.status_code == 502
    assert "was not found" in health.json()["message"]


def test_an_upstream_that_dies_mid_answer_resets_the_client(sdk: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        _serve_in(sbx, PARTIAL_ANSWER_SERVER, 8100)
        with socket.create_connection(("127.0.0.1", sdk.port), timeout=20) as client:
            client.sendall(
                f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {sbx.sandbox_id}\r\n"
                "E2b-Sandbox-Port: 8100\r\n\r\n".encode()
            )
            received = b""
            while b"hello" not in received:
                received += client.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            sbx.kill()
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while client.recv(65536):  # a clean end (b"") would mean a complete-looking answer
                    pass
    finally:
        sbx.kill()


def test_a_large_download_through_the_proxy_arrives_byte_exact_on_a_kept_connection(sdk: Runtime) -> None:
    """A body of megabytes moves from the sandbox's socket to the client's by ``splice(2)`` (issue 16):
    the bytes arrive whole, twice on one kept-alive client connection, and the same connection and the
    pooled upstream then carry an ordinary request."""
    sbx = Sandbox.create()
    try:
        sbx.commands.run("head -c 25165829 /dev/urandom > /home/user/big.bin", timeout=60)  # 24 MiB + 5
        want = sbx.commands.run("sha256sum /home/user/big.bin").stdout.split()[0]
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": info["envdAccessToken"]}
        with httpx.Client(timeout=60, headers=headers) as client:
            for _ in range(2):
                r = client.get(f"{sdk.url}/files", params={"path": "/home/user/big.bin"})
                assert r.status_code == 200
                assert int(r.headers["content-length"]) == len(r.content) == 25165829
                assert hashlib.sha256(r.content).hexdigest() == want
            assert client.get(f"{sdk.url}/health").status_code == 204
    finally:
        sbx.kill()


def test_a_client_on_this_host_gets_the_agents_downloads_as_they_are(sdk: Runtime) -> None:
    """The SDKs send ``Accept-Encoding: gzip, deflate`` on every ``files.read``; over loopback gzip saves
    no byte and costs both ends (4 MiB of text: 75 ms gzipped, 10 ms not, issue 16). Through the proxy
    a client on this host gets a compressible file whole with its ``Content-Length``; one that a
    reverse proxy forwarded (``X-Forwarded-For``, ``Forwarded``) still gets the agent's gzip, and so
    does one that asked for gzip alone (the SDKs' ``gzip=True``)."""
    sbx = Sandbox.create()
    try:
        text = "".join(f"line {i}: the same words again and again\n" for i in range(40_000)).encode()
        sbx.files.write("/home/user/log.txt", text)
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": info["envdAccessToken"]}
        sdk_accepts = httpx.Client().headers["accept-encoding"]
        assert "gzip" in sdk_accepts  # else this no longer asks what the SDK asks
        with httpx.Client(timeout=30, headers={**headers, "Accept-Encoding": sdk_accepts}) as client:
            url = f"{sdk.url}/files"
            r = client.get(url, params={"path": "/home/user/log.txt"})
            assert r.status_code == 200 and "content-encoding" not in r.headers
            assert r.headers["content-length"] == str(len(text)) and r.content == text
            for forwarded in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}):
                r = client.get(url, params={"path": "/home/user/log.txt"}, headers=forwarded)
                assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip", forwarded
                assert r.content == text  # httpx inflates
            r = client.get(url, params={"path": "/home/user/log.txt"}, headers={"Accept-Encoding": "gzip"})
            assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip" and r.content == text
        assert sbx.files.read("/home/user/log.txt", format="bytes") == text
        assert sbx.files.read("/home/user/log.txt", format="bytes", gzip=True) == text
    finally:
        sbx.kill()


@pytest.mark.parametrize(
    ("accept_encoding", "dropped"),
    [
        ([b"gzip, deflate"], True),  # httpx's default: the SDK's gzip=False
        ([b"gzip, deflate, br, zstd"], True),
        ([b"br", b"gzip"], True),  # two lines: one header, both codings
        ([], False),
        ([b"gzip"], False),  # the SDKs' gzip=True
        ([b"GZIP"], False),
        ([b"gzip;q=1"], False),
        ([b"x-gzip"], False),
        ([b"gzip", b"identity;q=0.5"], False),
        ([b"gzip, br;q=0"], False),
        ([b"gzip;q=0, br"], True),
        ([b"*"], True),
        ([b"gzip;q=bogus"], True),
    ],
)
def test_only_an_ask_for_gzip_alone_keeps_its_accept_encoding_from_this_host(
    accept_encoding: list[bytes], dropped: bool
) -> None:
    from sandboxd.runtime.proxy import ENVD_PORT, SAME_HOST_DROPPED, _dropped

    headers = [(b"Accept-Encoding", value) for value in accept_encoding]
    scope = {"client": ("127.0.0.1", 5000), "headers": headers}
    assert _dropped(scope, ENVD_PORT) == (SAME_HOST_DROPPED if dropped else frozenset())
    assert _dropped(scope, 8080) == frozenset()  # a server of the sandbox's own: as the client sent it
    forwarded = {"client": ("127.0.0.1", 5000), "headers": [*headers, (b"Via", b"1.1 squid")]}
    assert _dropped(forwarded, ENVD_PORT) == frozenset()


@pytest.mark.parametrize(
    ("client", "headers", "expected"),
    [
        (("127.0.0.1", 5000), [], True),
        (("127.9.8.7", 5000), [], True),
        (("::1", 5000), [], True),
        (("::ffff:127.0.0.1", 5000), [], True),
        (("10.0.0.1", 5000), [], False),
        (("::ffff:10.0.0.1", 5000), [], False),
        (("127.0.0.1", 5000), [(b"X-Real-IP", b"203.0.113.7")], False),
        (("127.0.0.1", 5000), [(b"x-forwarded-for", b"203.0.113.7")], False),
        (("127.0.0.1", 5000), [(b"forwarded", b"for=203.0.113.7")], False),
        (None, [], False),
        (("not-an-address", 0), [], False),
    ],
)
def test_same_host_is_a_loopback_peer_that_no_proxy_forwarded(
    client: tuple[str, int] | None, headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    from sandboxd.runtime.proxy import same_host

    assert same_host({"client": client, "headers": headers}) is expected


def test_an_upstream_whose_body_ends_short_resets_the_client(sdk: Runtime) -> None:
    """A sandbox server that announces 64 MiB and sends 4 before closing: the client's connection is
    reset (a clean end after fewer bytes would pass for a complete answer), spliced or not."""
    sbx = Sandbox.create()
    try:
        _serve_in(sbx, SHORT_BODY_SERVER, 8101)
        with socket.create_connection(("127.0.0.1", sdk.port), timeout=20) as client:
            client.sendall(
                f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {sbx.sandbox_id}\r\n"
                "E2b-Sandbox-Port: 8101\r\n\r\n".encode()
            )
            received = 0
            with pytest.raises(ConnectionResetError):
                while chunk := client.recv(1 << 20):
                    received += len(chunk)
            assert received < (64 << 20)
        assert sbx.files.exists("/home/user")  # the runtime and the sandbox's agent go on
    finally:
        sbx.kill()


def test_a_sandbox_that_stalls_its_downloads_holds_no_more_than_the_cap_of_the_runtimes_threads(
    sdk: Runtime,
) -> None:
    """Code in a sandbox answers 20 downloads with 2 MiB of 64 and then nothing, connections open:
    at most 16 of them hold a runtime thread (the rest wait on the event loop, which holds none),
    another sandbox's download goes through whole meanwhile, and the clients leaving frees every
    thread and descriptor although the sandbox never sends again."""
    staller = Sandbox.create()
    other = Sandbox.create()
    try:
        _serve_in(staller, STALLING_SERVER, 8102)
        other.commands.run("head -c 8388608 /dev/urandom > /home/user/ok.bin", timeout=60)
        want = other.commands.run("sha256sum /home/user/ok.bin").stdout.split()[0]
        info = httpx.get(f"{sdk.url}/sandboxes/{other.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        pid = sdk.process.pid
        threads_before = len(os.listdir(f"/proc/{pid}/task"))
        fds_before = _fds(pid)
        clients = []
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", sdk.port), timeout=20)
            client.sendall(
                f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {staller.sandbox_id}\r\n"
                "E2b-Sandbox-Port: 8102\r\n\r\n".encode()
            )
            clients.append(client)
        for client in clients:  # each has its 2 MiB: its body is under way
            received = 0
            while received < (2 << 20):
                received += len(client.recv(1 << 20))
        assert len(os.listdir(f"/proc/{pid}/task")) <= threads_before + 16
        answer = httpx.get(
            f"{sdk.url}/files",
            params={"path": "/home/user/ok.bin"},
            headers={"E2b-Sandbox-Id": other.sandbox_id, "X-Access-Token": info["envdAccessToken"]},
            timeout=30,
        )
        assert hashlib.sha256(answer.content).hexdigest() == want
        for client in clients:
            client.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            len(os.listdir(f"/proc/{pid}/task")) > threads_before or _fds(pid) > fds_before
        ):
            time.sleep(0.1)
        assert len(os.listdir(f"/proc/{pid}/task")) <= threads_before, "a stalled download kept its thread"
        assert _fds(pid) <= fds_before, "a stalled download kept its descriptors"
    finally:
        staller.kill()
        other.kill()


def test_a_client_that_leaves_mid_download_costs_nothing_after(sdk: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        sbx.commands.run("head -c 67108864 /dev/zero > /home/user/zero.bin", timeout=60)
        sbx.files.write("/home/user/warm", "x")  # the runtime's pool warm, so fds compare like with like
        baseline = _fds(sdk.process.pid)
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", sdk.port), timeout=20) as client:
                client.sendall(
                    f"GET /files?path=/home/user/zero.bin HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {sbx.sandbox_id}"
                    f"\r\nX-Access-Token: {info['envdAccessToken']}\r\n\r\n".encode()
                )
                received = 0
                while received < (4 << 20):
                    received += len(client.recv(1 << 20))
        deadline = time.monotonic() + 10
        while _fds(sdk.process.pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _fds(sdk.process.pid) <= baseline, "the runtime kept an aborted download's descriptors"
        assert sbx.files.read("/home/user/warm") == "x"
    finally:
        sbx.kill()


SILENT_SERVER = r"""
import socket, sys, time

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    if not conn.recv(65536):  # the request, never answered (none: a probe that only connected)
        conn.close()
        continue
    conn.settimeout(60)
    try:
        left = conn.recv(1) == b""
    except OSError:
        left = True
    with open("/tmp/silent.log", "a") as log:
        log.write(f"{'closed' if left else 'timed out'} {time.time()}\n")
    conn.close()
"""
"""Reads each connection's request and never answers; logs when the connection is closed."""


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_client_that_leaves_before_any_answer_closes_the_sandbox_side_at_once(sdk: Runtime, method: str) -> None:
    """A request whose body went with its head (none, or small) is relayed with no task watching the
    client: the server's callback for a lost connection aborts the upstream. A client that leaves
    while the sandbox's server has not answered still closes the proxy's connection to that server
    at once, not when the server answers (never, here) or a pool reaps it."""
    sbx = Sandbox.create()
    try:
        _serve_in(sbx, SILENT_SERVER, 8124)
        body = b'{"x": 1}' if method == "POST" else b""
        with socket.create_connection(("127.0.0.1", sdk.port), timeout=20) as client:
            client.sendall(
                b"%b / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: %b\r\nE2b-Sandbox-Port: 8124\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (method.encode(), sbx.sandbox_id.encode(), len(body), body)
            )
            time.sleep(1)  # the request reaches the server, which keeps it unanswered
        deadline = time.monotonic() + 10
        seen = ""
        while time.monotonic() < deadline:
            seen = sbx.commands.run("cat /tmp/silent.log 2>/dev/null || true").stdout
            if seen:
                break
            time.sleep(0.2)
        assert seen.startswith("closed"), f"the sandbox's side stayed open after the client left: {seen!r}"
    finally:
        sbx.kill()


def test_upstream_connections_are_reused(sdk: Runtime) -> None:
    """Requests share pooled connections into the sandbox (a new one each is a thread hop and a setns
    per request): 50 calls leave at most a few closed connections behind in the sandbox."""
    sbx = Sandbox.create()
    try:
        for _ in range(50):
            assert sbx.files.exists("/home/user")
        closed = sbx.commands.run("ss -tan state time-wait | tail -n +2 | wc -l").stdout.strip()
        assert int(closed) <= 5, f"{closed} connections into the sandbox were closed for 50 requests"
    finally:
        sbx.kill()


RECORDING_SERVER = r"""
import json, socket, sys

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    pieces = [conn.recv(65536)]
    while not pieces[-1].endswith(b"0\r\n\r\n") and pieces[-1]:
        pieces.append(conn.recv(65536))
    got = b"".join(pieces)
    reply = json.dumps({"reads": len([p for p in pieces if p]), "request": got.decode("latin-1")}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(reply), reply))
    conn.close()
"""
"""Answers each connection's first request (a chunked one) with how many reads it took and its bytes."""


def test_a_chunked_body_that_came_with_its_head_goes_into_the_sandbox_with_it_in_one_write(sdk: Runtime) -> None:
    """The SDKs send a command's ``Start`` as a head and then a small chunked body. When the body is all
    there (here it comes in the head's own write), the proxy sends head and body into the sandbox in
    one write, the body still chunked and byte for byte: the server inside reads the whole request
    at once, where it used to get the head, the chunk and the body's end apart (three wake-ups)."""
    sbx = Sandbox.create()
    try:
        _serve_in(sbx, RECORDING_SERVER, 8123)
        payload = b'{"process":{"cmd":"/bin/bash","args":["-l","-c","true"]}}'
        request = (
            b"POST /process.Process/Start HTTP/1.1\r\nHost: 127.0.0.1\r\nE2b-Sandbox-Id: %b\r\n"
            b"E2b-Sandbox-Port: 8123\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n"
        ) % (sbx.sandbox_id.encode(), len(payload), payload)
        with socket.create_connection(("127.0.0.1", sdk.port), timeout=20) as client:
            client.sendall(request)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        head, _, reply = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        seen = json.loads(reply)
        upstream_head, _, upstream_body = seen["request"].encode("latin-1").partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in upstream_head.lower(), seen
        assert upstream_body == b"%x\r\n%b\r\n0\r\n\r\n" % (len(payload), payload), seen
        assert seen["reads"] == 1, f"the request reached the sandbox's server in {seen['reads']} writes"
    finally:
        sbx.kill()


def test_the_first_request_into_a_new_sandbox_takes_the_connection_of_its_init(sdk: Runtime) -> None:
    """The runtime's ``/init`` connection is kept alive and carries the first proxied request, so a
    new sandbox's first command needs no connect into it: none closed yet, one open (this command's)."""
    sbx = Sandbox.create()
    try:
        closed = "ss -tan state time-wait | tail -n +2 | wc -l"
        first = sbx.commands.run(f"{closed}; ss -tan state established '( sport = :49983 )' | tail -n +2 | wc -l")
        closed, open_ = first.stdout.split()
        assert (closed, open_) == ("0", "1"), first.stdout
    finally:
        sbx.kill()


def test_a_kept_connection_is_used_only_while_idle_and_open() -> None:
    """A kept ``/init`` connection whose agent closed it, or sent anything unasked, is not reused."""
    from sandboxd.runtime.manager import idle

    for fate in ("open", "closed", "spoke"):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            if fate == "closed":
                theirs.close()
            elif fate == "spoke":
                theirs.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            assert idle(ours) is (fate == "open"), fate


def test_agents_started_from_the_zygotes_prepared_state_keep_their_own_token_and_envs(sdk: Runtime) -> None:
    """Every sandbox's agent starts from the state the zygote prepared once: each still has its own
    access token and environment, and the first request into a sandbox (on its kept ``/init``
    connection) is refused with another sandbox's token."""
    a = Sandbox.create(envs={"WHO": "a"})
    b = Sandbox.create(envs={"WHO": "b"})
    try:
        tokens = [
            httpx.get(f"{sdk.url}/sandboxes/{s.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()[
                "envdAccessToken"
            ]
            for s in (a, b)
        ]
        assert tokens[0] and tokens[1] and tokens[0] != tokens[1]
        into_b = {"Host": f"49983-{b.sandbox_id}.local"}
        refused = httpx.get(f"{sdk.url}/envs", headers={**into_b, "X-Access-Token": tokens[0]})
        assert refused.status_code == 401, refused.text
        envs = httpx.get(f"{sdk.url}/envs", headers={**into_b, "X-Access-Token": tokens[1]})
        assert envs.status_code == 200 and envs.json().get("WHO") == "b", envs.text
        assert a.commands.run("echo $WHO").stdout == "a\n"
    finally:
        a.kill()
        b.kill()


def test_an_upgrade_as_the_first_request_into_a_new_sandbox_gets_its_agents_answer(sdk: Runtime) -> None:
    """An upgrade is spliced: as the first request into a new sandbox's agent it is carried on the
    kept ``/init`` connection, answered by the agent, and that connection closes when the client does."""
    sbx = Sandbox.create()
    try:
        _boot_done(sdk, sbx.sandbox_id)  # else the kept connection may not be made yet, nor seen here
        kept = _sandbox_sockets(sdk.process.pid)  # the kept connection among them
        with socket.create_connection(("127.0.0.1", sdk.port)) as client:
            client.sendall(
                f"GET /health HTTP/1.1\r\nHost: 49983-{sbx.sandbox_id}.local\r\n"
                "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode()
            )
            client.settimeout(10)
            answer = client.recv(4096)
            assert answer.startswith(b"HTTP/1.1 "), answer
        deadline = time.monotonic() + 5
        while kept <= _sandbox_sockets(sdk.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not kept <= _sandbox_sockets(sdk.process.pid), "the spliced kept connection stayed open"
        assert sbx.commands.run("echo ok").stdout == "ok\n"  # a fresh connection afterwards
    finally:
        sbx.kill()


def test_create_kill_cycles_leave_no_kept_connection_open(sdk: Runtime) -> None:
    """The kept ``/init`` connection closes on kill whether or not a first request took it: the
    runtime's sockets into sandboxes after 50 creates and kills (half with a first command) are those
    before (counted by namespace: the SDK's own connections to the API come and go meanwhile)."""

    def cycle(first_request: bool) -> None:
        sbx = Sandbox.create()
        try:
            if first_request:
                assert sbx.commands.run("echo ok").stdout == "ok\n"
        finally:
            sbx.kill()

    pid = sdk.process.pid
    cycle(True)
    cycle(False)  # the runtime's pools are open now
    before = _sandbox_sockets(pid)
    sbx = Sandbox.create()
    try:
        _boot_done(sdk, sbx.sandbox_id)  # the kept connection is made once the boot is: after the answer
        assert _sandbox_sockets(pid) - before, "the kept /init connection is not seen: this test could not fail"
    finally:
        sbx.kill()
    for i in range(50):
        cycle(i % 2 == 0)
    deadline = time.monotonic() + 5
    while _sandbox_sockets(pid) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sandbox_sockets(pid) - before


def test_a_kept_connection_is_handed_once_to_its_own_sandbox_and_dropped_after_its_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept ``/init`` connection goes to the first taker of its own sandbox only, once; it is
    closed when its window passes or its sandbox stops (the manager's bookkeeping, without a runtime)."""
    import asyncio

    from sandboxd.runtime import manager as manager_module

    monkeypatch.setattr(manager_module, "KEEP_INIT_CONNECTION_S", 0.05)
    manager = manager_module.SandboxManager.__new__(manager_module.SandboxManager)
    manager.handles = {"a": None, "b": None}  # type: ignore[dict-item]  # running: only membership is read
    manager._init_connections = {}

    async def main() -> None:
        pairs = [socket.socketpair() for _ in range(3)]
        manager._keep_init_connection("a", pairs[0][0])
        assert manager._take_init_connection("b") is None  # another sandbox's
        assert manager._take_init_connection("a") is pairs[0][0]
        assert manager._take_init_connection("a") is None  # once
        manager._keep_init_connection("a", pairs[1][0])
        await asyncio.sleep(0.2)
        assert pairs[1][0].fileno() == -1 and manager._take_init_connection("a") is None  # the window passed
        manager._keep_init_connection("b", pairs[2][0])
        manager._drop_init_connection("b")  # as every way out of a sandbox does
        assert pairs[2][0].fileno() == -1 and not manager._init_connections
        for ours, theirs in pairs:
            ours.close()
            theirs.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/health", b""), ("POST", "/filesystem.Filesystem/Stat", b'{"path": "/tmp"}')],
)
def test_a_kept_connection_the_agent_closes_as_it_is_handed_out_costs_a_fresh_one_not_a_502(
    start_agent: Callable[..., Agent], method: str, path: str, body: bytes
) -> None:
    """The agent closes the kept ``/init`` connection in the instant the runtime hands it out (after
    the runtime saw it idle, before the request reached it): here a real agent at its connection cap
    (1) evicts it, idle, to admit another connection. The request, which nothing answered, is sent
    again on a fresh connection, as one on a stale pooled connection is; a small body is held for
    that. The real proxy and agent; the runtime's backend is reduced to handing out the kept
    connection once, then connections to the agent."""
    import asyncio
    import select

    from sandboxd.runtime.network.policy import NetworkConfig
    from sandboxd.runtime.proxy import ENVD_PORT, SandboxProxy

    agent = start_agent("--max-connections", "1")
    others: list[socket.socket] = []

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        others.append(sock)
        return sock

    # The kept connection: one that carried a request (as /init's did) and is idle, kept alive.
    kept = connect()
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: sandbox\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 204"), "the agent did not answer on the kept connection"

    class Backend:
        handed = 0

        def _hand_kept(self) -> socket.socket | None:
            if self.handed:
                return None
            self.handed += 1
            connect()  # another connection at the agent's cap: the idle kept one is closed to admit it
            assert select.select([kept], [], [], 10)[0] and kept.recv(1, socket.MSG_PEEK) == b"", "not evicted"
            kept.setblocking(False)
            return kept

        def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None:
            return self._hand_kept()

        async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
            handed = self._hand_kept()  # as the manager's: the kept connection first, while there is one
            if handed is not None:
                return handed
            sock = connect()
            sock.setblocking(False)
            return sock

        async def ensure_reachable(self, sandbox_id: str) -> None:
            return None

        def network_config(self, sandbox_id: str) -> NetworkConfig:
            return NetworkConfig()

    async def main() -> tuple[int, bytes]:
        proxy = SandboxProxy(Backend())  # type: ignore[arg-type]
        headers = [(b"host", b"sandbox")]
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": headers}
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, object]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await proxy(scope, receive, send, "a", ENVD_PORT)
        proxy.forget("a")
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    try:
        status, answer = asyncio.run(main())
    finally:
        for sock in others:
            sock.close()
    assert status in (200, 204), (status, answer)
    if body:
        assert json.loads(answer)["entry"]["name"] == "tmp", answer


def relay_once(
    answer: Callable[[socket.socket], None], on_send: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """The real :class:`SandboxProxy` relaying one GET to a local 'sandbox' server, which reads the
    request and then runs ``answer`` on its connection; the ASGI messages the proxy sent (each also
    given to ``on_send`` as it is sent). The backend is reduced to connecting to that server."""
    import asyncio

    from sandboxd.runtime.network.policy import NetworkConfig
    from sandboxd.runtime.proxy import ENVD_PORT, SandboxProxy

    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    class Backend:
        def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None:
            return None

        async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
            sock = socket.create_connection(server.getsockname(), timeout=10)
            sock.setblocking(False)
            return sock

        async def ensure_reachable(self, sandbox_id: str) -> None:
            return None

        def network_config(self, sandbox_id: str) -> NetworkConfig:
            return NetworkConfig()

    async def main() -> list[dict[str, Any]]:
        proxy = SandboxProxy(Backend())  # type: ignore[arg-type]
        scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": [(b"host", b"s")]}
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, object]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if on_send is not None:
                on_send(message)

        await asyncio.wait_for(proxy(scope, receive, send, "a", ENVD_PORT), 60)
        proxy.forget("a")
        return sent

    try:
        return asyncio.run(main())
    finally:
        server.close()
        thread.join(30)


@pytest.mark.parametrize("apart", [False, True])
def test_an_answer_that_comes_in_one_piece_is_relayed_in_one_piece_and_a_head_alone_at_once(apart: bool) -> None:
    """A sandbox server's answer that arrives whole (a Connect stream's head, its message and its end,
    as the agent writes a short command's) goes to the client as a head held for its body
    (``BODY_FOLLOWS``: one write with it) and one body message that ends the response: one write, not
    four. A head that arrives alone (``apart``) is passed on at once, unheld, before the rest of the
    answer comes (the server sends the rest only once the client has seen the head): a stream's head is
    never held waiting for its first message. The real proxy and a real server on a socket; the
    backend is reduced to connecting to it."""
    from sandboxd.agent.asgi import BODY_FOLLOWS

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"5\r\nstart\r\n3\r\nend\r\n0\r\n\r\n"
    head_seen = threading.Event()

    def answer(conn: socket.socket) -> None:
        if apart:
            conn.sendall(head)
            assert head_seen.wait(10), "the head was not relayed before the rest of the answer came"
            conn.sendall(body)
        else:
            conn.sendall(head + body)
        conn.recv(65536)  # until the proxy closes or pools it

    def seen(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            head_seen.set()

    sent = relay_once(answer, seen)
    kinds = [(m["type"], m.get(BODY_FOLLOWS, False), m.get("body"), m.get("more_body")) for m in sent]
    if apart:  # the head at once, unheld; the rest, which came whole, as one message that ends the body
        assert kinds == [("http.response.start", False, None, None), ("http.response.body", False, b"startend", False)]
    else:
        assert kinds == [("http.response.start", True, None, None), ("http.response.body", False, b"startend", False)]


def test_an_init_answer_with_bytes_after_its_head_is_not_kept() -> None:
    """An agent (hostile code may replace it) that answers ``/init`` with its 204 and, in the same
    write, a response nobody asked for: that connection is not kept for the first request, even
    when the extra bytes end as a head does (one whole head, exactly, is the only answer kept)."""
    import asyncio

    from sandboxd.runtime.agent_client import init_agent

    head = b"HTTP/1.1 204 No Content\r\n\r\n"
    planted = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    async def answered(answer: bytes) -> bool:
        ours, theirs = socket.socketpair()
        with theirs:

            async def open_socket(port: int) -> socket.socket:
                return ours

            theirs.sendall(answer)  # ahead of the request: read after it is sent
            kept = await init_agent(open_socket, "token", {})
            if kept is not None:
                kept.close()
            return kept is not None

    assert asyncio.run(answered(head))  # the agent's own answer: kept
    assert not asyncio.run(answered(head + planted))


def test_an_init_cancelled_while_the_agent_has_not_answered_closes_its_connection() -> None:
    """``/init`` is cancelled when the sandbox's init exits first (``_agent_up``) or the create is
    abandoned: its connection into the sandbox must close then, not wait for the garbage collector
    (a socket keeps the sandbox's network namespace, and so its network slot, alive)."""
    import asyncio

    from sandboxd.runtime.agent_client import init_agent

    async def main() -> socket.socket:
        ours, theirs = socket.socketpair()  # an agent that takes /init and never answers
        opened = asyncio.Event()

        async def open_socket(port: int) -> socket.socket:
            opened.set()
            return ours

        task = asyncio.ensure_future(init_agent(open_socket, "token", {}))
        await opened.wait()
        await asyncio.sleep(0.05)  # the request is sent; the answer is awaited
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        theirs.close()
        return ours

    assert asyncio.run(main()).fileno() == -1


def test_a_create_cancelled_as_its_init_returns_closes_the_connection_it_returned() -> None:
    """``_agent_up`` cancelled (the create abandoned) after ``/init`` returned its kept-alive
    connection but before it resumed to keep it: nobody will take that connection, so it closes
    now. (The manager's own state that ``_agent_up`` touches, in place of a whole runtime.)"""
    import asyncio
    import types

    from sandboxd.runtime.manager import SandboxManager

    async def main() -> tuple[socket.socket, list[socket.socket]]:
        ours, theirs = socket.socketpair()
        theirs.close()
        returned = asyncio.Event()
        kept: list[socket.socket] = []

        async def init() -> socket.socket:
            returned.set()
            return ours

        manager = types.SimpleNamespace(_ending={}, _keep_init_connection=lambda _id, conn: kept.append(conn))
        running = types.SimpleNamespace(is_running=lambda: True)  # the sandbox's init, still running
        up = asyncio.ensure_future(SandboxManager._agent_up(manager, "sbx", running, init()))  # type: ignore[arg-type]
        async with asyncio.timeout(10):  # a failure, not a hang, if _agent_up never awaits init
            await returned.wait()
        up.cancel()  # before _agent_up resumes from its wait
        with pytest.raises(asyncio.CancelledError):
            await up
        return ours, kept

    ours, kept = asyncio.run(main())
    assert ours.fileno() == -1 or kept == [ours]


def test_a_create_cancelled_while_its_init_answers_closes_the_connection_init_returns_anyway() -> None:
    """``_agent_up`` cancelled while ``/init`` is still in flight: it cancels ``init``, which may return
    its connection all the same (Python 3.11's ``wait_for``, which ``init_agent`` uses, returns a result
    that is ready when the cancel lands instead of raising). Nobody keeps that connection: it closes."""
    import asyncio
    import types

    from sandboxd.runtime.manager import SandboxManager

    async def main() -> tuple[socket.socket, list[socket.socket]]:
        ours, theirs = socket.socketpair()
        theirs.close()
        waiting = asyncio.Event()
        kept: list[socket.socket] = []

        async def init() -> socket.socket:
            waiting.set()
            with contextlib.suppress(asyncio.CancelledError):  # as 3.11's wait_for does with a ready result
                await asyncio.sleep(30)
            return ours

        manager = types.SimpleNamespace(_ending={}, _keep_init_connection=lambda _id, conn: kept.append(conn))
        running = types.SimpleNamespace(is_running=lambda: True)  # the sandbox's init, still running
        up = asyncio.ensure_future(SandboxManager._agent_up(manager, "sbx", running, init()))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await waiting.wait()
        up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await up
        return ours, kept

    ours, kept = asyncio.run(main())
    assert kept == []
    assert ours.fileno() == -1, "the connection init returned as it was cancelled was left open"


# ------------------------------------------------------------------------------ client aborts


def test_a_raw_upload_through_the_proxy_arrives_byte_exact(sdk: Runtime) -> None:
    """The sandbox's agent (uvloop, behind the proxy) moves a large raw body from its socket straight
    into the file (issue 16): the bytes arrive whole, and the kept-alive upstream goes on."""
    sbx = Sandbox.create()
    try:
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        body = hashlib.sha256(b"seed").digest() * ((6 << 20) // 32) + b"tail"
        headers = {
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "X-Access-Token": info["envdAccessToken"],
            "Content-Type": "application/octet-stream",
        }
        with httpx.Client(timeout=30) as client:
            for name in ("raw1.bin", "raw2.bin"):
                r = client.post(
                    f"{sdk.url}/files", params={"path": f"/home/user/{name}"}, content=body, headers=headers
                )
                assert r.status_code == 200, r.text
        digest = sbx.commands.run("sha256sum /home/user/raw1.bin /home/user/raw2.bin").stdout.split()
        assert digest[0] == digest[2] == hashlib.sha256(body).hexdigest()
    finally:
        sbx.kill()


def test_a_large_upload_the_agent_refuses_gets_the_agents_answer(sdk: Runtime) -> None:
    """The agent answers a bad token at once, before the body: the client gets that 401 whether the
    proxy moves the body by splice or through the loop, and a good upload after it lands whole."""
    sbx = Sandbox.create()
    try:
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        body = os.urandom(8 << 20)
        url = f"{sdk.url}/files"
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "Content-Type": "application/octet-stream"}
        with httpx.Client(timeout=30) as client:
            bad = client.post(url, params={"path": "/home/user/x.bin"}, content=body, headers=headers)
            assert bad.status_code == 401, bad.text
            good = client.post(
                url,
                params={"path": "/home/user/x.bin"},
                content=body,
                headers={**headers, "X-Access-Token": info["envdAccessToken"]},
            )
            assert good.status_code == 200, good.text
        digest = sbx.commands.run("sha256sum /home/user/x.bin").stdout.split()[0]
        assert digest == hashlib.sha256(body).hexdigest()
    finally:
        sbx.kill()


def test_an_aborted_upload_through_the_proxy_leaves_nothing_behind(sdk: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        # Warm the runtime's pool (it keeps idle upstream connections) so fds compare like with like.
        sbx.files.write("/home/user/warm", "x")
        baseline = _fds(sdk.process.pid)
        info = httpx.get(f"{sdk.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": sdk.api_key}).json()
        token = info["envdAccessToken"]
        with socket.create_connection(("127.0.0.1", sdk.port)) as client:
            client.sendall(
                (
                    "POST /files?path=/home/user/big.bin HTTP/1.1\r\nHost: x\r\n"
                    f"E2b-Sandbox-Id: {sbx.sandbox_id}\r\nX-Access-Token: {token}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {50 << 20}\r\n\r\n"
                ).encode()
            )
            client.sendall(b"\0" * (1 << 20))
            time.sleep(0.3)  # the upload is under way inside the sandbox
        time.sleep(1.0)
        leftovers = sbx.commands.run("find /home/user -name '*.tmp' -o -name big.bin").stdout.split()
        assert leftovers == [], leftovers
        assert _fds(sdk.process.pid) <= baseline, "the runtime kept the aborted upload's connection"
    finally:
        sbx.kill()


# ---------------------------------------------------------------------------------- upgrades


def test_websocket_through_get_host_both_ways(sdk: Runtime) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    sbx = Sandbox.create()
    try:
        _serve_in(sbx, WS_ECHO_SERVER, 8200)
        # Route by headers, as the SDK does with E2B_SANDBOX_URL.
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8200"}
        with connect(f"ws://127.0.0.1:{sdk.port}/socket", additional_headers=headers) as ws:
            assert ws.response.headers["X-Seen-Host"] == f"127.0.0.1:{sdk.port}"  # the Host goes through
            ws.send("hello")
            assert ws.recv(timeout=10) == "echo: hello"
            ws.send(b"\x00\x01" * 40_000)  # a frame bigger than one read: bytes both ways
            assert ws.recv(timeout=10) == b"echo: " + b"\x00\x01" * 40_000
        # Host routing (<port>-<id>.<domain>): the same server.
        with connect(f"ws://127.0.0.1:{sdk.port}/", additional_headers={"Host": f"8200-{sbx.sandbox_id}.local"}) as ws:
            ws.send("by host")
            assert ws.recv(timeout=10) == "echo: by host"
            # When the sandbox side ends, the client's side is closed too.
            sbx.commands.run("pkill -f 'server-82[0]0.py'")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
    finally:
        sbx.kill()


def test_https_ports_are_spoken_to_over_tls_without_checking_the_certificate(sdk: Runtime) -> None:
    """E2B's ``network.https_ports``: the proxy speaks TLS to a listed port whose server serves HTTPS
    itself (a self-signed certificate works), plain requests and WebSockets alike; a port not listed
    is spoken to in plain HTTP; a listed port that does not answer TLS gets a 502 that says so."""
    import trustme
    from websockets.sync.client import connect

    assert "ssl=TLS" in WSS_ECHO_SERVER and "TLS.load_cert_chain" in WSS_ECHO_SERVER
    leaf = trustme.CA().issue_cert("server.inside.sandbox")  # signed by a CA nobody trusts
    sbx = Sandbox.create(network={"https_ports": [8443, 8444, 8446]})
    try:
        sbx.files.write("/tmp/tls/cert.pem", leaf.cert_chain_pems[0].bytes().decode())
        sbx.files.write("/tmp/tls/key.pem", leaf.private_key_pem.bytes().decode())
        _serve_in(sbx, HTTPS_SERVER, 8443)
        _serve_in(sbx, WSS_ECHO_SERVER, 8444)
        _serve_in(sbx, HTTPS_SERVER, 8445)  # HTTPS too, but not listed
        _serve_in(sbx, PLAIN_HTTP_SERVER, 8446)  # listed, but plain HTTP

        def get(port: int, path: str = "/hello") -> httpx.Response:
            headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}
            return httpx.get(f"http://127.0.0.1:{sdk.port}{path}", headers=headers, timeout=20)

        for _ in range(3):  # the second and third over the pooled TLS connection
            answer = get(8443)
            assert answer.status_code == 200 and answer.text == "over tls: /hello", answer.text
        # 3 MiB: a body the proxy would splice from a plain port goes through TLS here, whole.
        assert get(8443, "/big").content == bytes(range(256)) * (3 << 12)
        by_host = httpx.get(
            f"http://127.0.0.1:{sdk.port}/by-host", headers={"Host": f"8443-{sbx.sandbox_id}.local"}, timeout=20
        )
        assert by_host.text == "over tls: /by-host"
        assert get(8445).status_code == 502, "a port not listed was spoken to over TLS"
        refused = get(8446)
        assert refused.status_code == 502 and "TLS handshake" in refused.json()["message"], refused.text

        with connect(f"ws://127.0.0.1:{sdk.port}/", additional_headers={"Host": f"8444-{sbx.sandbox_id}.local"}) as ws:
            ws.send("through tls")
            assert ws.recv(timeout=10) == "echo: through tls"
            ws.send(b"\x00\x01" * 40_000)
            assert ws.recv(timeout=10) == b"echo: " + b"\x00\x01" * 40_000
        raw = socket.create_connection(("127.0.0.1", sdk.port), timeout=20)
        with raw:
            raw.sendall(
                f"GET / HTTP/1.1\r\nHost: 8446-{sbx.sandbox_id}.local\r\nConnection: Upgrade\r\n"
                "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer_bytes = b""
            while chunk := raw.recv(65536):
                answer_bytes += chunk
        assert answer_bytes.startswith(b"HTTP/1.1 502") and b"TLS handshake" in answer_bytes, answer_bytes[:300]
    finally:
        sbx.kill()


def test_an_upgrade_needs_the_traffic_token_as_a_plain_request_does(sdk: Runtime) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    sbx = Sandbox.create(network={"allow_public_traffic": False})
    try:
        _serve_in(sbx, WS_ECHO_SERVER, 8250)
        token = sbx.traffic_access_token
        assert token
        route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8250"}
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{sdk.port}/", additional_headers=route, open_timeout=10)
        assert refused.value.response.status_code == 403
        with connect(
            f"ws://127.0.0.1:{sdk.port}/",
            additional_headers={**route, "e2b-traffic-access-token": token},
            open_timeout=10,
        ) as ws:
            ws.send("with the token")
            assert ws.recv(timeout=10) == "echo: with the token"
    finally:
        sbx.kill()


def test_any_upgrade_is_spliced_and_a_closed_client_closes_the_sandbox_side(sdk: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        _serve_in(sbx, WS_ECHO_SERVER, 8300)
        baseline = _fds(sdk.process.pid)
        client = socket.create_connection(("127.0.0.1", sdk.port))
        client.sendall(
            f"GET / HTTP/1.1\r\nHost: 8300-{sbx.sandbox_id}.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        client.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer  # RFC 6455's example accept: the sandbox's own
        client.close()
        deadline = time.monotonic() + 5
        while _fds(sdk.process.pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds(sdk.process.pid) <= baseline, "the sandbox side stayed open after the client left"
        # An upgrade to a sandbox that does not exist gets the proxy's 502, as a plain request does.
        with socket.create_connection(("127.0.0.1", sdk.port)) as other:
            other.sendall(
                b"GET / HTTP/1.1\r\nHost: 8300-doesnotexist0000000.local\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            )
            other.settimeout(10)
            reply = other.recv(65536)
            assert reply.startswith(b"HTTP/1.1 502") and b"was not found" in reply, reply
    finally:
        sbx.kill()


# ----------------------------------------------------------------------------- signed /files URLs


def _signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration is not None else "")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).decode().rstrip("=")


def test_signed_file_urls_work_with_e2b_sandbox_url(e2b_env: Runtime) -> None:
    api = httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key})
    one, two = Sandbox.create(), Sandbox.create()
    try:
        one.files.write("/home/user/which.txt", "one")
        two.files.write("/home/user/which.txt", "two")
        for sbx, expected in ((one, "one"), (two, "two")):
            url = sbx.download_url("/home/user/which.txt", use_signature_expiration=60)
            assert url.startswith(e2b_env.url + "/files?") and sbx.sandbox_id not in url  # no sandbox named
            assert httpx.get(url).text == expected
        upload = two.upload_url("/home/user/uploaded.txt")
        assert httpx.post(upload, files={"file": ("uploaded.txt", b"via a signed URL")}).status_code == 200
        assert two.files.read("/home/user/uploaded.txt") == "via a signed URL"

        token = api.get(f"/sandboxes/{one.sandbox_id}").json()["envdAccessToken"]
        past = int(time.time()) - 10
        expired = _signature("/home/user/which.txt", "read", "", token, past)
        answer = httpx.get(
            f"{e2b_env.url}/files",
            params={"path": "/home/user/which.txt", "signature": expired, "signature_expiration": past},
        )
        assert (answer.status_code, answer.json()["message"]) == (401, "signature is already expired")
        forged = _signature("/home/user/which.txt", "read", "", "not-a-token", None)
        answer = httpx.get(f"{e2b_env.url}/files", params={"path": "/home/user/which.txt", "signature": forged})
        assert (answer.status_code, answer.json()["message"]) == (401, "invalid signature")
        # A read signature does not authorise a write.
        read_only = _signature("/home/user/x", "read", "", token, None)
        answer = httpx.post(
            f"{e2b_env.url}/files", params={"path": "/home/user/x", "signature": read_only}, files={"file": b"x"}
        )
        assert answer.status_code == 401
    finally:
        one.kill()
        two.kill()
        api.close()


# --------------------------------------------------------------------------------------- TLS

SDK_OVER_TLS = """
import json, sys
from e2b import Sandbox
sbx = Sandbox.create()
sbx.files.write("/tmp/ws.py", sys.stdin.read())
sbx.commands.run("python3 /tmp/ws.py 8400", background=True, timeout=0)
print(json.dumps({"id": sbx.sandbox_id, "host": sbx.get_host(8400), "domain": sbx.sandbox_domain}))
"""


def test_get_host_over_https_with_domain_and_tls(start_runtime: Callable[..., Runtime], tmp_path: Path) -> None:
    import trustme
    from websockets.sync.client import connect

    domain = "sandboxes.test"
    ca = trustme.CA()
    leaf = ca.issue_cert(f"*.{domain}", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    trust = ssl.create_default_context(cafile=str(ca_file))
    runtime = start_runtime("--domain", domain, "--tls-cert", str(cert), "--tls-key", str(key), tls=trust)
    assert runtime.url.startswith("https://")

    # The official SDK over HTTPS only (API and sandbox traffic), trusting the test's CA (its TLS
    # stack reads SSL_CERT_FILE); in its own process, so its pooled connections are its own.
    sdk = subprocess.run(
        [sys.executable, "-c", SDK_OVER_TLS],
        input=WS_ECHO_SERVER,
        env={**os.environ, **runtime.env(), "SSL_CERT_FILE": str(ca_file)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sdk.returncode == 0, sdk.stderr
    made = json.loads(sdk.stdout)
    sandbox_id, host = made["id"], made["host"]
    try:
        assert made["domain"] == domain
        assert host == f"8400-{sandbox_id}.{domain}"
        # The test is the resolver: TCP to 127.0.0.1, TLS server name and Host the sandbox host name
        # (what a DNS entry for *.sandboxes.test would give), certificate verified against the CA.
        with httpx.Client(verify=trust) as client:
            agent = f"49983-{sandbox_id}.{domain}"
            health = client.get(
                f"https://127.0.0.1:{runtime.port}/health", headers={"Host": agent}, extensions={"sni_hostname": agent}
            )
            assert health.status_code == 204, health.text  # the agent's own /health, by Host routing
        deadline = time.monotonic() + 20
        while True:
            raw = socket.create_connection(("127.0.0.1", runtime.port))
            try:
                with connect(f"wss://{host}/", sock=raw, ssl=trust, server_hostname=host, open_timeout=10) as ws:
                    ws.send("over tls")
                    assert ws.recv(timeout=10) == "echo: over tls"
                    break
            except Exception:
                raw.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the server in the sandbox is still starting
    finally:
        with httpx.Client(verify=trust, headers={"X-API-KEY": runtime.api_key}) as api:
            api.delete(f"{runtime.url}/sandboxes/{sandbox_id}")


# ------------------------------------------------------------------------ the body splice alone


def _nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_splice_moves_exactly_the_bodys_bytes_and_leaves_what_follows() -> None:
    from sandboxd.runtime.proxy import _splice

    up_far, up = _nonblocking_pair()
    client, client_far = _nonblocking_pair()
    cancel = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    body = os.urandom(3 << 20)
    try:
        up_far.setblocking(True)
        writer = threading.Thread(target=lambda: up_far.sendall(body[1000:] + b"NEXT RESPONSE"))
        writer.start()
        received = bytearray()

        def drain() -> None:
            client_far.setblocking(True)
            while len(received) < len(body):
                received.extend(client_far.recv(1 << 20))

        reader = threading.Thread(target=drain)
        reader.start()
        outcome = _splice(up.fileno(), client.fileno(), body[:1000], len(body), cancel)
        writer.join(10)
        reader.join(10)
        assert outcome == ("done", len(body))
        assert bytes(received) == body
        up.setblocking(True)
        assert up.recv(100) == b"NEXT RESPONSE"  # the next answer on the connection stays unread
    finally:
        for s in (up_far, up, client, client_far):
            s.close()
        os.close(cancel)


def test_splice_reports_a_source_that_ends_early_a_client_that_leaves_and_a_cancel() -> None:
    from sandboxd.runtime.proxy import _splice

    cancel = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        up_far, up = _nonblocking_pair()
        client, client_far = _nonblocking_pair()
        up_far.sendall(b"x" * 1000)
        up_far.close()  # the sandbox's end, 1000 bytes short of 2000
        client_far.setblocking(True)
        outcome = _splice(up.fileno(), client.fileno(), b"", 2000, cancel)
        assert outcome == ("source", 1000)
        assert client_far.recv(5000) == b"x" * 1000
        for s in (up, client, client_far):
            s.close()

        up_far, up = _nonblocking_pair()
        client, client_far = _nonblocking_pair()
        client_far.close()  # the client is gone
        up_far.sendall(b"y" * 1000)
        assert _splice(up.fileno(), client.fileno(), b"", 5000, cancel)[0] == "sink"
        for s in (up_far, up, client):
            s.close()

        up_far, up = _nonblocking_pair()
        client, client_far = _nonblocking_pair()
        client_far.close()  # nothing arrives, and the client leaves: noticed without a byte to send
        assert _splice(up.fileno(), client.fileno(), b"", 5000, cancel) == ("sink", 0)
        for s in (up_far, up, client):
            s.close()

        up_far, up = _nonblocking_pair()
        client, client_far = _nonblocking_pair()
        os.eventfd_write(cancel, 1)  # nothing arrives; the exchange is cancelled
        assert _splice(up.fileno(), client.fileno(), b"", 5000, cancel) == ("stopped", 0)
        os.eventfd_read(cancel)
        # An upload's sender that goes silent, and one that trickles.
        up_far.sendall(b"z" * 10)
        assert _splice(up.fileno(), client.fileno(), b"", 5000, cancel, idle_timeout=0.3) == ("timed out", 10)

        def trickle() -> None:
            for _ in range(8):
                time.sleep(0.1)
                up_far.sendall(b"t")

        dripping = threading.Thread(target=trickle)
        dripping.start()
        ended, _ = _splice(up.fileno(), client.fileno(), b"", 5000, cancel, idle_timeout=0.3)
        dripping.join()
        assert ended == "too slow"
        for s in (up_far, up, client, client_far):
            s.close()
    finally:
        os.close(cancel)
