"""The HTTP server both the agent and the runtime run: uvicorn (uvloop + httptools), with its
connections bounded so that clients without a key cannot exhaust it. (The agent runs the protocol on a
server of its own, :mod:`sandboxd.agent.serving`, rather than uvicorn's ``Config`` and ``Server``.)

uvicorn alone bounds none of this: a connection that never finishes its request head is kept for
ever (its keep-alive timer only starts after a response), headers may grow without limit while they
arrive, and ``limit_concurrency`` answers 503 only once a head is complete, after every connection
was already accepted and holds a file descriptor. Its extension point for this is the HTTP protocol
class (``uvicorn.Config(http=<class>)``), and :class:`GuardedHttpToolsProtocol` adds, per connection:

* **a deadline for a complete request head** (``head_timeout``, from accept for the first request
  and from the first byte for the next ones on a keep-alive connection), and a cap on its size
  (``max_head_bytes``); past either the client gets 408 or 431 and the connection is closed;
* **an idle keep-alive timeout** (``idle_timeout``, uvicorn's own timer);
* **a cap on open connections** (``max_connections``) that keeps room for clients with work: when the
  cap is reached, the connection idle or still sending its head for the longest is closed to admit the
  new one, and a connection with a request in progress (a ``/health`` probe, an authenticated call)
  is never evicted. Only when every connection is busy is a new one refused at once.

Every response goes through a :class:`ResponseWriter`: a head whose body follows at once (it has
``content-length``, or the app says so with :data:`BODY_FOLLOWS`) is written with the body's first
bytes, in one write. It is also in every request's ``scope["extensions"]`` (under
:data:`BODY_PARTS`): a body message given as several ``bytes`` goes to the socket as one chunk with
``writelines`` (uvloop's ``writev``), where ASGI's ``send`` takes one ``bytes`` and uvicorn copies it
once more to put the chunked framing around it. Process output, 1 MiB per message, takes this path.
Its ``on_disconnect`` calls back when the connection is lost, so that a stream need not keep a task
waiting on ``receive()`` to notice a client that leaves.

A request's body can also be taken from the socket by a worker thread (:class:`RawBody`, under
:data:`RAW_BODY`): ``POST /files`` moves a large raw upload straight into its file with ``splice(2)``,
and the connection gets a fresh parser for its next request. Such a body that stops arriving is cut
off after the idle timeout without a byte (408), and so is one that trickles in: past the first idle
timeout it must average ``RECEIVE_MIN_RATE`` (4 KiB/s), or a byte per idle timeout would hold a thread
for its whole ``Content-Length``.

At start, :func:`raise_open_file_limit` raises ``RLIMIT_NOFILE`` to what the host allows, and the cap
is lowered if descriptors would still run out first.

Why not another server (compared for issue 11): **granian** 2.8 (Rust, hyper) has a header-read
timeout and a cap on requests in flight (``--backpressure``), but no idle keep-alive timeout for HTTP/1,
no cap on connections and no eviction; it runs its own worker processes and event loop rather than
inside ours (its embedding API is experimental), while the agent shares its loop with grpcio, inotify
readers and process pipes; the design measurements put its downloads below uvicorn's (3.6-4.2 vs
4.6-4.9 GB/s). **hypercorn** 0.18 has keep-alive and read timeouts but parses HTTP in pure Python
(h11). **A front in Rust** (hyper in the binding crate, calling the ASGI app) would own all of this but
is a second HTTP stack to maintain for what ~150 lines on uvicorn's extension point do.

Server CPU per ``GET /health`` on the agent's app (median of 5 alternating rounds, 2-core VM under a
load average of ~50 from other jobs, so ±25%): over 8 kept-alive connections, uvicorn 47 µs, uvicorn
with this guard 59 µs, granian 64 µs (hypercorn's keep-alive failed the client); a new connection per
request, uvicorn 150 µs, with the guard 180 µs, granian 127 µs, hypercorn 740 µs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from .._core import RECEIVE_MIN_RATE
from .asgi import BODY_FOLLOWS, BODY_PARTS, RAW_BODY, ClientDisconnected, Message

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from .rpc import Piece

DirectRoute = Callable[[dict[str, Any], "ResponseWriter"], "Coroutine[Any, Any, None] | None"]
"""An app's ``direct(scope, writer)`` (see :class:`GuardedHttpToolsProtocol`): the coroutine that
serves this request without the ASGI ``receive``/``send`` layers, or None to serve it through the app."""

log = logging.getLogger("sandboxd.http")

SHUTDOWN_GRACE_S = 5
"""How long SIGTERM waits for requests in flight before uvicorn cancels them (its
``timeout_graceful_shutdown``; unset, it waits for ever), in every server here: the agent, the runtime,
the code interpreter. A process's output stream lasts as long as the process, a watch or a terminal as
long as its client, and one whose client stopped reading as long as the socket stays full; without a
bound one such stream kept the agent from ever exiting, and the runtime too (its proxy carries the
same streams): it stopped listening and never got to its clean-up, its zygote, network helper and
warm pool running on. 5 s lets requests that are about to end finish."""

DEFAULT_MAX_CONNECTIONS = 4096
"""Open connections per server. The SDKs pool at most 200 connections per client
(``E2B_MAX_CONNECTIONS``) and hold one per running background command; 4096 leaves room for many
clients, while 4096 idle uvicorn connections cost ~100 MiB, affordable even inside a 1 GiB sandbox."""

DEFAULT_HEAD_TIMEOUT_S = 15.0
"""Seconds a client has to send a complete request head. An SDK sends its head in one write; 15 s
covers a slow mobile link. (Go's servers are often given 10 s; nginx's default is 60 s.)"""

DEFAULT_IDLE_TIMEOUT_S = 640.0
"""Keep-alive idle timeout: envd's (``IdleTimeout: 640s``), longer than the SDK pool's 300 s, so the
server is not the side that closes a pooled connection the client is about to reuse. Idle connections
are also the first evicted when the connection cap is reached."""

MAX_HEAD_BYTES = 64 << 10
"""Largest request head (request line and headers): nginx allows 32 KiB per line; no SDK call comes
near it. Past it: 431 and the connection is closed."""

JOIN_BELOW = 64 << 10
"""A held head and the body message after it are joined into one ``write`` up to this size (bytes):
copying that little costs less than another syscall; above it, a big body is not copied."""

FD_RESERVE = 256
"""File descriptors kept for everything but client connections (files, pipes, inotify, sandboxes)."""

MAX_RAW_BODIES = 16
"""Request bodies a server moves in worker threads at once (:class:`RawBody`). Each holds a thread
for as long as its client sends (up to the idle timeout when it stalls, and at least ``RECEIVE_MIN_RATE``
bytes/s on average after that), so past this
count bodies take the event loop's path again, which holds no thread; 16 leaves the files pool
(32 threads) room for downloads and the other uploads."""


MAX_HANDED_OFF = 16
"""Response bodies written by worker threads at once (:meth:`ResponseWriter.hand_off`). Each holds a
thread for as long as its stream runs (a process's whole output), so past this count streams go
through the event loop again, which holds no thread."""


NOTSENT_LOWAT = 256 << 10
"""``TCP_NOTSENT_LOWAT`` of a socket while it is lent to a thread for a framed stream
(:meth:`ResponseWriter.hand_off` without ``raw``; a raw body keeps the socket's own value: with the
mark, its thread woken for every 256 KiB, a ``sendfile`` download read 0.74x envd's on a quiet host,
without it 1.04x, alternating):
the kernel then reports it writable only while fewer bytes than this wait unsent, so the thread,
which takes more output only once the socket is writable (``Subscriber.pump``), sends fewer, larger
frames to a client that is behind (each frame costs it a wake-up and a parse) and each batch at once
to one that keeps up. The socket's own value is restored after."""


MAX_PIPELINED = 64
"""Requests a connection may send ahead of their answers (HTTP/1.1 pipelining). uvicorn parses all
that one read holds and queues a request cycle for each, ~3 KiB apiece: 256 KiB of ``GET /health``
held ~24 MiB until the answers were read, and the head cap counts each head alone. Past this the
parse stops, the client gets a 400 saying why and the connection closes. Clients that pipeline at
all (few do) keep a handful in flight."""


class _PipelinedTooFar(Exception):
    """Raised in the parser's callback to stop it at the request past :data:`MAX_PIPELINED`."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-server connection bounds (see the module documentation)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    head_timeout: float = DEFAULT_HEAD_TIMEOUT_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    max_head_bytes: int = MAX_HEAD_BYTES


class ConnectionGuard:
    """The open connections of one server: counts them, and knows which may be evicted (idle, or
    still sending a head), oldest first."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self.evictable: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()

    def admit(self, conn: GuardedHttpToolsProtocol) -> bool:
        """Counts a new connection, evicting the longest-waiting one at the cap; False to refuse it."""
        if self.open >= self.limits.max_connections:
            if not self.evictable:
                return False
            victim, _ = self.evictable.popitem(last=False)
            victim.evict()
        self.open += 1
        self.evictable[conn] = None
        return True

    def waiting(self, conn: GuardedHttpToolsProtocol) -> None:
        """``conn`` has no request in progress (idle, or its head is still arriving)."""
        self.evictable[conn] = None
        self.evictable.move_to_end(conn)

    def busy(self, conn: GuardedHttpToolsProtocol) -> None:
        """``conn`` has a request in progress: never evicted."""
        self.evictable.pop(conn, None)

    def closed(self, conn: GuardedHttpToolsProtocol) -> None:
        self.evictable.pop(conn, None)
        self.open -= 1


def _nothing() -> None:
    pass


async def _outlast(thread: asyncio.Future[Any]) -> None:
    """Waits until ``thread`` (settled when a worker thread that uses a connection's socket returned)
    is done, through any further cancellation of the waiting task: until then the loop must neither
    write to the socket nor close the thread's descriptor, whose number the next connection could get."""
    while not thread.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([thread])


class ResponseWriter:
    """What a request's response goes through between the ASGI app and uvicorn's
    ``RequestResponseCycle``: it writes the head together with the body's first bytes, and it is
    the request's writer of a body message in pieces (:data:`BODY_PARTS`).

    **The head with the first body bytes.** uvicorn writes the head as soon as the app sends
    ``http.response.start``, and the body with the next message: two writes, two segments and two
    wake-ups of the client for a reply that is ready at once. Worse, a client whose deadline falls
    between them has read a head announcing a body and records an empty one (the Connect
    conformance client once failed a ``Timeouts`` case so, on a unary error). So when the body is
    known to follow at once (the start has ``content-length``, or the app set :data:`BODY_FOLLOWS`
    in it), the start goes through uvicorn's own ``send`` with this object as the cycle's transport,
    which keeps the head's bytes; the next body message goes the same way and both are written in
    one ``write`` (past :data:`JOIN_BELOW`, a write each, so that a big body is not copied). uvicorn's
    state (started, chunked, keep-alive, ``connection: close``) is its own, only the bytes wait.
    Any other start (a proxied server's streamed head, say) is written at once, as uvicorn would.

    **A body message in pieces.** :meth:`__call__` writes the ``http.response.body`` message with
    ``more_body=True`` that ``b"".join(parts)`` would be, without joining them, as one chunk with
    ``writelines``, with the same flow control (waits while the transport is over its high-water
    mark) and the same silence once the client is gone. For a response started with chunked
    encoding (a streamed response without ``content-length``); :meth:`usable` says whether this one
    is. A head still held goes out in the same ``writelines``."""

    __slots__ = ("_cycle", "_held", "_lost", "_send", "_transport", "head_extra", "idle_timeout")
    handed_off = 0
    """Responses being written by worker threads now, in this process (:meth:`hand_off`)."""

    def __init__(
        self, cycle: Any, lost: list[Callable[[], None]], idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    ) -> None:
        self._cycle = cycle
        self.idle_timeout = idle_timeout
        """The connection's idle timeout: the longest a :meth:`hand_off` thread writing a raw body
        should wait for a client that takes nothing (a thread held for a stalled client is a thread
        of ``MAX_HANDED_OFF`` held for nothing)."""
        self._lost = lost  # the connection's: called when it is lost
        self._send = cycle.send  # uvicorn's
        self._transport: Any = cycle.transport  # uvloop's: its writelines takes any buffer (a Piece)
        self._held: list[bytes] | None = None
        """The bytes uvicorn wrote while this object stood in for the transport, not yet written."""
        self.head_extra = b""
        """Header lines (``name: value\r\n`` each) :meth:`send_direct` adds after a start's own
        headers, as an ASGI middleware appending them to ``http.response.start`` would (the agent's CORS)."""
        cycle.send = self.send  # run_asgi looks ``send`` up when the request's task first runs

    @property
    def receive(self) -> Callable[[], Any]:
        """The request's ASGI ``receive`` (uvicorn's)."""
        return self._cycle.receive  # type: ignore[no-any-return]

    def complete_body(self) -> bytes | None:
        """The request's whole body when it has all arrived and nothing read it yet, taken as one
        ``receive()`` would take it (the ``100 Continue`` a client asked for written first, reading
        resumed); None otherwise (then read it with ``receive()``). What a route that wants the whole
        body uses to skip a coroutine, an event wait and a message dict per request: a request's
        small body nearly always arrives with its head."""
        cycle = self._cycle
        if cycle.more_body or cycle.disconnected or cycle.response_complete:
            return None
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        cycle.flow.resume_reading()
        cycle.message_event.clear()
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return body

    def body_arrived(self) -> int | None:
        """The size of the request's body when all of it has arrived and ``receive()`` has not been
        called yet (it then returns the whole body at once, without waiting), else None. For a proxy
        that would send a request's small body with its head, but must not wait for a body that a
        client may send only after the answer has begun."""
        cycle = self._cycle
        if cycle.more_body or cycle.disconnected or cycle.response_complete:
            return None
        return len(cycle.body)

    async def send_direct(self, message: Message) -> None:
        """The request's ``send`` on the direct path (:class:`GuardedHttpToolsProtocol`): what
        :meth:`send` through uvicorn's ``RequestResponseCycle.send`` does with a message (the same
        checks of the headers, the same framing, keep-alive and completion, the head held for the
        body that follows at once), written here in one call instead of three, plus
        :attr:`head_extra` in each head."""
        cycle = self._cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        kind = message["type"]
        if not cycle.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            cycle.response_started = True
            cycle.waiting_for_100_continue = False
            status = message["status"]
            content = [STATUS_LINE[status]]
            has_connection_close = False
            headers = message.get("headers", ())
            for name, value in [*cycle.default_headers, *headers] if cycle.default_headers else headers:
                if HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
                name = name.lower()
                if name == b"content-length" and cycle.chunked_encoding is None:
                    cycle.expected_content_length = int(value.decode())
                    cycle.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    cycle.expected_content_length = 0
                    cycle.chunked_encoding = True
                elif name == b"connection" and b"close" in [token.lower().strip() for token in value.split(b",")]:
                    cycle.keep_alive = False
                    has_connection_close = True
                content += (name, b": ", value, b"\r\n")
            if self.head_extra:
                content.append(self.head_extra)
            if not cycle.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")
            if cycle.chunked_encoding is None and cycle.scope["method"] != "HEAD" and status not in (204, 304):
                cycle.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            head = b"".join(content)
            if _body_follows(message):
                self._held = [head]
            else:
                cycle.transport.write(head)
            return
        if cycle.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if cycle.scope["method"] == "HEAD":
            cycle.expected_content_length = 0
            self._flush()
        elif cycle.chunked_encoding:
            held = self._held
            self._held = None
            chunk = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
            if not more_body:
                chunk.append(b"0\r\n\r\n")
            if held and len(held[0]) + len(body) <= JOIN_BELOW:
                cycle.transport.write(b"".join(held + chunk))
            else:  # as uvicorn's send after the head's own write: the chunk joined, a big body copied once
                if held:
                    cycle.transport.write(held[0])
                cycle.transport.write(b"".join(chunk))
        else:
            if len(body) > cycle.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            cycle.expected_content_length -= len(body)
            self._held = [*(self._held or ()), body]
            self._flush()  # with the head held, in one write up to JOIN_BELOW
        if not more_body:
            if cycle.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                cycle.transport.close()
            cycle.on_response()

    async def send(self, message: Message) -> None:
        """The ASGI ``send`` of the request."""
        if self._held is None and (message["type"] != "http.response.start" or not _body_follows(message)):
            await self._send(message)
            return
        cycle = self._cycle
        while cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        # uvicorn's send suspends only to drain: from here it runs to its end while it writes here.
        if self._held is None:
            self._held = []
        cycle.transport = self
        try:
            await self._send(message)
        finally:
            cycle.transport = self._transport
        if message["type"] != "http.response.start":
            self._flush()

    def on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Has ``callback`` called (from the event loop, once) when the client's connection is lost,
        at once if it is lost already; returns what forgets it. What a request that has read its
        body can use instead of a task waiting on ``receive()`` for ``http.disconnect``."""
        if self._cycle.disconnected:
            callback()
            return _nothing
        lost = self._lost
        lost.append(callback)

        def forget() -> None:
            if callback in lost:  # (not contextlib.suppress(ValueError): three calls more per stream)
                lost.remove(callback)

        return forget

    def usable(self) -> bool:
        """Whether the response is started, chunked and not complete (otherwise use ``send``)."""
        cycle = self._cycle
        return bool(cycle.response_started and cycle.chunked_encoding and not cycle.response_complete)

    async def __call__(self, parts: Sequence[Piece]) -> None:
        cycle = self._cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return  # as uvicorn's send: the disconnect reaches the app through receive()
        if not self.usable():
            raise RuntimeError("ResponseWriter needs a started, chunked, unfinished response")
        pieces: list[Piece] = [*self._held] if self._held else []
        self._held = None
        size = sum(len(part) for part in parts)
        if size:
            pieces += [b"%x\r\n" % size, *parts, b"\r\n"]
        if pieces:
            # uvloop (the sandboxes' agents, the runtime) writes the pieces with writev, copying none;
            # asyncio's own loop (the standalone agent's, without OpenSSL) joins them: one copy.
            self._transport.writelines(pieces)

    async def hand_off(
        self,
        write: Callable[[int, int], tuple[str, int, bytes]],
        before: Callable[[], None] = _nothing,
        after: Callable[[], None] = _nothing,
        raw: int | None = None,
    ) -> tuple[str, int] | None:
        """Has a worker thread write to the socket itself, for as long as ``write(sock, cancel)``
        runs: process output as Connect frames (``Subscriber.pump``, Rust, without the GIL), so that
        no event-loop work or Python object is spent per frame. ``write`` must write whole chunks of
        this chunked response (the body's framing stays this object's), stop when the eventfd
        ``cancel`` becomes readable, and return ``(outcome, value, rest)``: ``rest`` is a chunk it
        left half written, which goes out here before anything else.

        With ``raw``, the response is one with a ``Content-Length`` instead, at least ``raw`` bytes of
        whose body are still to come: ``write`` writes up to ``raw`` of them as they are (no framing)
        and returns their count as ``value`` (a proxied download spliced from the sandbox's socket:
        ``sandboxd.runtime.proxy``); its ``rest`` must be empty.

        Offered only between body messages with nothing buffered (else None: the caller writes
        through the loop and may ask again), on a plain (not TLS) chunked response, while fewer than
        :data:`MAX_HANDED_OFF` run. The transport stops reading meanwhile: bytes the client sends
        (a pipelined request) wait in the socket for the parser. Outcome ``"closed"`` (the peer
        left): the connection is closed and :class:`ClientDisconnected` raised. A cancelled caller
        (deadline, disconnect) cancels the thread and waits for it before the socket is used again.
        ``before`` runs once the hand-off is decided, before the thread starts, ``after`` when it
        is over (a refusal runs neither: asking costs a few attribute reads). No descriptor left for the
        thread's two is a refusal, and so is a thread that cannot be started (code in a sandbox can
        use up its pids limit), after ``before`` and ``after``: the stream goes on through the loop,
        which needs neither."""
        cycle = self._cycle
        transport = self._transport
        if raw is None:
            fits = self.usable()
        else:
            fits = bool(
                cycle.response_started
                and not cycle.chunked_encoding
                and not cycle.response_complete
                and cycle.expected_content_length >= raw
            )
        if (
            self._held
            or not fits
            or cycle.disconnected
            or ResponseWriter.handed_off >= MAX_HANDED_OFF
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        # A descriptor of its own: the thread's stays valid even if the transport closes meanwhile.
        # Taken first, as a refusal when there are none to have (an agent at its RLIMIT_NOFILE: a
        # sandbox's many processes hold pipes), since the loop writes without any.
        try:
            own = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None
        try:
            cancel = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            own.close()
            return None
        paused_here = transport.is_reading()
        if paused_here:
            transport.pause_reading()  # uvicorn's flow control still says "reading": it leaves it be
        lowat: int | None = None
        if raw is None:  # frames: fewer, larger ones to a client that is behind (a raw body has none)
            with contextlib.suppress(OSError):  # not TCP (a Unix socket): no such option
                lowat = own.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                own.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[str, int, bytes]] = loop.create_future()

        def settle(result: tuple[str, int, bytes] | None, error: BaseException | None) -> None:
            if not done.done():
                if error is not None:
                    done.set_exception(error)
                else:
                    assert result is not None
                    done.set_result(result)

        def work() -> None:
            try:
                result = write(own.fileno(), cancel)
            except BaseException as exc:  # handed to the awaiting task
                with contextlib.suppress(RuntimeError):  # the loop is gone
                    loop.call_soon_threadsafe(settle, None, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, result, None)

        def stop() -> None:
            with contextlib.suppress(OSError):
                os.eventfd_write(cancel, 1)

        ResponseWriter.handed_off += 1
        forget = self.on_disconnect(stop)  # the transport closed under it (a server's forced exit)
        before()
        try:
            try:
                threading.Thread(target=work, name="sandboxd-output", daemon=True).start()
            except RuntimeError:  # no thread to be had (a sandbox's pids limit used up): the loop writes
                return None
            try:
                outcome, value, rest = await asyncio.shield(done)
            except OSError:
                # A socket error the thread does not read as "the peer left" (ETIMEDOUT after a TCP
                # timeout, say): it may have written half a frame, so nothing more can follow on this
                # connection, an error frame included. Closed, as for a peer that left.
                cycle.disconnected = True
                transport.close()
                raise ClientDisconnected from None
            except asyncio.CancelledError:
                stop()  # the thread must be done with the socket before the loop writes again
                await _outlast(done)
                if not done.cancelled() and done.exception() is None and not cycle.disconnected:
                    transport.write(done.result()[2])
                raise
        finally:
            after()
            forget()
            ResponseWriter.handed_off -= 1
            if lowat is not None:
                with contextlib.suppress(OSError):
                    own.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, lowat)
            own.close()
            os.close(cancel)
            if paused_here and not transport.is_closing():
                transport.resume_reading()
        if raw is not None:
            cycle.expected_content_length -= value  # uvicorn's count of the body still owed
        if rest and not cycle.disconnected:
            transport.write(rest)
        if outcome == "closed":
            cycle.disconnected = True
            transport.close()
            raise ClientDisconnected
        return outcome, value

    # The transport uvicorn's send writes to while a head is held (it calls nothing else).

    def write(self, data: bytes) -> None:
        assert self._held is not None
        self._held.append(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def _flush(self) -> None:
        held = self._held
        self._held = None
        if not held or self._cycle.disconnected:
            return
        if len(held) == 1:
            self._transport.write(held[0])
        elif sum(len(part) for part in held) <= JOIN_BELOW:
            self._transport.write(b"".join(held))
        else:  # a big body is not copied: asyncio's writelines would join it (uvloop's would not)
            for part in held:
                self._transport.write(part)


def _body_follows(start: Message) -> bool:
    """Whether the body of a response with this ``http.response.start`` follows it at once."""
    if start.get(BODY_FOLLOWS):
        return True
    return any(name.lower() == b"content-length" for name, _ in start.get("headers", ()))


class RawBody:
    """A request's body as the socket's bytes, for a route that writes it to a file: in every
    request's ``scope["extensions"]`` under :data:`RAW_BODY`.

    Through ``receive()``, each 64-256 KiB piece of a body goes socket → httptools' callback →
    uvicorn's ``bytearray`` → a ``bytes`` copy → the route → a worker thread that writes it, with
    the socket's reading paused and resumed around every piece. Here, once the route has decided
    where the body goes, :meth:`take` stops the transport reading and hands over what uvicorn has
    buffered, and :meth:`receive_into` has a worker thread move the remaining ``Content-Length``
    bytes straight from the socket (``AtomicWriter.receive_from``: ``splice(2)``, no Python on the
    bytes). The HTTP parser never sees them: the connection gets a fresh parser for its next
    request, which the socket still holds untouched (keep-alive and pipelining work as before).

    Offered only for a plain (not TLS) connection, a body with ``Content-Length`` (not chunked)
    that has not fully arrived, the request being the connection's latest, and while fewer than
    :data:`MAX_RAW_BODIES` move at once: :meth:`remaining` is None otherwise, and the route reads
    ``receive()`` as before."""

    __slots__ = ("_cycle", "_keep_alive", "_protocol", "_remaining", "_reserved", "_stop", "seen")
    moving = 0
    """Bodies taken (:meth:`take`) and not yet released in this process: being moved by worker
    threads, or about to be. Counted from :meth:`take` on, not from the move's start: between the
    two the route writes uvicorn's buffered bytes (a thread hop), and many bodies arriving at once
    all passed the cap there and held every thread of the files pool."""

    def __init__(self, protocol: GuardedHttpToolsProtocol, cycle: Any) -> None:
        self._protocol = protocol
        self._cycle = cycle
        self.seen = 0
        """Body bytes the parser has given uvicorn so far."""
        self._remaining: int | None = None
        self._keep_alive = False
        self._reserved = False
        self._stop: int | None = None
        """The eventfd that stops the move in progress (:meth:`cancel`)."""

    def remaining(self) -> int | None:
        """Body bytes still unread in the socket, when this body can be taken (see the class)."""
        protocol, cycle = self._protocol, self._cycle
        if (
            protocol.cycle is not cycle
            or protocol._raw_body is not self
            or not cycle.more_body
            or cycle.disconnected
            or RawBody.moving >= MAX_RAW_BODIES
            or protocol.transport.is_closing()
            or protocol.transport.get_extra_info("sslcontext") is not None
            or protocol.transport.get_extra_info("socket") is None
        ):
            return None
        length: int | None = None
        for name, value in cycle.scope["headers"]:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
        if length is None or length < self.seen:
            return None
        return length - self.seen

    def take(self) -> bytes:
        """Stops the transport reading and returns the body bytes uvicorn had buffered. Only after
        :meth:`remaining` said a number; then :meth:`receive_into` must follow."""
        remaining = self.remaining()
        if remaining is None:
            raise RuntimeError("RawBody.take without a body to take")
        protocol, cycle = self._protocol, self._cycle
        protocol.transport.pause_reading()
        # uvicorn resumes reading in ``receive()`` and after a response, when its flow control says
        # it paused: until the worker thread is done it must not, so that says not paused here
        # (body_taken hands the pause back to it).
        protocol.flow.read_paused = False
        if cycle.waiting_for_100_continue:  # uvicorn would answer it at the first receive()
            cycle.waiting_for_100_continue = False
            protocol.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._remaining = remaining
        self._reserved = True
        RawBody.moving += 1  # released by receive_into, or by release() when it never runs
        # Until receive_into has read the whole body, the connection cannot carry another request:
        # whatever fails first (writing the buffered bytes, the move), the response closes it.
        self._keep_alive = cycle.keep_alive
        cycle.keep_alive = False
        buffered = bytes(cycle.body)
        cycle.body = bytearray()
        return buffered

    async def receive_into(self, move: Callable[[int, int, float, int], str], executor: Executor) -> None:
        """Runs ``move(fd, length, idle_timeout, stop_fd)`` in ``executor`` (``AtomicWriter.receive_from``:
        it returns "complete", "closed", "timed out", "too slow" or "stopped") on the rest of the body
        after :meth:`take`.
        The whole body read: the connection goes on with its next request. The client gone, silent
        for the idle timeout or slower than ``RECEIVE_MIN_RATE`` after it (answered 408): the
        connection is closed and
        :class:`ClientDisconnected` raised. ``move`` failing (a full disk): its error is raised and
        the connection closes after the response, since the body's rest is still unread (as after
        any failure between :meth:`take` and the end of the move)."""
        remaining = self._remaining
        if remaining is None:
            raise RuntimeError("RawBody.receive_into without take")
        protocol, cycle = self._protocol, self._cycle
        transport = protocol.transport
        # A descriptor of its own: the thread's stays valid even if the transport closes meanwhile.
        sock = transport.get_extra_info("socket")
        own = socket.socket(fileno=os.dup(sock.fileno()))
        # The stop flag (cancel()): the thread waits on it with the socket and checks it between
        # pieces; shutting the socket's reading down would still let the bytes already queued through.
        stop = self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        protocol._moving = self
        if protocol._shutting_down:  # asked before the move began: no later cancel() would come
            self.cancel()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(executor, move, own.fileno(), remaining, protocol.guard.limits.idle_timeout, stop)
        try:
            outcome = await asyncio.shield(job)
        except asyncio.CancelledError:
            self.cancel()  # wakes the thread: it must be done with the descriptor before it is closed
            await _outlast(job)
            if not job.cancelled():
                job.exception()  # retrieved: the cancellation is what the caller hears of
            raise
        finally:
            self.release()
            protocol._moving = None
            self._stop = None
            os.close(stop)
            own.close()
        if outcome == "complete":
            # Not kept alive after a shutdown asked (uvicorn's cleared the flag take() had saved):
            # the server would wait out the idle timeout for the client to leave.
            cycle.keep_alive = self._keep_alive and not protocol._shutting_down
            cycle.more_body = False
            cycle.message_event.set()
            protocol.body_taken()
            return
        cycle.disconnected = True
        if not transport.is_closing():
            idle = protocol.guard.limits.idle_timeout
            if outcome == "timed out":
                protocol._refuse(408, "Request Timeout", f"no part of the request body arrived within {idle:g} s")
            elif outcome == "too slow":
                rate = f"{RECEIVE_MIN_RATE / 1024:g} KiB/s"
                protocol._refuse(
                    408,
                    "Request Timeout",
                    f"the request body arrived at under {rate} on average (past its first {idle:g} s)",
                )
            else:
                transport.close()
        raise ClientDisconnected

    def release(self) -> None:
        """Gives back the slot :meth:`take` counted in :attr:`moving` (once; :meth:`receive_into`
        does it when done, the route when it fails before calling it)."""
        if self._reserved:
            self._reserved = False
            RawBody.moving -= 1

    def cancel(self) -> None:
        """Ends a move in progress as if the client had closed (the server is shutting down, the
        connection is lost): the worker thread stops at once, waiting or between pieces."""
        if self._stop is not None:
            os.eventfd_write(self._stop, 1)


_REFUSED = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and a connection cap."""

    guard: ConnectionGuard
    """Set on the subclass that :func:`server_config` (or ``serving.agent_settings``) makes for each server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_due = 0.0
        """When the head in progress is due (the loop's clock); the timer may be set for an earlier one."""
        self._idle_since: float | None = None
        """When the connection's last response ended, if nothing arrived since (the keep-alive clock)."""
        self._in_head = True
        self._head_bytes = 0
        self._head_begun = False
        """Bytes of the head in progress have arrived (the parser began a message): a timeout is a 408."""
        self._lost: list[Callable[[], None]] = []
        """What to call when the connection is lost (:meth:`ResponseWriter.on_disconnect`)."""
        self._raw_body: RawBody | None = None
        """The latest request's body, as offered to its route (:class:`RawBody`)."""
        self._moving: RawBody | None = None
        """A body a worker thread is moving from the socket now."""
        self._shutting_down = False
        """The server asked this connection to close after its answer (:meth:`shutdown`)."""
        self._direct: DirectRoute | None = getattr(self.app, "direct", None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self._refuse(503, "Service Unavailable", "too many connections in progress: retry shortly")
            return
        self._admitted = True
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.timeout_keep_alive_task is not None:  # uvicorn cancels it only when exc is None
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._moving is not None:
            self._moving.cancel()
        if self._admitted:
            self._admitted = False
            self.guard.closed(self)
        super().connection_lost(exc)
        lost = [*self._lost]
        self._lost.clear()
        for callback in lost:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.guard.limits.max_head_bytes and not self.transport.is_closing():
            limit = self.guard.limits.max_head_bytes
            self._refuse(431, "Request Header Fields Too Large", f"the request head exceeds {limit} bytes")

    def on_message_begin(self) -> None:
        in_progress = self.cycle is not None and not self.cycle.response_complete  # before super() resets it
        super().on_message_begin()
        # Not _head_bytes: the bytes that begin a kept-alive connection's next head arrive while no
        # head is in progress, so they are not counted (that head was closed without its 408).
        self._head_begun = True
        if not self._in_head:  # the next request on a kept-alive connection: its head starts now
            self._in_head = True
            self._head_bytes = 0
            if not in_progress:  # a pipelined head behind a running request keeps the connection busy
                self.guard.waiting(self)
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False  # the head timer, left set, finds no head in progress (_head_timed_out)
        self.guard.busy(self)
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            raise _PipelinedTooFar  # the parser stops here; uvicorn answers with send_400_response
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.scope is self.scope  # not when upgraded
            and BODY_PARTS not in cycle.scope.get("extensions", ())  # not made already (_start_asgi_task)
        ):
            self._attach(cycle)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Starts a request's task (uvicorn calls it when the head is complete, or when a pipelined
        request's turn comes). An app with a ``direct(scope, writer)`` (:data:`DirectRoute`) may
        serve the request with a coroutine of its own: it gets the request's
        :class:`ResponseWriter`, whose :meth:`~ResponseWriter.send_direct` and
        :meth:`~ResponseWriter.complete_body` do what uvicorn's ``send`` and ``receive`` do in fewer
        calls, and it runs under the same guard as uvicorn's ``run_asgi`` (:meth:`_run_direct`)."""
        direct = self._direct
        if direct is not None and app is self.app:
            writer = cycle.scope.get("extensions", {}).get(BODY_PARTS)
            if writer is None:  # the head is complete only now: uvicorn starts the task before the writer is made
                writer = self._attach(cycle)
            serve = direct(cycle.scope, writer)
            if serve is not None:
                # Its own last step takes it out of the server's tasks (_run_direct), where uvicorn
                # adds a done callback: one more loop turn per request to run it.
                self.tasks.add(self.loop.create_task(self._run_direct(cycle, serve)))
                return
        super()._start_asgi_task(cycle, app)

    async def _run_direct(self, cycle: Any, serve: Coroutine[Any, Any, None]) -> None:
        """uvicorn's ``RequestResponseCycle.run_asgi`` for a direct route's coroutine: an exception
        is logged and answered 500 before the response started, or closes the connection after;
        a coroutine that did not start or finish its response is told of the same way. Last, the
        task leaves the server's tasks. (A task cancelled before its first step never runs this:
        only the server's shutdown cancels requests, after its wait for them is over.)"""
        try:
            await serve
        except BaseException as exc:
            cycle.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not cycle.response_started:
                await cycle.send_500_response()
            else:
                cycle.transport.close()
        else:
            if not cycle.response_started and not cycle.disconnected:
                cycle.logger.error("ASGI callable returned without starting response.")
                await cycle.send_500_response()
            elif not cycle.response_complete and not cycle.disconnected:
                cycle.logger.error("ASGI callable returned without completing response.")
                cycle.transport.close()
        finally:
            cycle.on_response = _nothing
            self.tasks.discard(asyncio.current_task(self.loop))

    def _attach(self, cycle: Any) -> ResponseWriter:
        """The request's :class:`ResponseWriter` and :class:`RawBody`, in its scope's extensions."""
        writer = ResponseWriter(cycle, self._lost, self.guard.limits.idle_timeout)
        self._raw_body = RawBody(self, cycle)
        extensions = cycle.scope.setdefault("extensions", {})
        extensions[BODY_PARTS] = writer
        extensions[RAW_BODY] = self._raw_body
        return writer

    def on_body(self, body: bytes) -> None:
        if self._raw_body is not None:
            self._raw_body.seen += len(body)
        super().on_body(body)

    def body_taken(self) -> None:
        """A worker thread read the rest of the current request's body from the socket
        (:class:`RawBody`): the parser, still expecting it, is replaced by a fresh one for the
        connection's next request. Reading resumes when the answer is out (uvicorn's flow control,
        told it paused), as after a body uvicorn read itself: reading on at once would take a client's
        end-of-file after its body (a half-close, then waiting for the answer) for a client gone,
        and drop the answer."""
        self._raw_body = None
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn sets it up (httptools >= 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.flow.read_paused = True  # the transport is paused since take()

    def shutdown(self) -> None:
        self._shutting_down = True  # a body taken but not yet moving is cut when its move starts
        if self._moving is not None:
            self._moving.cancel()
        super().shutdown()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request already read starts now: still busy
        # uvicorn's HttpToolsProtocol.on_response_complete, but for its keep-alive timer: that is
        # set once and kept across requests (see _keep_alive_due), not set here and cancelled by
        # the next request's first bytes each time (a timer made, pushed and cancelled per request).
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._idle_since = self.loop.time()
                if self.timeout_keep_alive_task is None:
                    due = self._idle_since + self.timeout_keep_alive
                    self.timeout_keep_alive_task = self.loop.call_at(due, self._keep_alive_due)
        if self._admitted and not self._in_head and not pipelined:
            self.guard.waiting(self)

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this when bytes arrive (and when the connection is lost without an error,
        # which connection_lost handles): the connection is no longer idle. The timer stays.
        self._idle_since = None

    def _keep_alive_due(self) -> None:
        """The keep-alive timer: closes the connection idle for ``timeout_keep_alive`` since its last
        response (uvicorn's ``timeout_keep_alive_handler``); set again for the rest of that time when
        a later response ended, and not at all while a request is in progress (its response will)."""
        self.timeout_keep_alive_task = None
        since = self._idle_since
        if since is None:
            return
        due = since + self.timeout_keep_alive
        if self.loop.time() < due:
            self.timeout_keep_alive_task = self.loop.call_at(due, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def evict(self) -> None:
        """Closes this waiting connection to make room for a new one (the guard forgot it already)."""
        self._cancel_head_timer()
        if self._admitted:
            self._admitted = False
            self.guard.open -= 1
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_head_timer(self) -> None:
        """A head starts now, due ``head_timeout`` from now. A timer still set for an earlier head
        (they are left set when a head completes) is kept: it sets itself again for this one."""
        self._head_due = self.loop.time() + self.guard.limits.head_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing() and self.loop.time() < self._head_due:
            self._head_timer = self.loop.call_at(self._head_due, self._head_timed_out)  # set for an earlier head
            return
        if self._in_head and not self.transport.is_closing():
            if self._head_begun or self._head_bytes:
                timeout = self.guard.limits.head_timeout
                self._refuse(408, "Request Timeout", f"the request head did not arrive within {timeout:g} s")
            else:
                self.transport.close()  # a connection that never said anything gets no answer

    def send_400_response(self, msg: str) -> None:
        if len(self.pipeline) > MAX_PIPELINED:  # only ever so when the parse was stopped for it
            msg = f"more than {MAX_PIPELINED} requests were sent ahead of their answers: read the answers first"
        super().send_400_response(msg)

    def _refuse(self, status: int, reason: str, message: str) -> None:
        body = message.encode()
        self.transport.write(_REFUSED % (status, reason.encode(), len(body), body))
        self.transport.close()


def raise_open_file_limit() -> int:
    """Raises the soft ``RLIMIT_NOFILE`` to the hard limit (what the host allows without
    ``CAP_SYS_RESOURCE``) and returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft


def effective_limits(limits: ConnectionLimits, nofile: int) -> ConnectionLimits:
    """``limits`` with the connection cap lowered to what ``nofile`` descriptors allow."""
    room = max(16, nofile - FD_RESERVE)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "RLIMIT_NOFILE is %d: serving at most %d connections instead of %d", nofile, room, limits.max_connections
    )
    return ConnectionLimits(room, limits.head_timeout, limits.idle_timeout, limits.max_head_bytes)


def log_like_uvicorn() -> None:
    """What uvicorn's default ``log_config`` (``uvicorn.config.LOGGING_CONFIG``) sets up, with
    ``logging`` alone rather than ``logging.config.dictConfig``: the ``uvicorn`` loggers print to stderr
    through uvicorn's formatter and do not propagate. (The access logger gets no handler: the servers
    turn the access log off, and uvicorn then clears it.)"""
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
    root = logging.getLogger("uvicorn")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)


def bind_listeners(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` names (as ``loop.create_server`` binds them),
    all on one port: ``port``, or with 0 the one the kernel picks for the first. Bound before the
    runtime starts its sandbox firewall, which must name the real port (its rule keeping sandboxes
    off the API even inside an operator-opened range; with the port still 0 it would name none).
    Raises OSError as ``bind`` does."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its v4 twin binds the v4 side
            if port == 0 and len(listeners) > 1:
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def server_config(
    app: Any, host: str, port: int, limits: ConnectionLimits | None = None, *, uvicorn_logging: bool = True
) -> Any:
    """The uvicorn settings both servers use: uvloop (run by the caller) with httptools through
    :class:`GuardedHttpToolsProtocol`, no WebSocket layer, no lifespan, no access log. Raises
    ``RLIMIT_NOFILE`` first. ``uvicorn_logging=False`` sets up uvicorn's loggers as its default
    ``log_config`` would, without ``logging.config`` (:func:`log_like_uvicorn`; the standalone agent,
    see :mod:`sandboxd.agent.lean`)."""
    from uvicorn.config import Config  # the submodule, not ``uvicorn.Config``: see sandboxd.agent.lean

    logging_options: dict[str, Any] = {}
    if not uvicorn_logging:
        log_like_uvicorn()
        logging_options["log_config"] = None
    protocol = type("ServerProtocol", (GuardedHttpToolsProtocol,), {})  # its guard: limit_connections
    config = Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=protocol,
        # Neither server takes WebSockets through uvicorn (the agent has none; the runtime's proxy
        # carries upgrades as bytes), so uvicorn's choice must not depend on what else is installed.
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        # No X-Forwarded-* rewriting of the client address: nothing reads it, and the middleware
        # that does it is one more coroutine and header scan on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        **logging_options,
    )
    limit_connections(config, limits)
    error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CutAtStop) for f in error.filters):
        error.addFilter(_CutAtStop())
    return config


class _CutAtStop(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a request it cancelled itself: that happens
    only at a stop, to the streams still open after the grace (:data:`SHUTDOWN_GRACE_S`: a background
    command's, a watch's, a terminal's), whose end its own line already says ("Cancel N running
    task(s)"). A traceback per stream would read as a fault of the server's. On the logger, so it
    holds whoever's handlers carry the line (the runtime routes uvicorn's through its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cut = isinstance(exc, asyncio.CancelledError)
        return not (cut and record.getMessage().startswith("Exception in ASGI application"))


def limit_connections(config: Any, limits: ConnectionLimits | None = None) -> None:
    """Cap a :func:`server_config`'s connections by this process's ``RLIMIT_NOFILE`` (raised first):
    the connection guard, the listen backlog and the keep-alive timeout. :func:`server_config` calls it;
    call it again for settings built in another process (the zygote's, whose limit is the host's, not
    the sandbox's)."""
    limits = effective_limits(limits or ConnectionLimits(), raise_open_file_limit())
    config.http.guard = ConnectionGuard(limits)
    config.backlog = min(limits.max_connections, 4096)
    config.timeout_keep_alive = int(limits.idle_timeout) or 1


def quiet_server(config: Any) -> Any:
    """A uvicorn ``Server`` for ``config`` without the 10 Hz main-loop tick (see
    :func:`serve_until_signalled`), not started: the runtime's and the code interpreter's. (The agent's
    server is :class:`sandboxd.agent.serving.AgentServer`, built in the zygote with its other settings.)"""
    return _quiet_server_class()(config)


@functools.cache
def _quiet_server_class() -> type:
    from uvicorn.server import Server  # the submodule, not ``uvicorn.Server``: see sandboxd.agent.lean

    class QuietServer(Server):
        stop: asyncio.Event

        async def main_loop(self) -> None:
            self.server_state.default_headers = list(self.config.encoded_headers)
            self.stop = asyncio.Event()
            if not self.should_exit:
                await self.stop.wait()

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            stop = getattr(self, "stop", None)
            if stop is not None:
                asyncio.get_running_loop().call_soon_threadsafe(stop.set)

    return QuietServer


async def serve_until_signalled(config: Any, sockets: list[socket.socket] | None = None, server: Any = None) -> None:
    """Run a uvicorn server until SIGINT or SIGTERM, without uvicorn's 10 Hz main-loop tick.
    ``sockets``: listening sockets bound already (then the config's host and port are not bound).
    ``server``: a :func:`quiet_server` for ``config`` built ahead, not started (else built here).

    ``uvicorn.Server.main_loop`` wakes every 100 ms to refresh its ``Date`` header and poll for exit:
    measured at 1-2 ms of CPU per second per idle agent, which a hundred idle sandboxes turn into a
    fifth of a core. With the Date header off nothing needs the tick, so the main loop here sleeps
    until uvicorn's own signal handler asks it to stop."""
    await (server if server is not None else quiet_server(config)).serve(sockets=sockets)
