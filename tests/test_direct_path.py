"""The agent's direct path for Connect calls (``AgentApp.direct``, ``GuardedHttpToolsProtocol``,
``ResponseWriter.send_direct``) answers byte for byte as the ASGI path through uvicorn's ``send``
does: each request below goes to two servers on one loop, the agent's app as it is and the same
app behind a plain ASGI callable (no ``direct``), and the raw responses must be equal (a started
process's pid masked). The requests cover what the direct path does itself: the header cap, the
token, the content types, bodies that come with the head or after it (``Expect: 100-continue``, a
head sent alone), compression, ``Connection: close``, pipelining, and a server stream's frames."""

from __future__ import annotations

import asyncio
import getpass
import gzip
import re
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sandboxd._proto.process import process_pb2 as pb
from sandboxd.agent.app import AgentApp
from sandboxd.agent.http_server import ConnectionLimits, GuardedHttpToolsProtocol
from sandboxd.agent.idle import IdleTrim
from sandboxd.agent.methods import build_methods
from sandboxd.agent.serving import ServerState, agent_settings
from sandboxd.agent.state import AgentState

TOKEN = "direct-path-token"


class _Servers:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        state = AgentState(default_user=getpass.getuser(), access_token=TOKEN)
        idle = IdleTrim()
        app = idle.wrap(AgentApp(state, build_methods(state)))

        async def plain(scope: Any, receive: Any, send: Any) -> None:  # no ``direct``: the ASGI path
            await app(scope, receive, send)

        self.direct_port, self.asgi_port = self._serve(app), self._serve(plain)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _serve(self, app: Any) -> int:
        # A head cap above the app's own (64 KiB of header names and values), so that its 431 is reached.
        settings = agent_settings(app, "127.0.0.1", 0, ConnectionLimits(max_head_bytes=256 << 10))
        state = ServerState()
        protocol: type[GuardedHttpToolsProtocol] = settings.http

        def make() -> asyncio.Protocol:
            return protocol(config=settings, server_state=state, app_state={}, _loop=self.loop)

        server = self.loop.run_until_complete(self.loop.create_server(make, "127.0.0.1", 0))
        port: int = server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        async def cancel_the_rest() -> None:  # the process service's sweeper
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers() -> Iterator[_Servers]:
    s = _Servers()
    yield s
    s.close()


def _read_response(sock: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """One whole response off ``sock`` (``data`` read already), and what follows it."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100 "):
        rest_response, rest = _read_response(sock, body)
        return head + b"\r\n\r\n" + rest_response, rest
    if re.match(rb"HTTP/1\.[01] (204|304) ", head):
        return head + b"\r\n\r\n", body
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length:
        while len(body) < int(length.group(1)):
            chunk = sock.recv(65536)
            assert chunk, "closed mid-response"
            body += chunk
        n = int(length.group(1))
        return head + b"\r\n\r\n" + body[:n], body[n:]
    while b"0\r\n\r\n" not in body:  # chunked: the streams here end with their last chunk
        chunk = sock.recv(65536)
        assert chunk, "closed mid-response"
        body += chunk
    end = body.index(b"0\r\n\r\n") + 5
    return head + b"\r\n\r\n" + body[:end], body[end:]


def _exchange(port: int, parts: list[bytes], responses: int = 1, pause: float = 0.0) -> list[bytes]:
    """Sends ``parts`` (``pause`` seconds apart, so that each arrives on its own) and reads
    ``responses`` responses; a final b"<closed>" when the server closed the connection after them."""
    import time

    out: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            sock.sendall(part)
        rest = b""
        for _ in range(responses):
            response, rest = _read_response(sock, rest)
            out.append(response)
        sock.settimeout(0.3)
        try:
            tail = sock.recv(1)
        except TimeoutError:
            tail = b"<open>"
        out.append(tail if tail else b"<closed>")
    return out


def _mask_pid(response: bytes) -> bytes:
    """A Start response with the start event's pid replaced: the one part that differs by server."""
    head, _, body = response.partition(b"\r\n\r\n")
    frames = b""
    data = body
    payload = b""
    while data and not data.startswith(b"0\r\n"):
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        payload += data[:size]
        data = data[size + 2 :]
    at = 0
    while at < len(payload):
        flags, length = struct.unpack_from(">BI", payload, at)
        message = payload[at + 5 : at + 5 + length]
        if b"connect+json" in head:
            message = re.sub(rb'"pid":\d+', b'"pid":1', message)
        elif not flags & 0x02:
            event = pb.StartResponse.FromString(message)
            if event.event.HasField("start"):
                event.event.start.pid = 1
            message = event.SerializeToString()
        frames += struct.pack(">BI", flags, len(message)) + message
        at += 5 + length
    return head + b"\r\n\r\n" + frames


def _post(path: str, body: bytes, content_type: str, *, token: str | None = TOKEN, extra: str = "") -> bytes:
    auth = f"X-Access-Token: {token}\r\n" if token is not None else ""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{auth}{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _envelope(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


LIST = "/process.Process/List"
START = "/process.Process/Start"
START_TRUE = _envelope(pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/echo", args=["hi"])).SerializeToString())

JSON, PROTO, STREAM_JSON, STREAM_PROTO = (
    "application/json",
    "application/proto",
    "application/connect+json",
    "application/connect+proto",
)
HEAD_ONLY = _post(START, START_TRUE, STREAM_PROTO)[: -len(START_TRUE)]
EXPECTING = _post(LIST, b"", JSON, extra="Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: 2")
BIG_HEADERS = f"X-Big: {'a' * (40 << 10)}\r\nX-Big2: {'a' * (30 << 10)}\r\n"
NOBODY = "Authorization: Basic bm9ib2R5LWF0LWFsbDo=\r\n"  # user "nobody-at-all"

CASES: dict[str, tuple[list[bytes], int, float]] = {
    # name: (what is sent, in parts; responses; seconds between the parts)
    "unary json": ([_post(LIST, b"{}", JSON)], 1, 0.0),
    "unary proto": ([_post(LIST, b"", PROTO)], 1, 0.0),
    "unary undecodable": ([_post(LIST, b"{nope", JSON)], 1, 0.0),
    "unary gzip": ([_post(LIST, gzip.compress(b"{}"), JSON, extra="Content-Encoding: gzip\r\n")], 1, 0.0),
    "unary bad encoding": ([_post(LIST, b"{}", JSON, extra="Content-Encoding: br\r\n")], 1, 0.0),
    "unary too large": ([_post(LIST, b" " * ((16 << 20) + 1), JSON)], 1, 0.0),
    "wrong token": ([_post(LIST, b"{}", JSON, token="nope")], 1, 0.0),
    "no token": ([_post(LIST, b"{}", JSON, token=None)], 1, 0.0),
    "headers too big": ([_post(LIST, b"{}", JSON, extra=BIG_HEADERS)], 1, 0.0),
    "unsupported content type": ([_post(LIST, b"{}", "text/plain")], 1, 0.0),
    "stream content type on unary": ([_post(LIST, b"{}", STREAM_JSON)], 1, 0.0),
    "connection close": ([_post(LIST, b"{}", JSON, extra="Connection: close\r\n")], 1, 0.0),
    "http/1.0": ([_post(LIST, b"{}", JSON).replace(b"HTTP/1.1", b"HTTP/1.0", 1)], 1, 0.0),
    "pipelined": ([_post(LIST, b"{}", JSON) * 2], 2, 0.0),
    "body after the head": ([_post(LIST, b"{}", JSON)[:-2], b"{}"], 1, 0.2),
    "expect 100-continue": ([EXPECTING, b"{}"], 1, 0.2),
    "start": ([_post(START, START_TRUE, STREAM_PROTO)], 1, 0.0),
    "start, body after the head": ([HEAD_ONLY, START_TRUE], 1, 0.2),
    "start empty cmd": ([_post(START, _envelope(b""), STREAM_PROTO)], 1, 0.0),
    "start no message": ([_post(START, b"", STREAM_PROTO)], 1, 0.0),
    "start two messages": ([_post(START, START_TRUE * 2, STREAM_PROTO)], 1, 0.0),
    "start cut envelope": ([_post(START, START_TRUE[:-1], STREAM_PROTO)], 1, 0.0),
    "start envelope over the limit": ([_post(START, struct.pack(">BI", 0, (16 << 20) + 1), STREAM_PROTO)], 1, 0.0),
    "start end-stream flag": ([_post(START, _envelope(b"{}", 0x02), STREAM_JSON)], 1, 0.0),
    "start compressed, no encoding": ([_post(START, _envelope(gzip.compress(b"{}"), 0x01), STREAM_JSON)], 1, 0.0),
    "start json": ([_post(START, _envelope(b'{"process":{"cmd":"/bin/echo","args":["hi"]}}'), STREAM_JSON)], 1, 0.0),
    "start bad timeout": ([_post(START, START_TRUE, STREAM_PROTO, extra="Connect-Timeout-Ms: soon\r\n")], 1, 0.0),
    "start unknown user": ([_post(START, START_TRUE, STREAM_PROTO, extra=NOBODY)], 1, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_path_answers_as_the_asgi_path(servers: _Servers, case: str) -> None:
    parts, responses, pause = CASES[case]
    direct = _exchange(servers.direct_port, parts, responses, pause)
    asgi = _exchange(servers.asgi_port, parts, responses, pause)
    if case.startswith("start"):
        direct = [_mask_pid(r) if r.startswith(b"HTTP/1.1 200") else r for r in direct]
        asgi = [_mask_pid(r) if r.startswith(b"HTTP/1.1 200") else r for r in asgi]
    assert direct == asgi
    assert direct[0].startswith(b"HTTP/1.")


def test_direct_path_is_taken(servers: _Servers) -> None:
    """The direct path answers Connect calls (so the comparison above compares two paths): its
    responses come from ``ResponseWriter.send_direct``, never from uvicorn's ``send``, which the
    ASGI path goes through."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    calls: list[int] = []
    original = RequestResponseCycle.send

    async def counting(self: Any, message: Any) -> None:
        calls.append(1)
        await original(self, message)

    RequestResponseCycle.send = counting  # type: ignore[method-assign]
    try:
        _exchange(servers.direct_port, [_post(LIST, b"{}", "application/json")])
        _exchange(servers.direct_port, [_post(START, START_TRUE, "application/connect+proto")])
        assert calls == []
        _exchange(servers.asgi_port, [_post(LIST, b"{}", "application/json")])
        assert calls
        calls.clear()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        _exchange(servers.direct_port, [head])  # not a Connect call: through the app, as before
        assert calls
    finally:
        RequestResponseCycle.send = original  # type: ignore[method-assign]
