"""``process.Process``: start, connect, list, input, signals and PTY resize (spec §4.2).

Beyond envd: output goes through a bounded ring per process (Rust, ``sandboxd-proc``), so output
produced while no client is attached is kept and replayed by ``Connect``; each stream has its own
cursor, and a client that stalls is cut loose with a ``data_loss`` error instead of freezing the
process or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sandboxd import _core
from sandboxd._proto.process import process_pb2 as pb

from ..errors import Code, RpcError
from ..paths import expand_and_resolve
from ..rpc import HAND_OFF, Context, HandOff, Kind, Method, NestedBytes, constant
from ..state import AgentState
from ..validate import check_env_vars, check_no_nul

SERVICE = "process.Process"

RETAIN_EXITED_S = 30.0
"""An exited process stays connectable this long, with its end event (as envd)."""

SWEEP_INTERVAL_S = 5.0
"""How often exited processes are looked for, to forget them (and free their rings) after
``RETAIN_EXITED_S``. Checking is a lock and a field read per process."""

STDIN_WRITE_TIMEOUT_S = 10.0
"""A child that does not read its stdin for this long fails the write with ``deadline_exceeded``."""

MAX_EVENT_BYTES = 1 << 20
"""Consecutive chunks of one stream are merged into one data event up to this size (by the binding,
in one copy): each event costs an envelope and a trip through the HTTP server, so fewer, larger
events raise throughput."""

HAND_OFF_ABOVE = 64 << 10
"""A stream hands its socket to a worker thread (see :func:`output_events`) once a batch of at least
this many bytes (or one cut by the byte budget) shows the process flooding: starting the thread costs
a thread's start and a hop back to the loop, which a command with a line of output should not pay.
A flooding PTY's ~4 KiB reads come gathered into chunks of up to ``_core.PTY_GATHER_BYTES`` (64 KiB,
no less than this), so its first full chunk is such a batch; before they were gathered, a loop that
kept up saw batches of 4 to 8 KiB, and a PTY flood often went through the loop in 4 KiB frames to its end."""

SDK_SHELL = "/bin/bash"
"""What the SDKs' ``commands.run`` starts (``/bin/bash -l -c CMD``), as envd expects every template to have."""

FALLBACK_SHELL = "/bin/sh"
"""Run instead of :data:`SDK_SHELL` in a template without bash (busybox, Alpine): POSIX ``sh`` takes
the same ``-l -c CMD``, so ``commands.run`` works there, with ``sh``'s syntax."""

USER_OOM_SCORE_ADJ = 100
"""User processes' OOM score, as envd sets it: under memory pressure they die before the agent."""

_SIGNALS = {pb.SIGNAL_SIGKILL: signal.SIGKILL, pb.SIGNAL_SIGTERM: signal.SIGTERM}


@dataclass(slots=True)
class Entry:
    """A process the agent started, while it runs and for ``RETAIN_EXITED_S`` after it ends."""

    pid: int
    process: _core.Process | None
    """None once it has ended without output (:meth:`settle`): its end is then all there is to replay."""
    config: pb.ProcessConfig | None
    """What it was started with, for ``List``; None once it has ended (``List`` shows only running
    processes, and an ended one is kept for ``RETAIN_EXITED_S`` for its output and end alone)."""
    tag: str | None
    deadline_timer: asyncio.TimerHandle | None = None
    ended_at: float | None = None
    """``time.monotonic()`` when the sweeper first saw the process ended."""
    end_response: pb.ConnectResponse | None = None
    """What ``Connect`` answers after the start event, once the process is let go of (shared by every
    process that ended alike: :func:`_end_response`)."""

    @property
    def ended(self) -> bool:
        return self.process is None or self.process.end() is not None

    def running(self) -> _core.Process:
        """The process, for a call that needs it running (found so by ``_find``); the "exited" error if
        it has ended and been let go of since."""
        if self.process is None:
            raise _exited(self.pid)
        return self.process

    def settle(self, without_output: bool = False) -> None:
        """Let go of what only a running process needs, once it has ended: its config (its request's
        whole message, ~0.5 KiB for a bare ``/bin/true``, more with an environment) and its deadline's
        timer (whose callback holds the process, and which the loop keeps until it is due, a minute
        for the SDK's default); and, ``without_output`` (its ``Start`` stream saw the end and not one
        byte), the process itself (its output's ring and locks, ~0.4 KiB): a ``Connect`` then gets
        the start and end events it would have got. An agent that ran a thousand commands held them
        all for 30 s."""
        self.config = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        end = self.process.end() if without_output and self.process is not None else None
        if end is not None:
            self.end_response = _end_response(pb.ConnectResponse, end)
            self.process = None


def _end_event(end: _core.End) -> pb.ProcessEvent:
    message = pb.ProcessEvent.EndEvent(exit_code=end.exit_code, exited=end.exited, status=end.status)
    if end.error is not None:
        message.error = end.error
    return pb.ProcessEvent(end=message)


_END_RESPONSES: dict[tuple[type[Any], int, bool, str], Any] = {}
"""End responses without an error, by type, exit code, ``exited`` and status: nearly every
process ends with one of a few (``exit status 0``, ``1``, ``signal: killed``), so each is built
once, and declared a :func:`~sandboxd.agent.rpc.constant` so that the transports encode it once too
(it is on the path from the process's exit to the client). The transports only read the messages
they are given (encode them), never change them."""


def _end_response(response_type: type[Response], end: _core.End) -> Response:
    if end.error is not None:
        return response_type(event=_end_event(end))
    key = (response_type, end.exit_code, end.exited, end.status)
    found: Response | None = _END_RESPONSES.get(key)
    if found is None:
        found = response_type(event=_end_event(end))
        if len(_END_RESPONSES) < 256:  # exit codes and signals: a few hundred at most anyway
            _END_RESPONSES[key] = constant(found)
    return found


_STREAM_FIELD = {_core.STREAM_STDOUT: "stdout", _core.STREAM_STDERR: "stderr", _core.STREAM_PTY: "pty"}
_DATA_PATHS = {stream: ("event", "data", name) for stream, name in _STREAM_FIELD.items()}

Response = TypeVar("Response", pb.StartResponse, pb.ConnectResponse)


async def output_events(
    begin: Callable[[], tuple[_core.Subscriber | Response, Response]],
    response_type: type[Response],
    ctx: Context,
    ended: Callable[[bool], object] | None = None,
) -> AsyncGenerator[Response | NestedBytes, None]:
    """A process stream's responses: ``begin()``'s first (the start event), then for the data from
    its subscriber as it arrives, then for the end event. ``begin`` runs at the first iteration (a
    ``Start`` spawns there). The handlers return this generator itself, not one of their own around
    it: one async generator and one hop per message less.

    Waits on the subscriber's eventfd through the event loop (no thread per stream). Each run of one
    stream in a batch (consecutive chunks, at most ``MAX_EVENT_BYTES``) is one data event, kept as
    :class:`NestedBytes` over the ring's own chunks (``OutputChunk``, lent without a copy): a binary
    Connect stream writes them to the socket as they are, a JSON one joins them for base64. A
    subscriber that fell behind the ring ends with ``data_loss``. ``ended`` is called when the end
    event is sent, with whether any output was. ``begin`` gives the end event in place of a
    subscriber for a process that ended without output and was let go of (:meth:`Entry.settle`).

    The wake-up callback reads the eventfd as well as setting ``woken``: the fd is level-triggered
    and stays readable from the moment new output lands until the next ``next_batch``, so left
    readable while the caller sends a batch to a full socket, it woke the event loop on every turn
    for nothing (a busy loop that took most of the agent's CPU and starved the client). Reading it
    loses nothing: ``woken`` stays set, and the producer, disarmed by its write, writes again only
    once ``next_batch`` has re-armed it. (Removing and re-adding the reader around each wait did
    the same at ~30 % more agent CPU for PTY output, which waits every few KiB.)

    With a ``hand_off`` in ``ctx.extras`` (a binary Connect stream: :data:`~sandboxd.agent.rpc.HAND_OFF`,
    set by the transport once it holds this generator, read after the first response), once the
    process floods (:data:`HAND_OFF_ABOVE`) the data frames are written by a worker thread straight
    from the ring to the socket (``Subscriber.pump``, Rust, without the GIL: no loop wake-up, Python
    object or copy per frame) as soon as the connection has nothing else buffered; the loop takes
    over again for the end event or a lag.
    """
    subscriber, first = begin()
    if not isinstance(subscriber, _core.Subscriber):
        yield first
        yield subscriber
        return
    loop = asyncio.get_running_loop()
    # What an asyncio.Event did, in fewer calls: ``woken`` is its flag (cleared before each
    # next_batch), ``waiter`` the future of a wait in progress.
    woken = False
    waiter: asyncio.Future[None] | None = None
    fd = subscriber.fileno()

    def wake() -> None:
        nonlocal woken
        try:  # noqa: SIM105 (contextlib.suppress is three calls more per wake-up)
            os.read(fd, 8)
        except BlockingIOError:  # already reset by next_batch
            pass
        woken = True
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, wake)
    numbers = _field_numbers(response_type)
    flooding = False

    def pump(sock: int, cancel: int, keepalive: bytes, interval: float) -> tuple[str, int, bytes]:
        return subscriber.pump(sock, cancel, numbers, keepalive, interval, MAX_EVENT_BYTES)

    def before() -> None:
        loop.remove_reader(fd)  # the thread waits on the eventfd itself: the loop must not read it

    def after() -> None:
        loop.add_reader(fd, wake)

    try:
        yield first
        hand_off: HandOff | None = ctx.extras.get(HAND_OFF)
        output = False
        while True:
            if flooding and hand_off is not None:
                handed = await hand_off(pump, before, after)
                if handed is not None:
                    outcome, lost = handed
                    if outcome == "lagged":
                        raise RpcError(Code.DATA_LOSS, _lag_message(lost))
                    hand_off = None  # "end": the end event follows through the loop
            woken = False
            batch = subscriber.next_batch(MAX_EVENT_BYTES, True)
            if batch.lagged_bytes:
                raise RpcError(Code.DATA_LOSS, _lag_message(batch.lagged_bytes))
            size = 0
            for stream, data in batch.chunks:
                size += len(data) if isinstance(data, bytes) else sum(len(piece) for piece in data)
                yield NestedBytes(response_type, _DATA_PATHS[stream], data)
            flooding = flooding or batch.more or size >= HAND_OFF_ABOVE
            output = output or size > 0  # set before any hand-off: flooding needs a batch with data
            if batch.end is not None:
                if ended is not None:
                    ended(output)
                yield _end_response(response_type, batch.end)
                return
            if not batch.more and not woken:
                waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    waiter = None
    finally:
        loop.remove_reader(fd)
        subscriber.close()


def _lag_message(lost: int) -> str:
    return (
        f"this client fell {lost} bytes behind the process's output and was dropped "
        "(it stopped reading); reconnect to resume from the output the agent still holds"
    )


_FIELD_NUMBERS: dict[str, tuple[list[int], list[int], list[int]]] = {}


def _field_numbers(response_type: type[Response]) -> tuple[list[int], list[int], list[int]]:
    """Field numbers from ``response_type`` down to the stdout, stderr and PTY bytes (for ``pump``;
    cached per type)."""
    name = response_type.DESCRIPTOR.full_name
    found = _FIELD_NUMBERS.get(name)
    if found is None:
        event: Any = response_type.DESCRIPTOR.fields_by_name["event"]
        data: Any = event.message_type.fields_by_name["data"]
        fields = data.message_type.fields_by_name
        head: list[int] = [event.number, data.number]
        found = ([*head, fields["stdout"].number], [*head, fields["stderr"].number], [*head, fields["pty"].number])
        _FIELD_NUMBERS[name] = found
    return found


def _exited(pid: int) -> RpcError:
    """A call on a process that ended while it was being served (after ``_find`` found it running)."""
    return RpcError(Code.NOT_FOUND, f"process {pid} has already exited")


class ProcessService:
    """Starts processes and keeps them addressable by pid or tag."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.processes: dict[int, Entry] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def methods(self) -> list[Method]:
        def keepalive(response: type[pb.StartResponse] | type[pb.ConnectResponse]) -> object:
            return lambda: response(event=pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive()))

        def is_end(message: object) -> bool:
            """The end event is a stream's last message (:func:`output_events` returns after it)."""
            return isinstance(message, (pb.StartResponse, pb.ConnectResponse)) and message.event.HasField("end")

        return [
            Method(SERVICE, "List", Kind.UNARY, pb.ListRequest, pb.ListResponse, self.list),
            Method(
                SERVICE,
                "Connect",
                Kind.SERVER_STREAM,
                pb.ConnectRequest,
                pb.ConnectResponse,
                self.connect,
                keepalive(pb.ConnectResponse),  # type: ignore[arg-type]
                is_end,
            ),
            Method(
                SERVICE,
                "Start",
                Kind.SERVER_STREAM,
                pb.StartRequest,
                pb.StartResponse,
                self.start,
                keepalive(pb.StartResponse),  # type: ignore[arg-type]
                is_end,
            ),
            Method(SERVICE, "Update", Kind.UNARY, pb.UpdateRequest, pb.UpdateResponse, self.update),
            Method(
                SERVICE,
                "StreamInput",
                Kind.CLIENT_STREAM,
                pb.StreamInputRequest,
                pb.StreamInputResponse,
                self.stream_input,
            ),
            Method(SERVICE, "SendInput", Kind.UNARY, pb.SendInputRequest, pb.SendInputResponse, self.send_input),
            Method(SERVICE, "SendSignal", Kind.UNARY, pb.SendSignalRequest, pb.SendSignalResponse, self.send_signal),
            Method(SERVICE, "CloseStdin", Kind.UNARY, pb.CloseStdinRequest, pb.CloseStdinResponse, self.close_stdin),
        ]

    # ------------------------------------------------------------------------------------- lookup

    def _find(self, selector: pb.ProcessSelector, *, running: bool = False) -> Entry:
        which = selector.WhichOneof("selector")
        if which == "pid":
            entry = self.processes.get(selector.pid)
            label = f"pid {selector.pid}"
        elif which == "tag":
            entry = next((e for e in self.processes.values() if e.tag == selector.tag), None)
            label = f"tag '{selector.tag}'"
        else:
            raise RpcError(Code.INVALID_ARGUMENT, "process selector needs a pid or a tag")
        if entry is None:
            raise RpcError(Code.NOT_FOUND, f"process with {label} not found")
        if running and entry.ended:
            raise RpcError(Code.NOT_FOUND, f"process with {label} has already exited")
        return entry

    # ---------------------------------------------------------------------------------------- start

    def _environment(self, request: pb.StartRequest) -> dict[str, str]:
        env = {"E2B_SANDBOX": "true"}
        env.update(self.state.env_vars)
        env.update(request.process.envs)
        return env

    def _spawn(self, request: pb.StartRequest, ctx: Context) -> _core.Process:
        config = request.process
        if not config.cmd:
            raise RpcError(Code.INVALID_ARGUMENT, "process.cmd is empty: name the program to run")
        check_no_nul([config.cmd], "process.cmd")
        check_no_nul(config.args, "process.args")
        check_env_vars(config.envs, "process.envs")
        explicit_cwd = config.HasField("cwd") and config.cwd != ""
        user = ctx.user
        cwd = expand_and_resolve(config.cwd if explicit_cwd else "", user, self.state.default_workdir)
        pty = (request.pty.size.cols or 80, request.pty.size.rows or 24) if request.HasField("pty") else None
        stdin = request.stdin if request.HasField("stdin") else True
        cmd = config.cmd
        args = list(config.args)
        env = self._environment(request)
        identity = (user.name, user.uid, user.gid, user.home, list(user.groups))
        while True:
            try:
                return _core.Process.spawn(
                    cmd,
                    args,
                    env,
                    cwd=cwd,
                    identity=identity,
                    stdin=stdin,
                    pty=pty,
                    oom_score_adj=USER_OOM_SCORE_ADJ,
                )
            except LookupError as exc:
                raise RpcError(Code.UNAUTHENTICATED, str(exc)) from None
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    # What is missing, asked only now: a spawn checks its cwd itself, and one that
                    # succeeds should not pay a stat for the cwd and another for the shell (each a
                    # path walk, 10-14 µs on the CI VM) to rule out what nearly never happens.
                    retry = self._missing(cmd, cwd, explicit_cwd)
                    if retry is not None:
                        cmd, cwd = retry
                        continue
                if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR):
                    raise RpcError(
                        Code.INVALID_ARGUMENT, f"cannot start '{config.cmd}': {exc.strerror or exc}"
                    ) from None
                raise RpcError(Code.INTERNAL, f"cannot start '{config.cmd}': {exc}") from None

    @staticmethod
    def _missing(cmd: str, cwd: str, explicit_cwd: bool) -> tuple[str, str] | None:
        """After a spawn failed with ``ENOENT`` or ``ENOTDIR``: the command and cwd to try instead
        (the root for a user's home that is missing, such as nobody's /nonexistent; ``sh`` for the
        SDKs' ``bash`` in a template without it), None when neither is the cause, or the error
        the cause gets."""
        if not os.path.isdir(cwd):
            if explicit_cwd:
                raise RpcError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
            return (cmd, "/") if cwd != "/" else None
        if cmd == SDK_SHELL and not os.path.exists(SDK_SHELL):
            if not os.path.exists(FALLBACK_SHELL):
                raise RpcError(
                    Code.INVALID_ARGUMENT,
                    f"cannot start '{SDK_SHELL}': this sandbox's template has neither {SDK_SHELL} nor "
                    f"{FALLBACK_SHELL}; commands need a shell in the template (files and watches work without one)",
                )
            return FALLBACK_SHELL, cwd
        return None

    def _register(self, process: _core.Process, request: pb.StartRequest, ctx: Context) -> Entry:
        tag = request.tag if request.HasField("tag") else None
        entry = Entry(process.pid, process, request.process, tag)
        self.processes[process.pid] = entry
        remaining = ctx.time_remaining()
        if remaining is not None:
            # envd kills a process whose Start deadline (connect-timeout-ms) passes, even after the
            # client went away: the deadline belongs to the process, not to the stream. Signalling
            # an already reaped process is a no-op in the core, so the timer needs no cancelling.
            loop = asyncio.get_running_loop()
            entry.deadline_timer = loop.call_later(max(remaining, 0), self._kill_quietly, process)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return entry

    @staticmethod
    def _kill_quietly(process: _core.Process) -> None:
        with contextlib.suppress(OSError):
            process.signal(signal.SIGKILL)

    async def _sweep(self) -> None:
        """Forget processes ``RETAIN_EXITED_S`` after they ended; stop when none are left."""
        while self.processes:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            forgotten = False
            for pid, entry in list(self.processes.items()):
                if entry.ended_at is None:
                    if entry.ended:
                        entry.ended_at = now
                        entry.settle()
                elif now - entry.ended_at >= RETAIN_EXITED_S:
                    del self.processes[pid]
                    forgotten = True
            if forgotten:
                self.state.freed()  # their rings and records, freed long after their requests' trim

    def start(self, request: pb.StartRequest, ctx: Context) -> AsyncIterator[pb.StartResponse | NestedBytes]:
        entry: Entry | None = None

        def begin() -> tuple[_core.Subscriber, pb.StartResponse]:
            nonlocal entry
            process = self._spawn(request, ctx)
            subscriber = process.subscribe(True)
            entry = self._register(process, request, ctx)
            started = pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=process.pid))
            return subscriber, pb.StartResponse(event=started)

        def ended(output: bool) -> None:
            if entry is not None:
                entry.settle(without_output=not output)

        return output_events(begin, pb.StartResponse, ctx, ended)

    def connect(self, request: pb.ConnectRequest, ctx: Context) -> AsyncIterator[pb.ConnectResponse | NestedBytes]:
        def begin() -> tuple[_core.Subscriber | pb.ConnectResponse, pb.ConnectResponse]:
            entry = self._find(request.process)
            started = pb.ConnectResponse(event=pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=entry.pid)))
            if entry.process is None:
                assert entry.end_response is not None  # set as the process is let go of
                return entry.end_response, started
            return entry.process.subscribe(True), started

        return output_events(begin, pb.ConnectResponse, ctx)

    # ----------------------------------------------------------------------------------- the rest

    async def list(self, request: pb.ListRequest, ctx: Context) -> pb.ListResponse:
        return pb.ListResponse(
            processes=[
                pb.ProcessInfo(config=e.config, pid=pid, tag=e.tag)
                for pid, e in self.processes.items()
                if e.config is not None and not e.ended
            ]
        )

    async def _write(self, entry: Entry, data: pb.ProcessInput) -> None:
        which = data.WhichOneof("input")
        pid = entry.pid
        if which is None:
            return
        process = entry.running()  # a StreamInput's entry may have ended since its start message
        if which == "pty":
            if not process.has_pty:
                raise RpcError(Code.FAILED_PRECONDITION, f"process {pid} has no PTY: send input as stdin")
            writer, payload = process.write_pty, data.pty
        else:
            if process.has_pty:
                raise RpcError(Code.FAILED_PRECONDITION, f"process {pid} runs in a PTY: send input as pty")
            writer, payload = process.write_stdin, data.stdin
        try:
            await asyncio.to_thread(writer, payload, STDIN_WRITE_TIMEOUT_S)
        except BrokenPipeError:
            # It ended since _find looked (a PTY's master is closed with its end; a StreamInput's
            # entry was found at its start message): the answer _find gives an ended process.
            if which == "pty" or entry.ended:
                raise _exited(pid) from None
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"stdin of process {pid} is not enabled or already closed (start it with stdin=True)",
            ) from None
        except TimeoutError:
            raise RpcError(
                Code.DEADLINE_EXCEEDED, f"process {pid} did not read its input within {STDIN_WRITE_TIMEOUT_S:.0f}s"
            ) from None

    async def send_input(self, request: pb.SendInputRequest, ctx: Context) -> pb.SendInputResponse:
        await self._write(self._find(request.process, running=True), request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self, requests: AsyncIterator[pb.StreamInputRequest], ctx: Context
    ) -> pb.StreamInputResponse:
        entry: Entry | None = None
        async for message in requests:
            which = message.WhichOneof("event")
            if which == "start":
                entry = self._find(message.start.process, running=True)
            elif which == "data":
                if entry is None:
                    raise RpcError(Code.INVALID_ARGUMENT, "StreamInput must start with a start message")
                await self._write(entry, message.data.input)
        return pb.StreamInputResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Context) -> pb.CloseStdinResponse:
        process = self._find(request.process, running=True).running()
        if process.has_pty:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"process {process.pid} runs in a PTY, which has no stdin to close: send Ctrl-D (\\x04)",
            )
        process.close_stdin()
        return pb.CloseStdinResponse()

    async def send_signal(self, request: pb.SendSignalRequest, ctx: Context) -> pb.SendSignalResponse:
        number = _SIGNALS.get(request.signal)
        if number is None:
            raise RpcError(Code.UNIMPLEMENTED, f"signal {request.signal} is not supported: use SIGTERM or SIGKILL")
        process = self._find(request.process, running=True).running()
        try:
            process.signal(number)
        except ProcessLookupError:
            raise _exited(process.pid) from None
        return pb.SendSignalResponse()

    async def update(self, request: pb.UpdateRequest, ctx: Context) -> pb.UpdateResponse:
        process = self._find(request.process, running=True).running()
        if request.HasField("pty"):
            if not process.has_pty:
                raise RpcError(Code.FAILED_PRECONDITION, f"process {process.pid} has no PTY to resize")
            size = request.pty.size
            if not size.cols or not size.rows:
                raise RpcError(Code.INVALID_ARGUMENT, "pty.size needs non-zero cols and rows")
            try:
                process.resize(size.cols, size.rows)
            except BrokenPipeError:  # it ended since _find looked: its master is closed with its end
                raise _exited(process.pid) from None
        return pb.UpdateResponse()
