"""One Jupyter kernel: its process, started, interrupted, restarted and stopped with
``jupyter_client``'s ``AsyncKernelManager``, and a *pump* thread that owns its ZeroMQ sockets.

Jupyter's wire protocol (messaging spec 5.x): the server sends ``execute_request`` on the *shell*
channel; the kernel publishes on *iopub* what the cell does (``status`` busy/idle,
``execute_input``, ``stream``, ``display_data``, ``execute_result``, ``error``), every message
carrying the request's id as its parent, and answers ``execute_reply`` on shell. A cell is over
when both its ``execute_reply`` and its ``status: idle`` have arrived, in either order (Deno's
kernel replies before it publishes the cell's output).

Why a thread: the pump receives, checks (HMAC), decodes and re-encodes every message, work that
grows with what the code prints or plots (a 100 MB print, a 5 MB PNG). It does all of that off the
event loop, which only moves finished lines to the HTTP response. ZeroMQ sockets are not
thread-safe, so the pump owns them all and takes commands through a queue and a wake-up pipe.

Flow control: iopub is a PUB socket that drops messages when its reader falls behind, so the pump
always reads, and the kernel is slowed down instead: its process group is stopped (SIGSTOP) while
``HIGH_WATER`` bytes wait for a slow client (continued below ``LOW_WATER``), and while the pump
itself is ``BACKLOG_LIMIT`` bytes behind (ZeroMQ queues what a fast kernel sends, unseen, in our
memory). Memory stays bounded and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from . import wire
from .languages import BARRIER_MSG_TYPE, KernelCommand

log = logging.getLogger("sandboxd.interpreter")

STARTUP_TIMEOUT = 120.0
"""Seconds a kernel may take to answer its first request. ipykernel answers in ~1 s here, 3.5 s on
this 2-core VM during a parallel build; a template's start-up files can add more."""

HANDSHAKE_RETRY_MS = 200
"""Between ``kernel_info_request``s while the iopub subscription is not yet live (ZeroMQ drops what
a PUB socket publishes before a subscriber has joined)."""

HIGH_WATER = 32 << 20
"""Bytes of one execution's output waiting for a slow client before its kernel is paused."""

LOW_WATER = 8 << 20
"""Bytes still waiting when a paused kernel is continued."""

BACKLOG_LIMIT = 16 << 20
"""Bytes the pump may read from iopub in one streak, without ever finding it empty, before it stops the
kernel to catch up: a kernel printing in a loop outpaces the decoding (~0.2-0.8 GB/s here)."""

DRAIN_BATCH = 64
"""Messages read from one socket before the pump looks at its other sockets and commands again."""

SEND_SIZE = 1 << 20
"""The most handed to the HTTP server in one write: it buffers a whole write before it applies
backpressure, so bigger writes would move the waiting output out of our accounting."""

STDERR_TAIL = 16 << 10
"""The last bytes a kernel wrote to its own stdout/stderr, kept to explain a kernel that died."""

SHUTDOWN_WAIT = 1.0
"""Seconds a removed kernel gets to exit after ``shutdown_request`` before it is killed."""


class KernelError(Exception):
    """A kernel that could not start, or died."""


def _exit_description(status: int | None) -> str:
    if status is None:
        return "exited"
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else str(-status)
        hint = " (out of memory?)" if -status == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {status}"


class _OneSpec(KernelSpecManager):
    """Hands ``AsyncKernelManager`` the kernelspec we resolved, whatever name it asks for."""

    def __init__(self, spec: KernelSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


class Execution:
    """One cell's output lines, produced by the pump thread and consumed on the event loop.

    The pump only appends (``deque.append`` is atomic) and counts what it produced; the consumer
    only pops and counts what it took: each counter has one writer, so no lock is needed."""

    def __init__(self, kernel: Kernel, code: str, silent: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.kernel = kernel
        self.code = code
        self.silent = silent
        self.msg_id = ""
        self.error: tuple[str, str] | None = None
        """``(name, value)`` of the first error, for silent executions that the server runs itself."""
        self._lines: deque[bytes | None] = deque()
        self._produced = 0
        self._consumed = 0
        self._signalled = False
        self._wake = asyncio.Event()
        self._loop = loop
        self._stop = False
        self.finished = False

    # -- pump side (thread) -------------------------------------------------------------------

    def _push(self, data: bytes | None) -> None:
        self._lines.append(data)
        if data is not None:
            self._produced += len(data)
            if not self.silent and self._produced - self._consumed > HIGH_WATER:
                self.kernel._hold("client", True)
        if not self._signalled:
            self._signalled = True
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- event loop side ----------------------------------------------------------------------

    async def chunks(self, keepalive: float | None = None) -> AsyncIterator[bytes]:
        """The output as it comes, in pieces of at most ``SEND_SIZE`` bytes (several lines joined, or
        a slice of a long one), until the execution ends. The caller awaits each piece's write, so
        what waits for a slow client stays here, counted, and pauses the kernel past ``HIGH_WATER``.

        With ``keepalive``, a keepalive line is yielded after that many quiet seconds."""
        while True:
            if self._stop:
                self._stop = False
                return
            self._signalled = False
            self._wake.clear()
            batch: list[bytes] = []
            size = 0
            while self._lines:
                item = self._lines.popleft()
                if item is None:
                    if batch:
                        yield self._took(b"".join(batch))
                    self.finished = True
                    return
                if len(item) > SEND_SIZE:
                    if batch:
                        yield self._took(b"".join(batch))
                        batch, size = [], 0
                    view = memoryview(item)
                    for start in range(0, len(item), SEND_SIZE):
                        yield self._took(bytes(view[start : start + SEND_SIZE]))
                    continue
                batch.append(item)
                size += len(item)
                if size >= SEND_SIZE:
                    yield self._took(b"".join(batch))
                    batch, size = [], 0
            if batch:
                yield self._took(b"".join(batch))
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), keepalive)
            except TimeoutError:
                yield wire.KEEPALIVE

    def _took(self, piece: bytes) -> bytes:
        self._consumed += len(piece)
        if self._produced - self._consumed < LOW_WATER:
            self.kernel._hold("client", False)
        return piece

    def stop_streaming(self) -> None:
        """Make the current :meth:`chunks` iteration return now (its reader left)."""
        self._stop = True
        self._wake.set()

    async def wait(self) -> None:
        """Drain and drop the output until the execution ends (silent and abandoned executions)."""
        self._stop = False
        async for _ in self.chunks():
            pass


class Kernel:
    """A kernel process and its pump. Methods are called on the event loop."""

    def __init__(
        self,
        command: KernelCommand,
        cwd: str,
        env: dict[str, str],
        runtime_dir: Path,
        on_death: Callable[[Kernel], None] | None = None,
    ) -> None:
        self.command = command
        self.cwd = cwd
        self.id = uuid.uuid4().hex
        self.on_death = on_death
        spec = KernelSpec(
            argv=list(command.argv),
            display_name=command.display_name,
            language=command.language,
            interrupt_mode=command.interrupt_mode,
            env={},
            resource_dir=command.resource_dir,
        )
        self.manager = AsyncKernelManager(
            kernel_name="sandboxd", kernel_spec_manager=_OneSpec(spec), shutdown_wait_time=SHUTDOWN_WAIT
        )
        self.manager.connection_file = str(runtime_dir / f"kernel-{self.id}.json")
        self._env = {**env, **command.env}
        self._ready: asyncio.Future[None] | None = None
        self._pump: _Pump | None = None
        self._stderr_r, self._stderr_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._stderr_r, False)
        self._flow = threading.Lock()
        self._pgid: int | None = None
        self._holds: set[str] = set()
        """Why the kernel is stopped now ("client", "pump"); guarded by ``_flow``."""
        self.alive = False

    @property
    def language(self) -> str:
        return self.command.language

    @property
    def pid(self) -> int | None:
        process = getattr(self.manager.provisioner, "process", None)
        return getattr(process, "pid", None)

    async def start(self) -> None:
        """Launch the process and wait until it answers and ran its setup cell."""
        loop = asyncio.get_running_loop()
        await self.manager.start_kernel(
            cwd=self.cwd, env=self._env, stdin=subprocess.DEVNULL, stdout=self._stderr_w, stderr=self._stderr_w
        )
        info = self.manager.get_connection_info()
        self._pump = _Pump(self, info, loop)
        self._pump.start()
        await self._attach()

    async def _attach(self) -> None:
        """Point the pump at the (re)started process and wait for the kernel to be ready."""
        assert self._pump is not None
        pid = self.pid
        if pid is None:
            raise KernelError(f"the {self.language} kernel did not start")
        pidfd = os.pidfd_open(pid)
        with self._flow:
            self._pgid = pid  # launched with start_new_session: the kernel leads its process group
            self._holds.clear()
        self.alive = True
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        setup = Execution(self, self.command.init_code, True, loop) if self.command.init_code else None
        self._pump.command("attach", pidfd, self._ready, setup)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), STARTUP_TIMEOUT)
        except TimeoutError:
            tail = self.stderr_tail()
            await self._kill()
            raise KernelError(
                f"the {self.language} kernel did not answer within {STARTUP_TIMEOUT:.0f} s"
                + (f": {tail}" if tail else "")
            ) from None

    def stderr_tail(self) -> str:
        return self._pump.stderr_tail() if self._pump else ""

    @property
    def pump_alive(self) -> bool:
        return self._pump is not None and self._pump.is_alive()

    def execute(self, code: str, silent: bool = False) -> Execution:
        """Send a cell; its output arrives on the returned :class:`Execution`."""
        execution = Execution(self, code, silent, asyncio.get_running_loop())
        if self._pump is not None and self._pump.is_alive():
            self._pump.command("execute", execution)
        else:  # the pump failed (a bug): say so instead of waiting forever
            if silent:
                execution.error = ("InterpreterError", "this kernel's message pump stopped")
            else:
                execution._push(wire.error("InterpreterError", "this kernel's message pump stopped", ""))
                execution._push(wire.END_OF_EXECUTION)
            execution._push(None)
        return execution

    async def run_silent(self, code: str) -> tuple[str, str] | None:
        """Run server-side code (env vars, working directory) without output or history; its error."""
        execution = self.execute(code, silent=True)
        await execution.wait()
        return execution.error

    async def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT, or ``interrupt_request`` for kernels that need it)."""
        self._release()
        if self.alive:
            with contextlib.suppress(RuntimeError, OSError):
                await self.manager.interrupt_kernel()

    async def restart(self, reason: bytes | None) -> None:
        """A fresh process for the same context; the running cell ends with ``reason``."""
        assert self._pump is not None
        await self._detach(reason)
        await self.manager.restart_kernel(now=True)
        await self._attach()

    async def shutdown(self) -> None:
        """Stop the kernel (``shutdown_request``, then kill) and the pump."""
        if self._pump is not None:
            await self._detach(wire.error("ContextRemoved", "The context was removed", ""))
        with contextlib.suppress(RuntimeError, OSError):
            if self.manager.has_kernel:
                await self.manager.shutdown_kernel(now=False)
        with contextlib.suppress(OSError):
            self.manager.cleanup_resources()
        if self._pump is not None:
            self._pump.command("stop")
            await asyncio.to_thread(self._pump.join)
        for fd in (self._stderr_r, self._stderr_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _kill(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            await self.manager.shutdown_kernel(now=True)

    async def _detach(self, reason: bytes | None) -> None:
        """Stop watching the current process (its exit is expected now) and end the running cell."""
        assert self._pump is not None
        self._release()
        self.alive = False
        if not self._pump.is_alive():
            return
        done = asyncio.get_running_loop().create_future()
        self._pump.command("detach", reason, done)
        await done

    def _died(self) -> None:
        """Called on the event loop when the process exited on its own."""
        self.alive = False
        if self.on_death is not None:
            self.on_death(self)

    # -- flow control (either thread) ---------------------------------------------------------

    def _hold(self, reason: str, on: bool) -> None:
        """Stop the kernel's process group while any reason holds it; continue it when none does."""
        with self._flow:
            before = bool(self._holds)
            if on:
                self._holds.add(reason)
            else:
                self._holds.discard(reason)
            if before != bool(self._holds) and self._pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pgid, signal.SIGSTOP if self._holds else signal.SIGCONT)

    def _release(self) -> None:
        """Continue the kernel whatever held it (before an interrupt, a restart or a shutdown)."""
        with self._flow:
            if self._holds and self._pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pgid, signal.SIGCONT)
            self._holds.clear()


class _Pump(threading.Thread):
    """Owns the kernel's shell and iopub sockets; turns its messages into :mod:`wire` lines."""

    def __init__(self, kernel: Kernel, info: Mapping[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name=f"interp-{kernel.language}-{kernel.id[:8]}", daemon=True)
        self.kernel = kernel
        self.loop = loop
        self.info = info
        self.session = Session(
            key=info["key"] if isinstance(info["key"], bytes) else info["key"].encode(),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            username="sandboxd",
        )
        self._commands: deque[tuple[Any, ...]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stderr: bytearray = bytearray()
        self._stderr_lock = threading.Lock()
        # Owned by the pump thread:
        self._pidfd: int | None = None
        self._ready: asyncio.Future[None] | None = None
        self._handshake: set[str] = set()
        self._got_reply = False
        self._got_iopub = False
        self._setup: Execution | None = None
        """The setup cell to run once the handshake is done; then the kernel is ready."""
        self._attached = False
        self._current: Execution | None = None
        self._idle = False
        self._replied = False
        self._errored = False
        self._streak = 0
        """Bytes read from iopub since it was last found empty."""
        self._shell: zmq.Socket[bytes] | None = None
        self._barrier: str | None = None
        """The id of the barrier cell sent after ``_current`` (see ``KernelCommand.barrier_code``)."""

    # -- called from the event loop -----------------------------------------------------------

    def command(self, *item: Any) -> None:
        self._commands.append(item)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def stderr_tail(self) -> str:
        with self._stderr_lock:
            return bytes(self._stderr).decode(errors="replace").strip()

    # -- the thread ---------------------------------------------------------------------------

    def _url(self, channel: str) -> str:
        transport, ip, port = self.info["transport"], self.info["ip"], self.info[f"{channel}_port"]
        return f"ipc://{ip}-{port}" if transport == "ipc" else f"tcp://{ip}:{port}"

    def run(self) -> None:
        context = zmq.Context()
        shell = context.socket(zmq.DEALER)
        self._shell = shell
        iopub = context.socket(zmq.SUB)
        for sock in (shell, iopub):
            sock.linger = 0
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        shell.connect(self._url("shell"))
        iopub.connect(self._url("iopub"))
        poller = zmq.Poller()
        poller.register(shell, zmq.POLLIN)
        poller.register(iopub, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self.kernel._stderr_r, zmq.POLLIN)
        try:
            while True:
                handshaking = self._ready is not None and not (self._got_reply and self._got_iopub)
                events = dict(poller.poll(HANDSHAKE_RETRY_MS if handshaking else None))
                if self._wake_r in events and not self._run_commands(shell, poller):
                    return
                if self.kernel._stderr_r in events:
                    self._read_stderr()
                if iopub in events:
                    self._drain(iopub, self._on_iopub, True)
                if shell in events:
                    self._drain(shell, self._on_reply, False)
                if self._pidfd is not None and self._pidfd in events:
                    self._on_exit(poller)
                elif handshaking and not events:
                    self._send_kernel_info(shell)
                if handshaking and self._got_reply and self._got_iopub:
                    self._after_handshake(shell)
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("interpreter pump for %s kernel %s failed", self.kernel.language, self.kernel.id)
            self._abandon(wire.error("InterpreterError", "the interpreter lost this kernel's messages", ""))
            if self._ready is not None:
                self.loop.call_soon_threadsafe(_fail, self._ready, KernelError("the interpreter's message pump failed"))
            self.loop.call_soon_threadsafe(self.kernel._died)
        finally:
            shell.close()
            iopub.close()
            context.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._pidfd is not None:
                os.close(self._pidfd)

    def _run_commands(self, shell: zmq.Socket[bytes], poller: zmq.Poller) -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while self._commands:
            name, *args = self._commands.popleft()
            if name == "attach":
                self._abandon(_RESTARTING)
                self._pidfd, self._ready, self._setup = args
                self._attached = True
                poller.register(self._pidfd, zmq.POLLIN)
                self._handshake.clear()
                self._got_reply = self._got_iopub = False
                self._send_kernel_info(shell)
            elif name == "execute":
                if self._attached and self._ready is None:
                    self._start(shell, args[0])
                else:  # lost a race with a restart: the kernel that was asked for is gone
                    self._current = args[0]
                    self._abandon(_RESTARTING)
            elif name == "detach":
                reason, done = args
                self._forget_process(poller)
                self._abandon(reason)
                self.loop.call_soon_threadsafe(_resolve, done, None)
            elif name == "stop":
                self._abandon(None)
                return False
        return True

    def _forget_process(self, poller: zmq.Poller) -> None:
        self._attached = False
        if self._pidfd is not None:
            poller.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._ready is not None:
            self.loop.call_soon_threadsafe(
                _fail, self._ready, KernelError(f"the {self.kernel.language} kernel stopped")
            )
            self._ready = None
        self._setup = None

    def _send_kernel_info(self, shell: zmq.Socket[bytes]) -> None:
        msg = self.session.msg("kernel_info_request", {})
        self._handshake.add(msg["header"]["msg_id"])
        self.session.send(shell, msg)

    def _after_handshake(self, shell: zmq.Socket[bytes]) -> None:
        """The kernel answers and we hear its iopub: run the setup cell, or be ready now."""
        if self._setup is not None:
            self._start(shell, self._setup)
        else:
            self._declare_ready()

    def _declare_ready(self) -> None:
        if self._ready is not None:
            self.loop.call_soon_threadsafe(_resolve, self._ready, None)
            self._ready = None

    def _start(self, shell: zmq.Socket[bytes], execution: Execution) -> None:
        content = {
            "code": execution.code,
            "silent": execution.silent,
            "store_history": not execution.silent,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        msg = self.session.msg("execute_request", content)
        execution.msg_id = msg["header"]["msg_id"]
        self._current = execution
        self._barrier = None
        self._idle = self._replied = self._errored = False
        self.session.send(shell, msg)

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[dict[str, Any]], None], iopub: bool) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if iopub and self._streak:
                    self._streak = 0
                    self.kernel._hold("pump", False)
                return
            if iopub:
                self._streak += sum(len(frame) for frame in frames)
                if self._streak > BACKLOG_LIMIT:
                    self.kernel._hold("pump", True)
            try:
                _, parts = self.session.feed_identities(frames)
                msg = self.session.deserialize(parts)
            except (ValueError, KeyError, TypeError) as exc:  # a bad signature or shape: not our kernel's
                log.warning("dropped a message from the %s kernel: %s", self.kernel.language, exc)
                continue
            handle(msg)

    def _on_reply(self, msg: dict[str, Any]) -> None:
        parent = msg["parent_header"].get("msg_id")
        if parent in self._handshake:
            self._got_reply = True
            return
        if parent is not None and parent == self._barrier:
            if msg["content"].get("status") != "ok":  # a kernel without the barrier's API: end now
                log.warning("%s kernel: barrier cell failed; cells may lose late output", self.kernel.language)
                self._finish()
            return
        current = self._current
        if current is None or parent != current.msg_id:
            return
        self._replied = True
        content = msg["content"]
        status = content.get("status")
        if status == "error" and not self._errored:
            self._error(content.get("ename", "Error"), content.get("evalue", ""), content.get("traceback", []))
        elif status == "aborted" or status == "abort":
            self._error("ExecutionAborted", "Execution was aborted", "")
        self._maybe_finish()

    def _on_iopub(self, msg: dict[str, Any]) -> None:
        parent = msg["parent_header"].get("msg_id")
        if parent in self._handshake:
            self._got_iopub = True
            return
        if parent is not None and parent == self._barrier:
            if msg["msg_type"] == BARRIER_MSG_TYPE:
                self._finish()
            return
        current = self._current
        if current is None or parent != current.msg_id:
            return  # output of a cell that already ended (a timer that fires later): nobody to tell
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "status":
            if content.get("execution_state") == "idle":
                self._idle = True
                self._maybe_finish()
        elif current.silent:
            if kind == "error" and current.error is None:
                current.error = (str(content.get("ename", "")), str(content.get("evalue", "")))
        elif kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            current._push(wire.stream(name, content.get("text", ""), msg["header"]))
        elif kind == "execute_result":
            current._push(wire.result(content.get("data", {}), True))
        elif kind == "display_data":
            current._push(wire.result(content.get("data", {}), False))
        elif kind == "execute_input":
            current._push(wire.number_of_executions(int(content.get("execution_count", 0))))
        elif kind == "error" and not self._errored:
            self._error(content.get("ename", "Error"), content.get("evalue", ""), content.get("traceback", []))

    def _error(self, name: str, value: str, traceback: str | list[str]) -> None:
        current = self._current
        assert current is not None
        self._errored = True
        if current.silent:
            if current.error is None:
                current.error = (str(name), str(value))
        else:
            current._push(wire.error(str(name), str(value), traceback))

    def _maybe_finish(self) -> None:
        current = self._current
        if current is None or not (self._idle and self._replied) or self._barrier is not None:
            return
        barrier = self.kernel.command.barrier_code
        if barrier and not current.silent and self._shell is not None:
            msg = self.session.msg(
                "execute_request",
                {"code": barrier, "silent": True, "store_history": False, "user_expressions": {}, "allow_stdin": False},
            )
            self._barrier = msg["header"]["msg_id"]
            self.session.send(self._shell, msg)
            return
        self._finish()

    def _finish(self) -> None:
        current = self._current
        self._current = None
        self._barrier = None
        if current is None:
            return
        if current is self._setup:
            if current.error is not None:
                log.warning("%s kernel setup cell failed: %s: %s", self.kernel.language, *current.error)
            self._setup = None
            current._push(None)
            self._declare_ready()
            return
        if not current.silent:
            current._push(wire.END_OF_EXECUTION)
        current._push(None)

    def _abandon(self, reason: bytes | None) -> None:
        """End the running cell now (its kernel is going away), with ``reason`` as its error."""
        current, self._current = self._current, None
        self._barrier = None
        if current is None:
            return
        if current.silent:
            if reason and current.error is None:
                current.error = ("ContextRestarting", "the kernel stopped")
        else:
            if reason:
                current._push(reason)
            current._push(wire.END_OF_EXECUTION)
        current._push(None)

    def _read_stderr(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.kernel._stderr_r, 65536):
                with self._stderr_lock:
                    self._stderr += data
                    del self._stderr[:-STDERR_TAIL]

    def _on_exit(self, poller: zmq.Poller) -> None:
        """The kernel process exited by itself (crash, OOM kill, ``exit()`` in a cell)."""
        process = getattr(self.kernel.manager.provisioner, "process", None)
        status = process.poll() if process is not None else None
        self._read_stderr()
        what = f"the {self.kernel.language} kernel {_exit_description(status)}"
        starting = self._ready
        self._ready = None
        self._forget_process(poller)
        if starting is not None:
            tail = self.stderr_tail()
            self.loop.call_soon_threadsafe(_fail, starting, KernelError(what + (f": {tail}" if tail else "")))
            return
        self._abandon(wire.error("ContextRestarting", f"{what}; the context restarts with a fresh kernel", ""))
        self.loop.call_soon_threadsafe(self.kernel._died)


_RESTARTING = wire.error("ContextRestarting", "the context's kernel restarted before the cell could run", "")


def _resolve(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: a start that nobody awaits any more must not log noise
