"""The agent's ASGI application: one port for Connect RPCs and envd's REST endpoints."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from itertools import chain
from types import ModuleType
from typing import Any

from .asgi import Receive, Scope, Send, header_map, send_empty, send_http_error
from .auth import TOKEN_ERROR
from .connect import ConnectTransport
from .rest import envs, health, init, metrics
from .rpc import Method
from .state import AgentState

MAX_HEADER_BYTES = 64 << 10
"""Requests whose headers add up to more than 64 KiB are refused with 431 (nginx's default is 32 KiB
per line; no SDK call comes near it)."""

CORS = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "*"),
    ("access-control-allow-headers", "*"),
    ("access-control-expose-headers", "*"),
    ("access-control-max-age", "86400"),
]
_CORS_RAW = [(name.encode(), value.encode()) for name, value in CORS]
_CORS_HEAD = b"".join(b"%s: %s\r\n" % pair for pair in _CORS_RAW)
"""The CORS headers as head lines, for the direct path's writer (``ResponseWriter.head_extra``)."""


def _files() -> ModuleType:
    """:mod:`sandboxd.agent.files`, imported by the first ``/files`` request rather than with the app: a
    standalone agent that only runs commands never loads it, nor the file workers' executor it makes
    at import (``concurrent.futures.thread``, ``queue``), ``contenttype`` and ``httpdate``: 0.24 MiB
    of idle RSS (docs/benchmarks.md, ``rss9``). The zygote imports every module of the agent ahead
    (``runtime.zygote.preload``), so a sandbox's agent finds it loaded; after the first request this
    is a dictionary lookup."""
    from . import files

    return files


class AgentApp:
    """Routes a request to the Connect transport or a REST handler (envd's routing and auth)."""

    def __init__(
        self, state: AgentState, methods: list[Method], later: tuple[str, Callable[[], list[Method]]] | None = None
    ) -> None:
        """``later``: a path prefix and the methods under it, built on first use (``ConnectTransport``)."""
        self.state = state
        self.connect = ConnectTransport(methods, state, later=later)

    def direct(self, scope: Scope, writer: Any) -> Coroutine[Any, Any, None] | None:
        """The agent's HTTP server asks this first (``GuardedHttpToolsProtocol``, with the request's
        ``ResponseWriter``): a ``POST`` to a Connect route is served by :meth:`_rpc`, the same steps as
        :meth:`__call__` and :meth:`ConnectTransport.__call__` take for it (header cap, token,
        Connect) without the ASGI layers between them: the messages go straight to the writer,
        with the CORS headers in its heads, and a body that came with the head is taken whole.
        Anything else (None) goes through :meth:`__call__`."""
        if scope["method"] != "POST":
            return None
        rpc = self.connect.routes.get(scope["path"]) or self.connect.route_later(scope["path"])
        if rpc is None:
            return None
        return self._rpc(scope, writer, rpc)

    async def _rpc(self, scope: Scope, writer: Any, rpc: Method) -> None:
        writer.head_extra = _CORS_HEAD
        send = writer.send_direct
        raw = scope["headers"]
        if _header_bytes(raw) > MAX_HEADER_BYTES:
            await send_http_error(send, 431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
            return
        header_list = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
        headers = dict(header_list)
        if not self.state.token_matches(headers.get("x-access-token")):
            await send_http_error(send, 401, TOKEN_ERROR)
            return
        await self.connect.direct(writer, rpc, headers, header_list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        send = _with_cors(send)
        if _header_bytes(scope["headers"]) > MAX_HEADER_BYTES:
            await send_http_error(send, 431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
            return
        path: str = scope["path"]
        verb: str = scope["method"]
        if verb == "OPTIONS":
            await send_empty(send, 204)
            return
        rpc = self.connect.routes.get(path) or self.connect.route_later(path)
        if rpc is not None:
            if verb == "POST" and not self.state.token_matches(header_map(scope).get("x-access-token")):
                await send_http_error(send, 401, TOKEN_ERROR)
                return
            await self.connect(scope, receive, send, rpc)
            return
        if path == "/health" and verb in ("GET", "HEAD"):
            await health(send)
        elif path == "/files" and verb in ("GET", "HEAD"):
            await _files().download(self.state, scope, receive, send)
        elif path == "/files" and verb == "POST":
            await _files().upload(self.state, scope, receive, send)
        elif path == "/init" and verb == "POST":
            await init(self.state, header_map(scope), receive, send)
        elif path in ("/envs", "/metrics") and verb == "GET":
            if not self.state.token_matches(header_map(scope).get("x-access-token")):
                await send_http_error(send, 401, TOKEN_ERROR)
            elif path == "/envs":
                await envs(self.state, send)
            else:
                await metrics(send)
        elif path in ("/health", "/files", "/init", "/envs", "/metrics"):
            await send_http_error(send, 405, f"method {verb} is not allowed on {path}")
        else:
            await send_http_error(send, 404, f"no such endpoint: {verb} {path}")


def _header_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of the request's header names and values together (in C: a generator over the
    headers was a Python frame step per header, a dozen per SDK call)."""
    return sum(map(len, chain.from_iterable(headers)))


def _with_cors(send: Send) -> Send:
    """envd answers every request with open CORS headers."""

    async def wrapped(message: dict) -> None:  # type: ignore[type-arg]
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *_CORS_RAW]
        await send(message)

    return wrapped  # type: ignore[return-value]
