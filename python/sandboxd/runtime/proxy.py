"""The sandbox proxy: HTTP requests for ``<port>`` inside sandbox ``<id>``, streamed both ways.

A request is for a sandbox when it carries ``E2b-Sandbox-Id`` (and ``E2b-Sandbox-Port``, default
49983) or its Host is ``<port>-<id>.<domain>`` (spec §5.2). The upstream connection is a TCP socket
created *inside* the sandbox's network namespace (nothing is published on the host), kept alive
and reused per (sandbox, port). Bodies stream in both directions without buffering, so Connect
server streams (command output, watch events) flow as they are produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections import defaultdict
from dataclasses import dataclass, field

import httptools

from sandboxd.agent.asgi import ClientDisconnected, Receive, Scope, Send, body_chunks, send_json

from .backend import Backend
from .errors import ApiError

ENVD_PORT = 49983
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
"""E2B's header for a sandbox's traffic access token (its edge proxy's name)."""
HOP_BY_HOP = {
    TRAFFIC_TOKEN_HEADER,  # the sandbox's secret stays in the proxy
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"content-length",
    b"host",
}
MAX_IDLE_PER_TARGET = 16
"""Idle upstream connections kept per (sandbox, port): enough for an SDK's pool of parallel calls."""

READ_SIZE = 256 << 10
"""Upstream read size: large enough that file downloads move in few, big pieces."""


@dataclass(slots=True)
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Response:
    """What the httptools callbacks collected from the upstream's reply."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    headers_done: bool = False
    complete: bool = False
    keep_alive: bool = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


def parse_target(headers: dict[str, str], domain: str | None) -> tuple[str, int] | None:
    """``(sandbox id, port)`` of a proxied request, or None for a control-plane request."""
    sandbox_id = headers.get("e2b-sandbox-id")
    if sandbox_id:
        port = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ApiError(400, f"E2b-Sandbox-Port must be a TCP port, got '{port}'")
        return sandbox_id, int(port)
    host = headers.get("host", "").rsplit(":", 1)[0] if "]" not in headers.get("host", "") else ""
    label, _, rest = host.partition(".")
    port_text, dash, sandbox_id = label.partition("-")
    if dash and port_text.isdigit() and sandbox_id and (domain is None or rest == domain):
        return sandbox_id, int(port_text)
    return None


class SandboxProxy:
    """Forwards requests into sandboxes, with a keep-alive pool per (sandbox, port)."""

    def __init__(self, backend: Backend) -> None:
        self.manager = backend
        self.idle: dict[tuple[str, int], list[_Upstream]] = defaultdict(list)

    def forget(self, sandbox_id: str) -> None:
        """Drop pooled connections of a sandbox that was killed or paused."""
        for key in [k for k in self.idle if k[0] == sandbox_id]:
            for upstream in self.idle.pop(key):
                upstream.writer.close()

    async def _connect(self, sandbox_id: str, port: int) -> tuple[_Upstream, bool]:
        """An upstream connection, and whether it came from the pool (it may have gone stale)."""
        pool = self.idle.get((sandbox_id, port))
        while pool:
            upstream = pool.pop()
            if not upstream.reader.at_eof() and not upstream.writer.is_closing():
                return upstream, True
            upstream.writer.close()
        sock = await self.manager.open_socket(sandbox_id, port)
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        return _Upstream(reader, writer), False

    def _release(self, sandbox_id: str, port: int, upstream: _Upstream) -> None:
        pool = self.idle[(sandbox_id, port)]
        if len(pool) < MAX_IDLE_PER_TARGET and not upstream.writer.is_closing():
            pool.append(upstream)
        else:
            upstream.writer.close()

    async def _unavailable(self, send: Send, sandbox_id: str, port: int) -> None:
        """The 502 the E2B edge proxy gives: "…was not found" when the sandbox is gone (the SDK
        raises ``SandboxNotRunningException``), "…port is not open" when nothing listens."""
        try:
            await self.manager.ensure_reachable(sandbox_id)
            message = f"The sandbox is running but port is not open: nothing listens on port {port}"
        except ApiError as exc:
            message = exc.message
        await send_json(send, 502, {"sandboxId": sandbox_id, "message": message, "code": 502, "port": port})

    def _ingress(self, scope: Scope, sandbox_id: str, port: int) -> tuple[bytes, ApiError | None]:
        """The Host to send upstream, and the refusal of a request that lacks the sandbox's traffic
        token (``allow_public_traffic=False``; envd's port has its own token and is exempt, as in
        E2B's proxy)."""
        if port == ENVD_PORT:
            return b"sandbox", None
        token = self.manager.traffic_token(sandbox_id)
        if token is not None:
            given = next((v for k, v in scope["headers"] if k.lower() == TRAFFIC_TOKEN_HEADER), None)
            if given is None:
                return b"", ApiError(
                    403,
                    f"Sandbox is secured with traffic access token. Token header '{TRAFFIC_TOKEN_HEADER.decode()}' is "
                    "missing",
                )
            if not hmac.compare_digest(given, token.encode()):
                return b"", ApiError(
                    403,
                    f"Sandbox is secured with traffic access token. Provided token in header "
                    f"'{TRAFFIC_TOKEN_HEADER.decode()}' is invalid",
                )
        mask = self.manager.network_config(sandbox_id).mask_request_host
        return (mask.replace("${PORT}", str(port)).encode() if mask else b"sandbox"), None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int) -> None:
        host, refusal = self._ingress(scope, sandbox_id, port)
        if refusal is not None:
            await send_json(send, refusal.status, {"sandboxId": sandbox_id, "message": refusal.message, "code": 403})
            return
        relay = _Relay(send)
        # A pooled connection the agent closed meanwhile fails before any reply: retry once on a
        # fresh one when the request has no body to replay.
        attempts = 1 if _has_body(scope) else 2
        for attempt in range(attempts):
            try:
                await self.manager.ensure_reachable(sandbox_id)
                upstream, pooled = await self._connect(sandbox_id, port)
            except ApiError as exc:
                await send_json(send, exc.status, {"sandboxId": sandbox_id, "message": exc.message, "code": exc.status})
                return
            except OSError:
                await self._unavailable(send, sandbox_id, port)
                return
            reusable = False
            try:
                reusable = await self._exchange(scope, receive, relay, upstream, host)
                return
            except ClientDisconnected:
                return
            except (OSError, _UpstreamLost):
                if relay.started:
                    return  # mid-reply: nothing more can be said; closing tells the client
                if not (pooled and attempt + 1 < attempts):
                    await self._unavailable(send, sandbox_id, port)
                    return
            finally:
                if reusable:
                    self._release(sandbox_id, port, upstream)
                else:
                    upstream.writer.close()

    async def _exchange(
        self, scope: Scope, receive: Receive, relay: _Relay, upstream: _Upstream, host: bytes = b"sandbox"
    ) -> bool:
        """One request/response over ``upstream``; True when the connection may be reused."""
        method: str = scope["method"]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        length = next((v for k, v in headers if k == b"content-length"), None)
        chunked = length is None and any(k == b"transfer-encoding" for k, _ in headers)
        head = [method.encode() + b" " + target + b" HTTP/1.1", b"host: " + host]
        head += [k + b": " + v for k, v in headers if k not in HOP_BY_HOP]
        if length is not None:
            head.append(b"content-length: " + length)
        elif chunked:
            head.append(b"transfer-encoding: chunked")
        upstream.writer.write(b"\r\n".join(head) + b"\r\n\r\n")

        request_sent = asyncio.Event()

        async def forward_body() -> None:
            if length is not None or chunked:
                async for chunk in body_chunks(receive):
                    upstream.writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await upstream.writer.drain()
                if chunked:
                    upstream.writer.write(b"0\r\n\r\n")
            await upstream.writer.drain()
            request_sent.set()

        sender = asyncio.ensure_future(forward_body())
        try:
            complete = await self._relay_response(method, relay, upstream, sender)
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientDisconnected, OSError):
                await sender
        return complete and request_sent.is_set()

    async def _relay_response(
        self, method: str, relay: _Relay, upstream: _Upstream, sender: asyncio.Future[None]
    ) -> bool:
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        send = relay.send
        while not response.complete:
            data = await upstream.reader.read(READ_SIZE)
            if not data:
                if sender.done() and not sender.cancelled() and sender.exception() is not None:
                    raise _UpstreamLost from sender.exception()
                if response.headers_done:
                    response.keep_alive = False  # a body delimited by the end of the connection
                    break
                raise _UpstreamLost  # the agent went away before replying
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                raise _UpstreamLost from None
            if response.headers_done and not relay.started:
                relay.started = True
                response.keep_alive = parser.should_keep_alive()
                out = [(k.lower(), v) for k, v in response.headers]
                out = [(k, v) for k, v in out if k not in HOP_BY_HOP or k == b"content-length"]
                await send({"type": "http.response.start", "status": parser.get_status_code(), "headers": out})
                if method == "HEAD":
                    response.complete = True
            for chunk in response.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            response.body.clear()
        await send({"type": "http.response.body", "body": b""})
        return response.keep_alive


class _UpstreamLost(Exception):
    """The sandbox side closed or broke the connection."""


@dataclass(slots=True)
class _Relay:
    """The client side of one proxied request: whether its response has started."""

    send: Send
    started: bool = False


def _has_body(scope: Scope) -> bool:
    return any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
