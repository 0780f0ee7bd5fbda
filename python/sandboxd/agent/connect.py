"""The Connect protocol over HTTP/1.1 (what the E2B SDKs speak), as a thin ASGI adapter.

Written here rather than taken from ``connectrpc``/``connect-python``: those own the whole ASGI app and
routing, while the agent serves Connect, REST and envd's plain-HTTP auth semantics on one port, and
must match details the SDK checks byte for byte (the exact ``application/connect+json`` stream type,
errors of streams as HTTP 200 + end-stream frame, envd's 401 JSON). The adapter is ~300 lines.

* unary: ``application/json`` or ``application/proto`` body → same type reply, errors as JSON with
  the code's HTTP status;
* streams: ``application/connect+json`` / ``+proto`` envelopes (1 flag byte, 4-byte big-endian length),
  ending with an end-stream frame (flag 0x02) holding ``{}`` or ``{"error": ...}``;
* ``connect-timeout-ms`` is the handler's deadline; ``gzip`` request compression is accepted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

from google.protobuf.message import DecodeError, Message

from .. import _core
from .asgi import (
    BODY_FOLLOWS,
    BODY_PARTS,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    body_chunks,
    raw_headers,
    read_body,
    send_bytes,
)
from .auth import rpc_user
from .compression import gunzip
from .errors import HTTP_STATUS, Code, RpcError, to_rpc_error
from .protojson import message_to_dict, parse
from .rpc import HAND_OFF, Batch, Context, Encoded, HandOff, Kind, Method, NestedBytes, Piece, encoded_constant
from .state import AgentState

MAX_UNARY_BODY = 16 << 20
"""Largest unary request accepted (bytes), both as sent and once decompressed. envd's messages are
paths and small structs; 16 MiB leaves room for big ``SendInput`` payloads while bounding memory per
request."""

MAX_ENVELOPE = 16 << 20
"""Largest single streamed message accepted (bytes), as sent and once decompressed, for the same
reason."""

JOIN_BELOW = 64 << 10
"""A streamed message in pieces (see :meth:`Codec.frame_parts`) smaller than this is joined and sent
as one body message: copying a few KiB costs less than another trip through the ASGI ``send``."""

_JSON = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON, as ``json.dumps(..., separators=(",", ":"))`` without building an encoder per call
(1.5 us of the ~5 us a streamed message's JSON took)."""

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")

UNARY_TYPES = {"application/json": "json", "application/proto": "proto"}
STREAM_TYPES = {"application/connect+json": "json", "application/connect+proto": "proto"}


class Codec:
    """Protobuf messages to and from JSON (proto3 canonical JSON) or binary."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, data: bytes, message_type: type[Message]) -> Message:
        try:
            if self.name == "proto":
                message = message_type()
                message.ParseFromString(data)
            else:
                message = parse(data, message_type)
        except (DecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # protojson.ParseError too
            detail = str(exc) or type(exc).__name__
            raise RpcError(
                Code.INVALID_ARGUMENT, f"cannot decode {message_type.DESCRIPTOR.full_name}: {detail}"
            ) from None
        return message

    def encode(self, message: Message | NestedBytes | Encoded) -> bytes:
        return b"".join(self._encode_parts(message))

    def frame(self, message: Message | NestedBytes | Encoded) -> bytes:
        """``message`` as one stream envelope."""
        return b"".join(self.frame_parts(message))

    def frame_parts(self, message: Message | NestedBytes | Encoded) -> list[Piece]:
        """``message`` as one stream envelope, in pieces that add up to it: a :class:`NestedBytes`
        (process output) keeps its bytes as a piece of their own, so that they are not copied into
        a joined envelope on their way to the HTTP server (which copies each body message once more
        into its chunked framing)."""
        parts = self._encode_parts(message)
        size = len(parts[0]) if len(parts) == 1 else sum(len(p) for p in parts)
        parts.insert(0, _HEADER.pack(0, size))
        return parts

    def _encode_parts(self, message: Message | NestedBytes | Encoded) -> list[Piece]:
        if isinstance(message, Encoded):
            return [message.SerializeToString() if self.name == "proto" else message.to_json()]
        if isinstance(message, NestedBytes):
            if self.name == "proto":
                return [message.proto_prefix(), *message.pieces]
            # base64 has no characters JSON escapes, so the text goes between the names as it is;
            # encoded in Rust from the ring's chunks straight into the one result (CPython's
            # encoder is a byte-at-a-time loop: crates/sandboxd-py/src/encode.rs).
            before, after = message.json_affixes()
            return [_core.base64_between(before, message.data, after)]
        known = encoded_constant(message, self.name, self._encode)
        if known is not None:
            return [known]
        return [self._encode(message)]

    def _encode(self, message: Message) -> bytes:
        if self.name == "proto":
            return message.SerializeToString()
        return _JSON(message_to_dict(message)).encode()


_CODECS = {"json": Codec("json"), "proto": Codec("proto")}

_STREAM_HEADERS = {
    name: [(b"content-type", f"application/connect+{name}".encode()), (b"x-accel-buffering", b"no")] for name in _CODECS
}
"""A stream response's own headers, by codec (a handler's ``response_headers`` follow them)."""
"""One of each: a codec holds nothing of a call."""

_NO_DEADLINE = contextlib.nullcontext()
"""What a call without ``connect-timeout-ms`` runs in, instead of an ``asyncio.timeout_at(None)``
(which makes, enters and leaves a ``Timeout`` for nothing). Holds no state, so one serves all."""


def _within(deadline: float | None) -> contextlib.AbstractAsyncContextManager[Any]:
    """``asyncio.timeout_at`` for a ``time.monotonic()`` deadline, or nothing without one."""
    return _NO_DEADLINE if deadline is None else asyncio.timeout_at(_loop_deadline(deadline))


def error_json(error: RpcError) -> dict[str, Any]:
    """The Connect error object: ``code``, ``message`` (left out when empty) and ``details`` (each
    ``{"type": <full name>, "value": <unpadded base64 of the binary message>}``)."""
    out: dict[str, Any] = {"code": str(error.code)}
    if error.message:
        out["message"] = error.message
    if error.details:
        out["details"] = [
            {"type": name, "value": base64.b64encode(value).decode().rstrip("=")} for name, value in error.details
        ]
    return out


def envelope(flags: int, payload: bytes) -> bytes:
    """One Connect stream frame."""
    return _HEADER.pack(flags, len(payload)) + payload


def end_stream(error: RpcError | None, trailers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The final frame of a stream: ``{}``, or ``{"error": ...}``, and the trailers as ``metadata``;
    always JSON."""
    body: dict[str, Any] = {} if error is None else {"error": error_json(error)}
    metadata: dict[str, list[str]] = {}
    for name, value in trailers:
        metadata.setdefault(name, []).append(value)
    if metadata:
        body["metadata"] = metadata
    elif error is None:
        return _END_OK  # most streams' end: the same bytes every time
    return envelope(FLAG_END_STREAM, _JSON(body).encode())


_END_OK = envelope(FLAG_END_STREAM, b"{}")


def deadline_from(headers: dict[str, str]) -> float | None:
    """``connect-timeout-ms`` as a ``time.monotonic()`` deadline; absent or 0 means none."""
    raw = headers.get("connect-timeout-ms")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise RpcError(Code.INVALID_ARGUMENT, f"connect-timeout-ms must be a positive integer, got '{raw}'")
    millis = int(raw)
    return None if millis == 0 else time.monotonic() + millis / 1000


def _is_gzip(encoding: str | None, header: str) -> bool:
    """Whether ``encoding`` (a request's ``content-encoding`` or ``connect-content-encoding``) is gzip;
    identity (or none) is not; anything else is ``unimplemented``, as the Connect protocol says."""
    if encoding in (None, "", "identity"):
        return False
    if encoding == "gzip":
        return True
    raise RpcError(Code.UNIMPLEMENTED, f"unsupported {header} '{encoding}' (supported: identity, gzip)")


def _envelope_at(data: bytes | bytearray, at: int, limit: int, encoding: str | None) -> tuple[int, bool, bytes] | None:
    """The Connect envelope that starts at ``at`` in ``data``: where the next one starts, whether it
    ends the stream, and its payload (decompressed); None while it has not all arrived. A length over
    ``limit`` is refused as soon as the header is in (before its payload arrives), a payload over it
    once decompressed. The one reader of envelopes behind :func:`envelopes`, :func:`envelopes_of` and
    :func:`_read_single`."""
    if len(data) - at < _HEADER.size:
        return None
    flags, length = _HEADER.unpack_from(data, at)
    if length > limit:
        raise RpcError(Code.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit of {limit} bytes")
    end = at + _HEADER.size + length
    if len(data) < end:
        return None
    payload = bytes(memoryview(data)[at + _HEADER.size : end])  # the view is let go at once: data may be resized
    if flags & FLAG_END_STREAM:
        return end, True, payload
    if flags & FLAG_COMPRESSED:
        if not _is_gzip(encoding, "connect-content-encoding"):
            raise RpcError(Code.INTERNAL, "compressed message without connect-content-encoding")
        payload = gunzip(payload, "message", limit)
    return end, False, payload


def _cut_short(left: int) -> RpcError:
    return RpcError(Code.INVALID_ARGUMENT, f"request body ends inside a message envelope ({left} bytes)")


async def envelopes(
    chunks: AsyncIterator[bytes], encoding: str | None, limit: int = MAX_ENVELOPE
) -> AsyncIterator[bytes]:
    """Payloads of the Connect envelopes in a request body, decompressed; each at most ``limit`` bytes
    as sent and once decompressed."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while (taken := _envelope_at(buffer, 0, limit, encoding)) is not None:
            end, last, payload = taken
            del buffer[:end]
            if last:
                return
            yield payload
    if buffer:
        raise _cut_short(len(buffer))


def envelopes_of(body: bytes, encoding: str | None, limit: int = MAX_ENVELOPE) -> Iterator[bytes]:
    """:func:`envelopes` of a body that has all arrived: the same payloads and the same errors, at
    the same points of the iteration, without an async generator per request."""
    at = 0
    while (taken := _envelope_at(body, at, limit, encoding)) is not None:
        at, last, payload = taken
        if last:
            return
        yield payload
    if at < len(body):
        raise _cut_short(len(body) - at)


class ConnectTransport:
    """Serves a set of :class:`Method` over the Connect protocol.

    ``message_limit`` bounds a unary body and each streamed message, as sent and once decompressed."""

    def __init__(
        self,
        methods: list[Method],
        state: AgentState,
        message_limit: int = MAX_UNARY_BODY,
        later: tuple[str, Callable[[], list[Method]]] | None = None,
    ) -> None:
        self.routes = {m.path: m for m in methods}
        self.state = state
        self.message_limit = message_limit
        self._later = later
        """A path prefix and the methods under it, built on the first request to one of them
        (:meth:`route_later`; ``methods.filesystem_later``)."""

    def route_later(self, path: str) -> Method | None:
        """The method at ``path`` when it is one of the methods built on first use (built now, once);
        None for any other path. Asked only when ``routes`` has no such path, so a route found there
        costs nothing more."""
        later = self._later
        if later is None or not path.startswith(later[0]):
            return None
        self._later = None
        for method in later[1]():
            self.routes.setdefault(method.path, method)
        return self.routes.get(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, method: Method) -> None:
        if scope["method"] != "POST":
            # As connect-go: 405 with the verbs allowed, and no body to mistake for a Connect error.
            await send_bytes(send, 405, b"", None, [("allow", "POST")])
            return
        header_list = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        writer = scope.get("extensions", {}).get(BODY_PARTS)
        await self.serve(method, dict(header_list), header_list, receive, send, writer, None)

    async def direct(
        self, writer: Any, method: Method, headers: dict[str, str], header_list: list[tuple[str, str]]
    ) -> None:
        """A ``POST`` to ``method`` on the HTTP server's direct path (``GuardedHttpToolsProtocol``):
        :meth:`serve` with the server's ``ResponseWriter`` as ``send`` (``send_direct``) and the body
        taken whole when it came with the head (``complete_body``; a client stream reads its own)."""
        body = writer.complete_body() if method.kind is not Kind.CLIENT_STREAM else None
        await self.serve(method, headers, header_list, writer.receive, writer.send_direct, writer, body)

    async def serve(
        self,
        method: Method,
        headers: dict[str, str],
        header_list: list[tuple[str, str]],
        receive: Receive,
        send: Send,
        writer: Any,
        body: bytes | None,
    ) -> None:
        """A ``POST`` to ``method``: ``headers`` as :func:`~.asgi.header_map` gives them and
        ``header_list`` every one in order (names lower-case); ``writer`` the server's
        ``ResponseWriter`` (:data:`~.asgi.BODY_PARTS`) or None; ``body`` the whole request body
        when it has all arrived already (a unary or server-stream call; None: read from ``receive``)."""
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        types = UNARY_TYPES if method.kind is Kind.UNARY else STREAM_TYPES
        codec_name = types.get(content_type)
        if codec_name is None:
            error = RpcError(
                Code.UNKNOWN,
                f"unsupported content-type '{content_type}' for {method.kind.value} {method.path}: "
                f"use {' or '.join(types)}",
            )
            await self._send_unary_error(send, error, [("accept-post", ", ".join(types))], status=415)
            return
        if method.kind is Kind.UNARY:
            await self._unary(method, headers, header_list, _CODECS[codec_name], receive, send, body)
        else:
            await self._stream(method, headers, header_list, _CODECS[codec_name], receive, send, writer, body)

    def _context(self, headers: dict[str, str], header_list: list[tuple[str, str]], codec: Codec) -> Context:
        return Context(
            user=rpc_user(self.state, headers.get("authorization")),
            headers=headers,
            deadline=deadline_from(headers),
            header_list=header_list,
            codec=codec.name,
        )

    async def _unary(
        self,
        method: Method,
        headers: dict[str, str],
        header_list: list[tuple[str, str]],
        codec: Codec,
        receive: Receive,
        send: Send,
        body: bytes | None,
    ) -> None:
        ctx: Context | None = None
        limit = self.message_limit
        try:
            compressed = _is_gzip(headers.get("content-encoding"), "content-encoding")
            if body is None:
                body = await read_body(receive, limit)
            elif len(body) > limit:
                body = None
            if body is None:
                raise RpcError(Code.RESOURCE_EXHAUSTED, f"request body exceeds the limit of {limit} bytes")
            if compressed:
                body = gunzip(body, "request body", limit)
            ctx = self._context(headers, header_list, codec)
            request = codec.decode(body, method.request_type)
            async with _within(ctx.deadline):
                response = await method.handler(request, ctx)
            body = codec.encode(response)
        except ClientDisconnected:
            return
        except Exception as exc:
            extra = [] if ctx is None else [*ctx.response_headers, *_prefixed_trailers(ctx.response_trailers)]
            await self._send_unary_error(send, to_rpc_error(exc), extra)
            return
        extra = [*ctx.response_headers, *_prefixed_trailers(ctx.response_trailers)]
        await send_bytes(send, 200, body, f"application/{codec.name}", extra)

    async def _send_unary_error(
        self, send: Send, error: RpcError, headers: Iterable[tuple[str, str]] = (), status: int | None = None
    ) -> None:
        """A Connect error: the HTTP status is the code's (the REST status an error may carry for
        ``/files``, such as 413 or 507, is not Connect's), unless ``status`` says otherwise."""
        body = json.dumps(error_json(error), separators=(",", ":")).encode()
        await send_bytes(send, status or HTTP_STATUS[error.code], body, "application/json", headers)

    async def _stream(
        self,
        method: Method,
        headers: dict[str, str],
        header_list: list[tuple[str, str]],
        codec: Codec,
        receive: Receive,
        send: Send,
        body_parts: Any,
        body: bytes | None,
    ) -> None:
        started = False
        complete = False  # the body's last message was handed to the server: nothing may follow it
        ctx: Context | None = None

        async def frame(data: bytes | list[Piece], more: bool = True) -> None:
            nonlocal complete, started
            if complete:
                return  # a keepalive due while the last message was being sent
            if not started:
                started = True
                head = _STREAM_HEADERS[codec.name]
                if ctx is not None and ctx.response_headers:
                    head = [*head, *raw_headers(ctx.response_headers)]
                # Only ever sent right before the first frame: the head may wait for it.
                await send({"type": "http.response.start", "status": 200, "headers": head, BODY_FOLLOWS: True})
            complete = not more  # before the send: a failed send is not followed by another end
            if isinstance(data, list):
                if len(data) > 1 and sum(len(part) for part in data) > JOIN_BELOW:
                    if more and body_parts is not None and body_parts.usable():
                        await body_parts(data)  # one chunk, written with writev: no copy
                        return
                    last = len(data) - 1
                    for i, part in enumerate(data):  # one body message each, so the big one is never copied
                        await send({"type": "http.response.body", "body": part, "more_body": more or i < last})
                    return
                data = b"".join(data)
            await send({"type": "http.response.body", "body": data, "more_body": more})

        error: RpcError | None = None
        try:
            ctx = self._context(headers, header_list, codec)
            encoding = headers.get("connect-content-encoding")
            _is_gzip(encoding, "connect-content-encoding")
            async with _within(ctx.deadline):
                if method.kind is Kind.CLIENT_STREAM:
                    payloads = envelopes(body_chunks(receive), encoding, self.message_limit)
                    requests = (codec.decode(p, method.request_type) async for p in payloads)
                    response = await method.handler(requests, ctx)
                    await frame(codec.frame_parts(response))
                else:
                    if body is None:  # still arriving (the SDKs write the head and the body apart)
                        request = await _read_single(receive, codec, method, encoding, self.message_limit)
                    else:
                        request = _one_request(envelopes_of(body, encoding, self.message_limit), codec, method)
                    await self._serve_stream(method, request, ctx, codec, receive, frame, body_parts)
        except ClientDisconnected:
            return
        except Exception as exc:
            error = to_rpc_error(exc)
        if not complete:  # else the stream ended with its last message (a deadline may pass after it)
            with contextlib.suppress(OSError):
                await frame(end_stream(error, ctx.response_trailers if ctx is not None else ()), more=False)

    async def _serve_stream(
        self, method: Method, request: Message, ctx: Context, codec: Codec, receive: Receive, frame: Any, writer: Any
    ) -> None:
        """Run a server-stream handler until it ends or the client disconnects, sending in-band
        keepalives after each quiet ``Keepalive-Ping-Interval`` (as envd). The method's last message
        (:attr:`Method.last`) goes out with the end-stream frame, in the same write.

        No task of its own (three before, measured on the round trip): the handler's messages are
        sent from the request's task, keepalives come from a loop timer (:class:`_Keepalives`), and
        a client that leaves while the handler waits is reported by the server's ``writer``
        (``ResponseWriter.on_disconnect``; on a server without one, by a task waiting on
        ``receive``). Either cancels this task, which then raises :class:`ClientDisconnected`."""
        messages: AsyncIterator[Message] = method.handler(request, ctx)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # (with the loop: no getpid(2) to find it again)
        assert task is not None
        gone = False  # the client left (or a keepalive could not be sent): this task was cancelled
        finished = False

        def leave() -> None:
            nonlocal gone
            if not gone and not finished:
                gone = True
                task.cancel()

        watcher: asyncio.Future[None] | None = None
        if writer is not None:
            forget = writer.on_disconnect(leave)
        else:
            watcher = asyncio.ensure_future(_disconnected(receive))
            watcher.add_done_callback(lambda _: leave())
        keepalives = None
        if method.keepalive is not None:
            make = method.keepalive
            keepalives = _Keepalives(loop, ctx.keepalive_interval, lambda: frame(codec.frame_parts(make())), leave)
            if codec.name == "proto" and writer is not None:
                ctx.extras[HAND_OFF] = _hand_off(
                    writer, keepalives, lambda: codec.frame(make()), ctx.keepalive_interval
                )
        is_last = method.last
        try:
            try:
                async for message in messages:
                    if isinstance(message, Batch):  # several envelopes, one write
                        parts = [part for each in message.messages for part in codec.frame_parts(each)]
                        last = message.messages[-1]
                    else:
                        parts, last = codec.frame_parts(message), message
                    if is_last is not None and is_last(last):
                        parts.append(end_stream(None, ctx.response_trailers))
                        await frame(parts, more=False)
                        return
                    await frame(parts)
                    if keepalives is not None:
                        keepalives.last_sent = loop.time()
            finally:
                try:
                    aclose = getattr(messages, "aclose", None)
                    if aclose is not None:
                        await aclose()
                finally:
                    if keepalives is not None:
                        await keepalives.stop()
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise ClientDisconnected from None
            raise
        finally:
            finished = True  # no await from here on: a disconnect now cancels nothing
            if watcher is None:
                forget()
            else:
                watcher.cancel()


def _hand_off(writer: Any, keepalives: _Keepalives, keepalive: Callable[[], bytes], interval: float) -> HandOff:
    """What a binary stream's handler gets under :data:`HAND_OFF`: ``await hand_off(write)`` runs
    ``write(sock, cancel, keepalive_chunk, interval)`` in a worker thread that owns the socket
    meanwhile (``ResponseWriter.hand_off``: it writes the stream's data frames, and its keepalives,
    itself); the loop's keepalives wait for it. None when the socket cannot be handed off now.
    ``keepalive`` makes the keepalive's frame, once, when first needed (not for every stream)."""
    chunk: bytes | None = None

    async def hand_off(
        write: Callable[[int, int, bytes, float], tuple[str, int, bytes]],
        before: Callable[[], None],
        after: Callable[[], None],
    ) -> tuple[str, int] | None:
        nonlocal chunk
        if not keepalives.pause():
            return None
        if chunk is None:
            frame = keepalive()
            chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
        ping = chunk
        try:
            handed = await writer.hand_off(lambda sock, cancel: write(sock, cancel, ping, interval), before, after)
        finally:
            keepalives.resume()
        return handed  # type: ignore[no-any-return]

    return hand_off


class _Keepalives:
    """A stream's in-band keepalives, each sent after ``interval`` seconds without a message: one
    loop timer, a task only while one is being sent. The stream sets :attr:`last_sent` after each
    message of its own; when the timer finds the stream quiet it sends a keepalive, else it waits
    for the rest of the interval."""

    __slots__ = ("_failed", "_interval", "_loop", "_send", "_sending", "_timer", "last_sent")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float,
        send: Callable[[], Awaitable[None]],
        failed: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._send = send
        self._failed = failed  # called when a keepalive could not be sent
        self._sending: asyncio.Task[None] | None = None
        self.last_sent = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_at(self.last_sent + interval, self._due)

    def _due(self) -> None:
        due = self.last_sent + self._interval
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._due)
        else:
            self._timer = None
            self._sending = self._loop.create_task(self._send_one())

    async def _send_one(self) -> None:
        try:
            await self._send()
        except Exception:
            self._failed()
            return
        self._sending = None
        self.last_sent = self._loop.time()
        self._timer = self._loop.call_at(self.last_sent + self._interval, self._due)

    def pause(self) -> bool:
        """Stops the timer while something else sends the stream's keepalives (a hand-off); False,
        and nothing stopped, while one is being sent or after :meth:`stop`."""
        if self._sending is not None or self._timer is None:
            return False
        self._timer.cancel()
        self._timer = None
        return True

    def resume(self) -> None:
        """After :meth:`pause`: the next keepalive a whole interval from now."""
        if self._timer is None and self._sending is None:
            self.last_sent = self._loop.time()
            self._timer = self._loop.call_at(self.last_sent + self._interval, self._due)

    async def stop(self) -> None:
        """No more keepalives; waits for one being sent to be cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sending, self._sending = self._sending, None
        if sending is not None and not sending.done():
            sending.cancel()
            await asyncio.wait([sending])


async def _disconnected(receive: Receive) -> None:
    """Returns when ``receive`` says the client disconnected (after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _prefixed_trailers(trailers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A unary reply's trailers, sent as ``trailer-<name>`` headers (the Connect protocol)."""
    return [(f"trailer-{name}", value) for name, value in trailers]


async def _read_single(receive: Receive, codec: Codec, method: Method, encoding: str | None, limit: int) -> Message:
    """The one request message of a server stream, read from ``receive`` as it arrives;
    ``unimplemented`` for none or several (the code connect-go gives: the call's shape is not one the
    method implements). What iterating :func:`envelopes` over :func:`~.asgi.body_chunks` did (the
    same payloads and errors, raised at the same points of the body, nothing buffered past the
    envelope being read) in one coroutine, without two async generators per request."""
    buffer = bytearray()
    request: Message | None = None
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        more = message.get("more_body", False)
        chunk = message.get("body", b"")
        if not chunk:
            continue
        buffer += chunk
        while (taken := _envelope_at(buffer, 0, limit, encoding)) is not None:
            end, last, payload = taken
            del buffer[:end]
            if last:
                return _the_request(request, method)
            if request is not None:
                raise RpcError(Code.UNIMPLEMENTED, f"{method.path} takes exactly one request message, got more")
            request = codec.decode(payload, method.request_type)
    if buffer:
        raise _cut_short(len(buffer))
    return _the_request(request, method)


def _the_request(request: Message | None, method: Method) -> Message:
    if request is None:
        raise RpcError(Code.UNIMPLEMENTED, f"{method.path} needs one request message, the body had none")
    return request


def _one_request(payloads: Iterator[bytes], codec: Codec, method: Method) -> Message:
    """:func:`_read_single` of payloads that have all arrived (:func:`envelopes_of`)."""
    request: Message | None = None
    for payload in payloads:
        if request is not None:
            raise RpcError(Code.UNIMPLEMENTED, f"{method.path} takes exactly one request message, got more")
        request = codec.decode(payload, method.request_type)
    return _the_request(request, method)


def _loop_deadline(deadline: float | None) -> float | None:
    """A ``time.monotonic()`` deadline on the running loop's clock (``asyncio.timeout_at`` wants that)."""
    if deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
