"""The agent's log lines as the runtime's ``sandbox logs`` reads them (``runtime.logs.read_agent_log``):
their times are UTC whatever zone the agent's process is in, the start line's and a warning's alike."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import die_with_parent, free_port, wait_healthy
from sandboxd.runtime.logs import read_agent_log


def test_an_agent_in_a_zone_nine_hours_ahead_logs_times_sandbox_logs_reads_right(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "agent.log"
    # A POSIX zone string (no tzdata needed): nine hours ahead of UTC, as a template or host on
    # Asia/Tokyo is. Read as UTC, a local time would land nine hours in the future.
    env = {**os.environ, "TZ": "XST-9"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "agent", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)
        # A warning through logging: /init names a default user the host does not have.
        answer = httpx.post(f"{url}/init", json={"defaultUser": "no-such-user-sandboxd"}, timeout=10)
        assert answer.status_code == 204, answer.text
        before = time.time()
        deadline = before + 10
        while "no-such-user-sandboxd" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(10)
    entries = read_agent_log(log, "sbx")
    started = [e for e in entries if e.message.startswith("sandboxd agent ") and " on http://" in e.message]
    warned = [e for e in entries if "no-such-user-sandboxd" in e.message]
    assert len(started) == 1 and len(warned) == 1, log.read_text()
    for entry in (*started, *warned):
        assert entry.level == "warn" and entry.fields["source"] == "sandboxd.agent", entry
        assert abs(entry.timestamp_ms / 1000 - before) < 60, (entry, before, log.read_text())
