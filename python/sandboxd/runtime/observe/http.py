"""Per-request observation for the runtime's port: a request id, a counter by status, proxied bytes,
and one log line per failed request.

The runtime's own answers (control plane, probes, metrics) are logged when their status is 400 or
more, or when no response started (a 5xx as a warning, which ``sandboxd status`` lists among the last
errors); they carry an ``X-Request-Id`` header that matches the log line. Proxied requests are the
sandbox's conversation with its client: a 404 from a web server inside a sandbox is not the runtime
failing, so only 5xx (the runtime's 502 for a sandbox that is gone, or a sandbox's own server error)
and aborted exchanges are logged, at info level; every status is counted. Neither the
query string (signed URLs carry their signature there) nor any header is ever logged.

Cost per request: two closures, a dict increment (:class:`.metrics.RequestCounts`), a request id from
a process-wide sequence (no randomness, no syscall). Body bytes are summed in a local and added once
at the end.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from sandboxd.agent.asgi import Message, Receive, Scope, Send, send_json

from .logs import REQUEST_ID
from .metrics import RuntimeMetrics

log = logging.getLogger("sandboxd.runtime.http")

MAX_LOGGED_PATH = 200
"""Characters of a request path kept in a log line: enough for any real route, bounded for hostile ones."""

MAX_ERROR_MESSAGE = 1000
"""Characters of an unexpected exception's text sent to the client: enough for any OS error and the
step that failed, bounded whatever the exception carries."""

_SANDBOX_PATH = re.compile(r"/(?:v2/)?sandboxes/([a-z0-9]{1,64})(?:/|$)")

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Proxy = Callable[[Scope, Receive, Send, str, int], Awaitable[None]]

SPLICED_BYTES = "sandboxd.spliced_bytes"
"""Under this key of a proxied request's ``scope["extensions"]``: ``[request, response]`` body bytes
the proxy moved with ``splice(2)``, past ``receive`` and ``send`` (:mod:`..proxy`), counted here too."""


class RequestObserver:
    """Wraps the runtime's handlers; one instance per runtime."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self.metrics = metrics
        self._prefix = secrets.token_hex(4)
        self._sequence = itertools.count(1)
        self.counts = metrics.requests

    def _request_id(self) -> str:
        return f"{self._prefix}-{next(self._sequence):x}"

    async def runtime(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a request the runtime answers itself."""
        request_id = self._request_id()
        header = (b"x-request-id", request_id.encode())
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        started = time.monotonic()
        try:
            await app(scope, receive, observed_send)
        except Exception as exc:
            if status:
                raise  # mid-answer: the server can only drop the connection
            await _internal_error(observed_send, request_id, exc)
        finally:
            api = self.counts.api
            api[status] = api.get(status, 0) + 1
            if status >= 400 or status == 0:
                match = _SANDBOX_PATH.match(scope["path"])
                level = logging.WARNING if status >= 500 else logging.INFO  # an abort is a client that left
                _failed(scope, status, started, match.group(1) if match else None, level)
            REQUEST_ID.reset(token)

    async def proxied(
        self, proxy: Proxy, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int
    ) -> None:
        """Serve a request for a port inside a sandbox, counting its bytes both ways."""
        status = 0
        received = sent = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        spliced = [0, 0]
        scope.setdefault("extensions", {})[SPLICED_BYTES] = spliced
        request_id = self._request_id()
        token = REQUEST_ID.set(request_id)
        started = time.monotonic()
        try:
            await proxy(scope, counted_receive, counted_send, sandbox_id, port)
        except Exception as exc:
            if status:
                raise
            await _internal_error(counted_send, request_id, exc)
        finally:
            counts = self.counts
            statuses = counts.proxy  # keys: the status codes the HTTP parser accepts (0-999) at most
            statuses[status] = statuses.get(status, 0) + 1
            counts.request_bytes += received + spliced[0]
            counts.response_bytes += sent + spliced[1]
            if status >= 500 or status == 0:
                _failed(scope, status, started, sandbox_id, logging.INFO, port=port)
            REQUEST_ID.reset(token)


async def _internal_error(send: Send, request_id: str, exc: Exception) -> None:
    """A failure no handler turned into an answer, before any response started: still E2B's JSON
    error shape (the SDKs parse it) with the cause, never the server's plain-text 500; the traceback
    goes to the log only, under the request id."""
    log.error("request %s failed", request_id, exc_info=exc)
    message = f"internal error of the runtime (request {request_id}): {exc}"[:MAX_ERROR_MESSAGE]
    await send_json(send, 500, {"code": 500, "message": message})


def _failed(scope: Scope, status: int, started: float, sandbox_id: str | None, level: int, **fields: object) -> None:
    path = scope["path"][:MAX_LOGGED_PATH]
    outcome = f"answered {status}" if status else "aborted before a response"
    log.log(
        level,
        f"{scope['method']} {path} {outcome}",
        extra={
            "event": "request.failed",
            "sandbox_id": sandbox_id,
            "method": scope["method"],
            "path": path,
            "status": status,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            **fields,
        },
    )
