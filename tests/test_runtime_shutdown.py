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
    before = _tables()
    runtime = start_runtime()
    ours = _tables() - before
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
    assert ours and not (ours & _tables()), f"the runtime's network table is left: {ours & _tables()}"


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
