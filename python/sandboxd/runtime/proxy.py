"""The sandbox proxy: HTTP requests for ``<port>`` inside sandbox ``<id>``, streamed both ways, and
HTTP/1.1 Upgrades (WebSockets and any other protocol) carried as bytes.

A request is for a sandbox when it carries ``E2b-Sandbox-Id`` (and ``E2b-Sandbox-Port``, default
49983) or its Host is ``<port>-<id>.<domain>`` (spec §5.2). The upstream connection is a TCP socket
created *inside* the sandbox's network namespace (nothing is published on the host), kept alive
and reused per (sandbox, port). Bodies stream in both directions without buffering, so Connect
server streams (command output, watch events) flow as they are produced.

The proxy is a faithful pipe, as Go's reverse proxy in front of E2B's sandboxes is:

* a client that goes away (mid-upload, or while a stream is open) closes the upstream connection at
  once, so the agent sees the abort (an aborted upload leaves no temporary file behind);
* an upstream that dies in the middle of a response resets the client's connection (TCP RST), so
  the SDKs report the sandbox killed or gone rather than a short, clean answer; then the sandbox's
  ``/health`` answers 502 "…was not found", which the SDKs' probe reads as "not running";
* an upgraded connection is spliced byte for byte, and closed on both sides when either ends.

The Host header goes upstream as the client sent it (servers inside, such as Jupyter, compare it
with ``Origin``), as E2B's proxy does. One header is the proxy's to decide: a request for the agent
from this host itself loses the ``Accept-Encoding`` its HTTP client adds by default (:func:`same_host`,
:data:`SAME_HOST_DROPPED`), so its downloads come back as they are rather than gzipped for a link
that has no bandwidth to save.

A port the sandbox was created with in ``network.https_ports`` serves TLS itself: the proxy speaks
TLS to it, plain requests and upgrades alike, without verifying its certificate (so a self-signed
one works), as E2B's proxy does; the client's side is the runtime's own (plain, or ``--tls-cert``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hmac
import ipaddress
import json
import os
import re
import select
import socket
import ssl
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from sandboxd._core import RECEIVE_MIN_RATE
from sandboxd.agent.asgi import (
    BODY_FOLLOWS,
    BODY_PARTS,
    RAW_BODY,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    read_body,
    send_json,
)
from sandboxd.agent.compression import accepted_codings
from sandboxd.agent.http_server import MAX_RAW_BODIES

from .backend import Backend
from .connection import Upgrade, reset_client, response
from .errors import ApiError
from .inputs import SANDBOX_ID
from .observe.http import SPLICED_BYTES

ENVD_PORT = 49983
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
"""E2B's header for a sandbox's traffic access token (its edge proxy's name)."""
HOP_BY_HOP = {
    TRAFFIC_TOKEN_HEADER,  # the sandbox's secret stays in the proxy
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"content-length",
    b"expect",  # the runtime's server answers 100-continue itself, when the body is read
}
FORWARDING_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"via",
        b"cf-connecting-ip",
        b"true-client-ip",
    }
)
"""What a proxy in front of the runtime adds for a client elsewhere (nginx's usual configuration,
Caddy's and Traefik's defaults, Squid's ``Via``, a CDN's client address): a loopback peer with one of
them is not this host. A tunnel that adds none (``ssh -L``, ``kubectl port-forward``, a TCP proxy)
looks local, and its client gets identity: slower on a slow link, never wrong."""

SAME_HOST_DROPPED = frozenset({b"accept-encoding"})
"""Headers a request for the agent (:data:`ENVD_PORT`) from this host loses (:func:`_dropped`). The
SDKs send ``Accept-Encoding: gzip, deflate`` on every ``files.read``, ``gzip=False`` included
(httpx's default; the JS SDK's fetch likewise), and the agent, as envd, then gzips a compressible
file up to 8 MiB. Over loopback no byte is saved and both sides pay: a 1.2 MB text file read by the
Python SDK through the proxy took 52 ms gzipped and 4 ms not, 4 MiB of repeated text 75 ms and 10
(the agent's level-1 deflate ran at ~65 MB/s on text, the SDK's inflate slower still;
docs/benchmarks.md, stop 44). Identity is an answer every client accepts (spec §3.4). Kept: what a
user asked for (the SDKs' ``gzip=True`` sends ``gzip`` alone), and every header of a client on
another host, whose link may gain from gzip."""

MAX_IDLE_PER_TARGET = 16
"""Idle upstream connections kept per (sandbox, port): enough for an SDK's pool of parallel calls."""

READ_SIZE = 256 << 10
"""Upstream read size: large enough that file downloads move in few, big pieces."""

REPLAY_BODY = 64 << 10
"""A request body up to this size (by its ``Content-Length``) is read whole before it is sent, so the
request can be sent again on a fresh connection if the reused one it went out on (pooled, or the
sandbox's kept ``/init`` connection) turns out closed before any answer. The SDK's commands and
file calls are bodies of a few hundred bytes; larger ones stream, and are never sent twice."""

MAX_RESPONSE_HEAD = 64 << 10
"""A sandbox's response head larger than this is refused (502): the sandbox is hostile, and the
head is buffered until complete."""

SPLICE_FROM = 1 << 20
"""A response body with at least this much of its ``Content-Length`` still to come moves from the
sandbox's socket to the client's with ``splice(2)`` in a worker thread (:func:`_splice_body`), not
through the event loop. Through the loop each byte was copied four times in user space (asyncio's
stream buffer in and out, httptools' body callback, the ASGI message): a 64 MiB download through the
proxy moved at 0.55-0.62x of the same download from the agent directly, with the runtime's core full."""

PIPE_SIZE = 1 << 20
"""The splice pipe's capacity (``F_SETPIPE_SZ``; the kernel's default cap, ``fs.pipe-max-size``)."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_PEER_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


@functools.cache
def upstream_tls() -> ssl.SSLContext:
    """The client context for a sandbox port in ``https_ports``: TLS 1.2 or later, and no check of
    the sandbox's certificate or name (E2B's proxy re-encrypts to the sandbox the same way: there is
    no name a sandbox's certificate could prove, and the hop never leaves this machine)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_failure(port: int, exc: OSError) -> str:
    """The 502 message of a TLS handshake with a sandbox's ``https_ports`` port that failed."""
    reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
    return (
        f"The sandbox's server on port {port} did not complete a TLS handshake ({reason}): the port is "
        "listed in network.https_ports, so the proxy speaks HTTPS to it"
    )


_BAD_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""Header names and values the runtime's server refuses to send: a sandbox's response carrying one
loses that header rather than failing the whole response."""


@dataclass(slots=True, eq=False)  # compared and hashed by identity: a member of the busy sets
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def abort(self) -> None:
        self.writer.transport.abort()


@dataclass
class _Response:
    """What the httptools callbacks collected from the upstream's reply (informational 1xx answers
    are skipped: the client's server sends its own 100-continue)."""

    parser: httptools.HttpResponseParser | None = None
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    body_seen: int = 0
    """Body bytes the parser has given (all of ``body`` and what was relayed before)."""
    head_size: int = 0
    head_read: int = 0
    """Bytes fed to the parser before the head was complete: httptools gathers a header line across
    reads and calls :meth:`on_header` only once it ends, so a line that never ends is counted here."""
    headers_done: bool = False
    complete: bool = False
    overrun: bool = False
    """A second answer began in the bytes after this one's end: this one is whole, the connection
    is not reusable (what the sandbox sent past its answer is never relayed to anyone)."""
    keep_alive: bool = False
    """Read when the head is complete: llhttp forgets it once the message is."""

    def on_message_begin(self) -> None:
        if self.complete:
            self.overrun = True
            raise _UpstreamLost  # stops the parser here: the answer relayed keeps its own head
        self.headers = []
        self.head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_RESPONSE_HEAD:
            raise _UpstreamLost
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # informational: the real answer follows
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(data)
        self.body_seen += len(data)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True

    def framed(self, method: str) -> bool:
        """Whether the body has its own end (a length or chunks): then the upstream closing before
        that end is a failure, not the end of the body."""
        if method == "HEAD" or self.status in (204, 304):
            return True
        return any(
            k == b"content-length" or (k == b"transfer-encoding" and b"chunked" in v.lower()) for k, v in self.headers
        )

    def length(self) -> int | None:
        """The body's ``Content-Length`` when it has exactly one, of digits, and no chunked framing."""
        lengths = [v for k, v in self.headers if k == b"content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit() or any(k == b"transfer-encoding" for k, _ in self.headers):
            return None
        return int(lengths[0])


def parse_target(headers: dict[str, str], domain: str | None) -> tuple[str, int] | None:
    """``(sandbox id, port)`` of a proxied request, or None for a control-plane request."""
    sandbox_id = headers.get("e2b-sandbox-id")
    if sandbox_id:
        port = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise ApiError(400, "E2b-Sandbox-Id is not a sandbox id")
        if not port.isascii() or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise ApiError(400, f"E2b-Sandbox-Port must be a TCP port, got '{port[:16]}'")
        return sandbox_id, int(port)
    host = headers.get("host", "").rsplit(":", 1)[0] if "]" not in headers.get("host", "") else ""
    label, _, rest = host.partition(".")
    port_text, dash, sandbox_id = label.partition("-")
    if (
        dash
        and port_text.isascii()
        and port_text.isdigit()
        and len(port_text) <= 5
        and 0 < int(port_text) < 65536
        and SANDBOX_ID.fullmatch(sandbox_id)
        and (domain is None or rest.lower() == domain.lower())
    ):
        return sandbox_id, int(port_text)
    return None


def same_host(scope: Scope) -> bool:
    """Whether the request's client runs on this host: its peer is a loopback address (an IPv4-mapped
    one included) and no reverse proxy forwarded it (none of :data:`FORWARDING_HEADERS`). A forged
    header only makes a local client look remote (it keeps its own ``Accept-Encoding``): nothing to
    gain by sending one."""
    client = scope.get("client")
    if not client or not _loopback(client[0]):
        return False
    return not any(name.lower() in FORWARDING_HEADERS for name, _ in scope["headers"])


@functools.lru_cache(maxsize=1024)
def _loopback(host: str) -> bool:
    """Whether a peer's address is a loopback one, an IPv4-mapped one included. Remembered: parsed
    with ``ipaddress`` it was ~4 % of the event loop's time per proxied request, and a runtime's
    clients are few addresses."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _dropped(scope: Scope, port: int) -> frozenset[bytes]:
    """The client's headers the proxy does not send on (:data:`SAME_HOST_DROPPED`): for the agent's
    port, from this host, unless the ``Accept-Encoding`` asks for gzip alone (:func:`_gzip_alone`)."""
    if port != ENVD_PORT or not same_host(scope):
        return frozenset()
    accepted = [v for k, v in scope["headers"] if k.lower() == b"accept-encoding"]
    if not accepted or _gzip_alone(accepted):
        return frozenset()
    return SAME_HOST_DROPPED


def _gzip_alone(values: list[bytes]) -> bool:
    """Whether ``Accept-Encoding`` (every line of it) names gzip (``gzip``, ``x-gzip``) and no other
    coding with a ``q`` above 0, ``identity`` aside, read as the agent reads it: the SDKs'
    ``gzip=True``, a user's choice rather than an HTTP client's default list."""
    codings = {name for name, q in accepted_codings(b",".join(values).decode("latin-1")) if q > 0}
    codings.discard("identity")
    return bool(codings) and codings <= {"gzip", "x-gzip"}


def _header_map(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def _request_head(
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    keep: set[bytes],
    host: bytes | None,
    drop: frozenset[bytes] = frozenset(),
) -> list[bytes]:
    """The request line and the end-to-end headers (those named by ``Connection`` are hop-by-hop too),
    with any of ``keep`` kept and none of ``drop``; the client's Host unless ``host`` replaces it."""
    named = {token.strip().lower() for k, v in headers if k.lower() == b"connection" for token in v.split(b",")}
    dropped = (HOP_BY_HOP | named | drop) - keep
    if host is not None or not any(k.lower() == b"host" for k, _ in headers):
        dropped.add(b"host")
    head = [method.encode("latin-1") + b" " + target + b" HTTP/1.1"]
    if b"host" in dropped:
        head.append(b"host: " + (host or b"sandbox"))
    head += [k + b": " + v for k, v in headers if k.lower() not in dropped]
    return head


def _target(scope: Scope) -> bytes:
    target: bytes = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    return target


class SandboxProxy:
    """Forwards requests into sandboxes, with a keep-alive pool per (sandbox, port)."""

    def __init__(self, backend: Backend, domain: str | None = None) -> None:
        self.manager = backend
        self.domain = domain
        """For Host routing of upgrades (``<port>-<id>.<domain>``), as the runtime's app routes requests."""
        self.idle: dict[tuple[str, int], list[_Upstream]] = defaultdict(list)
        self.busy: dict[str, set[_Upstream]] = defaultdict(set)
        """Upstream connections of each sandbox that a request is using now (out of the pool)."""

    def forget(self, sandbox_id: str) -> None:
        """Drop every upstream connection of a sandbox that was killed or paused: the pooled ones, and
        those in use (their requests fail as the sandbox stops anyway), which would otherwise come back
        to the pool afterwards and stay there. Each is a socket in the sandbox's network namespace,
        and a socket keeps its namespace, and so the sandbox's veth pair and its name, alive: a
        leftover would make the next sandbox given the same network slot fail to link."""
        for key in [k for k in self.idle if k[0] == sandbox_id]:
            for upstream in self.idle.pop(key):
                upstream.writer.close()
        for upstream in self.busy.pop(sandbox_id, ()):
            upstream.abort()

    async def _connect(self, sandbox_id: str, port: int) -> tuple[_Upstream, bool]:
        """An upstream connection, and whether it was used before (it may have gone stale): one from
        the pool, or the sandbox's kept ``/init`` connection, which its agent may close as it is
        handed out."""
        pool = self.idle.get((sandbox_id, port))
        while pool:
            upstream = pool.pop()
            if not upstream.reader.at_eof() and not upstream.writer.is_closing():
                self.busy[sandbox_id].add(upstream)
                return upstream, True
            upstream.writer.close()
        kept = self.manager.kept_socket(sandbox_id, port)
        sock = kept if kept is not None else await self.manager.open_socket(sandbox_id, port)
        tls = self._tls(sandbox_id, port)
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=READ_SIZE, ssl=tls, server_hostname="" if tls is not None else None
            )
        except BaseException:
            sock.close()
            raise
        upstream = _Upstream(reader, writer)
        self.busy[sandbox_id].add(upstream)
        return upstream, kept is not None

    def _tls(self, sandbox_id: str, port: int) -> ssl.SSLContext | None:
        """TLS for a port the sandbox's ``network.https_ports`` lists, else None."""
        ports = self.manager.network_config(sandbox_id).https_ports
        return upstream_tls() if ports and port in ports else None

    def _done(self, sandbox_id: str, upstream: _Upstream) -> bool:
        """The request is done with ``upstream``; False if the sandbox was forgotten meanwhile."""
        busy = self.busy.get(sandbox_id)
        if busy is None or upstream not in busy:
            return False
        busy.discard(upstream)
        if not busy:
            del self.busy[sandbox_id]
        return True

    def _release(self, sandbox_id: str, port: int, upstream: _Upstream) -> None:
        if not self._done(sandbox_id, upstream):
            upstream.abort()  # the sandbox stopped while the request ran: never pool its sockets
            return
        pool = self.idle[(sandbox_id, port)]
        if len(pool) < MAX_IDLE_PER_TARGET and not upstream.writer.is_closing():
            pool.append(upstream)
        else:
            upstream.writer.close()

    async def _unavailable_message(self, sandbox_id: str, port: int) -> str:
        """The E2B edge proxy's 502 message: "…was not found" when the sandbox is gone (the SDK raises
        ``SandboxNotRunningException``), "…port is not open" when nothing listens."""
        try:
            await self.manager.ensure_reachable(sandbox_id)
            return f"The sandbox is running but port is not open: nothing listens on port {port}"
        except ApiError as exc:
            return exc.message

    async def _unavailable(self, send: Send, sandbox_id: str, port: int, tls: OSError | None = None) -> None:
        message = tls_failure(port, tls) if tls is not None else await self._unavailable_message(sandbox_id, port)
        await send_json(send, 502, {"sandboxId": sandbox_id, "message": message, "code": 502, "port": port})

    async def _ingress(
        self, headers: list[tuple[bytes, bytes]], sandbox_id: str, port: int
    ) -> tuple[bytes | None, ApiError | None]:
        """The Host to send upstream instead of the client's (``maskRequestHost``; None keeps the
        client's, as E2B's proxy does), and the refusal of a request that lacks the sandbox's traffic
        token (``allow_public_traffic=False``; envd's port has its own token and is exempt, as in
        E2B's proxy). Plain requests and upgrades alike."""
        if port == ENVD_PORT:
            return None, None
        try:
            token = await self.manager.traffic_token(sandbox_id)
        except ApiError as exc:  # whether a token is needed is unknown: refused, never let through
            return None, exc
        if token is not None:
            given = next((v for k, v in headers if k.lower() == TRAFFIC_TOKEN_HEADER), None)
            if given is None:
                return None, ApiError(
                    403,
                    f"Sandbox is secured with traffic access token. Token header '{TRAFFIC_TOKEN_HEADER.decode()}' is "
                    "missing",
                )
            if not hmac.compare_digest(given, token.encode()):
                return None, ApiError(
                    403,
                    f"Sandbox is secured with traffic access token. Provided token in header "
                    f"'{TRAFFIC_TOKEN_HEADER.decode()}' is invalid",
                )
        mask = self.manager.network_config(sandbox_id).mask_request_host
        return (mask.replace("${PORT}", str(port)).encode() if mask else None), None

    # ---------------------------------------------------------------------------------- HTTP

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int) -> None:
        host, refusal = await self._ingress(scope["headers"], sandbox_id, port)
        if refusal is not None:
            await send_json(
                send, refusal.status, {"sandboxId": sandbox_id, "message": refusal.message, "code": refusal.status}
            )
            return
        extensions = scope.get("extensions", {})
        relay = _Relay(send, extensions.get(BODY_PARTS), extensions.get(SPLICED_BYTES))
        try:
            body = await _replayable_body(scope, receive)
        except ClientDisconnected:
            return
        dropped = _dropped(scope, port)
        # A reused connection the agent closed meanwhile fails before any reply: retry once on a
        # fresh one when the request's body can be sent again (none, or held whole).
        attempts = 1 if body is None else 2
        for attempt in range(attempts):
            try:
                await self.manager.ensure_reachable(sandbox_id)
                upstream, pooled = await self._connect(sandbox_id, port)
            except ApiError as exc:
                await send_json(send, exc.status, {"sandboxId": sandbox_id, "message": exc.message, "code": exc.status})
                return
            except ssl.SSLError as exc:
                await self._unavailable(send, sandbox_id, port, tls=exc)
                return
            except OSError:
                await self._unavailable(send, sandbox_id, port)
                return
            reusable = False
            try:
                reusable = await self._exchange(scope, receive, relay, upstream, host, body, dropped)
                return
            except ClientDisconnected:
                upstream.abort()  # the agent sees the abort now, not when a pooled socket is reaped
                return
            except (OSError, _UpstreamLost):
                if relay.started:
                    reset_client(scope)  # mid-answer: only a reset tells the client it is incomplete
                    return
                if not (pooled and attempt + 1 < attempts):
                    await self._unavailable(send, sandbox_id, port)
                    return
            finally:
                if reusable:
                    self._release(sandbox_id, port, upstream)
                else:
                    self._done(sandbox_id, upstream)
                    upstream.writer.close()

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        relay: _Relay,
        upstream: _Upstream,
        host: bytes | None = None,
        body: bytes | None = None,
        drop: frozenset[bytes] = frozenset(),
    ) -> bool:
        """One request/response over ``upstream``; True when the connection may be reused. ``body``:
        the request's whole body, already read (None: it streams from ``receive``); ``drop``: the
        client's headers not sent on (:data:`SAME_HOST_DROPPED`).

        Two tasks: one sends the request body and then waits for the client to go away; the other
        relays the response. Whichever ends first decides: the response done ends the exchange; the
        client gone aborts the upstream at once (raising :class:`ClientDisconnected`)."""
        method: str = scope["method"]
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        length = next((v for k, v in headers if k == b"content-length"), None)
        chunked = length is None and any(k == b"transfer-encoding" for k, _ in headers)
        head = _request_head(method, _target(scope), headers, set(), host, drop)
        if length is not None:
            head.append(b"content-length: " + length)
        elif chunked:
            head.append(b"transfer-encoding: chunked")
        if body is not None and chunked:  # a chunked body held whole: framed again, still chunked
            body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        # One write for the head and a held body: each write into the sandbox is a segment and a
        # wake-up of its server (the SDK's commands.run was head, body, and its end: three).
        upstream.writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
        if body is not None and relay.writer is not None:
            return await self._relay_watched(method, relay, upstream)

        body_sent = asyncio.Event()

        async def send_body_then_watch() -> None:
            spliced = body is None and length is not None and await _splice_request_body(scope, upstream)
            if not spliced and body is None and (length is not None or chunked):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected
                    chunk: bytes = message.get("body", b"")
                    more = message.get("more_body", False)
                    if chunked:  # the last chunk and the body's end in one write when they came together
                        framed = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b""
                        chunk = framed if more else framed + b"0\r\n\r\n"
                    if chunk:
                        upstream.writer.write(chunk)
                        await upstream.writer.drain()
            await upstream.writer.drain()
            body_sent.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            raise ClientDisconnected

        sender = asyncio.ensure_future(send_body_then_watch())
        relayer = asyncio.ensure_future(self._relay_response(method, relay, upstream))
        try:
            await asyncio.wait([sender, relayer], return_when=asyncio.FIRST_COMPLETED)
            if not relayer.done():
                error = sender.exception()
                if isinstance(error, ClientDisconnected):
                    raise ClientDisconnected
                # Writing the body failed (the agent closed its side): its answer, if any, still counts.
                await relayer
            complete = relayer.result()
        finally:
            for task in (sender, relayer):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ClientDisconnected, OSError, _UpstreamLost):
                    await task
        return complete and body_sent.is_set()

    async def _relay_watched(self, method: str, relay: _Relay, upstream: _Upstream) -> bool:
        """:meth:`_relay_response` for a request whose body went with its head (the common case: the
        SDK's calls), without a second task: the server calls back when the client goes, which aborts
        the upstream at once (the agent sees it, as with the task) and ends the relay with
        :class:`ClientDisconnected`. The task, its ``asyncio.wait`` and its cancellation cost ~5% of the
        runtime's event-loop CPU per ``commands.run`` (1.17 ms → 1.09 ms, median of 3 alternating runs)."""
        gone = False

        def left() -> None:
            nonlocal gone
            gone = True
            upstream.abort()

        forget = relay.writer.on_disconnect(left)
        try:
            complete = await self._relay_response(method, relay, upstream)
        except (OSError, _UpstreamLost):
            if gone:
                raise ClientDisconnected from None
            raise
        finally:
            forget()
        if gone:
            raise ClientDisconnected
        # Reusable only once all of the request went (the task waited for that): an answer that came
        # before the agent read the whole body must not pool a connection with our bytes still queued.
        return complete and not upstream.writer.transport.get_write_buffer_size()

    async def _relay_response(self, method: str, relay: _Relay, upstream: _Upstream) -> bool:
        """Relay the upstream's response; True when it ended cleanly with the connection reusable.
        Raises :class:`_UpstreamLost` (or ``OSError``) when the upstream fails before its end."""
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        response.parser = parser
        send = relay.send
        ended = False  # the last body message (more_body False) was sent
        while not response.complete:
            data = await upstream.reader.read(READ_SIZE)
            if not data:
                if response.headers_done and not response.framed(method):
                    break  # a body delimited by the end of the connection: this is its end
                raise _UpstreamLost  # the agent went away before its answer was complete
            if not response.headers_done:
                response.head_read += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise _UpstreamLost from None  # an upgrade answer to a request that asked for none
            except httptools.HttpParserError:
                if not response.overrun:
                    raise _UpstreamLost from None
            if not response.headers_done and response.head_read > MAX_RESPONSE_HEAD:
                raise _UpstreamLost  # a head, or a header line, that does not end
            if response.headers_done and not relay.started:
                if not 200 <= response.status <= 599:
                    raise _UpstreamLost
                relay.started = True
                out = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP or k == b"content-length"]
                out = [(k, v) for k, v in out if not _BAD_NAME.search(k) and not _BAD_VALUE.search(v)]
                if response.status in (204, 304):
                    # No body follows either (RFC 9110 §6.4.1); a 304 may carry the length a 200 would
                    # have, which the client's server would then wait for: the client gets none.
                    out = [(k, v) for k, v in out if k != b"content-length"]
                    response.complete = True
                if method == "HEAD":
                    response.complete = True
                # Body bytes that came in the same read as the head go out in the same write as it
                # (the server holds the head for them), as they would from the sandbox's server directly:
                # a Connect stream's head and its first message, one segment and one wake-up of the
                # client, not two. A head that came alone is written at once (a stream that starts
                # with its head only must show it before its first message, however late that is).
                follows = bool(response.body) or response.complete
                start = {"type": "http.response.start", "status": response.status, "headers": out}
                await send({**start, BODY_FOLLOWS: True} if follows else start)
            if response.body:
                # What one read gave is sent as one message (a few small chunks: one write, not one each),
                # with the end of the body when the response ended in it (the chunked body's last
                # chunk and its terminator in one write, not two).
                chunk = response.body[0] if len(response.body) == 1 else b"".join(response.body)
                response.body.clear()
                ended = response.complete
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if relay.started and not response.complete and relay.writer is not None:
                length = response.length() if method != "HEAD" else None
                rest = 0 if length is None else length - response.body_seen
                if rest >= SPLICE_FROM and await _splice_body(relay.writer, upstream, rest, relay.tally):
                    response.complete = True
        if not ended:
            await send({"type": "http.response.body", "body": b""})
        return response.complete and response.keep_alive and not response.overrun

    # ------------------------------------------------------------------------------ upgrades

    def claims(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """An Upgrade request is the proxy's when it is for a sandbox (a bad target too: it is
        answered here, as the HTTP path would)."""
        try:
            return parse_target(_header_map(headers), self.domain) is not None
        except ApiError:
            return True

    async def upgrade(self, upgrade: Upgrade) -> None:
        """An upgraded connection into a sandbox port: same routing and answers as plain requests
        (auth is the sandbox server's, as for every proxied request), then bytes both ways."""
        try:
            target = parse_target(_header_map(upgrade.scope["headers"]), self.domain)
        except ApiError as exc:
            upgrade.reply(exc.status, json.dumps(exc.body()).encode())
            return
        assert target is not None
        sandbox_id, port = target
        host, refusal = await self._ingress(upgrade.scope["headers"], sandbox_id, port)
        if refusal is not None:
            body = {"sandboxId": sandbox_id, "message": refusal.message, "code": refusal.status}
            upgrade.reply(refusal.status, json.dumps(body).encode())
            return
        try:
            await self.manager.ensure_reachable(sandbox_id)
            sock: socket.socket = await self.manager.open_socket(sandbox_id, port)
        except ApiError as exc:
            body = {"sandboxId": sandbox_id, "message": exc.message, "code": exc.status}
            upgrade.reply(exc.status, json.dumps(body).encode())
            return
        except OSError:
            message = await self._unavailable_message(sandbox_id, port)
            body = {"sandboxId": sandbox_id, "message": message, "code": 502, "port": port}
            upgrade.reply(502, json.dumps(body).encode())
            return
        # As Go's ReverseProxy: hop-by-hop headers go, then "Connection: upgrade" and the Upgrade
        # header come back; a body (rare) passes raw, so its framing headers stay.
        scope = upgrade.scope
        keep = {b"upgrade", b"content-length", b"transfer-encoding"}
        head = [*_request_head(scope["method"], _target(scope), scope["headers"], keep, host), b"connection: upgrade"]

        def failed(exc: OSError) -> bytes:  # the TLS handshake with an https_ports port
            body = {"sandboxId": sandbox_id, "message": tls_failure(port, exc), "code": 502, "port": port}
            return response(502, json.dumps(body).encode())

        await upgrade.splice(sock, b"\r\n".join(head) + b"\r\n\r\n", self._tls(sandbox_id, port), failed)


class _UpstreamLost(Exception):
    """The sandbox side closed or broke the connection."""


@dataclass(slots=True)
class _Relay:
    """The client side of one proxied request: whether its response has started."""

    send: Send
    writer: Any = None
    """The server's ``ResponseWriter`` of this request (``sandboxd.agent.http_server``), when it has one."""
    tally: list[int] | None = None
    """The request's :data:`~.observe.http.SPLICED_BYTES`, when it is observed."""
    started: bool = False


_request_movers: ThreadPoolExecutor | None = None


def _plain_socket(upstream: _Upstream) -> socket.socket | None:
    """The upstream connection's socket, when its bytes are the body's (not TLS: an ``https_ports``
    port), so that they can be spliced."""
    if upstream.writer.get_extra_info("sslcontext") is not None:
        return None
    sock: socket.socket | None = upstream.writer.get_extra_info("socket")
    return sock


async def _splice_request_body(scope: Scope, upstream: _Upstream) -> bool:
    """A large request body (an upload) moved from the client's socket to the upstream's by a worker
    thread (the server's ``RawBody``: what it has buffered, then ``splice(2)``), as a download's
    is the other way (:func:`_splice_body`). False, and nothing taken, when the body does not
    qualify (under :data:`SPLICE_FROM` still to come, TLS, the server's cap on bodies moving) or the
    upstream still has bytes queued. Raises ``OSError`` when the sandbox's side fails first (its
    answer, if any, is still relayed; the client's connection closes after it, its body unread),
    :class:`ClientDisconnected` when the client goes, is silent for the idle timeout or too slow."""
    global _request_movers
    raw = scope.get("extensions", {}).get(RAW_BODY)
    remaining = raw.remaining() if raw is not None else None
    sock = _plain_socket(upstream)
    if (
        remaining is None
        or remaining < SPLICE_FROM
        or sock is None
        or upstream.writer.transport.get_write_buffer_size()
    ):
        return False
    if _request_movers is None:  # as many threads as the server lets bodies move at once
        _request_movers = ThreadPoolExecutor(MAX_RAW_BODIES, thread_name_prefix="sandboxd-upload")
    try:  # before the body is taken: once it is, it must be moved (no descriptor left: the loop's way)
        sink = os.dup(sock.fileno())
    except OSError:
        return False
    ahead = raw.take()
    tally = scope["extensions"].get(SPLICED_BYTES)

    def move(client: int, length: int, idle_timeout: float, stop: int) -> str:
        ended, moved = _splice(client, sink, ahead, len(ahead) + length, stop, idle_timeout)
        if tally is not None:
            tally[0] += moved  # read by the loop once the request is over, after this thread
        if ended == "sink":
            raise BrokenPipeError("the sandbox closed its side of the connection during the body")
        return {"done": "complete", "source": "closed"}.get(ended, ended)

    try:
        await raw.receive_into(move, _request_movers)
    finally:
        os.close(sink)
    return True


async def _splice_body(writer: Any, upstream: _Upstream, remaining: int, tally: list[int] | None) -> bool:
    """The rest of a response body (``remaining`` bytes) moved from the upstream's socket to the
    client's by a worker thread (``ResponseWriter.hand_off``, raw): the bytes asyncio has read ahead
    first, then ``splice(2)`` through a pipe, no byte copied in user space. True once all of it went;
    False when the hand-off was refused (a head still held, bytes still queued for the client, TLS on
    the client's side, the threads' cap), and the loop relays as before. Raises
    :class:`_UpstreamLost` when the sandbox's side ends or fails first (the caller resets the
    client), :class:`ClientDisconnected` when the client goes."""
    reader = upstream.reader
    buffered = getattr(reader, "_buffer", None)  # asyncio's read-ahead (a bytearray), taken whole below
    sock = _plain_socket(upstream)
    if not isinstance(buffered, bytearray) or sock is None or len(buffered) >= remaining:
        return False
    transport = cast(asyncio.Transport, upstream.writer.transport)
    try:  # the thread's own descriptor (none left: the loop's way)
        source = os.dup(sock.fileno())
    except OSError:
        return False
    ahead: list[bytes] = []
    ran: list[bool] = []

    def before() -> None:  # the hand-off is decided; the loop runs nothing else until the thread starts
        transport.pause_reading()
        ahead.append(bytes(buffered))
        buffered.clear()

    def move(client: int, cancel: int) -> tuple[str, int, bytes]:
        ran.append(True)
        ended, written = _splice(source, client, ahead[0], remaining, cancel)
        # hand_off's outcomes: "closed" (it closes the client's connection and raises
        # ClientDisconnected), anything else is returned to us.
        return {"done": "done", "source": "upstream"}.get(ended, "closed"), written, b""

    def after() -> None:
        if not ran and ahead:  # no thread could be started: the loop relays the read-ahead after all
            buffered[:0] = ahead[0]
        if not transport.is_closing():
            transport.resume_reading()

    try:
        handed = await writer.hand_off(move, before, after, raw=remaining)
    finally:  # hand_off returns or raises only once its thread, if one started, is done
        os.close(source)
    if handed is None:
        return False
    outcome, written = handed
    if tally is not None:
        tally[1] += written
    if outcome != "done":
        raise _UpstreamLost
    return True


def _splice(
    source: int, sink: int, ahead: bytes, count: int, cancel: int, idle_timeout: float | None = None
) -> tuple[str, int]:
    """In a worker thread: ``ahead``, then ``count - len(ahead)`` bytes from the socket ``source``,
    written to the socket ``sink`` (both non-blocking, shared with the event loop's transports, which
    meanwhile neither read ``source`` nor write ``sink``), through a pipe with ``splice(2)``. Returns
    what ended it and the bytes written to ``sink``: ``"done"``; ``"source"`` (it ended or failed
    before ``count``), ``"sink"`` (it failed or its peer left), ``"stopped"`` (``cancel``, an eventfd,
    was signalled); with ``idle_timeout``, ``"timed out"`` (nothing came from ``source`` for that long)
    or ``"too slow"`` (under ``RECEIVE_MIN_RATE`` bytes/s on average past the first ``idle_timeout``:
    as the agent's uploads, so that a trickle cannot hold the thread for a whole ``Content-Length``)."""
    into = select.poll()
    into.register(source, select.POLLIN)
    into.register(cancel, select.POLLIN)
    # The sink's peer closing, while nothing comes to send it: the event loop, which does not read
    # the sink meanwhile, would not notice (a client gone from a download its sandbox stalls).
    into.register(sink, select.POLLRDHUP)
    out = select.poll()
    out.register(sink, select.POLLOUT)
    out.register(cancel, select.POLLIN)
    began = last = time.monotonic()

    def wait(poller: select.poll, timeout: float | None = None) -> str | None:
        """Until ready (None), or what stopped the wait."""
        ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)) + 1)
        if any(fd == cancel for fd, _ in ready):
            return "stopped"
        if any(fd == sink and events & _PEER_GONE for fd, events in ready):
            return "sink"
        return None if ready else "timed out"

    written = 0
    view = memoryview(ahead)
    while written < len(ahead):
        try:
            written += os.write(sink, view[written:])
        except BlockingIOError:
            if (stop := wait(out)) is not None:
                return stop, written
        except OSError:
            return "sink", written
    pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe moves the same bytes in more calls
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, PIPE_SIZE)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        held = 0  # bytes in the pipe
        while written < count:
            want = count - written - held
            if want and held < PIPE_SIZE:
                try:
                    got = os.splice(source, pipe_in, min(want, PIPE_SIZE - held), flags=flags)
                except BlockingIOError:
                    got = -1
                except OSError:
                    return "source", written
                if got == 0:
                    return "source", written  # ended before ``count``
                if got > 0:
                    held += got
                    last = time.monotonic()
                    slow = idle_timeout is not None and last - began > idle_timeout
                    if slow and (written + held) / (last - began) < RECEIVE_MIN_RATE:
                        return "too slow", written
                elif not held:
                    left = None if idle_timeout is None else idle_timeout - (time.monotonic() - last)
                    if (stop := wait(into, left)) is not None:
                        return stop, written
                    continue
            try:
                sent = os.splice(pipe_out, sink, held, flags=flags)
            except BlockingIOError:
                if (stop := wait(out)) is not None:
                    return stop, written
                continue
            except OSError:
                return "sink", written
            held -= sent
            written += sent
        return "done", written
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


async def _replayable_body(scope: Scope, receive: Receive) -> bytes | None:
    """The request's whole body when it can be held to be sent again (none: ``b""``; one of a
    ``Content-Length`` up to :data:`REPLAY_BODY`, read now; a chunked one that is all there already,
    :func:`_arrived_body`), else None: it streams as it comes. Raises :class:`ClientDisconnected` if
    the client leaves meanwhile."""
    lengths = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    if any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"]):
        return await _arrived_body(scope, receive)
    if not lengths:
        return b""
    if len(lengths) > 1 or not lengths[0].isdigit() or int(lengths[0]) > REPLAY_BODY:
        return None
    held = await read_body(receive, REPLAY_BODY)
    return held if held is not None else b""  # never None: the server ends the body at its Content-Length


async def _arrived_body(scope: Scope, receive: Receive) -> bytes | None:
    """A chunked request body (no length to wait for) when all of it, up to :data:`REPLAY_BODY`, has
    arrived after at most one turn of the event loop, else None (it streams). The SDKs send a
    command's ``Start`` so: the head, then its small body with the body's end, in two writes that
    usually arrive apart. The turn lets the body's bytes be read, so the head goes upstream with the
    body in one write (and the request can be sent again, :data:`REPLAY_BODY`). Never waits longer:
    a client may send the rest of a body only once the answer has begun."""
    writer = scope.get("extensions", {}).get(BODY_PARTS)
    if writer is None:
        return None
    size: int | None = writer.body_arrived()
    if size is None:
        await asyncio.sleep(0)
        size = writer.body_arrived()
    if size is None or size > REPLAY_BODY:
        return None
    held = await read_body(receive, REPLAY_BODY)  # all there: no wait
    return held if held is not None else b""
