"""The egress proxy: TCP of sandboxes whose rules name hosts or transform requests.

The firewall redirects such a sandbox's outgoing TCP here (every port). Each connection is
decided on its own, E2B's way (see :mod:`.policy`):

1. who is calling (the source address is a sandbox's, :class:`~.addressing.AddressPool`) and where
   it was going (``SO_ORIGINAL_DST``);
2. the connection's name, read without consuming it (``MSG_PEEK``): the SNI of a TLS ClientHello,
   or the Host header of an HTTP/1 request. A client-first protocol sends at once; a server-first
   one (SSH, SMTP) sends nothing and gets no name after :data:`PEEK_TIMEOUT_S`. When its address
   is allowed anyway, the proxy dials it after :data:`PEEK_TIMEOUT_ALLOWED_S` of silence and the side
   that speaks first decides: the server's greeting is relayed, a client that was only slow (a busy
   host) still has its name read and its rules applied;
3. allowed by name: dialed *by that name*, resolved by the host's resolvers, to an address that is
   not in a never-reachable range nor the host's own (:func:`_own_address`); else allowed by
   address (or by default): dialed at the original address; else closed;
4. a name with header rules: HTTP requests get the headers (values replace the request's own, and
   a ``${e2b.secrets.<name>}`` in them becomes that secret's current value, read per connection,
   on TLS connections only; a connection whose rule names a secret that is gone, or in plain HTTP,
   is closed); TLS
   is terminated with a certificate from the runtime's CA (:mod:`.tls`) and re-encrypted to the
   real host, verified. Headers are only ever sent to a connection dialed by the rule's name, in
   requests whose Host is that name, so a sandbox cannot steer them to an address or a virtual
   host of its choosing. Otherwise the bytes are relayed as
   they are.

It runs in the network helper process (:mod:`.helper`), so its work never competes with the
runtime's API for an event loop or the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from .policy import SECRET_PLACEHOLDER, Egress, IPAddress, IPNetwork, fill_secrets
from .resolver import Resolver
from .tls import LeafContexts

log = logging.getLogger("sandboxd.network")

SO_ORIGINAL_DST = 80
"""``SO_ORIGINAL_DST`` (IPv4, ``SOL_IP``) and ``IP6T_SO_ORIGINAL_DST`` (IPv6, ``SOL_IPV6``)."""

PEEK_LIMIT = 16389
"""A whole TLS record (16 KiB + header): a ClientHello fits one, even with post-quantum key shares."""

PEEK_TIMEOUT_S = 5.0
"""How long a connection that must be named may stay silent before it is decided without a name."""

PEEK_TIMEOUT_ALLOWED_S = 0.5
"""The same when its address is already allowed and only header rules want a name: after this long
the proxy dials the address, so a server-first protocol waits at most this long for its greeting.
It is no deadline for the name: a client that speaks before the server still has it read (on a
loaded machine a client can take longer than this between its connect and its ClientHello, and
its request must not then go out by address, without the rule's headers)."""

PEEK_POLL_S = 0.003
"""Pause between peeks while a ClientHello or request head is still arriving."""

CONNECT_TIMEOUT_S = 10.0
RELAY_CHUNK = 256 << 10
"""Read size while relaying: big reads keep the per-byte cost of the loop low."""

SLOW_SETUP_S = 1.0
"""A connection whose set-up (naming, resolving, dialing, the TLS handshakes) takes longer than this
is logged with the time of each step: its client may have given up meanwhile, and nothing else would
say which step it waited on."""

WARN_EVERY_S = 60.0
MAX_WARNED = 4096
"""Sandboxes whose last warning time is kept (cleared past it: a few more warnings, no growth)."""

MAX_HEAD = 64 << 10
"""Longest HTTP request head the header rewriter accepts."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The sandbox a connection came from and its rules."""

    sandbox_id: str
    egress: Egress


Lookup = Callable[[IPAddress], Caller | None]


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def original_destination(sock: socket.socket, v4: bool) -> tuple[IPAddress, int]:
    """Where the sandbox was connecting before the firewall redirected it here."""
    if v4:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from(">H", raw, 2)[0]
        return ipaddress.IPv4Address(raw[4:8]), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from(">H", raw, 2)[0]
    return ipaddress.IPv6Address(raw[8:24]), port


def client_hello_sni(data: bytes) -> str | bool | None:
    """The SNI host name of a TLS ClientHello; None if it has none; False if ``data`` is not a
    ClientHello; True if it may be one that has not fully arrived."""
    if len(data) < 5:
        return not data or data[0] == 0x16
    if data[0] != 0x16 or data[1] != 0x03:
        return False
    record_len = struct.unpack_from(">H", data, 3)[0]
    if len(data) < 5 + record_len:
        return True
    body = data[5 : 5 + record_len]
    try:
        if body[0] != 0x01:
            return False
        at = 4 + 2 + 32  # handshake header, client version, random
        at += 1 + body[at]  # session id
        at += 2 + struct.unpack_from(">H", body, at)[0]  # cipher suites
        at += 1 + body[at]  # compression methods
        if at + 2 > len(body):
            return None
        end = at + 2 + struct.unpack_from(">H", body, at)[0]
        at += 2
        while at + 4 <= min(end, len(body)):
            kind, length = struct.unpack_from(">HH", body, at)
            at += 4
            if kind == 0:  # server_name: list length, then (type, length, name) entries
                entry = at + 2
                if body[entry] == 0:
                    name_len = struct.unpack_from(">H", body, entry + 1)[0]
                    name = body[entry + 3 : entry + 3 + name_len].decode("ascii")
                    return name.lower().rstrip(".") or None
                return None
            at += length
    except (IndexError, struct.error, UnicodeDecodeError):
        return False
    return None


_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def http_host(data: bytes) -> str | bool | None:
    """The Host of an HTTP/1 request head; None if it has none; False if ``data`` is not one; True
    if the head has not fully arrived."""
    if not any(data.startswith(m) or m.startswith(data) for m in _METHODS):
        return False
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return True if len(data) < PEEK_LIMIT else None
    for line in data[:end].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            if host.startswith("["):
                return host[1 : host.find("]")].lower() or None
            return host.rsplit(":", 1)[0].lower().rstrip(".") or None
    return None


class EgressProxy:
    """Accepts redirected connections and decides, dials and relays each one."""

    def __init__(
        self,
        lookup: Lookup,
        resolver: Resolver,
        never: list[IPNetwork],
        opened: list[IPNetwork],
        leaves: LeafContexts | None,
        upstream_tls: ssl.SSLContext,
        secret: Callable[[str], str | None] = lambda name: None,
    ) -> None:
        self.lookup = lookup
        self.secret = secret
        """A secret's current value by name, for the placeholders in header rules."""
        self._warned: dict[str, float] = {}
        self.resolver = resolver
        self.never = never
        self.opened = opened
        self.leaves = leaves
        self.upstream_tls = upstream_tls
        self.tasks: set[asyncio.Task[None]] = set()

    def _warn(self, sandbox_id: str, message: str, *args: object) -> None:
        """A warning about a sandbox's connections, at most once per :data:`WARN_EVERY_S` each (a
        sandbox may open connections as fast as it likes)."""
        now = time.monotonic()
        if now - self._warned.get(sandbox_id, -WARN_EVERY_S) >= WARN_EVERY_S:
            if len(self._warned) > MAX_WARNED:
                self._warned.clear()
            self._warned[sandbox_id] = now
            log.warning(message + " (connection closed; said once a minute)", sandbox_id, *args)

    def reachable(self, ip: IPAddress) -> bool:
        """Outside every never-reachable range, or inside one the operator opened."""
        return not any(ip in n for n in self.never) or any(ip in n for n in self.opened)

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._handle(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        steps = _Steps()
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = _plain(ipaddress.ip_address(conn.getpeername()[0]))
            caller = self.lookup(peer)
            if caller is None:  # its slot holds no sandbox (gone since, or not recorded yet): say so
                log.info("egress: a connection from %s, no sandbox's address now, closed", peer)
                return
            dst, port = original_destination(conn, isinstance(peer, ipaddress.IPv4Address))
            dst = _plain(dst)
            if not self.reachable(dst):
                return
            egress = caller.egress
            verdict = egress.address_verdict(dst)
            name: str | None = None
            tls = False
            if egress.header_rules or (egress.allow_domains and verdict is not True):
                steps.caller = caller.sandbox_id
                if verdict is False:
                    name, tls, _silent = await self._peek_name(conn, PEEK_TIMEOUT_S)
                else:
                    began = time.monotonic()
                    name, tls, silent = await self._peek_name(conn, PEEK_TIMEOUT_ALLOWED_S)
                    if silent:
                        # Allowed by address: dial it, so that a server-first protocol gets its
                        # greeting, and let the side that speaks first decide (see the module's 2.).
                        upstream = await self._dial(dst, port)
                        if upstream is None:
                            return
                        if await _client_speaks_first(conn, upstream):
                            name, tls, _silent = await self._peek_name(conn, PEEK_TIMEOUT_S)
                            if name is not None:
                                log.info(
                                    "egress: sandbox %s's connection to %s named itself after %.1f s",
                                    caller.sandbox_id,
                                    name,
                                    time.monotonic() - began,
                                )
            steps.done("named")
            by_name = name is not None and egress.name_allowed(name)
            if not by_name and verdict is False:
                return
            headers = egress.headers_for(name) if name is not None else None
            if headers is not None and any(SECRET_PLACEHOLDER.search(value) for _, value in headers):
                # Never the placeholder, nor the request without its header; and a secret only over
                # TLS, verified, where nobody on the way reads it.
                filled = fill_secrets(headers, self.secret) if tls else None
                if not isinstance(filled, tuple):
                    why = f"secret '{filled}' no longer exists" if filled else "secrets are only sent over TLS"
                    self._warn(caller.sandbox_id, "egress: sandbox %s's rule for %s names a secret: %s", name, why)
                    return
                headers = filled
            if by_name or headers is not None:
                assert name is not None
                if upstream is not None:  # dialed by address while the client was silent: unused
                    upstream.close()
                upstream = await self._dial_name(name, port, steps)
                if upstream is None:
                    self._warn(caller.sandbox_id, "egress: sandbox %s: %s:%d did not resolve or answer", name, port)
                    return
            elif upstream is None:
                upstream = await self._dial(dst, port)
            if upstream is None:
                return
            if headers is not None and tls and self.leaves is not None:
                await self._intercept_tls(conn, upstream, name or "", port, headers, steps)
                upstream = None  # owned by the TLS streams now
            elif headers is not None and not tls:
                await _relay_rewriting(conn, upstream, lambda host: headers if host == name else None)
            else:
                await _relay(conn, upstream)
        except (OSError, TimeoutError, ValueError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.info("egress: a connection ended with %s: %s%s", type(exc).__name__, exc, steps.slow())
            return
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    async def _peek_name(self, conn: socket.socket, timeout: float) -> tuple[str | None, bool, bool]:
        """(name, is TLS, silent) from the connection's first bytes, left unread. ``silent``: the
        timeout passed before they said whether they carry a name (none came, or part of a hello)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ready = asyncio.Event()
            loop.add_reader(conn.fileno(), ready.set)
            try:
                await asyncio.wait_for(ready.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return None, False, True
            finally:
                loop.remove_reader(conn.fileno())
            data = conn.recv(PEEK_LIMIT, socket.MSG_PEEK)
            if not data:
                return None, False, False
            sni = client_hello_sni(data)
            if isinstance(sni, str) or sni is None:
                return sni, True, False
            host = http_host(data) if sni is False else True
            if isinstance(host, str) or host is None:
                return host, False, False
            if (sni is False and host is False) or len(data) >= PEEK_LIMIT:
                return None, False, False
            if loop.time() >= deadline:
                return None, False, True
            await asyncio.sleep(PEEK_POLL_S)  # the rest of the hello or head is on its way

    async def _dial(self, ip: IPAddress, port: int) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (str(ip), port)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            sock.close()
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def _dial_name(self, name: str, port: int, steps: _Steps) -> socket.socket | None:
        """Connect to ``name`` as the host's resolvers see it, skipping never-reachable addresses
        (a name pointed at a private address does not get the sandbox in)."""
        found = await self.resolver.addresses(name)
        steps.done("resolved")
        for text in found:
            ip = _plain(ipaddress.ip_address(text))
            if not self.reachable(ip) or (_own_address(ip) and not any(ip in n for n in self.opened)):
                log.warning("egress: %s resolved to %s, which sandboxes may not reach", name, ip)
                continue
            sock = await self._dial(ip, port)
            steps.done(f"dialed {ip}" if sock is not None else f"not dialed {ip}")
            if sock is not None:
                return sock
        return None

    async def _intercept_tls(
        self,
        conn: socket.socket,
        upstream: socket.socket,
        name: str,
        port: int,
        headers: tuple[tuple[str, str], ...],
        steps: _Steps,
    ) -> None:
        assert self.leaves is not None
        loop = asyncio.get_running_loop()
        server_context = await loop.run_in_executor(None, self.leaves.context_for, name)
        steps.done("certificate")
        # TLS as the server, on the socket already accepted (StreamWriter.start_tls is client-side only).
        client_r = asyncio.StreamReader(limit=RELAY_CHUNK)
        protocol = asyncio.StreamReaderProtocol(client_r)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock=conn, ssl=server_context, ssl_handshake_timeout=CONNECT_TIMEOUT_S
        )
        client_w = asyncio.StreamWriter(transport, protocol, client_r, loop)
        steps.done("client's handshake")
        up_r, up_w = await asyncio.open_connection(sock=upstream, ssl=self.upstream_tls, server_hostname=name)
        steps.done("server's handshake")
        if slow := steps.slow():
            log.info("egress: sandbox %s's connection to %s:%d was set up slowly%s", steps.caller, name, port, slow)
        try:
            # Only requests whose Host is the name dialed (the SNI): a request naming another host on
            # this connection (a CDN routing by Host) does not get the rule's headers.
            await _pump_rewriting(client_r, up_w, up_r, client_w, lambda host: headers if host == name else None)
        finally:
            up_w.close()
            client_w.close()


class _Steps:
    """When each step of a connection's set-up ended, for :data:`SLOW_SETUP_S`."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.caller = "?"
        self.ended: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        self.ended.append((step, time.monotonic() - self.began))

    def slow(self) -> str:
        """``" (step at N s, ...)"`` when the set-up has taken longer than :data:`SLOW_SETUP_S`."""
        if time.monotonic() - self.began <= SLOW_SETUP_S:
            return ""
        said = ", ".join(f"{step} at {at:.2f} s" for step, at in self.ended)
        return f" (after {time.monotonic() - self.began:.2f} s: {said or 'no step done'})"


def _own_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is one of this host's addresses. The proxy dials from the host's namespace, where
    the firewall's ``input`` chain (which keeps sandboxes off the host's services, on any address)
    does not apply; an allowed name resolving to the host's public address would otherwise lead in.
    The kernel's route to a local address has that address as its source, and a UDP connect only
    looks the route up (nothing is sent)."""
    with socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(ip), 9))
        except OSError:
            return False
        return bool(ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0]) == ip)


async def _client_speaks_first(conn: socket.socket, upstream: socket.socket) -> bool:
    """Whether the sandbox's side (``conn``) has something to read (bytes, or its end) before the
    server it was dialed to does. A server that has spoken, even at the same moment, keeps its
    bytes: it is a server-first protocol, whose connection is relayed as it is."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[bool] = loop.create_future()

    def ready(client: bool) -> None:
        if not first.done():
            first.set_result(client)

    loop.add_reader(upstream.fileno(), ready, False)
    loop.add_reader(conn.fileno(), ready, True)
    try:
        client = await first
    finally:
        loop.remove_reader(conn.fileno())
        loop.remove_reader(upstream.fileno())
    return client and not _readable(upstream)


def _readable(sock: socket.socket) -> bool:
    """Whether a non-blocking socket has bytes, its end or an error to read now."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


async def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions ended (a half-close is passed on)."""
    loop = asyncio.get_running_loop()

    async def one_way(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = await loop.sock_recv_into(src, buf)
                if not n:
                    break
                await loop.sock_sendall(dst, view[:n])
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    first = asyncio.ensure_future(one_way(a, b))
    second = asyncio.ensure_future(one_way(b, a))
    try:
        await asyncio.gather(first, second)
    finally:
        first.cancel()
        second.cancel()


async def _relay_rewriting(
    conn: socket.socket, upstream: socket.socket, headers_for: Callable[[str], tuple[tuple[str, str], ...] | None]
) -> None:
    client_r, client_w = await asyncio.open_connection(sock=conn)
    up_r, up_w = await asyncio.open_connection(sock=upstream)
    try:
        await _pump_rewriting(client_r, up_w, up_r, client_w, headers_for)
    finally:
        up_w.close()
        client_w.close()


async def _pump_rewriting(
    client_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    headers_for: Callable[[str], tuple[tuple[str, str], ...] | None],
) -> None:
    """Requests client → upstream through :class:`_Rewriter`; responses back as they are."""

    async def requests() -> None:
        rewriter = _Rewriter(headers_for)
        while True:
            data = await client_r.read(RELAY_CHUNK)
            if not data:
                break
            out = rewriter.feed(data)
            if out:
                up_w.write(out)
                await up_w.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if up_w.can_write_eof():
                up_w.write_eof()

    async def responses() -> None:
        while True:
            data = await up_r.read(RELAY_CHUNK)
            if not data:
                break
            client_w.write(data)
            await client_w.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if client_w.can_write_eof():
                client_w.write_eof()

    # The exchange is over when the upstream's side ends (a client that half-closed after its last
    # request still gets every response; a TLS client cannot be half-closed, so it is closed).
    sending = asyncio.ensure_future(requests())
    receiving = asyncio.ensure_future(responses())
    try:
        await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
        if sending.done():
            sending.result()  # a request stream that broke ends the exchange
        await receiving
    finally:
        sending.cancel()
        receiving.cancel()


class _Rewriter:
    """Re-emits an HTTP/1 request stream with headers added to each request whose Host has rules.

    httptools parses (it is what uvicorn uses); the head is rebuilt from the parsed parts, the body
    is passed on as parsed (re-chunked when it came chunked). After an ``Upgrade`` the rest is
    passed on untouched."""

    def __init__(self, headers_for: Callable[[str], tuple[tuple[str, str], ...] | None]) -> None:
        self.headers_for = headers_for
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        self.raw = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.head_size = 0

    def feed(self, data: bytes) -> bytes:
        if self.raw:
            return data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.raw = True
            offset = upgrade.args[0] if upgrade.args else len(data)
            self.out.append(data[offset:])
        except httptools.HttpParserError as exc:
            raise ValueError(f"not an HTTP/1 request stream: {exc}") from None
        out = b"".join(self.out)
        self.out.clear()
        return out

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.chunked = False
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        host = ""
        for name, value in self.headers:
            if name.lower() == b"host":
                host = value.decode("latin-1").strip()
                host = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
        extra = self.headers_for(host.lower().rstrip("."))
        replaced = {k.lower().encode() for k, _ in extra} if extra else set()
        method = self.parser.get_method()
        head = [method + b" " + self.url + b" HTTP/" + self.parser.get_http_version().encode()]
        head += [n + b": " + v for n, v in self.headers if n.lower() not in replaced]
        head += [k.encode() + b": " + v.encode() for k, v in extra or ()]
        self.out.append(b"\r\n".join(head) + b"\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
