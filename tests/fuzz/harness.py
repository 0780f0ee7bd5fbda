"""Drive an ASGI application in process with generated HTTP requests, and check that whatever arrives
it answers like a server should: a complete response, no 5xx, no traceback, within a time bound, and
without leaving the app broken for the next request.

A fuzz target is a :class:`Target`: a factory for the app and a hypothesis strategy of
:class:`Request`. The agent's is in ``fuzz_agent.py``; the runtime's can be added beside it the
same way (its app from ``sandboxd.runtime.server.RuntimeApp``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings

RESPONSE_TIMEOUT_S = 10.0
"""How long one request may take, its body sent and the client gone: every handler must finish."""

STREAM_LINGER_S = 0.05
"""How long the fake client stays after sending a streaming request, before it disconnects."""


@dataclass
class Request:
    """One generated HTTP request."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    """The body as the chunks the server receives."""


@dataclass
class Response:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


ALLOWED_5XX = {501, 507}
"""5xx answers that are not failures: 501 ``unimplemented`` is what the Connect protocol prescribes for
a compression or call shape it does not serve; 507 is a full disk."""


class Broken(AssertionError):
    """The app answered a request in a way no input may cause."""


async def drive(app: Callable[..., Any], request: Request) -> Response:
    """Sends ``request`` to ``app`` as uvicorn would (the body in its chunks, then a disconnect once
    the body is sent and a response started or the linger passed) and returns what it answered."""
    response = Response()
    pending = [*request.body] or [b""]
    disconnected = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.sleep(STREAM_LINGER_S)
        disconnected.set()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if response.status is not None:
                raise Broken("http.response.start sent twice")
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            if response.status is None:
                raise Broken("body sent before http.response.start")
            if response.complete:
                raise Broken("body sent after the response was complete")
            response.body += message.get("body", b"")
            if not message.get("more_body", False):
                response.complete = True

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8", "surrogateescape"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 49983),
        "state": {},
    }
    async with asyncio.timeout(RESPONSE_TIMEOUT_S):
        await app(scope, receive, send)
    return response


def check(request: Request, response: Response, disconnect_ok: bool = True) -> None:
    """The invariants every answer keeps."""
    if response.status is None:
        raise Broken(f"no response to {request.method} {request.path}")
    deadline_passed = response.status == 504 and any(k.lower() == b"connect-timeout-ms" for k, _ in request.headers)
    if response.status >= 500 and response.status not in ALLOWED_5XX and not deadline_passed:
        # 504 is Connect's deadline_exceeded: right when the request set its own deadline (a busy
        # machine lets a 1 ms one pass before the answer), a defect otherwise.
        raise Broken(f"{response.status} for {request.method} {request.path}: {bytes(response.body[:500])!r}")
    if b"Traceback" in response.body:
        raise Broken(f"a traceback in the answer to {request.method} {request.path}")
    if not response.complete and not disconnect_ok:
        raise Broken(f"incomplete response to {request.method} {request.path}")


@dataclass
class Target:
    """One app to fuzz."""

    name: str
    make_app: Callable[[], Callable[..., Any]]
    healthy: Request
    """A request that must answer 2xx after any fuzzed one (the app is not left broken)."""


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
"""Examples per fuzz test: 400 keeps ``make fuzz`` under a minute; set ``FUZZ_EXAMPLES`` for a long run."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None if os.environ.get("CI") else settings.default.database,
)
"""The settings of every fuzz test: no deadline (a request may start real work), no example
database in CI (a clean clone starts from nothing)."""
