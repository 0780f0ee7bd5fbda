"""The runtime's calls into a new sandbox: ``POST /init`` to its agent, with its access token, env vars
and the template's default user and workdir; and, in a code-interpreter sandbox, the interpreter's
ready check (``GET /health`` on port 49999, 200 once its Python kernel is warm).

A new agent starts without a token (the zygote it was forked from never holds a secret) and nothing
but the agent runs in the sandbox yet, so this first ``/init`` is the one that sets it. The zygote
binds the agent's port first thing in the new sandbox, before the agent's start-up, so the first
connect normally succeeds and ``/init`` waits in the backlog until the agent serves; a connect made
before that bind is refused and retried.

Requests go over a socket opened inside the sandbox's network namespace (``open_socket``), the same
way the proxy reaches it, so nothing is published on the host.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from sandboxd.interpreter import INTERPRETER_PORT

from .errors import ApiError

log = logging.getLogger("sandboxd.runtime")

AGENT_PORT = 49983
"""envd's port, where every sandbox's agent listens."""

READY_TIMEOUT_S = 10.0
"""How long a new agent may take to answer ``/init`` before the create fails (a loaded 2-core host
can take a second or two to schedule a fresh fork)."""

RETRY_S = 0.001
"""Between connects while a new agent is not listening yet, times the creates waiting (see
:class:`_Waiters`). A new agent starts listening 5-40 ms after its sandbox is set up (more on a
loaded host); doubling the delay from 2 ms (2, 4, 8, 16, 32 ms) found it ~10 ms later than this
does (measured from the agent's start, ``docs/benchmarks.md``)."""

MAX_RETRY_S = 0.05
"""The longest wait between two connects of one create."""


class _Waiters:
    """Creates polling for their agent right now. Each waits ``RETRY_S x waiters`` between connects,
    so one create alone polls every millisecond while a burst of a hundred polls at about the same
    total rate (each connect into a sandbox is a helper thread's ``setns`` and a system call), not a hundred
    times more."""

    count = 0

    @classmethod
    def delay(cls) -> float:
        return min(RETRY_S * max(cls.count, 1), MAX_RETRY_S)


INTERPRETER_READY_S = 30.0
"""How long a create waits for the code interpreter's Python kernel: it starts in 1-4 s on a 2-core
host, much longer only when the host is saturated. Past this the create returns anyway (under the
SDKs' 60 s request timeout), and the first ``runCode`` waits for the kernel instead."""

INTERPRETER_POLL_S = 0.05
"""Between connects while the interpreter does not listen yet (the first ~30 ms of a sandbox): its
kernel's start-up is ~0.5 s, so the first tries come sooner (:data:`INTERPRETER_FIRST_POLL_S`,
doubling up to this)."""

INTERPRETER_FIRST_POLL_S = 0.01

OpenSocket = Callable[[int], Awaitable[socket.socket]]


async def init_agent(
    open_socket: OpenSocket,
    access_token: str | None,
    env_vars: dict[str, str] | None,
    ca_bundle: str | None = None,
    default_user: str | None = None,
    default_workdir: str | None = None,
) -> socket.socket | None:
    """``POST /init`` until the agent answers; 204 is success, anything else fails the create.
    Returns the connection, idle and kept alive by the agent, for the caller to reuse (the proxy's
    first request into a new sandbox then needs no connect of its own: see :data:`KEEP_ALIVE_HEAD`),
    or None when the agent did not keep it.
    ``access_token`` and ``env_vars``: None leaves the agent's as they are (a warm sandbox's
    warm-up sets neither);
    ``ca_bundle``: PEM certificates for the sandbox's trust store (envd's ``caBundle``);
    ``default_user`` and ``default_workdir``: the template's (envd's ``defaultUser``, ``defaultWorkdir``)."""
    fields: dict[str, object] = {}
    if env_vars is not None:
        fields["envVars"] = env_vars
    if access_token is not None:
        fields["accessToken"] = access_token
    if ca_bundle:
        fields["caBundle"] = ca_bundle
    if default_user:
        fields["defaultUser"] = default_user
    if default_workdir:
        fields["defaultWorkdir"] = default_workdir
    body = json.dumps(fields).encode()
    head = (
        f"POST /init HTTP/1.1\r\nHost: sandbox\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + READY_TIMEOUT_S
    _Waiters.count += 1
    try:
        while True:
            try:
                sock = await open_socket(AGENT_PORT)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ApiError(500, f"the sandbox's agent did not start listening: {exc}") from None
                await asyncio.sleep(_Waiters.delay())
    finally:
        _Waiters.count -= 1
    try:
        answer = await asyncio.wait_for(_exchange(sock, head + body), max(deadline - time.monotonic(), 0.1))
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise ApiError(500, f"the sandbox's agent did not answer /init: {exc!r}") from None
    except BaseException:  # cancelled (the sandbox's init exited first, or the create was abandoned)
        sock.close()  # now, not at garbage collection: the socket holds the sandbox's network namespace
        raise
    status_line, _, rest = answer.partition(b"\r\n")
    if b" 204 " not in status_line:
        sock.close()
        raise ApiError(500, f"the sandbox's agent refused /init: {status_line.decode(errors='replace').strip()}")
    # Exactly one head (a 204 has no body): bytes after it, even ending as a head does, are more
    # than the agent was asked for. Or the agent closes its end.
    if answer.find(b"\r\n\r\n") != len(answer) - 4 or b"\r\nconnection: close\r\n" in b"\r\n" + rest.lower():
        sock.close()
        return None
    return sock


KEEP_ALIVE_HEAD = 16 << 10
"""The most of ``/init``'s answer read: a 204's head is ~100 bytes (no body). The connection is kept
for reuse only when exactly one whole head came: then nothing of it is left unread for the next
request to take as its answer. Reusing it saves the proxy's first request into a new sandbox its own
connect (a helper thread's ``setns``; measured as ~0.7 ms of the first command when connects ran in a
worker thread, ``docs/benchmarks.md``)."""


async def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on ``sock`` and read the answer's head (to its blank line, and whatever came
    with it); an answer cut short raises ``ConnectionError``, one longer than
    :data:`KEEP_ALIVE_HEAD` is returned cut (and so fails or is not kept)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_sendall(sock, request)
    answer = b""
    while b"\r\n\r\n" not in answer and len(answer) < KEEP_ALIVE_HEAD:
        chunk = await loop.sock_recv(sock, KEEP_ALIVE_HEAD)
        if not chunk:
            if answer:
                return answer  # a status line, then the end: judged by the caller
            raise ConnectionError("the agent closed the connection without an answer")
        answer += chunk
    return answer


async def interpreter_ready(open_socket: OpenSocket, sandbox_id: str, spares_on_use: bool = False) -> bool:
    """Wait for the code interpreter's ``GET /health`` to answer 200 (its Python kernel is warm) or
    :data:`INTERPRETER_READY_S` to pass; returns whether it did. Never fails the create: a sandbox
    whose kernel is slow still serves commands and files, and its first ``runCode`` waits.

    One request, ``?wait=S``, held by the interpreter until its kernel is ready: the create returns
    the moment it is, where polling every 50 ms lost 25 ms on average (and cost a connect into the
    sandbox each time). Connects are retried until the interpreter listens. ``spares_on_use``: have it
    start no spare kernel until the first cell or context (a warm sandbox, before it is pooled)."""
    deadline = time.monotonic() + INTERPRETER_READY_S
    pause = INTERPRETER_FIRST_POLL_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            sock = await open_socket(INTERPRETER_PORT)
        except OSError:
            await asyncio.sleep(pause)
            pause = min(pause * 2, INTERPRETER_POLL_S)
            continue
        query = f"wait={left:.3f}" + ("&spares=on-use" if spares_on_use else "")
        request = f"GET /health?{query} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), max(deadline - time.monotonic(), 0.1))
        except (OSError, TimeoutError, ValueError):  # ValueError: a line past the reader's 64 KiB limit
            status_line = b""
        finally:
            writer.close()
        if b" 200 " in status_line:
            return True
        await asyncio.sleep(INTERPRETER_POLL_S)  # a 503 after the wait, or a server still starting
    log.warning(
        "sandbox %s: the code interpreter's Python kernel is not ready after %.0f s; the first runCode waits for it",
        sandbox_id,
        INTERPRETER_READY_S,
        extra={"sandbox_id": sandbox_id, "event": "sandbox.interpreter_slow"},
    )
    return False


# ---------------------------------------------------------------------------------- build steps
# The template builder (:mod:`.template_builder`) runs its steps through a build sandbox's agent, as
# any client would: ``process.Process/Start`` (Connect, server-streaming, JSON envelopes) and
# ``POST /files``. Each call is one HTTP/1.1 request with ``Connection: close`` over a socket into
# the sandbox, so the runtime needs no HTTP client library and nothing is published on the host.

MAX_OUTPUT_LINE = 16 << 10
"""A build step's output line longer than this is cut (a step's log is for people, and bounded)."""

MAX_HEADERS = 100
"""Header lines accepted in an agent's answer (it sends a handful)."""

MAX_ENVELOPE = 4 << 20
"""The largest Connect envelope accepted from an agent: a sandbox is hostile, so its answers are bounded."""


@dataclass(slots=True)
class CommandResult:
    """How a command ended: its exit code (None when it was killed by a signal) and envd's status."""

    exit_code: int | None
    status: str


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


async def _request(
    open_socket: OpenSocket, head: str, body: bytes | AsyncIterator[bytes]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    sock = await open_socket(AGENT_PORT)
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_ENVELOPE)
    try:
        writer.write(head.encode())
        if isinstance(body, bytes):
            writer.write(body)
        else:
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise OSError(f"the agent answered {status_line[:100]!r}")
        chunked = False
        for _ in range(MAX_HEADERS):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        else:
            raise OSError(f"the agent sent more than {MAX_HEADERS} header lines")
        if chunked:
            reader = _dechunked(reader)
        return reader, writer, int(parts[1])
    except BaseException:
        writer.close()
        raise


def _dechunked(source: asyncio.StreamReader) -> asyncio.StreamReader:
    """A reader of the body of a chunked response, fed by a task that decodes the chunks."""
    out = asyncio.StreamReader(limit=MAX_ENVELOPE)

    async def pump() -> None:
        try:
            while True:
                size_line = await source.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                out.feed_data(await source.readexactly(size))
                await source.readexactly(2)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        out.feed_eof()

    task = asyncio.get_running_loop().create_task(pump())
    _PUMPS.add(task)
    task.add_done_callback(_PUMPS.discard)
    return out


_PUMPS: set[asyncio.Task[None]] = set()


async def run_command(
    open_socket: OpenSocket,
    access_token: str,
    command: str,
    user: str,
    cwd: str | None,
    envs: dict[str, str],
    on_line: Callable[[str, str], None],
    detach_tag: str | None = None,
) -> CommandResult:
    """Run ``/bin/bash -l -c command`` as ``user`` through the agent's ``process.Process/Start`` and
    call ``on_line(stream, line)`` for each line of its output (``stdout``/``stderr``) as it comes.
    With ``detach_tag``, return once it started (status ``started``), leaving it running with that tag."""
    process: dict[str, object] = {"cmd": "/bin/bash", "args": ["-l", "-c", command], "envs": envs}
    if cwd:
        process["cwd"] = cwd
    fields: dict[str, object] = {"process": process, "stdin": False}
    if detach_tag is not None:
        fields["tag"] = detach_tag
    message = json.dumps(fields).encode()
    body = struct.pack(">BI", 0, len(message)) + message
    head = (
        "POST /process.Process/Start HTTP/1.1\r\nHost: sandbox\r\n"
        "Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
        f"X-Access-Token: {access_token}\r\nAuthorization: {_basic(user)}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    reader, writer, status = await _request(open_socket, head, body)
    partial = {"stdout": b"", "stderr": b""}

    def emit(stream: str, data: bytes, final: bool = False) -> None:
        buffered = partial[stream] + data
        *lines, rest = buffered.split(b"\n")
        if final and rest:
            lines.append(rest)
            rest = b""
        for line in lines:
            on_line(stream, line[:MAX_OUTPUT_LINE].decode(errors="replace"))
        partial[stream] = rest[-MAX_OUTPUT_LINE:]

    try:
        if status != 200:
            raise OSError(f"the agent refused the command with HTTP {status}")
        while True:
            try:
                flags, length = struct.unpack(">BI", await reader.readexactly(5))
            except asyncio.IncompleteReadError:
                raise OSError("the agent ended the command's stream without an end event") from None
            if length > MAX_ENVELOPE:
                raise OSError(f"the agent sent a {length}-byte message")
            payload = json.loads(await reader.readexactly(length) or b"{}")
            if flags & 0x02:
                error = payload.get("error") if isinstance(payload, dict) else None
                detail = error.get("message") if isinstance(error, dict) else None
                raise OSError(f"the command could not run: {detail or 'its stream ended without an end event'}")
            event = payload.get("event") if isinstance(payload, dict) else None
            if not isinstance(event, dict):
                continue  # a keepalive, or nothing an agent sends
            if detach_tag is not None and isinstance(event.get("start"), dict):
                return CommandResult(None, "started")
            data = event.get("data")
            if isinstance(data, dict):
                for stream in ("stdout", "stderr"):
                    if isinstance(data.get(stream), str):
                        emit(stream, base64.b64decode(data[stream]))
            end = event.get("end")
            if isinstance(end, dict):
                emit("stdout", b"", final=True)
                emit("stderr", b"", final=True)
                exited = end.get("exited", False)
                code = end.get("exitCode", 0) if exited else None
                return CommandResult(int(code) if isinstance(code, int) else None, str(end.get("status", "")))
    finally:
        writer.close()


async def upload_file(
    open_socket: OpenSocket, access_token: str, path: str, chunks: AsyncIterator[bytes], size: int
) -> None:
    """Write a file in the sandbox as root through the agent's ``POST /files`` (raw bytes)."""
    head = (
        f"POST /files?path={quote(path)}&username=root HTTP/1.1\r\nHost: sandbox\r\n"
        f"Content-Type: application/octet-stream\r\nX-Access-Token: {access_token}\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    reader, writer, status = await _request(open_socket, head, chunks)
    try:
        if status != 200:
            detail = (await reader.read(4096)).decode(errors="replace")
            raise OSError(f"the agent refused the upload of {path} with HTTP {status}: {detail[:300]}")
    finally:
        writer.close()


READY_CHECK_S = 45.0
"""How long a create waits for a template's ready command to succeed: under the SDKs' 60 s request
timeout, so the user reads why instead of a timeout."""

READY_POLL_S = 0.2
"""Between runs of the ready command (E2B's helpers are quick probes: ``ss``, ``curl``, ``test -f``)."""


async def start_template_command(
    open_socket: OpenSocket,
    access_token: str,
    start_cmd: str | None,
    ready_cmd: str | None,
    user: str,
    cwd: str | None,
    envs: dict[str, str],
) -> None:
    """A built template's ``set_start_cmd``: start the command (it keeps running, tagged ``start_cmd``),
    then run the ready command until it exits 0; 500 naming both if that does not happen in
    :data:`READY_CHECK_S` (or the start command could not start)."""

    def ignore(stream: str, line: str) -> None:
        del stream, line

    try:
        if start_cmd:
            await run_command(open_socket, access_token, start_cmd, user, cwd, envs, ignore, detach_tag="start_cmd")
        if not ready_cmd:
            return
        deadline = time.monotonic() + READY_CHECK_S
        while True:
            result = await run_command(open_socket, access_token, ready_cmd, user, cwd, envs, ignore)
            if result.exit_code == 0:
                return
            if time.monotonic() > deadline:
                raise ApiError(
                    500,
                    f"the template's ready command {ready_cmd[:200]!r} did not succeed within {READY_CHECK_S:.0f}s "
                    f"of its start command {str(start_cmd)[:200]!r} (last: {result.status or 'an error'})",
                )
            await asyncio.sleep(READY_POLL_S)
    except (OSError, ValueError) as exc:  # ValueError: an answer that is not what an agent sends
        raise ApiError(500, f"the template's start command {str(start_cmd)[:200]!r} could not run: {exc}") from None
