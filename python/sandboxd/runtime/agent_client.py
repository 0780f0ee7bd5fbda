"""The runtime's one call to a sandbox's agent: ``POST /init`` with its access token, env vars and the
template's default user and workdir.

A new agent starts without a token (the zygote it was forked from never holds a secret) and nothing
but the agent runs in the sandbox yet, so this first ``/init`` is the one that sets it. The agent
binds its port a few milliseconds after the fork; the call is retried until then.

Requests go over a socket opened inside the sandbox's network namespace (``open_socket``), the same
way the proxy reaches it, so nothing is published on the host.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

from .errors import ApiError

AGENT_PORT = 49983
"""envd's port, where every sandbox's agent listens."""

READY_TIMEOUT_S = 10.0
"""How long a new agent may take to answer ``/init`` before the create fails (a loaded 2-core host
can take a second or two to schedule a fresh fork)."""

FIRST_RETRY_S = 0.002
MAX_RETRY_S = 0.05
"""Retry delays while the agent is not listening yet: it usually is within a few milliseconds, so
start small, and back off to a delay that costs nothing measurable."""

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
