"""Transport-agnostic RPC model: a service is a list of methods; a method has a kind, message
types and an async handler. Connect and gRPC adapters serve the same lists unchanged."""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from .users import User

M = TypeVar("M", bound=Message)


class Kind(enum.Enum):
    """The call shapes the envd services use."""

    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"


DEFAULT_KEEPALIVE_S = 90.0
"""envd's keepalive interval when the client sends no (valid) ``Keepalive-Ping-Interval``."""


@dataclass(slots=True)
class Context:
    """What a handler knows about its call, whatever the transport."""

    user: User
    headers: Mapping[str, str]
    deadline: float | None = None
    """``time.monotonic()`` value after which the call has failed, or None."""
    extras: dict[str, Any] = field(default_factory=dict)
    header_list: list[tuple[str, str]] = field(default_factory=list)
    """Every request header in order, names lower-case, repeated names kept (``headers`` keeps the last)."""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    """Headers the handler adds to the response (sent before the first message, or with an error)."""
    response_trailers: list[tuple[str, str]] = field(default_factory=list)
    """Trailers the handler adds: ``trailer-``-prefixed headers of a unary reply, or the end-stream
    frame's ``metadata`` of a stream."""
    codec: str = "proto"
    """The codec the call's messages are encoded with: ``json`` or ``proto`` (gRPC's is ``proto``),
    for a handler that encodes its response itself (:class:`Preencoded`)."""

    def time_remaining(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def keepalive_interval(self) -> float:
        """Seconds between in-band keepalives (header ``Keepalive-Ping-Interval``, as envd)."""
        raw = self.headers.get("keepalive-ping-interval")
        try:
            value = float(raw) if raw is not None else DEFAULT_KEEPALIVE_S
        except ValueError:
            return DEFAULT_KEEPALIVE_S
        return value if value > 0 else DEFAULT_KEEPALIVE_S


Handler = Callable[[Any, Context], Any]

HAND_OFF = "hand_off"
"""Key in :attr:`Context.extras` of a server stream whose transport can lend its socket to a
worker thread (binary Connect over HTTP/1.1): an async ``hand_off(write, before, after) -> (outcome,
value) | None``, where ``write(sock, cancel, keepalive_chunk, keepalive_interval)`` runs in the thread
and returns ``(outcome, value, rest)`` (``Subscriber.pump``'s contract; see ``connect._hand_off``);
``before`` and ``after`` run on the loop around it, only when the socket is handed off."""

HandOff = Callable[
    [Callable[[int, int, bytes, float], tuple[str, int, bytes]], Callable[[], None], Callable[[], None]],
    Awaitable[tuple[str, int] | None],
]


_CONSTANTS: dict[int, tuple[Message, dict[str, bytes]]] = {}
"""What :func:`constant` registered, by ``id``: the message itself (so that its ``id`` is never
reused while the entry exists) and its encodings made so far, by codec name."""

MAX_CONSTANTS = 1024
"""The most messages :func:`constant` keeps: a bound, not a size anything is expected to reach."""


def constant(message: M) -> M:
    """Declares ``message`` a constant: never changed again, and kept (here) for the process's life, so
    that a transport may encode it once per codec and reuse the bytes (:func:`encoded_constant`).
    For replies built once and sent again and again, such as a process's ``exit status 0`` end
    event, whose Connect JSON (5-8 us on a warm loop, several times that right after the loop wakes)
    was made on the path from the process's exit to the client at every end. Returns ``message``; past
    :data:`MAX_CONSTANTS` it is simply not registered (it is then encoded each time, as any message)."""
    if len(_CONSTANTS) < MAX_CONSTANTS:
        _CONSTANTS.setdefault(id(message), (message, {}))
    return message


def encoded_constant(message: object, codec: str, encode: Callable[[Any], bytes]) -> bytes | None:
    """``message``'s encoding by ``codec`` (made with ``encode`` the first time) when it was declared a
    :func:`constant`; None for any other message."""
    found = _CONSTANTS.get(id(message))
    if found is None or found[0] is not message:
        return None
    by_codec = found[1]
    data = by_codec.get(codec)
    if data is None:
        data = by_codec[codec] = encode(message)
    return data


class Piece(Protocol):
    """A piece of bytes: ``bytes``, or anything with the buffer protocol and a length in bytes (the
    binding's ``OutputChunk``, a chunk of a process's output ring lent without a copy)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...


class Encoded:
    """A response message that encodes itself: ``SerializeToString()`` gives its binary wire form,
    ``to_json()`` its proto3 JSON as the JSON codec writes a message (compact, the same bytes).
    For a stream whose messages are simple and many, where building the protobuf message and
    converting it through ``message_to_dict`` cost more than the bytes (a watch stream's events:
    ~9 us of the agent's ~80 us of Python per event, docs/benchmarks.md, ``watch3``)."""

    __slots__ = ()

    def SerializeToString(self) -> bytes:  # protobuf's name, so serializers take either
        raise NotImplementedError

    def to_json(self) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Batch:
    """Messages of one server stream that were ready together, sent as one piece: each its own
    envelope, all in one write (one HTTP chunk); gRPC sends them one by one. A watch's backlog: the
    SDKs' HTTP client (pyqwest) hands each chunk it receives to Python with a wake-up of the event loop
    from its own thread, ~200 us of client CPU a chunk, so a chunk per event held an SDK stream to
    ~4,800 events/s (docs/benchmarks.md, stop 44)."""

    messages: list[Any]


class Preencoded(Encoded):
    """A response already encoded for its call's codec (:attr:`Context.codec`), where the encoding grows
    with a sandbox's contents and so is done in a worker thread, not by the transport on the event
    loop (a ``ListDir`` of a large directory: ``_core.list_dir_encoded``)."""

    __slots__ = ("codec", "data")

    def __init__(self, data: bytes, codec: str) -> None:
        self.data = data
        self.codec = codec

    def SerializeToString(self) -> bytes:
        if self.codec != "proto":
            raise TypeError(f"a response encoded as {self.codec} was asked for its binary form")
        return self.data

    def to_json(self) -> bytes:
        if self.codec != "json":
            raise TypeError(f"a response encoded as {self.codec} was asked for its JSON")
        return self.data


@dataclass(frozen=True, slots=True)
class NestedBytes:
    """A response message whose only content is one ``bytes`` field nested in singular message
    fields, kept as that field's path and its bytes until a transport encodes it.

    Process output, the bulk of what process streams carry, has this shape
    (``StartResponse{event: {data: {stdout: ...}}}``). Built as a protobuf message, its bytes were
    copied once into the field, once more by each enclosing message's merge and once more when read
    back to frame them: at 1 GB/s of output those copies took most of the agent's CPU. Encoded from
    here, the binary form is a few bytes of tags and lengths in front of the bytes, and the JSON form
    their base64 between the field names; :meth:`message` builds the real message for anything else."""

    message_type: type[Message]
    path: tuple[str, ...]
    """Field names from ``message_type`` down to the ``bytes`` field, e.g. ``("event", "data", "stdout")``."""
    data: bytes | Sequence[Piece]
    """The bytes, or pieces that add up to them (process output: its ring's chunks, uncopied, which
    a binary transport writes as they are and a JSON one joins for base64)."""

    @property
    def payload(self) -> bytes:
        """The bytes as one object (joined, one copy, when they are in pieces)."""
        return self.data if isinstance(self.data, bytes) else b"".join(self.data)

    @property
    def pieces(self) -> Sequence[Piece]:
        """The bytes in pieces that add up to them (one piece when they are one object)."""
        return (self.data,) if isinstance(self.data, bytes) else self.data

    def message(self) -> Message:
        """The protobuf message this stands for."""
        message = self.message_type()
        node: Any = message
        for name in self.path[:-1]:
            node = getattr(node, name)
        setattr(node, self.path[-1], self.payload)
        return message

    def proto_prefix(self) -> bytes:
        """The binary encoding up to the bytes themselves: ``prefix + data`` is the message's wire form."""
        numbers, _ = _field_path(self.message_type, self.path)
        size = sum(len(piece) for piece in self.pieces)
        parts: list[bytes] = []
        for number in reversed(numbers):
            head = _varint(number << 3 | 2) + _varint(size)
            parts.append(head)
            size += len(head)
        return b"".join(reversed(parts))

    def SerializeToString(self) -> bytes:  # protobuf's name, so serializers take either
        """The binary wire form, as ``message().SerializeToString()`` gives it."""
        return self.proto_prefix() + self.payload

    def json_affixes(self) -> tuple[bytes, bytes]:
        """What goes before and after the base64 of the bytes in the proto3 JSON form:
        ``{"event":{"data":{"stdout":"`` and ``"}}}``."""
        _, names = _field_path(self.message_type, self.path)
        return b"".join(b'{"%s":' % name for name in names) + b'"', b'"' + b"}" * len(names)


_FIELD_PATHS: dict[tuple[type[Message], tuple[str, ...]], tuple[tuple[int, ...], tuple[bytes, ...]]] = {}


def _field_path(message_type: type[Message], path: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
    """Field numbers and JSON names along ``path``, from the descriptors (cached)."""
    key = (message_type, path)
    found = _FIELD_PATHS.get(key)
    if found is None:
        descriptor: Any = message_type.DESCRIPTOR  # a message's, then each field's message type (None past the last)
        numbers: list[int] = []
        names: list[bytes] = []
        for name in path:
            field_descriptor = descriptor.fields_by_name[name]
            numbers.append(field_descriptor.number)
            names.append(field_descriptor.json_name.encode())
            descriptor = field_descriptor.message_type
        found = _FIELD_PATHS[key] = (tuple(numbers), tuple(names))
    return found


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC. ``handler`` is ``async (request, ctx) -> response`` (unary), an async generator
    ``(request, ctx) -> AsyncIterator[response]`` (server stream), or ``async (AsyncIterator[request],
    ctx) -> response`` (client stream)."""

    service: str
    name: str
    kind: Kind
    request_type: type[Message]
    response_type: type[Message]
    handler: Handler
    keepalive: Callable[[], Message] | None = None
    """For server streams: the in-band keepalive message to send after a quiet interval."""
    last: Callable[[Any], bool] | None = None
    """For server streams: whether a message is the stream's last (a process's end event). A transport
    may then end the stream right after it, in the same write, without waiting for the handler's
    generator to finish: the client's round trip ends with that write."""

    @property
    def path(self) -> str:
        """The URL path, ``/<package>.<Service>/<Method>``."""
        return f"/{self.service}/{self.name}"


UnaryHandler = Callable[[Any, Context], Awaitable[Message]]
StreamHandler = Callable[[Any, Context], AsyncIterator[Message]]


def unimplemented(service: ServiceDescriptor, names: list[str] | None = None, why: str = "") -> list[Method]:
    """Methods of ``service`` (all, or ``names``) that answer ``unimplemented`` with ``why``."""
    from google.protobuf import message_factory

    from .errors import Code, RpcError

    message = why or "not implemented"
    methods = []
    for m in service.methods:
        if names is not None and m.name not in names:
            continue
        kind = Kind.SERVER_STREAM if m.server_streaming else Kind.CLIENT_STREAM if m.client_streaming else Kind.UNARY

        async def unary(request: Any, ctx: Context, _name: str = m.name) -> Message:
            raise RpcError(Code.UNIMPLEMENTED, f"{_name}: {message}")

        async def stream(request: Any, ctx: Context, _name: str = m.name) -> AsyncIterator[Message]:
            raise RpcError(Code.UNIMPLEMENTED, f"{_name}: {message}")
            yield  # pragma: no cover - makes this an async generator

        methods.append(
            Method(
                service.full_name,
                m.name,
                kind,
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
                stream if kind is Kind.SERVER_STREAM else unary,
            )
        )
    return methods
