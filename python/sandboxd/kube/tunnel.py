"""The node's tunnel: how a ``serve`` replica reaches a port inside a sandbox on another machine.

HTTP ``CONNECT <sandbox id>:<port>`` with ``Proxy-Authorization: Bearer <tunnel key>``; the node
answers ``200`` and from then on the connection is a byte pipe to that port inside the sandbox
(opened in the sandbox's network namespace by the node's own sandbox manager). So ``serve``'s
proxy treats a tunnel exactly as the single-machine runtime treats a socket into a local sandbox:
it pools them per (sandbox, port) and streams both ways. ``GET /sandboxes/<id>/metrics`` (same
key) answers the sandbox's metrics; ``GET /healthz`` answers 200.

Why hand-written: uvicorn (the runtime's HTTP server) does not let an application take over a
connection after ``CONNECT``; a request head bounded in size and time is all this needs to parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("sandboxd.kube.tunnel")

MAX_HEAD = 8 << 10
"""A CONNECT head is one line and one header; 8 KiB is generous and bounds what we buffer."""

HEAD_TIMEOUT_S = 10.0
"""A client that has not sent its whole head by then is dropped (slow-loris)."""

COPY_SIZE = 256 << 10
"""Bytes moved per read: large enough that file transfers move in few pieces (as the proxy's)."""

CONNECT_TIMEOUT_S = 5.0


class TunnelError(ConnectionError):
    """The node refused the tunnel: ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


OpenSocket = Callable[[str, int], Awaitable[socket.socket]]
Metrics = Callable[[str], Awaitable[dict[str, Any]]]


class TunnelServer:
    """The node side: authenticate, open the sandbox's port, splice."""

    def __init__(self, key: str, open_socket: OpenSocket, metrics: Metrics) -> None:
        self.key = key.encode()
        self.open_socket = open_socket
        self.metrics = metrics
        self.servers: list[asyncio.Server] = []

    async def start(self, listeners: list[socket.socket]) -> None:
        """Serve on ``listeners``, bound by the caller (the node binds before its sandbox firewall
        starts, so that the firewall names the real port)."""
        for sock in listeners:
            self.servers.append(await asyncio.start_server(self._handle, sock=sock, limit=MAX_HEAD))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                await _answer(writer, 400, "malformed request line")
                return
            method, target, _version = parts
            if method == "GET" and target == "/healthz":
                await _answer(writer, 200, "ok")
                return
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            presented = headers.get("proxy-authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(presented, self.key):
                await _answer(writer, 407, "the tunnel key is missing or wrong")
                return
            if method == "GET" and target.startswith("/sandboxes/") and target.endswith("/metrics"):
                await self._metrics(writer, target.split("/")[2])
            elif method == "CONNECT":
                await self._connect(reader, writer, target)
            else:
                await _answer(writer, 405, "CONNECT <sandbox>:<port> or GET /sandboxes/<id>/metrics")
        finally:
            writer.close()

    async def _metrics(self, writer: asyncio.StreamWriter, sandbox_id: str) -> None:
        from sandboxd.runtime.errors import ApiError

        try:
            body = json.dumps(await self.metrics(sandbox_id))
        except ApiError as exc:
            await _answer(writer, exc.status, exc.message)
            return
        await _answer(writer, 200, body, "application/json")

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> None:
        sandbox_id, _, port_text = target.rpartition(":")
        if not sandbox_id or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            await _answer(writer, 400, f"CONNECT target must be <sandbox id>:<port>, got {target!r}")
            return
        try:
            sock = await self.open_socket(sandbox_id, int(port_text))
        except OSError as exc:
            await _answer(writer, 502, f"cannot reach port {port_text} of sandbox {sandbox_id}: {exc}")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=COPY_SIZE)
        try:
            await splice(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()


async def _answer(writer: asyncio.StreamWriter, status: int, message: str, kind: str = "text/plain") -> None:
    body = message.encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 407: "Unauthorized"}
    writer.write(
        f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(COPY_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both sides have ended; a broken side closes the other at once."""
    one = asyncio.ensure_future(_pump(a_reader, b_writer))
    two = asyncio.ensure_future(_pump(b_reader, a_writer))
    try:
        await asyncio.gather(one, two)
    finally:
        for task in (one, two):
            task.cancel()


# ----------------------------------------------------------------------------------- client


async def _read_head(sock: socket.socket) -> bytes:
    """The response head, read byte by byte so not one byte of the tunnelled stream is consumed
    (a server that speaks first, like SSH, may send right after the 200)."""
    loop = asyncio.get_running_loop()
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) > MAX_HEAD:
            raise TunnelError(502, "the node's answer head is too long")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            raise TunnelError(502, "the node closed the tunnel before answering")
        head += byte
    return bytes(head)


async def _dial(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tunnel(host: str, port: int, key: str, sandbox_id: str, sandbox_port: int) -> socket.socket:
    """A socket connected, through the node at ``host:port``, to ``sandbox_port`` in the sandbox."""
    sock = await _dial(host, port)
    loop = asyncio.get_running_loop()
    try:
        request = (
            f"CONNECT {sandbox_id}:{sandbox_port} HTTP/1.1\r\nHost: {sandbox_id}:{sandbox_port}\r\n"
            f"Proxy-Authorization: Bearer {key}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = await _read_head(sock)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            body = await asyncio.wait_for(loop.sock_recv(sock, 4096), CONNECT_TIMEOUT_S)
            raise TunnelError(
                int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502, body.decode(errors="replace")
            )
    except BaseException:
        sock.close()
        raise
    return sock


async def fetch_metrics(host: str, port: int, key: str, sandbox_id: str) -> tuple[int, bytes]:
    """``GET /sandboxes/<id>/metrics`` on the node: its status and body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    try:
        request = f"GET /sandboxes/{sandbox_id}/metrics HTTP/1.1\r\nHost: node\r\nProxy-Authorization: Bearer {key}"
        writer.write(request.encode() + b"\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), CONNECT_TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502), body
