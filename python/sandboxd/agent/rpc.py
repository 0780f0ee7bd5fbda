"""Transport-agnostic RPC model: a service is a list of methods; a method has a kind, message
types and an async handler. Connect and gRPC adapters serve the same lists unchanged."""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from .users import User


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
