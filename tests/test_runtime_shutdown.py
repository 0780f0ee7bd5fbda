"""How ``sandboxd serve`` ends: on SIGTERM and on SIGINT (Ctrl-C) it stops its zygote and its network
helper and removes its network table, then exits; nothing of it is left running. Real runtime, real
signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Runtime, zygote_pid


def _table_of(data_dir: Path) -> str:
    """The network table a runtime on ``data_dir`` makes (others' runtimes may add tables meanwhile)."""
    from sandboxd.runtime.network.addressing import tag_for

    return f"sandboxd_{tag_for(data_dir, None)}"


def _tables() -> set[str]:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in listed.splitlines() if line.startswith("table inet sandboxd_")}


def _gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has exited (a zombie counts: nothing runs, whoever reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_zygote_and_network_and_exits_on_a_stop_signal(
    start_runtime: Callable[..., Runtime], sig: signal.Signals
) -> None:
    """SIGINT used to hang the runtime for ever, its zygote and its network helper alive: asyncio's
    Runner cancelled the main task at the first await of the clean-up, and the loop's shutdown then
    waited on a thread blocked in the helper's ``wait()``, while the helper waited for the runtime."""
    runtime = start_runtime()
    ours = {_table_of(runtime.data_dir)}
    assert ours <= _tables(), "the runtime made no network table: the test would prove nothing"
    zygote = zygote_pid(runtime)
    runtime.process.send_signal(sig)
    try:
        status = runtime.process.wait(30)
    except subprocess.TimeoutExpired:
        runtime.process.kill()  # hung: leave nothing behind on the machine, then fail
        runtime.process.wait()
        for table in ours:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False)
        pytest.fail(f"sandboxd serve did not exit within 30 s of {sig.name}:\n{runtime.log.read_text()[-3000:]}")
    assert status == 0, runtime.log.read_text()[-3000:]
    assert _gone(zygote, 10), f"the zygote {zygote} outlived the runtime"
    assert not (ours & _tables()), f"the runtime's network table is left: {ours & _tables()}"
    assert _instance_groups(runtime.data_dir) == [], "the runtime's cgroup groups are left"


def test_a_stop_signal_while_an_answered_create_boots_keeps_its_sandbox_for_the_next_runtime(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create is answered once its agent runs; its ``/init`` and link finish after (here its agent
    starts 2 s late). A stop signal meanwhile lets that boot finish before the runtime stops watching:
    the sandbox the answer named stays, with the create's env, and the restarted runtime adopts it."""
    from e2b import Sandbox

    runtime = start_runtime(env={"SANDBOXD_FAULT_CREATED_AGENT": "after:2:"})
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    sbx = Sandbox.create(envs={"KEPT": "yes"})
    runtime.process.send_signal(signal.SIGTERM)
    assert runtime.process.wait(30) == 0, runtime.log.read_text()[-3000:]
    runtime.restart()
    try:
        assert sbx.commands.run("echo $KEPT").stdout == "yes\n"
    finally:
        sbx.kill()


def test_a_stop_signal_ends_the_runtime_while_a_client_holds_a_command_stream_open(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a benchmark's loop (stop 39): uvicorn waited, with no bound, for every open request to
    end before the runtime's clean-up, and a stream through the proxy (a background command's, a
    watch's, a terminal's) lasts as long as its client: on SIGTERM the runtime stopped listening and
    never exited, its zygote, network helper and warm pool running on. Now the stream is cut after the
    grace, the runtime exits 0 with no traceback in its log, and the sandbox and its command run on for
    the restarted runtime."""
    from e2b import Sandbox
    from sandboxd.agent.http_server import SHUTDOWN_GRACE_S

    runtime = start_runtime("--warm-sandboxes", "0")
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    sbx = Sandbox.create()
    try:
        command = sbx.commands.run("sleep 600", background=True)  # its output stream stays open
        time.sleep(0.3)
        started = time.monotonic()
        runtime.process.send_signal(signal.SIGTERM)
        try:
            status = runtime.process.wait(SHUTDOWN_GRACE_S + 25)
        except subprocess.TimeoutExpired:
            runtime.process.kill()
            runtime.process.wait()
            runtime.restart()  # so that the sandbox is killed below
            raise AssertionError("the runtime did not exit on SIGTERM while a command stream was open") from None
        took = time.monotonic() - started
        log = runtime.log.read_text()
        assert status == 0, log[-3000:]
        assert took >= SHUTDOWN_GRACE_S - 0.5, f"exited in {took:.1f} s: the stream was not waited for at all"
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
        runtime.restart()
        running = [p for p in sbx.commands.list() if p.pid == command.pid]
        assert running and running[0].args[-1] == "sleep 600", sbx.commands.list()
    finally:
        sbx.kill()


def test_a_runtime_killed_while_an_answered_create_boots_ends_that_sandbox_when_it_starts_again(
    start_runtime: Callable[..., Runtime],
) -> None:
    """A SIGKILL between a create's answer and the end of its boot leaves a sandbox whose agent never
    got its token or env (its row says so: ``booting``). The restarted runtime does not adopt it: it
    ends it, with the reason its client then reads, and its processes are gone."""
    import sqlite3

    import httpx

    runtime = start_runtime("--warm-sandboxes", "0", env={"SANDBOXD_FAULT_CREATED_AGENT": "after:3:"})
    headers = {"X-API-KEY": runtime.api_key}
    created = httpx.post(f"{runtime.url}/sandboxes", headers=headers, json={"templateID": "base"}, timeout=60)
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    with sqlite3.connect(runtime.data_dir / "sandboxd.db") as db:
        init_pid, booting = db.execute("SELECT init_pid, booting FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    assert booting == 1, "the test killed the runtime after the boot: it would prove nothing"
    os.kill(runtime.process.pid, signal.SIGKILL)
    runtime.process.wait()
    runtime.restart()
    info = httpx.get(f"{runtime.url}/sandboxes/{sandbox_id}", headers=headers)
    assert info.status_code == 404 and "the runtime stopped before the sandbox's boot was done" in info.text, info.text
    assert _gone(init_pid, 10), "the half-booted sandbox's processes are left"


def test_a_zygote_exits_when_its_runtime_is_killed(start_runtime: Callable[..., Runtime]) -> None:
    """A SIGKILL runs no clean-up: the zygote notices its socket's end (no signal, no timer) and exits.
    (The sandboxes keep running, by design, for a restarted runtime to re-adopt.)"""
    runtime = start_runtime()
    zygote = zygote_pid(runtime)
    runtime.process.kill()
    runtime.process.wait()
    try:
        assert _gone(zygote, 10), f"the zygote {zygote} outlived its killed runtime"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote, signal.SIGKILL)
        runtime.restart()  # and stopped by the fixture: its network table removed


def _instance_groups(data_dir: Path) -> list[str]:
    """The cgroup groups of the runtime on ``data_dir`` (``sandboxd/<instance>``) that exist."""
    from sandboxd.runtime.host import instance_name

    instance = instance_name(data_dir)
    root = Path("/sys/fs/cgroup")  # v2's one hierarchy, or v1's, one per mount under it
    return [str(p) for base in (root, *root.iterdir()) if (p := base / "sandboxd" / instance).is_dir()]


# Seconds after the zygote appears: its start, the network's, the disk pool's, the manager's, serving.
_START_UP_MOMENTS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0]


def test_a_stop_signal_at_any_moment_of_the_start_up_ends_the_runtime_cleanly(tmp_path: Path) -> None:
    """SIGTERM at moments spread over the start-up, from the zygote's fork to serving: each time the
    runtime exits 0 within 30 s, with no traceback, its zygote gone, its network table and its cgroup
    groups removed.

    Found by this test: the handler used to raise KeyboardInterrupt wherever the main thread was, and a
    SIGTERM ~0.15-0.2 s in landed in a weakref callback, where the interpreter printed it as
    "Exception ignored" and dropped it: the runtime went on to serve, and the stop hung for good. And
    a signal while the zygote started (before the clean-up was armed), or before the event loop ran,
    left the instance's cgroup group behind. It also used to raise UnboundLocalError ('place', the disk
    pool not opened yet) part-way through the clean-up, skipping the steps after it."""
    import sys

    from conftest import free_port

    if os.geteuid() != 0:
        pytest.skip("the runtime needs root")
    for moment in _START_UP_MOMENTS:
        data_dir = tmp_path / f"at-{moment}"
        log = tmp_path / f"serve-{moment}.log"
        args = [sys.executable, "-m", "sandboxd", "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]
        with log.open("wb") as out:
            process = subprocess.Popen([*args, "--api-key", "k", "--warm-sandboxes", "0"], stdout=out, stderr=out)
        try:
            zygote = None
            deadline = time.monotonic() + 60
            while zygote is None and time.monotonic() < deadline and process.poll() is None:
                # Every thread's children: the zygote is started from a worker thread.
                for children in Path(f"/proc/{process.pid}/task").glob("*/children"):
                    for child in children.read_text().split():
                        with contextlib.suppress(OSError):
                            if b"sandboxd.runtime.zygote" in Path(f"/proc/{child}/cmdline").read_bytes():
                                zygote = int(child)
                time.sleep(0.002)
            assert zygote is not None, log.read_text()
            time.sleep(moment)
            process.send_signal(signal.SIGTERM)
            try:
                status = process.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"SIGTERM {moment} s after the zygote's start: no exit in 30 s\n{log.read_text()[-3000:]}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text()
        assert status == 0, f"at {moment} s: {text[-3000:]}"
        assert "Traceback" not in text and "Exception ignored" not in text, f"at {moment} s: {text[-3000:]}"
        assert _gone(zygote, 10), f"at {moment} s: the zygote {zygote} outlived the runtime"
        assert _table_of(data_dir) not in _tables(), f"at {moment} s"
        assert _instance_groups(data_dir) == [], f"at {moment} s: {text[-3000:]}"
