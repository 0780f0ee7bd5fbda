"""The official E2B SDK's ``files.watch_dir`` (sync polling handle and async stream) against a real
agent, with real inotify: recursion, renames, bursts, and overflows that are reported, never silent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Agent
from e2b import AsyncSandbox, FilesystemEvent, FilesystemEventType
from e2b.exceptions import InvalidArgumentException, NotFoundException, SandboxException

CREATE, WRITE, REMOVE, RENAME, CHMOD = (
    FilesystemEventType.CREATE,
    FilesystemEventType.WRITE,
    FilesystemEventType.REMOVE,
    FilesystemEventType.RENAME,
    FilesystemEventType.CHMOD,
)


def poll_until(
    handle: Any, done: Callable[[list[FilesystemEvent]], bool], timeout: float = 10
) -> list[FilesystemEvent]:
    events: list[FilesystemEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(handle.get_new_events())
        if done(events):
            return events
        time.sleep(0.02)
    return events


def pairs(events: list[FilesystemEvent]) -> list[tuple[str, FilesystemEventType]]:
    return [(e.name, e.type) for e in events]


def test_sync_handle_reports_create_write_chmod_remove(sandbox: Any, workdir: Path) -> None:
    handle = sandbox.files.watch_dir(str(workdir))
    try:
        f = workdir / "a.txt"
        f.write_text("x")
        with f.open("a") as out:
            out.write("more")
        f.chmod(0o600)
        f.unlink()
        events = poll_until(handle, lambda ev: ("a.txt", REMOVE) in pairs(ev))
        got = pairs(events)
        assert got[0] == ("a.txt", CREATE)
        assert ("a.txt", WRITE) in got
        assert ("a.txt", CHMOD) in got
        assert got[-1] == ("a.txt", REMOVE)
    finally:
        handle.stop()


def test_non_recursive_watch_ignores_nested_files(sandbox: Any, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    handle = sandbox.files.watch_dir(str(workdir))
    try:
        (workdir / "sub" / "hidden.txt").write_text("x")
        (workdir / "top.txt").write_text("x")
        events = poll_until(handle, lambda ev: ("top.txt", CREATE) in pairs(ev))
        assert all(not e.name.startswith("sub/") for e in events)
    finally:
        handle.stop()


def test_deep_mkdir_burst_yields_the_files_events(sandbox: Any, workdir: Path) -> None:
    for attempt in range(20):
        root = workdir / f"run{attempt}"
        root.mkdir()
        handle = sandbox.files.watch_dir(str(root), recursive=True)
        try:
            subprocess.run(["sh", "-c", "mkdir -p a/b/c/d/e && echo hi > a/b/c/d/e/f"], cwd=root, check=True)
            events = poll_until(handle, lambda ev: ("a/b/c/d/e/f", CREATE) in pairs(ev))
            got = pairs(events)
            for name in ("a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "a/b/c/d/e/f"):
                assert got.count((name, CREATE)) == 1, (attempt, got)
        finally:
            handle.stop()


def test_renames_within_and_out_of_the_tree(
    sandbox: Any, workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    watched = workdir / "w"
    (watched / "dir").mkdir(parents=True)
    outside = tmp_path_factory.mktemp("outside")
    handle = sandbox.files.watch_dir(str(watched), recursive=True)
    try:
        (watched / "dir" / "old.txt").write_text("x")
        os.rename(watched / "dir" / "old.txt", watched / "dir" / "new.txt")
        os.rename(watched / "dir", watched / "moved")
        (watched / "moved" / "after.txt").write_text("y")
        os.rename(watched / "moved" / "after.txt", outside / "gone.txt")
        events = poll_until(handle, lambda ev: ("moved/after.txt", RENAME) in pairs(ev))
        got = pairs(events)
        i = got.index(("dir/old.txt", RENAME))
        assert got[i + 1] == ("dir/new.txt", CREATE)
        j = got.index(("dir", RENAME))
        assert got[j + 1] == ("moved", CREATE)
        assert ("moved/after.txt", CREATE) in got  # the renamed directory keeps being watched, by its new name
        assert got[-1] == ("moved/after.txt", RENAME)
    finally:
        handle.stop()


def test_include_entry_attaches_entry_info(agent: Agent, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)
    from e2b import Sandbox

    sbx = Sandbox.create()
    handle = sbx.files.watch_dir(str(workdir), include_entry=True)
    try:
        (workdir / "e.txt").write_text("12345")
        events = poll_until(handle, lambda ev: any(e.entry for e in ev))
        entry = next(e.entry for e in events if e.entry)
        assert entry.name == "e.txt"
        assert entry.path == str(workdir / "e.txt")
    finally:
        handle.stop()


def test_errors_for_missing_path_file_and_unknown_watcher(sandbox: Any, workdir: Path) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(str(workdir / "missing"))
    (workdir / "file").write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(str(workdir / "file"))
    handle = sandbox.files.watch_dir(str(workdir))
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_async_stream_recursive(agent: Agent, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)

    async def main() -> list[tuple[str, FilesystemEventType]]:
        sbx = await AsyncSandbox.create()
        seen: list[FilesystemEvent] = []
        done = asyncio.Event()

        def on_event(event: FilesystemEvent) -> None:
            seen.append(event)
            if event.name == "x/y/z.txt" and event.type == CREATE:
                done.set()

        handle = await sbx.files.watch_dir(str(workdir), on_event, recursive=True)
        try:
            await asyncio.to_thread(
                subprocess.run, ["sh", "-c", "mkdir -p x/y && echo data > x/y/z.txt"], cwd=workdir, check=True
            )
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await handle.stop()
        return pairs(seen)

    got = asyncio.run(main())
    # Whether z.txt's WRITE is seen depends on whether y's watch existed when it was written; a
    # file made before its directory's watch is reported by the scan as CREATE, never lost.
    assert [e for e in got if e[1] == CREATE] == [("x", CREATE), ("x/y", CREATE), ("x/y/z.txt", CREATE)]


def test_ten_thousand_file_burst_delivers_every_event_or_reports_overflow(sandbox: Any, workdir: Path) -> None:
    handle = sandbox.files.watch_dir(str(workdir), recursive=True)
    try:
        subprocess.run(["sh", "-c", "mkdir burst && cd burst && seq 1 10000 | xargs touch"], cwd=workdir, check=True)
        created: set[str] = set()
        deadline = time.monotonic() + 30
        overflowed = False
        while len(created) < 10_000 and time.monotonic() < deadline:
            try:
                batch = handle.get_new_events()
            except SandboxException as exc:
                assert "data_loss" in str(exc).lower() or "lost" in str(exc)
                overflowed = True
                break
            created.update(e.name for e in batch if e.type == CREATE and e.name.startswith("burst/"))
            time.sleep(0.01)
        assert overflowed or len(created) == 10_000
    finally:
        handle.stop()


@contextlib.contextmanager
def max_queued_events(value: int) -> Iterator[None]:
    path = Path("/proc/sys/fs/inotify/max_queued_events")
    original = path.read_text()
    path.write_text(str(value))
    try:
        yield
    finally:
        path.write_text(original)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower fs.inotify.max_queued_events")
def test_forced_kernel_overflow_is_reported_not_swallowed(sandbox: Any, workdir: Path, agent: Agent) -> None:
    # The queue limit applies to inotify instances created while it is in force.
    with max_queued_events(64):
        handle = sandbox.files.watch_dir(str(workdir), recursive=True)
    try:
        # Stop the agent from reading so the kernel queue fills: freeze it with SIGSTOP.
        os.kill(agent.process.pid, 19)
        try:
            subprocess.run(["sh", "-c", "seq 1 500 | xargs touch"], cwd=workdir, check=True)
        finally:
            os.kill(agent.process.pid, 18)
        with pytest.raises(SandboxException) as caught:
            poll_until(handle, lambda ev: False, timeout=5)
        assert "max_queued_events" in str(caught.value)
        # The watcher rescanned and goes on.
        (workdir / "after-overflow.txt").write_text("x")
        events = poll_until(handle, lambda ev: ("after-overflow.txt", CREATE) in pairs(ev))
        assert ("after-overflow.txt", CREATE) in pairs(events)
    finally:
        handle.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower fs.inotify.max_queued_events")
def test_async_stream_ends_with_data_loss_on_overflow(
    agent: Agent, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)

    async def main() -> Exception | None:
        sbx = await AsyncSandbox.create()
        exited: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        with max_queued_events(64):
            handle = await sbx.files.watch_dir(
                str(workdir), lambda e: None, on_exit=lambda e: exited.done() or exited.set_result(e)
            )
        os.kill(agent.process.pid, 19)
        try:
            await asyncio.to_thread(subprocess.run, ["sh", "-c", "seq 1 500 | xargs touch"], cwd=workdir, check=True)
        finally:
            os.kill(agent.process.pid, 18)
        try:
            return await asyncio.wait_for(exited, 10)
        finally:
            await handle.stop()

    error = asyncio.run(main())
    assert error is not None
    assert "max_queued_events" in str(error)


def test_watch_stops_when_the_directory_is_deleted(sandbox: Any, workdir: Path) -> None:
    target = workdir / "doomed"
    target.mkdir()
    handle = sandbox.files.watch_dir(str(target))
    try:
        (target / "f").write_text("x")
        shutil.rmtree(target)
        events = poll_until(handle, lambda ev: (".", REMOVE) in pairs(ev) or ("", REMOVE) in pairs(ev))
        assert ("f", REMOVE) in pairs(events)
    finally:
        with contextlib.suppress(SandboxException):
            handle.stop()


def test_watch_limit_is_resource_exhausted_naming_the_sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent in its own user namespace, where inotify's per-user watch limit is lowered to 20
    (so the host's limit is untouched), asked to watch a tree of 50 directories."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    from conftest import free_port, wait_healthy

    tree = tmp_path / "tree"
    for i in range(50):
        (tree / f"d{i}").mkdir(parents=True)
    port = free_port()
    log = tmp_path / "agent.log"
    script = f"echo 20 > /proc/sys/user/max_inotify_watches && exec {sys.executable} -m sandboxd agent --port {port}"
    with log.open("wb") as out:
        process = subprocess.Popen(["unshare", "-U", "-r", "sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, log)
        except RuntimeError as exc:
            pytest.skip(f"cannot run an agent in a user namespace here: {exc}")
        monkeypatch.setenv("E2B_DEBUG", "true")
        monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{port}")
        from e2b import Sandbox
        from e2b.exceptions import RateLimitException

        sbx = Sandbox.create()
        with pytest.raises(RateLimitException) as caught:  # the SDK's class for resource_exhausted
            sbx.files.watch_dir(str(tree), recursive=True)
        assert "fs.inotify.max_user_watches" in str(caught.value)
        handle = sbx.files.watch_dir(str(tree / "d0"))  # a small watch still works
        handle.stop()
    finally:
        process.terminate()
        process.wait(10)


def test_a_stalled_watch_client_does_not_make_the_agent_spin(start_agent: Callable[..., Agent], workdir: Path) -> None:
    """A client that stops reading its WatchDir stream, with events piling up: the agent waits (its
    readers are off while the stream cannot send) instead of waking its loop on every turn. Before,
    the level-triggered descriptors kept it at a whole core for as long as the client stalled."""
    import json
    import socket
    import struct

    agent = start_agent()
    message = json.dumps({"path": str(workdir), "recursive": True}).encode()
    body = struct.pack(">BI", 0, len(message)) + message
    with socket.create_connection(("127.0.0.1", agent.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(
            b"POST /filesystem.Filesystem/WatchDir HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b" 200 " in client.recv(200)  # the start event; from here on the client reads nothing
        for i in range(30000):
            (workdir / f"f{i:05d}-{'x' * 100}").touch()
        time.sleep(1)  # the socket and the agent's buffers fill

        def cpu_s() -> float:
            fields = Path(f"/proc/{agent.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu_s()
        time.sleep(3)
        used = (cpu_s() - before) / 3
        assert used < 0.3, f"the agent used {used:.0%} of a core while its only client was stalled"


def test_events_that_are_ready_together_go_out_together(start_agent: Callable[..., Agent], workdir: Path) -> None:
    """A backlog of events (made here while the agent is stopped) goes out as many envelopes per HTTP
    chunk, not one chunk per event: the SDKs' HTTP client wakes its event loop for every chunk it
    receives (~200 us of its CPU each), which held an SDK stream to ~4,800 events/s (12,000-17,000
    with the backlog batched; docs/benchmarks.md, stop 44)."""
    import json
    import signal
    import socket
    import struct

    agent = start_agent()
    message = json.dumps({"path": str(workdir)}).encode()
    body = struct.pack(">BI", 0, len(message)) + message
    with socket.create_connection(("127.0.0.1", agent.port), timeout=20) as client:
        client.sendall(
            b"POST /filesystem.Filesystem/WatchDir HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        reader = client.makefile("rb")
        assert b" 200 " in reader.readline()
        while reader.readline() != b"\r\n":  # the head
            pass

        def chunk() -> bytes:
            size = int(reader.readline().split(b";")[0], 16)
            data = reader.read(size)
            assert reader.read(2) == b"\r\n"
            return data

        def creates(data: bytes) -> int:
            found, at = 0, 0
            while at < len(data):
                _, length = struct.unpack_from(">BI", data, at)
                event = json.loads(data[at + 5 : at + 5 + length]).get("filesystem", {})
                found += event.get("type") == "EVENT_TYPE_CREATE" and event["name"].startswith("b-")
                at += 5 + length
            return found

        assert b'"start"' in chunk()
        os.kill(agent.process.pid, signal.SIGSTOP)
        try:
            for i in range(300):
                os.close(os.open(workdir / f"b-{i:03d}", os.O_CREAT | os.O_WRONLY, 0o644))
        finally:
            os.kill(agent.process.pid, signal.SIGCONT)
        seen, chunks = 0, 0
        while seen < 300:
            got = creates(chunk())
            seen += got
            chunks += got > 0
        assert seen == 300 and chunks <= 30, f"300 events came in {chunks} chunks"
