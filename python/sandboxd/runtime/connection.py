"""The runtime's client connections: uvicorn's HTTP/1.1 protocol (httptools) plus the two things a
faithful proxy needs that ASGI cannot express.

* **A reset.** When the sandbox side of a proxied response dies midway, the client must see the
  connection reset (TCP RST), as Go's reverse proxy in front of E2B's sandboxes makes it, not a clean
  end of a chunked body that looks like a complete (if short) answer. The SDKs tell "killed
  mid-request" from "answered" by exactly that. A reset is ``SO_LINGER`` with a zero timeout, then
  an abort of the transport: the kernel sends RST instead of FIN and drops unsent data.
  ``scope["extensions"][CONNECTION]`` carries a :class:`ConnectionControl` for it.
* **Upgrades.** A request with ``Connection: upgrade`` (a WebSocket, or any other HTTP/1.1 Upgrade)
  is not an ASGI HTTP request: once the server answers ``101``, the connection is a byte stream in
  both directions. uvicorn hands only WebSockets to a WebSocket library, as messages, and drops the
  bytes of any other upgrade. Here the connection itself is handed to the proxy
  (:class:`Upgrade`), which sends the request head on to the sandbox and then splices bytes both
  ways (:func:`splice`), closing both sides when either ends, like Go's ``ReverseProxy``.

This is the only module that knows uvicorn's protocol internals (``HttpToolsProtocol``: its parser
callbacks, ``data_received``, ``scope``, ``transport``), so a change of server is a change here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sandboxd.agent.asgi import Scope

log = logging.getLogger("sandboxd.runtime")

CONNECTION = "sandboxd.connection"
"""The ASGI scope extension that carries a request's :class:`ConnectionControl`."""

_LINGER_RESET = struct.pack("ii", 1, 0)
"""``struct linger {l_onoff = 1, l_linger = 0}``: close() sends RST."""


class UpgradeRouter(Protocol):
    """Who takes upgraded connections: the sandbox proxy."""

    def claims(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether an Upgrade request with these headers is for a sandbox (the others are served as
        plain HTTP requests, their Upgrade ignored, as by any server that does not speak it)."""

    async def upgrade(self, upgrade: Upgrade) -> None:
        """Carry the connection; it is closed when this returns."""


class ConnectionControl:
    """What a request may do to its client connection beyond ASGI."""

    def __init__(self, protocol: HttpToolsProtocol) -> None:
        self._protocol = protocol

    def reset(self) -> None:
        """Abort the connection with a TCP reset. The request counts as disconnected at once, so the
        server neither writes more nor reports the response as unfinished."""
        if self._protocol.cycle is not None:
            self._protocol.cycle.disconnected = True
        _reset(self._protocol.transport)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    abort = getattr(transport, "abort", None)  # uvloop's transports are not asyncio's subclasses
    if abort is not None:
        abort()
    else:
        transport.close()


def reset_client(scope: Scope) -> None:
    """Reset the client connection of ``scope`` (see the module's docstring); where the server gives
    no such control, raise, which makes any ASGI server drop the connection."""
    control = scope.get("extensions", {}).get(CONNECTION)
    if control is None:
        raise ConnectionAbortedError("the sandbox closed the connection in the middle of its response")
    control.reset()


class Upgrade:
    """A client connection taken over for an HTTP/1.1 Upgrade, before anything was answered.

    ``scope`` is an ASGI-style HTTP scope of the request (method, path, raw_path, query_string,
    headers, client); ``early`` are bytes the client sent after the request head."""

    def __init__(self, scope: Scope, transport: asyncio.Transport, early: bytes, done: Callable[[], None]) -> None:
        self.scope = scope
        self.transport = transport
        self.early = early
        self._done = done

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        """Answer with a complete response instead of upgrading, and close the connection."""
        self.transport.write(response(status, body, content_type))
        self.transport.close()
        self._done()

    async def splice(
        self,
        upstream: socket.socket,
        head: bytes,
        tls: ssl.SSLContext | None = None,
        failed: Callable[[OSError], bytes] | None = None,
    ) -> None:
        """Send ``head`` and the early bytes to ``upstream``, then copy bytes both ways until either
        side ends; both are closed then. The upstream's answer (``101`` or not) reaches the client as
        it is sent. ``tls``: speak TLS to the upstream; if its handshake fails, the client gets
        ``failed(error)`` (a complete response) before the connection closes."""
        try:
            await splice(self.transport, upstream, head + self.early, tls)
        except OSError as exc:
            if tls is None:
                raise  # the splice closed the client
            if not self.transport.is_closing():
                if failed is not None:
                    self.transport.write(failed(exc))
                self.transport.close()
        finally:
            self._done()


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete HTTP/1.1 response that closes its connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class _Side(asyncio.Protocol):
    """One end of a splice: what it receives is written to its peer, with flow control both ways."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.closed = closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # Either direction ending ends the tunnel (Go's ReverseProxy does the same): the peer gets
        # what was already written, then a FIN; returning False closes this side.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            if exc is None:
                peer.close()
            else:
                _reset(peer)  # a reset on one side is passed on as a reset
        if not self.closed.done():
            self.closed.set_result(None)


async def splice(
    client: asyncio.Transport, upstream: socket.socket, first: bytes, tls: ssl.SSLContext | None = None
) -> None:
    """Copy bytes between ``client`` (a transport already connected) and ``upstream`` (over TLS
    without checking its certificate, with ``tls``) until either ends; both are closed on return.
    A failed TLS handshake raises with the client still open."""
    loop = asyncio.get_running_loop()
    client_closed: asyncio.Future[None] = loop.create_future()
    upstream_closed: asyncio.Future[None] = loop.create_future()
    near = _Side(client_closed)
    client.pause_reading()
    client.set_protocol(near)
    near.transport = client
    try:
        upstream.setblocking(False)
        far_transport, far = await loop.create_connection(
            lambda: _Side(upstream_closed), sock=upstream, ssl=tls, server_hostname="" if tls is not None else None
        )
    except BaseException as exc:
        upstream.close()
        if tls is None or not isinstance(exc, OSError):
            client.close()
        raise
    far.transport = far_transport  # (uvloop may call connection_made later than it returns)
    near.peer, far.peer = far, near
    far_transport.write(first)
    if client.is_closing():  # the client left while the upstream was being reached
        far_transport.close()
    else:
        client.resume_reading()
    try:
        await asyncio.wait([client_closed, upstream_closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for transport in (client, far_transport):
            if not transport.is_closing():
                transport.close()


class RuntimeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a :class:`ConnectionControl` in every request's scope, and
    the HTTP/1.1 Upgrades that :attr:`router` claims handed to it. Used as a mixin over the server's
    own protocol class (:func:`protocol_class`), whose bookkeeping it keeps: every callback goes
    through ``super()``, and a connection handed over reports its end as a lost connection."""

    router: UpgradeRouter | None = None
    """Set by :func:`protocol_class`."""

    _claimed = False
    """Whether the request being parsed is an upgrade the router takes."""

    _data = b""
    """The bytes of the ``data_received`` call in progress (the upgrade's early bytes are in them)."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._claimed = False
        self.scope["extensions"] = {CONNECTION: ConnectionControl(self)}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        self._claimed = (
            self.router is not None
            and self.parser.should_upgrade()
            and self._get_upgrade() is not None
            and self.router.claims(self.headers)
        )
        super().on_headers_complete()

    def _should_upgrade(self) -> bool:
        # Any upgrade the router claims, not only WebSockets: the proxy carries bytes, whatever the protocol.
        return self._claimed

    def data_received(self, data: bytes) -> None:
        self._data = data
        try:
            super().data_received(data)
        finally:
            self._data = b""

    def handle_websocket_upgrade(self) -> None:
        """Called by uvicorn's ``data_received`` for an upgrade we claimed (any protocol, despite the
        name), inside its ``except HttpParserUpgrade``: the exception carries the offset in ``data``
        where the upgraded bytes begin."""
        caught = sys.exc_info()[1]
        offset = caught.args[0] if isinstance(caught, httptools.HttpParserUpgrade) and caught.args else None
        early = self._data[offset:] if isinstance(offset, int) else b""
        if self.cycle is not None and not self.cycle.response_complete:
            self.send_400_response("An upgrade cannot follow a request whose response is still being sent.")
            return
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:  # llhttp let it through (a port past 65535, CONNECT's form)
            self.send_400_response("Invalid HTTP request received: the request target is not a URL.")
            return
        scope: dict[str, Any] = {
            "type": "http",
            "http_version": "1.1",
            "method": self.scope["method"],
            "path": url.path.decode("latin-1"),
            "raw_path": url.path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
            "scheme": self.scheme,
        }
        self.transport.pause_reading()
        upgrade = Upgrade(scope, self.transport, early, lambda: self.connection_lost(None))
        assert self.router is not None
        task = self.loop.create_task(_run_upgrade(self.router, upgrade))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def shutdown(self) -> None:
        # uvicorn's graceful shutdown: a tunnel has no request to finish, so it simply closes.
        if self._claimed:
            self.transport.close()
            return
        super().shutdown()


async def _run_upgrade(router: UpgradeRouter, upgrade: Upgrade) -> None:
    try:
        await router.upgrade(upgrade)
    except Exception:
        log.exception("proxying an upgraded connection failed")
        if not upgrade.transport.is_closing():
            _reset(upgrade.transport)


def protocol_class(router: UpgradeRouter, server: Any = None) -> type[RuntimeProtocol]:
    """The protocol class for ``uvicorn.Config.http``: :class:`RuntimeProtocol` with ``router`` bound,
    over ``server`` (the class the server settings chose, e.g. one that bounds connections) when it is
    an httptools protocol class."""
    bases: tuple[type, ...] = (RuntimeProtocol,)
    if isinstance(server, type) and issubclass(server, HttpToolsProtocol) and server is not HttpToolsProtocol:
        bases += (server,)
    return type("RuntimeConnection", bases, {"router": router})
