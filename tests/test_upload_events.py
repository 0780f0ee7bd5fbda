"""Uploads as watchers see them: envd's event sequence for the target's name, in the polling and the
streaming watcher, including a file written into a directory the same upload created (issue 12, items
1 and 2), however the request body is chunked.

envd (``upload.go``) writes in place: a new file is ``open(O_CREAT|O_TRUNC)`` (CREATE), ``chown``
(CHMOD), then the data (WRITE); an existing one is ``chown`` (CHMOD) first, then ``open(O_TRUNC)`` and
the data (WRITE, merged by the kernel). The agent's uploads stay atomic (temp file + rename) and report
the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Agent
from e2b import AsyncSandbox, FilesystemEvent, FilesystemEventType
from test_watch_sdk import pairs, poll_until

CREATE, WRITE, CHMOD = FilesystemEventType.CREATE, FilesystemEventType.WRITE, FilesystemEventType.CHMOD
NEW_FILE = [CREATE, CHMOD, WRITE]
OVERWRITE = [CHMOD, WRITE]


def kinds_of(events: list[FilesystemEvent], name: str) -> list[FilesystemEventType]:
    return [e.type for e in events if e.name == name]


def slow_chunks(data: bytes, pieces: int = 4, pause: float = 0.05) -> Iterator[bytes]:
    """The body in ``pieces`` chunks with pauses between them (a client that sends slowly)."""
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        time.sleep(pause)
        yield data[i : i + step]


def raw_upload(agent: Agent, path: Path, body: Any, encoding: str | None = None) -> None:
    headers = {"content-type": "application/octet-stream"}
    if encoding:
        headers["content-encoding"] = encoding
    r = httpx.post(f"{agent.url}/files", params={"path": str(path)}, content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


def test_polling_watcher_sees_envds_sequence_for_new_overwritten_and_empty_files(sandbox: Any, workdir: Path) -> None:
    handle = sandbox.files.watch_dir(str(workdir))
    try:
        sandbox.files.write(str(workdir / "new.txt"), "content")
        events = poll_until(handle, lambda ev: ("new.txt", WRITE) in pairs(ev))
        assert kinds_of(events, "new.txt") == NEW_FILE

        sandbox.files.write(str(workdir / "new.txt"), "replaced")
        events = poll_until(handle, lambda ev: ("new.txt", WRITE) in pairs(ev))
        assert kinds_of(events, "new.txt") == OVERWRITE

        sandbox.files.write(str(workdir / "empty.txt"), "")
        events = poll_until(handle, lambda ev: ("empty.txt", CHMOD) in pairs(ev), timeout=5)
        time.sleep(0.2)
        events += handle.get_new_events()
        assert kinds_of(events, "empty.txt") == [CREATE, CHMOD]  # no data written: no WRITE, as envd
        assert (workdir / "new.txt").read_text() == "replaced"
        assert sorted(p.name for p in workdir.iterdir()) == ["empty.txt", "new.txt"]  # no temporary left
    finally:
        handle.stop()


def test_polling_watcher_sequence_for_raw_gzip_and_multi_file_uploads(
    agent: Agent, sandbox: Any, workdir: Path
) -> None:
    handle = sandbox.files.watch_dir(str(workdir))
    try:
        raw_upload(agent, workdir / "raw.bin", slow_chunks(b"x" * 100_000))
        raw_upload(agent, workdir / "gz.txt", gzip.compress(b"hello " * 1000), encoding="gzip")
        sandbox.files.write_files(
            [{"path": str(workdir / "m1.txt"), "data": "1"}, {"path": str(workdir / "m2.txt"), "data": "2"}]
        )
        events = poll_until(handle, lambda ev: ("m2.txt", WRITE) in pairs(ev))
        for name in ("raw.bin", "gz.txt", "m1.txt", "m2.txt"):
            assert kinds_of(events, name) == NEW_FILE, (name, pairs(events))
        assert (workdir / "gz.txt").read_bytes() == b"hello " * 1000
    finally:
        handle.stop()


class Collector:
    """An ``on_event`` callback that keeps the events and wakes a waiter on each."""

    def __init__(self) -> None:
        self.events: list[FilesystemEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: FilesystemEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait(self, done: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.events):
                self.changed.clear()
                await self.changed.wait()


def test_streaming_watcher_sees_envds_sequence(agent: Agent, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)

    async def main() -> list[FilesystemEvent]:
        sbx = await AsyncSandbox.create()
        seen = Collector()
        handle = await sbx.files.watch_dir(str(workdir), seen)
        try:
            await sbx.files.write(str(workdir / "s.txt"), "one")
            await sbx.files.write(str(workdir / "s.txt"), "two")
            await seen.wait(lambda ev: len(kinds_of(ev, "s.txt")) >= 5, timeout=10)
            await asyncio.sleep(0.1)
        finally:
            await handle.stop()
        return seen.events

    events = asyncio.run(main())
    assert kinds_of(events, "s.txt") == NEW_FILE + OVERWRITE


RECURSIVE_RUNS = 20


def test_file_in_a_directory_made_by_the_same_upload_is_reported_as_new_every_time(
    agent: Agent, sandbox: Any, workdir: Path
) -> None:
    """The seed's recursive example, polling: the new folder's file always gets CREATE, CHMOD, WRITE,
    with bodies sent in one piece and in slow chunks."""
    handle = sandbox.files.watch_dir(str(workdir), recursive=True)
    try:
        for i in range(RECURSIVE_RUNS):
            name = f"folder-{i}/sub/my-file"
            if i % 2:
                raw_upload(agent, workdir / name, slow_chunks(b"hello", pieces=5, pause=0.01))
            else:
                sandbox.files.write(str(workdir / name), "hello")
            events = poll_until(handle, lambda ev, name=name: (name, WRITE) in pairs(ev), timeout=5)
            assert kinds_of(events, f"folder-{i}") == [CREATE, CHMOD], pairs(events)
            assert kinds_of(events, name) == NEW_FILE, (i, pairs(events))
    finally:
        handle.stop()


def test_file_in_a_new_directory_streaming_20_times(
    agent: Agent, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)

    async def main() -> list[list[FilesystemEvent]]:
        sbx = await AsyncSandbox.create()
        runs: list[list[FilesystemEvent]] = []
        for i in range(RECURSIVE_RUNS):
            seen = Collector()
            root = workdir / f"run-{i}"
            root.mkdir()
            handle = await sbx.files.watch_dir(str(root), seen, recursive=True)
            try:
                await sbx.files.write(str(root / "my-folder" / "my-file"), "hello")
                with contextlib.suppress(TimeoutError):
                    await seen.wait(lambda ev: ("my-folder/my-file", WRITE) in pairs(ev), timeout=5)
            finally:
                await handle.stop()
            runs.append(seen.events)
        return runs

    for i, seen in enumerate(asyncio.run(main())):
        assert kinds_of(seen, "my-folder/my-file") == NEW_FILE, (i, pairs(seen))
