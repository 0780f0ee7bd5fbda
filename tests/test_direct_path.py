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
from hypothesis import given, settings
from hypothesis import strategies as st
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
CHUNKED_HEAD = (
    f"POST {START} HTTP/1.1\r\nHost: x\r\nContent-Type: {STREAM_PROTO}\r\nX-Access-Token: {TOKEN}\r\n"
    "Transfer-Encoding: chunked\r\n\r\n"
).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


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
    "start chunked": ([CHUNKED_HEAD, _chunk(START_TRUE[:3]), _chunk(START_TRUE[3:]) + b"0\r\n\r\n"], 1, 0.1),
    "start chunked, two messages": ([CHUNKED_HEAD, _chunk(START_TRUE), _chunk(START_TRUE) + b"0\r\n\r\n"], 1, 0.1),
    "start chunked, cut envelope": ([CHUNKED_HEAD, _chunk(START_TRUE[:-1]), b"0\r\n\r\n"], 1, 0.1),
    "start chunked, end-stream flag": ([CHUNKED_HEAD, _chunk(_envelope(b"", 0x02)), b"0\r\n\r\n"], 1, 0.1),
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


def _outcome(run: Any) -> tuple[str, Any]:
    from sandboxd.agent.errors import RpcError

    try:
        return "ok", run().SerializeToString()
    except RpcError as exc:
        return "error", (exc.code, exc.message)


def _reference(body: bytes, cuts: list[int]) -> tuple[str, Any]:
    """The one request of a server stream as the streaming path finds it: ``envelopes`` over the
    body's chunks, the first payload decoded, a second refused (what ``_read_single`` replaced)."""
    from sandboxd.agent.connect import _CODECS, _the_request, envelopes
    from sandboxd.agent.errors import Code, RpcError

    method = _start_method()

    async def chunks() -> Any:
        at = 0
        for cut in [*cuts, len(body)]:
            if body[at:cut]:
                yield body[at:cut]
            at = cut

    async def run() -> Any:
        request = None
        async for payload in envelopes(chunks(), "gzip", 64):
            if request is not None:
                raise RpcError(Code.UNIMPLEMENTED, f"{method.path} takes exactly one request message, got more")
            request = _CODECS["proto"].decode(payload, method.request_type)
        return _the_request(request, method)

    return _outcome(lambda: asyncio.run(run()))


def _start_method() -> Any:
    state = AgentState(default_user=getpass.getuser())
    return next(m for m in build_methods(state) if m.path == START)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.just(START_TRUE),
            st.just(_envelope(b"", 0x02)),
            st.just(_envelope(gzip.compress(b"\x0a\x03\x0a\x01x"), 0x01)),
            st.just(struct.pack(">BI", 0, 65)),  # over the limit of 64 bytes given below
            st.binary(max_size=12),  # garbage: cut envelopes, undecodable payloads
        ),
        max_size=4,
    ).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=4).map(sorted),
)
def test_a_stream_request_read_whole_or_as_it_arrives_is_the_streaming_path_s(body: bytes, cuts: list[int]) -> None:
    """``_read_single`` (a body still arriving) and ``envelopes_of`` + ``_one_request`` (a body that
    came with its head) find the same request, or the same error, as ``envelopes`` over the body's
    chunks did, wherever the chunks are cut."""
    from sandboxd.agent.connect import _CODECS, _one_request, _read_single, envelopes_of

    method = _start_method()
    cuts = [min(cut, len(body)) for cut in cuts]
    expected = _reference(body, cuts)

    async def read() -> Any:
        pieces, at = [], 0
        for cut in [*cuts, len(body)]:
            pieces.append(body[at:cut])
            at = cut

        async def receive() -> dict[str, Any]:
            chunk = pieces.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}

        return await _read_single(receive, _CODECS["proto"], method, "gzip", 64)

    assert _outcome(lambda: asyncio.run(read())) == expected
    whole = _outcome(lambda: _one_request(envelopes_of(body, "gzip", 64), _CODECS["proto"], method))
    assert whole == expected
