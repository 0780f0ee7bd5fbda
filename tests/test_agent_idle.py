"""``IdleTrim``: the allocator is trimmed once per quiet spell, never while a request is in flight nor
between requests that follow each other closely, on a real event loop and through the ASGI wrapper
the agent's server uses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sandboxd import _core
from sandboxd.agent.idle import IdleTrim

if TYPE_CHECKING:
    from sandboxd.agent.rpc import Context
    from sandboxd.agent.services.process import ProcessService

DELAY = 0.1


def _counting() -> tuple[IdleTrim, list[bool]]:
    calls: list[bool] = []

    def trim() -> bool:
        released = _core.trim_malloc()  # the real call, counted
        calls.append(released)
        return released

    return IdleTrim(DELAY, trim), calls


async def _request(app: Any, seconds: float, scope_type: str = "http") -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app({"type": scope_type}, receive, send)


def _holder() -> tuple[asyncio.Event, Any]:
    """An app whose requests stay in flight until the event is set."""
    release = asyncio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()

    return release, held


async def _no_trim_until_it_ends(
    slow: asyncio.Task[None], release: asyncio.Event, idle: IdleTrim, calls: list[bool]
) -> None:
    """No trim while ``slow`` (a held request) is in flight; one once it has ended."""
    before = len(calls)
    await asyncio.sleep(DELAY * 3)
    assert len(calls) == before and idle.active == 1
    release.set()
    await slow
    await asyncio.sleep(DELAY * 3)
    assert len(calls) == before + 1


def _sleeper(seconds: float) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(seconds)

    return app


def test_one_trim_after_a_quiet_spell() -> None:
    async def main() -> list[bool]:
        idle, calls = _counting()
        app = idle.wrap(_sleeper(0))
        await asyncio.sleep(DELAY * 3)
        assert calls == []  # nothing served yet: nothing to give back
        loop = asyncio.get_running_loop()
        await _request(app, 0)
        ended = loop.time()
        await asyncio.sleep(DELAY / 2)
        if loop.time() - ended < DELAY:  # (a loaded machine may oversleep)
            assert calls == []
        await asyncio.sleep(DELAY * 2)
        assert len(calls) == 1
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == 1  # once per spell, not every interval
        await _request(app, 0)
        await asyncio.sleep(DELAY * 3)
        return calls

    calls = asyncio.run(main())
    assert len(calls) == 2


def test_no_trim_while_a_request_is_in_flight() -> None:
    async def main() -> None:
        idle, calls = _counting()
        release, held = _holder()
        slow = asyncio.create_task(_request(idle.wrap(held), 0))
        await _request(idle.wrap(_sleeper(0)), 0)  # one ends while the held one is still in flight
        await asyncio.sleep(DELAY * 3)
        assert calls == [] and idle.active == 1
        release.set()
        await slow
        assert idle.active == 0
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == 1
        # The timer armed by the end of a spell finds a request that began since, still in flight.
        release.clear()
        await _request(idle.wrap(_sleeper(0)), 0)
        slow = asyncio.create_task(_request(idle.wrap(held), 0))
        await _no_trim_until_it_ends(slow, release, idle, calls)

    asyncio.run(main())


def test_no_trim_between_requests_that_follow_closely() -> None:
    async def main() -> None:
        idle, calls = _counting()
        app = idle.wrap(_sleeper(0))
        loop = asyncio.get_running_loop()
        long_gaps = 0  # pauses a loaded machine stretched past the delay: each may trim once
        for _ in range(12):
            await _request(app, 0)
            ended = loop.time()
            await asyncio.sleep(DELAY / 4)
            long_gaps += loop.time() - ended >= DELAY
        assert len(calls) <= long_gaps  # 0 but on a loaded machine
        before = len(calls)
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == before + 1

    asyncio.run(main())


def test_a_failed_request_counts_as_ended_and_lifespan_is_not_counted() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        idle, calls = _counting()
        with contextlib.suppress(RuntimeError):
            await _request(idle.wrap(failing), 0)
        assert idle.active == 0
        await asyncio.sleep(DELAY * 2)
        assert len(calls) == 1
        await _request(idle.wrap(_sleeper(0)), 0, scope_type="lifespan")
        await asyncio.sleep(DELAY * 2)
        assert len(calls) == 1 and idle.trims == 1

    asyncio.run(main())


def test_close_cancels_a_pending_trim() -> None:
    async def main() -> None:
        idle, calls = _counting()
        await _request(idle.wrap(_sleeper(0)), 0)
        idle.close()
        await asyncio.sleep(DELAY * 2)
        assert calls == []

    asyncio.run(main())


def test_a_request_on_the_direct_path_is_counted_while_in_flight() -> None:
    """The wrapper passes an app's ``direct`` on (the agent's Connect calls take it) and counts what
    it serves as a request in flight; a request it declines (None) is left to the ASGI call, which
    counts it itself; an app without ``direct`` gets none."""
    idle, calls = _counting()

    class Direct:
        def __init__(self) -> None:
            self.release = asyncio.Event()

        def direct(self, scope: Any, writer: Any) -> Any:
            return self.serve() if scope["path"] == "/direct" else None

        async def serve(self) -> None:
            await self.release.wait()

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            pass

    async def scenario() -> None:
        inner = Direct()
        app: Any = idle.wrap(inner)
        assert app.direct({"path": "/other"}, None) is None
        task = asyncio.create_task(app.direct({"path": "/direct"}, None))
        await asyncio.sleep(0)
        assert idle.active == 1
        await asyncio.sleep(DELAY * 3)
        assert calls == [], "trimmed while a direct request was in flight"
        inner.release.set()
        await task
        assert idle.active == 0
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == 1
        assert not hasattr(idle.wrap(_sleeper(0)), "direct")

    asyncio.run(scenario())
    idle.close()


def test_memory_freed_outside_a_request_is_trimmed_once_quiet() -> None:
    """``freed`` (the process table forgot exited processes, long after their requests' trim) trims
    once the agent is quiet, and waits for a request in flight to end first."""

    async def main() -> None:
        idle, calls = _counting()
        idle.freed()
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == 1
        await asyncio.sleep(DELAY * 3)
        assert len(calls) == 1  # once per call, not every interval
        release, held = _holder()
        slow = asyncio.create_task(_request(idle.wrap(held), 0))
        await asyncio.sleep(0)
        idle.freed()
        await _no_trim_until_it_ends(slow, release, idle, calls)

    asyncio.run(main())


def test_the_process_tables_sweep_reports_what_it_forgot(monkeypatch: Any) -> None:
    """A real ``/bin/true`` through the process service's ``Start``: once its retention has passed the
    sweep forgets it and calls the state's ``freed`` (the server points it at ``IdleTrim.freed``)."""
    from sandboxd._proto.process import process_pb2 as pb
    from sandboxd.agent.rpc import Context
    from sandboxd.agent.services import process as service_module
    from sandboxd.agent.state import AgentState

    monkeypatch.setattr(service_module, "RETAIN_EXITED_S", 0.2)
    monkeypatch.setattr(service_module, "SWEEP_INTERVAL_S", 0.05)

    async def main() -> None:
        freed: list[int] = []
        state = AgentState(default_user="root")
        service = service_module.ProcessService(state)
        state.freed = lambda: freed.append(len(service.processes))
        request = pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/true"))
        events = [m async for m in service.start(request, Context(user=state.user(), headers={}))]
        assert events[-1].event.HasField("end") and events[-1].event.end.exit_code == 0
        assert len(service.processes) == 1 and freed == []  # retained, connectable for a while
        for _ in range(100):
            await asyncio.sleep(0.05)
            if freed:
                break
        assert freed == [0] and service.processes == {}

    asyncio.run(main())


def test_an_ended_process_is_kept_connectable_without_its_config_or_deadline() -> None:
    """A real ``sh`` through ``Start`` with a deadline, as the SDK sends one: while it runs ``List``
    shows its config; once its stream has sent the end, the entry kept for ``Connect`` (30 s) holds
    neither its config (its request's message) nor its deadline's timer, and ``Connect`` still
    replays its output and end. Before, each ended process kept both until it was forgotten, ~0.5 KiB
    of the 1.7 KiB RSS it cost an agent idle after a thousand commands."""
    from sandboxd._proto.process import process_pb2 as pb
    from sandboxd.agent.rpc import NestedBytes

    async def main() -> None:
        service, ctx = _process_service(deadline_s=60)
        config = pb.ProcessConfig(cmd="/bin/sh", args=["-c", "read line; echo got $line"])
        events = service.start(pb.StartRequest(process=config, tag="kept"), ctx)
        started = await anext(events)
        pid = started.event.start.pid
        (entry,) = service.processes.values()
        assert entry.deadline_timer is not None
        listed = await service.list(pb.ListRequest(), ctx)
        assert [(p.pid, p.tag, p.config.args[1]) for p in listed.processes] == [(pid, "kept", config.args[1])]

        entry.process.write_stdin(b"it\n", 5)
        rest = [m async for m in events]
        assert rest[-1].event.HasField("end") and rest[-1].event.end.exit_code == 0
        assert entry.config is None and entry.deadline_timer is None
        assert (await service.list(pb.ListRequest(), ctx)).processes == []

        selector = pb.ProcessSelector(pid=pid)
        replayed = [m async for m in service.connect(pb.ConnectRequest(process=selector), ctx)]
        assert replayed[0].event.start.pid == pid and replayed[-1].event.end.exit_code == 0
        output = b"".join(m.payload for m in replayed[1:-1] if isinstance(m, NestedBytes))
        assert output == b"got it\n"

    asyncio.run(main())


def test_a_process_that_ended_without_output_is_kept_as_its_end_alone() -> None:
    """``/bin/true`` through ``Start``: its stream saw the end and no output, so the entry kept for
    ``Connect`` lets go of the process itself (its ring and locks); ``Connect`` still answers the
    start and end events, as for a process kept whole, and calls that need it running answer that it
    has exited."""
    from sandboxd._proto.process import process_pb2 as pb
    from sandboxd.agent.errors import Code, RpcError

    async def main() -> None:
        service, ctx = _process_service()
        request = pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/sh", args=["-c", "exit 3"]), tag="quiet")
        events = [m async for m in service.start(request, ctx)]
        pid = events[0].event.start.pid
        assert events[-1].event.end.exit_code == 3 and len(events) == 2
        (entry,) = service.processes.values()
        assert entry.process is None and entry.ended

        for selector in (pb.ProcessSelector(pid=pid), pb.ProcessSelector(tag="quiet")):
            replayed = [m async for m in service.connect(pb.ConnectRequest(process=selector), ctx)]
            assert [m.event.WhichOneof("event") for m in replayed] == ["start", "end"]
            assert replayed[0].event.start.pid == pid
            assert (replayed[1].event.end.exit_code, replayed[1].event.end.status) == (3, "exit status 3")
        try:
            await service.send_signal(
                pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=pb.SIGNAL_SIGKILL), ctx
            )
        except RpcError as exc:
            assert exc.code == Code.NOT_FOUND and "has already exited" in str(exc)
        else:
            raise AssertionError("a signal to an ended process was accepted")

    asyncio.run(main())


def test_stream_input_to_a_process_that_has_ended_since_its_start_message_says_so() -> None:
    """A ``StreamInput`` whose process ends after its start message: the input sent after the end
    is answered as ``_find`` answers any call on an ended process (NOT_FOUND, "has already exited"),
    whether the process was kept whole (it had output) or as its end alone. Before, one kept whole
    answered that its stdin was not enabled, which it had been."""
    from sandboxd._proto.process import process_pb2 as pb
    from sandboxd.agent.errors import Code, RpcError

    async def input_after_the_end(script: str) -> None:
        service, ctx = _process_service()
        events = service.start(pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/sh", args=["-c", script])), ctx)
        selector = pb.ProcessSelector(pid=(await anext(events)).event.start.pid)
        ended = asyncio.Event()

        async def requests() -> AsyncIterator[pb.StreamInputRequest]:
            yield pb.StreamInputRequest(start=pb.StreamInputRequest.StartEvent(process=selector))
            yield pb.StreamInputRequest(data=pb.StreamInputRequest.DataEvent(input=pb.ProcessInput(stdin=b"x\n")))
            await ended.wait()
            yield pb.StreamInputRequest(data=pb.StreamInputRequest.DataEvent(input=pb.ProcessInput(stdin=b"y\n")))

        async def drain() -> None:
            async for _ in events:
                pass
            ended.set()

        drained = asyncio.create_task(drain())
        try:
            await service.stream_input(requests(), ctx)
        except RpcError as exc:
            assert exc.code == Code.NOT_FOUND and "has already exited" in str(exc), (script, exc)
        else:
            raise AssertionError(f"input after the end was accepted ({script})")
        await drained

    async def main() -> None:
        await input_after_the_end("read line; echo got $line")  # kept whole: it had output
        await input_after_the_end("read line")  # kept as its end alone

    asyncio.run(main())


def _process_service(deadline_s: float | None = None) -> tuple[ProcessService, Context]:
    """A process service of its own (the default user root), and a call's context for it, with a
    deadline ``deadline_s`` from now when given (as the SDK sends one)."""
    from sandboxd.agent.rpc import Context
    from sandboxd.agent.services.process import ProcessService
    from sandboxd.agent.state import AgentState

    state = AgentState(default_user="root")
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    return ProcessService(state), Context(user=state.user(), headers={}, deadline=deadline)
