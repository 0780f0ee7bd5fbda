"""Small ASGI helpers shared by the transports: headers, bodies and JSON replies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

BODY_PARTS = "sandboxd.body_parts"
"""The ``scope["extensions"]`` key of the server's response writer
(``sandboxd.agent.http_server.ResponseWriter``), when the server offers one: it writes a body
message in pieces, and tells of a lost connection (``on_disconnect``) without a task on ``receive``."""

RAW_BODY = "sandboxd.raw_body"
"""The ``scope["extensions"]`` key of the request's body as the socket's bytes
(``sandboxd.agent.http_server.RawBody``), when the server offers it: a route that writes a large
plain body to a file has a worker thread move it socket → file (``splice(2)``) instead of taking it
through ``receive()``."""

BODY_FOLLOWS = "sandboxd.body_follows"
"""A key an app may set (to True) in ``http.response.start`` to say that its first body message
follows at once, so the server may write the head with it in one write (a start with
``content-length`` says so by itself). Servers ignore keys they do not know."""


class ClientDisconnected(Exception):
    """The client went away before the request body was complete."""


_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
"""RFC 9110's ``tchar``."""


def is_token(name: bytes) -> bool:
    """Whether ``name`` is an RFC 9110 token, what a header field's name is made of: not empty, and no
    space, separator, control or 8-bit byte."""
    return bool(name) and not name.translate(None, _TOKEN_CHARS)


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers as a dict with lower-case names (the last value wins), decoded as latin-1."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def raw_headers(pairs: Iterable[tuple[str, str]]) -> RawHeaders:
    """``(name, value)`` strings as ASGI header bytes."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives; raises :class:`ClientDisconnected` if the client leaves."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than ``limit`` bytes; raises
    :class:`ClientDisconnected` if the client leaves. (:func:`body_chunks`' loop, without an async
    generator per request.)"""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: str | None, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """A complete response in one go."""
    pairs = [("content-length", str(len(body))), *headers]
    if content_type is not None:
        pairs.append(("content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers(pairs)})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
    """A JSON response."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send_bytes(send, status, body, "application/json", headers)


async def send_http_error(send: Send, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    """envd's REST error shape: ``{"code": <http status>, "message": ...}``."""
    await send_json(send, status, {"code": status, "message": message}, headers)


async def send_empty(send: Send, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
    """A response with no body (204 and the like)."""
    await send({"type": "http.response.start", "status": status, "headers": raw_headers(headers)})
    await send({"type": "http.response.body", "body": b""})
