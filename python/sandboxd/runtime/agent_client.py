"""The runtime's calls into a new sandbox: ``POST /init`` to its agent, with its access token, env vars
and the template's default user and workdir; and, in a code-interpreter sandbox, the interpreter's
ready check (``GET /health`` on port 49999, 200 once its Python kernel is warm).

A new agent starts without a token (the zygote it was forked from never holds a secret) and nothing
but the agent runs in the sandbox yet, so this first ``/init`` is the one that sets it. The agent
binds its port a few milliseconds after the fork; the call is retried until then.

Requests go over a socket opened inside the sandbox's network namespace (``open_socket``), the same
way the proxy reaches it, so nothing is published on the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from sandboxd.interpreter import INTERPRETER_PORT

from .errors import ApiError

log = logging.getLogger("sandboxd.runtime")

AGENT_PORT = 49983
"""envd's port, where every sandbox's agent listens."""

READY_TIMEOUT_S = 10.0
"""How long a new agent may take to answer ``/init`` before the create fails (a loaded 2-core host
can take a second or two to schedule a fresh fork)."""

FIRST_RETRY_S = 0.002
MAX_RETRY_S = 0.05
"""Retry delays while the agent is not listening yet: it usually is within a few milliseconds, so
start small, and back off to a delay that costs nothing measurable."""

INTERPRETER_READY_S = 30.0
"""How long a create waits for the code interpreter's Python kernel: it starts in 1-4 s on a 2-core
host, much longer only when the host is saturated. Past this the create returns anyway (under the
SDKs' 60 s request timeout), and the first ``runCode`` waits for the kernel instead."""

INTERPRETER_POLL_S = 0.05
"""Between ready checks: the kernel's start-up is seconds, so 50 ms adds at most that to a create."""

OpenSocket = Callable[[int], Awaitable[socket.socket]]


async def init_agent(
    open_socket: OpenSocket,
    access_token: str,
    env_vars: dict[str, str],
    ca_bundle: str | None = None,
    default_user: str | None = None,
    default_workdir: str | None = None,
) -> None:
    """``POST /init`` until the agent answers; 204 is success, anything else fails the create.
    ``ca_bundle``: PEM certificates for the sandbox's trust store (envd's ``caBundle``);
    ``default_user`` and ``default_workdir``: the template's (envd's ``defaultUser``, ``defaultWorkdir``)."""
    fields: dict[str, object] = {"envVars": env_vars, "accessToken": access_token}
    if ca_bundle:
        fields["caBundle"] = ca_bundle
    if default_user:
        fields["defaultUser"] = default_user
    if default_workdir:
        fields["defaultWorkdir"] = default_workdir
    body = json.dumps(fields).encode()
    head = (
        "POST /init HTTP/1.1\r\nHost: sandbox\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + READY_TIMEOUT_S
    delay = FIRST_RETRY_S
    while True:
        try:
            sock = await open_socket(AGENT_PORT)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ApiError(500, f"the sandbox's agent did not start listening: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
            continue
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(head + body)
            status_line = await asyncio.wait_for(reader.readline(), max(deadline - time.monotonic(), 0.1))
        except (OSError, TimeoutError) as exc:
            raise ApiError(500, f"the sandbox's agent did not answer /init: {exc!r}") from None
        finally:
            writer.close()
        if b" 204 " not in status_line:
            raise ApiError(500, f"the sandbox's agent refused /init: {status_line.decode(errors='replace').strip()}")
        return


async def interpreter_ready(open_socket: OpenSocket, sandbox_id: str) -> bool:
    """Poll the code interpreter's ``GET /health`` until it answers 200 (its Python kernel is warm)
    or :data:`INTERPRETER_READY_S` passes; returns whether it did. Never fails the create: a sandbox
    whose kernel is slow still serves commands and files, and its first ``runCode`` waits."""
    request = b"GET /health HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + INTERPRETER_READY_S
    while time.monotonic() < deadline:
        try:
            sock = await open_socket(INTERPRETER_PORT)
        except OSError:
            await asyncio.sleep(INTERPRETER_POLL_S)
            continue
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), max(deadline - time.monotonic(), 0.1))
        except (OSError, TimeoutError):
            status_line = b""
        finally:
            writer.close()
        if b" 200 " in status_line:
            return True
        await asyncio.sleep(INTERPRETER_POLL_S)
    log.warning(
        "sandbox %s: the code interpreter's Python kernel is not ready after %.0f s; the first runCode waits for it",
        sandbox_id,
        INTERPRETER_READY_S,
        extra={"sandbox_id": sandbox_id, "event": "sandbox.interpreter_slow"},
    )
    return False
