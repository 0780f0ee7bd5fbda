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


def test_a_stop_signal_during_start_up_ends_the_runtime_cleanly(tmp_path: Path) -> None:
    """SIGTERM as soon as the zygote is forked, while the runtime sets up its network and disk pool:
    the clean-up still runs whole. It used to raise UnboundLocalError ('place', the disk pool not
    opened yet) part-way, skipping the steps after it, and left the instance's cgroup group."""
    import sys

    from conftest import free_port

    if os.geteuid() != 0:
        pytest.skip("the runtime needs root")
    log = tmp_path / "serve.log"
    args = [sys.executable, "-m", "sandboxd", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path)]
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
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert _gone(zygote, 10), f"the zygote {zygote} outlived the runtime"
    assert _table_of(tmp_path) not in _tables()
    # Not asserted yet: the runtime's empty instance cgroup group is removed by most interrupted
    # starts, but CI at f500934 found one left (under pids) when the signal came at another moment.
    # A known gap until the start-up's steps are ordered for it; an empty group holds no process.
