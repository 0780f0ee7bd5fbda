"""The code interpreter's HTTP API (ASGI), E2B's contract on port 49999:

``GET /health`` (``?wait=S``: held until the Python kernel is ready; ``&spares=on-use``); ``POST /execute``
(streamed, see :mod:`.wire`); ``POST /contexts``, ``GET /contexts``, ``DELETE /contexts/{id}``,
``POST /contexts/{id}/restart``.

Errors are plain text, as E2B's server sends them and as the SDKs show them (``404`` becomes the SDKs'
``NotFoundException`` with the text). Requests are bounded and validated before anything reaches a
kernel. There is no token check here: as on E2B, who may reach the port is the proxy's decision
(``X-Access-Token`` is only passed on to the agent's ``/envs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
from typing import Any

from sandboxd.agent.asgi import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    header_map,
    raw_headers,
    read_body,
    send_bytes,
    send_empty,
    send_json,
)

from . import languages
from .contexts import Context, Contexts
from .kernel import KernelError
from .languages import LanguageError

log = logging.getLogger("sandboxd.interpreter")

MAX_EXECUTE_BODY = 16 << 20
"""``/execute`` bodies carry code, not data (files go through the agent's ``/files``): 16 MiB."""

MAX_CONTEXT_BODY = 64 << 10
"""``POST /contexts`` carries a language and a path."""

PARSE_IN_THREAD = 1 << 20
"""Bodies larger than this are decoded off the event loop."""

MAX_CONTEXTS = 64
"""Each context is a kernel process (40-200 MiB): a bound a person notices before the OOM killer does."""

MAX_ENV_VARS = 1024
"""Env vars in one call: far more than anyone passes, far fewer than would slow a kernel down."""

MAX_HEALTH_WAIT = 60.0
"""The longest ``GET /health?wait=S`` holds its answer."""

MAX_HEADER_BYTES = 64 << 10
"""As the agent: requests whose headers add up to more than 64 KiB are refused with 431."""

CORS = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "*"),
    ("access-control-allow-headers", "*"),
]
"""E2B's server answers every origin (its FastAPI app installs an allow-all CORS middleware)."""

NDJSON = "application/x-ndjson"


class HttpError(Exception):
    """An error answered as plain text with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InterpreterApp:
    """Routes requests; contexts and kernels live in :class:`Contexts`."""

    def __init__(self, contexts: Contexts, started: asyncio.Event) -> None:
        self.contexts = contexts
        self.started = started
        """Set once the default Python context's kernel is ready (or failed): until then, /health is 503."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        send = _with_cors(send)
        try:
            await self._route(scope, receive, send)
        except HttpError as exc:
            await _send_text(send, exc.status, exc.message)
        except ClientDisconnected:
            return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            raise HttpError(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
        path: str = scope["path"]
        verb: str = scope["method"]
        if verb == "OPTIONS":
            await send_empty(send, 204)
        elif path == "/health":
            _allow(verb, ("GET", "HEAD"), path)
            wait, spares_on_use = _health_query(scope.get("query_string", b""))
            if spares_on_use:
                self.contexts.spares_on_use()
            if wait and not self.started.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.started.wait(), wait)
            if self.started.is_set():
                await send_json(send, 200, "OK")
            else:
                await _send_text(send, 503, "the code interpreter is starting its Python kernel")
        elif path == "/execute":
            _allow(verb, ("POST",), path)
            await self._execute(scope, receive, send)
        elif path == "/contexts":
            _allow(verb, ("GET", "POST"), path)
            if verb == "GET":
                await send_json(send, 200, [c.describe() for c in self.contexts.contexts.values()])
            else:
                await self._create_context(receive, send)
        elif path.startswith("/contexts/"):
            rest = path[len("/contexts/") :]
            context_id, _, action = rest.partition("/")
            if action == "restart":
                _allow(verb, ("POST",), path)
                await self.contexts.restart(self._context(context_id))
                await send_empty(send, 204)
            elif action == "":
                _allow(verb, ("DELETE",), path)
                await self.contexts.remove(self._context(context_id))
                await send_empty(send, 204)
            else:
                raise HttpError(404, f"no such endpoint: {verb} {path}")
        else:
            raise HttpError(404, f"no such endpoint: {verb} {path}")

    def _context(self, context_id: str) -> Context:
        context = self.contexts.get(context_id)
        if context is None:
            raise HttpError(404, f"Context {context_id} not found")
        return context

    async def _create_context(self, receive: Receive, send: Send) -> None:
        body = await _json_body(receive, MAX_CONTEXT_BODY)
        language = _optional_str(body, "language")
        cwd = _optional_str(body, "cwd")
        if len(self.contexts.contexts) >= MAX_CONTEXTS:
            raise HttpError(429, f"this sandbox has {MAX_CONTEXTS} contexts already: remove some first")
        try:
            name = languages.normalize(language)
            if cwd is not None:
                if "\0" in cwd:
                    raise HttpError(400, "'cwd' must not contain NUL")
                cwd = posixpath.normpath(posixpath.join(self.contexts.options.cwd, cwd))
            context = await self.contexts.create(name, cwd)
        except LanguageError as exc:
            raise HttpError(400, str(exc)) from None
        except NotADirectoryError as exc:
            raise HttpError(400, str(exc)) from None
        except KernelError as exc:
            raise HttpError(503, str(exc)) from None
        await send_json(send, 200, context.describe())

    async def _execute(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _json_body(receive, MAX_EXECUTE_BODY)
        code = body.get("code")
        if not isinstance(code, str):
            raise HttpError(400, "'code' is required and must be a string")
        try:
            code.encode()
        except UnicodeEncodeError:
            raise HttpError(400, "'code' is not valid Unicode (it has an unpaired surrogate)") from None
        context_id = _optional_str(body, "context_id")
        language = _optional_str(body, "language")
        envs = _env_vars(body.get("env_vars"))
        if context_id is not None and language is not None:
            raise HttpError(400, "Only one of context_id or language can be provided")
        if context_id is not None:
            context = self._context(context_id)
        else:
            try:
                context = await self.contexts.default(languages.normalize(language))
            except LanguageError as exc:
                raise HttpError(400, str(exc)) from None
        token = header_map(scope).get("x-access-token")

        # The body is read: the next receive() returns only when the client disconnects.
        gone = asyncio.ensure_future(receive())
        opening = asyncio.ensure_future(self.contexts.open_run(context, code, envs, token))
        try:
            await asyncio.wait({gone, opening}, return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():  # the client left while waiting for the context
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await opening
                return
            try:
                run = opening.result()
            except KernelError as exc:
                raise HttpError(503, str(exc)) from None
            gone.add_done_callback(lambda task: None if task.cancelled() else run.client_gone())
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": raw_headers([("content-type", NDJSON)])}
                )
                async for chunk in run.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                run.close()
        finally:
            gone.cancel()


def _health_query(query: bytes) -> tuple[float, bool]:
    """``GET /health?wait=S&spares=on-use``, ours (the runtime's), not E2B's. ``wait=S``: answer as
    soon as the Python kernel is ready, or after S seconds (at most :data:`MAX_HEALTH_WAIT`) with the
    503, instead of at once: the runtime holds one request open where it polled every 50 ms, each poll
    a connect into the sandbox, and learns the moment the kernel is ready. ``spares=on-use``: the
    pool's spare kernels start only after the first cell or context (a warm sandbox's warm-up:
    :meth:`.Contexts.spares_on_use`). Anything else: no wait, spares as usual."""
    wait, spares = 0.0, False
    for field in query.split(b"&"):
        name, _, value = field.partition(b"=")
        if name == b"wait":
            try:
                seconds = float(value)
            except ValueError:
                seconds = 0.0
            wait = min(seconds, MAX_HEALTH_WAIT) if seconds > 0 else 0.0  # NaN is not > 0
        elif name == b"spares":
            spares = value == b"on-use"
    return wait, spares


def _allow(verb: str, allowed: tuple[str, ...], path: str) -> None:
    if verb not in allowed:
        raise HttpError(405, f"method {verb} is not allowed on {path} (use {' or '.join(allowed)})")


async def _send_text(send: Send, status: int, message: str) -> None:
    await send_bytes(send, status, message.encode(), "text/plain; charset=utf-8")


async def _json_body(receive: Receive, limit: int) -> dict[str, Any]:
    raw = await read_body(receive, limit)
    if raw is None:
        raise HttpError(413, f"request body exceeds {limit} bytes")
    if not raw.strip():
        return {}
    try:
        body = await asyncio.to_thread(json.loads, raw) if len(raw) > PARSE_IN_THREAD else json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, f"'{name}' must be a string")
    return value


def _env_vars(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HttpError(400, "'env_vars' must be an object of strings")
    if len(value) > MAX_ENV_VARS:
        raise HttpError(400, f"'env_vars' has {len(value)} entries; at most {MAX_ENV_VARS}")
    for name, item in value.items():
        if not languages.valid_env_name(name):
            raise HttpError(
                400, f"env var name '{name}' is invalid: use letters, digits and _, not starting with a digit"
            )
        if not isinstance(item, str):
            raise HttpError(400, f"env var '{name}' must be a string")
        if "\0" in item:
            raise HttpError(400, f"env var '{name}' contains NUL")
        try:
            item.encode()
        except UnicodeEncodeError:
            raise HttpError(400, f"env var '{name}' is not valid Unicode") from None
    return dict(value)


def _with_cors(send: Send) -> Send:
    async def wrapped(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *raw_headers(CORS)]}
        await send(message)

    return wrapped
