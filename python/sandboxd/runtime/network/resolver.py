"""The sandboxes' DNS: a forwarder at every sandbox's gateway address.

A sandbox's ``/etc/resolv.conf`` names its gateway (the host end of its link). The firewall
redirects DNS to the gateway, UDP and TCP, to this forwarder, which runs in the network helper
process (:mod:`.helper`), not in the runtime's API process. Each query is checked (a DNS message
with one question, at most :data:`MAX_QUERY` bytes), sent to the host's upstream resolvers
(``--dns-upstream``, else the host's ``/etc/resolv.conf``) from a fresh socket, and the answer that
matches its id and question is relayed back. The egress proxy resolves the names it dials through
the same upstreams (:func:`resolve`), so what a sandbox is allowed to reach by name is what the
host's resolvers say that name is.

Whether a sandbox may use DNS at all is the firewall's decision (its ``nodns`` set, from
:mod:`.policy`); here only queries that came through the firewall's redirect arrive, and the
source address is checked against the runtime's sandboxes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

import dns.asyncresolver
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver

log = logging.getLogger("sandboxd.network")

MAX_QUERY = 4096
"""A query is a few dozen bytes; EDNS lets clients advertise 4096-byte answers, never ask that much."""

MAX_ANSWER = 65535
"""A TCP answer's length prefix is 16 bits."""

UPSTREAM_TIMEOUT_S = 4.0
"""Per upstream: resolvers in the sandbox retry after their own timeout (2 s in our resolv.conf)."""

MAX_INFLIGHT = 512
"""Queries being forwarded at once, from all sandboxes: beyond it new ones are dropped (the client
retries), so a flood cannot hold unbounded sockets."""

TCP_IDLE_S = 10.0
"""How long a TCP DNS client may stay silent between queries."""


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[str]:
    servers = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    servers.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
    return servers


def _split(upstream: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[ipv6]:port``."""
    if upstream.startswith("["):
        host, _, port = upstream[1:].partition("]:")
        return host, int(port or 53)
    if upstream.count(":") == 1:
        host, port = upstream.split(":")
        return host, int(port)
    return upstream, 53


def _valid_query(data: bytes) -> bool:
    if not 12 <= len(data) <= MAX_QUERY:
        return False
    flags, qdcount = struct.unpack_from(">HH", data, 2)
    return not flags & 0x8000 and qdcount == 1  # a query (QR=0) with one question


class Forwarder:
    """Forwards sandboxes' queries to the upstream resolvers."""

    def __init__(self, upstreams: list[str], is_sandbox: Callable[[str], bool]) -> None:
        if not upstreams:
            raise ValueError("no upstream DNS resolver: pass --dns-upstream")
        self.upstreams = [_split(u) for u in upstreams]
        self.is_sandbox = is_sandbox
        self.inflight = 0

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        """The upstream's answer to ``query``, or None (no upstream answered)."""
        if self.inflight >= MAX_INFLIGHT:
            return None
        self.inflight += 1
        try:
            for host, port in self.upstreams:
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    answer = await asyncio.wait_for(self._ask(host, port, query, tcp), UPSTREAM_TIMEOUT_S)
                    if answer is not None:
                        return answer
            return None
        finally:
            self.inflight -= 1

    async def _ask(self, host: str, port: int, query: bytes, tcp: bool) -> bytes | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if tcp:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(struct.pack(">H", len(query)) + query)
                (length,) = struct.unpack(">H", await reader.readexactly(2))
                answer = await reader.readexactly(length)
            finally:
                writer.close()
            return answer if answer[:2] == query[:2] else None
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, query)
            while True:
                answer = await loop.sock_recv(sock, MAX_ANSWER)
                # A connected UDP socket only receives from the upstream; the id and question must
                # match too (a stray or spoofed datagram is ignored, the wait goes on).
                if len(answer) >= 12 and answer[:2] == query[:2] and answer[12:].startswith(_question(query)):
                    return answer

    # ------------------------------------------------------------------------------ servers

    def udp_protocol(self) -> asyncio.DatagramProtocol:
        forwarder = self

        class Protocol(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # uvloop's UDP transport has DatagramTransport's methods without subclassing it.
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                source = str(addr[0])
                if not forwarder.is_sandbox(source) or not _valid_query(data):
                    return
                task = asyncio.get_running_loop().create_task(self._answer(data, addr))
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)

            async def _answer(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                answer = await forwarder.forward(data, tcp=False)
                if answer is None:
                    answer = _servfail(data)
                if answer is not None:
                    self.transport.sendto(answer, addr)

        return Protocol()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if not peer or not self.is_sandbox(str(peer[0])):
                return
            while True:
                (length,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S))
                query = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                if not _valid_query(query):
                    return
                answer = await self.forward(query, tcp=True) or _servfail(query)
                if answer is None:
                    return
                writer.write(struct.pack(">H", len(answer)) + answer)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


_TASKS: set[asyncio.Task[None]] = set()


def _question(query: bytes) -> bytes:
    """The question section's name bytes (up to the root label), for matching answers."""
    end = 12
    while end < len(query) and query[end] != 0:
        end += 1 + query[end]
    return query[12 : end + 1]


def _servfail(query: bytes) -> bytes | None:
    """A SERVFAIL for ``query`` (no upstream answered), so the client fails fast."""
    try:
        message = dns.message.from_wire(query)
    except dns.exception.DNSException:
        return None
    response = dns.message.make_response(message)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


RETRY_AFTER_S = 1.0
"""The egress proxy's resolver asks again after this long without an answer (a lost datagram cost
the whole :data:`UPSTREAM_TIMEOUT_S`, while the sandbox's client waited on a connection it had made)."""

CACHED_NAMES = 1024
"""Answers the egress proxy keeps, each for its TTL (dnspython's LRU cache: bounded, whatever names
sandboxes dial)."""


class Resolver:
    """Names to addresses through the upstreams (the egress proxy's dialing). Every connection that
    needs its name dialed (rules by name, header rules) resolves it: answers are cached for their
    TTL, and A and AAAA are asked at once."""

    def __init__(self, upstreams: list[str]) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        hosts = [_split(u) for u in upstreams]
        self._resolver.nameservers = [h for h, _ in hosts]
        self._resolver.port = hosts[0][1] if hosts else 53
        self._resolver.lifetime = UPSTREAM_TIMEOUT_S * 2
        self._resolver.timeout = RETRY_AFTER_S
        self._resolver.cache = dns.resolver.LRUCache(CACHED_NAMES)

    async def addresses(self, name: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``name`` (empty when it has none)."""
        v4, v6 = await asyncio.gather(self._of_kind(name, dns.rdatatype.A), self._of_kind(name, dns.rdatatype.AAAA))
        return v4 + v6

    async def _of_kind(self, name: str, kind: dns.rdatatype.RdataType) -> list[str]:
        with contextlib.suppress(dns.exception.DNSException):
            answer = await self._resolver.resolve(name, kind, search=False)
            return [r.to_text() for r in answer]
        return []
