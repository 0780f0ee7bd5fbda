"""The runtime's side of the zygote (:mod:`.zygote`): sends create requests, matches the answers, and
keeps a zygote running.

The zygote is a separate process that forks every sandbox's agent. If it dies (killed, OOM, a bug),
every create would fail, so this client supervises it: the end of its socket is noticed at once, the
creates waiting on it fail with a 503 that says why, and a new zygote is started after a short,
growing delay. While none is up, :attr:`ZygoteClient.down_reason` says why, for ``/health`` and
``/ready``, and creates answer 503 at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
from collections.abc import Callable
from typing import Any

from .errors import ApiError
from .zygote import MAX_MESSAGE

log = logging.getLogger("sandboxd.runtime")

RESTART_DELAYS_S = (0.0, 0.2, 1.0, 5.0)
"""Waits before successive restarts of a zygote that keeps dying: at once the first time (a one-off
kill), then backing off so a zygote that cannot start does not spin a core."""

HEALTHY_AFTER_S = 30.0
"""A zygote that stayed up this long resets the back-off: its death is a new, unrelated event."""


class ZygoteClient:
    """One zygote process at a time, restarted when it dies; creates are matched by sandbox id."""

    def __init__(self, start: Callable[[], tuple[socket.socket, subprocess.Popen[bytes]]]) -> None:
        self._start = start
        self._sock: socket.socket | None = None
        self._send_lock = asyncio.Lock()
        """Serialises writes to the socket (one SOCK_SEQPACKET message per request)."""
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self.down_reason: str | None = "the zygote has not started yet"
        """None while a zygote is up; otherwise why creates cannot be served."""
        self.restarts = 0
        """Zygotes started after the first (for operators' metrics)."""

    async def start(self) -> None:
        """Start the first zygote and its supervisor."""
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        await self._up.wait()

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._sock is not None:
            self._sock.close()  # the zygote exits when its end of the socket closes
            self._sock = None

    def check_up(self) -> None:
        """Raise the 503 a create gets while no zygote is up, so callers can refuse before they
        reserve anything (an id range, a disk, a network slot)."""
        if self._sock is None or self.down_reason is not None:
            raise ApiError(503, f"cannot create sandboxes right now: {self.down_reason}; retry in a moment")

    async def create(self, request: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        """Ask for a sandbox; the answer is ``{"id", "ok", "init_pid"}`` or ``{"id", "ok": False, "error"}``.
        ``fds`` travel with the request (``SCM_RIGHTS``); the caller keeps and closes its own copies.

        Raises a 503 :class:`ApiError` when no zygote is up or it dies before answering, a 400 for a
        request the zygote could not read whole (:func:`encode`)."""
        self.check_up()
        data = encode(request)
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[request["id"]] = answer
        try:
            async with self._send_lock:
                await _send(sock, data, fds or [])
            return await answer
        except OSError as exc:  # the zygote died between our check and the send
            raise ApiError(503, f"cannot create sandboxes right now: the zygote died ({exc}); retry") from None
        finally:
            self._waiting.pop(request["id"], None)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                sock, process = await asyncio.to_thread(self._start)
            except OSError as exc:
                self.down_reason = f"the zygote could not be started: {exc}"
                log.error("%s", self.down_reason, extra={"event": "zygote.start_failed"})
                failures += 1
                await asyncio.sleep(RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)])
                continue
            sock.setblocking(False)
            self._sock = sock
            self.down_reason = None
            if self.restarts:
                log.info("zygote restarted (pid %d)", process.pid, extra={"event": "zygote.restarted"})
            self._up.set()
            started = loop.time()
            reason = await self._read_answers(sock)
            self.down_reason = f"the zygote exited ({reason}) and is being restarted"
            self._sock = None
            sock.close()
            status = await asyncio.to_thread(_reap, process)
            self.down_reason = f"the zygote exited ({reason}; exit status {status}) and is being restarted"
            log.error("%s", self.down_reason, extra={"event": "zygote.exited"})
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ApiError(503, f"the sandbox could not be created: {self.down_reason}"))
            failures = 1 if loop.time() - started > HEALTHY_AFTER_S else failures + 1
            await asyncio.sleep(RESTART_DELAYS_S[min(failures - 1, len(RESTART_DELAYS_S) - 1)])
            self.restarts += 1

    async def _read_answers(self, sock: socket.socket) -> str:
        """Deliver answers until the zygote's end closes; returns why it stopped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(sock, MAX_MESSAGE)
            except OSError as exc:
                return str(exc)
            if not data:
                return "its socket closed"
            try:
                answer = json.loads(data)
            except ValueError:
                log.error("the zygote sent a malformed answer: %r", data[:200])
                continue
            pending = self._waiting.get(answer.get("id"))
            if pending is not None and not pending.done():
                pending.set_result(answer)


def encode(request: dict[str, Any]) -> bytes:
    """A request as the zygote reads it: JSON in UTF-8 (not ``\\u`` escapes, 6 or 12 bytes a
    character), of at most :data:`.zygote.MAX_MESSAGE` bytes; a 400 otherwise.

    The zygote receives at most that much (``SOCK_SEQPACKET`` cuts a longer message), and a request it
    cannot read is the end of it, with every create in flight: a sandbox's 16 volume mount paths of
    1,024 characters each (the API's limits) are ~98 KiB escaped when they are not ASCII, and were
    one create request's way to restart the zygote (``docs/security.md``, ``review6``)."""
    try:
        data = json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: not a path the jail would take anyway
        raise ApiError(400, "the sandbox's settings are not valid UTF-8") from None
    if len(data) > MAX_MESSAGE:
        raise ApiError(
            400,
            f"the sandbox's settings take {len(data)} bytes, more than the {MAX_MESSAGE} a create can carry:"
            " use shorter volume mount paths",
        )
    return data


async def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One SOCK_SEQPACKET message with descriptors attached, waiting while the socket is full."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except BlockingIOError:
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), _resolve, writable)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reap(process: subprocess.Popen[bytes]) -> int:
    """Collect an exited zygote (it is our child); one whose socket broke but that lives on is killed."""
    try:
        return process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
