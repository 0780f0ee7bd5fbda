"""The official E2B Python SDK's commands and PTY APIs against a real ``sandboxd agent``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GLIBC_SIGNALS, Agent, ignore_glibc_signals, ignored_signals
from e2b import AsyncSandbox, CommandExitException, PtySize
from e2b.exceptions import InvalidArgumentException, TimeoutException


def test_run_captures_stdout_stderr_and_exit_code(sandbox: Any) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0
    assert result.error is None
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo boom >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stderr == "boom\n"
    assert caught.value.error == "exit status 3"


def test_envs_cwd_and_user(sandbox: Any, workdir: Path) -> None:
    result = sandbox.commands.run("echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd=str(workdir))
    assert result.stdout == f"hi\n{workdir}\n"
    if os.geteuid() == 0:
        assert sandbox.commands.run("id -u", user="nobody").stdout == "65534\n"
    home = sandbox.commands.run("echo $HOME $USER").stdout.split()
    assert home[1] == sandbox.commands.run("id -un").stdout.strip()
    with pytest.raises(InvalidArgumentException) as caught:
        sandbox.commands.run("true", cwd=str(workdir / "missing"))
    assert "missing" in str(caught.value)


def test_a_missing_home_starts_at_the_root_and_a_bad_cwd_is_named(sandbox: Any, workdir: Path) -> None:
    """What the agent asks only once a spawn failed (a spawn that succeeds takes no stat of its cwd
    in Python): a user whose home is missing starts at ``/``; a cwd given that is missing or is a
    file is named in an ``invalid_argument``; a command that is missing is not taken for a bad cwd."""
    import pwd

    (workdir / "file").write_text("")
    for cwd in (workdir / "missing", workdir / "file"):
        with pytest.raises(InvalidArgumentException) as caught:
            sandbox.commands.run("true", cwd=str(cwd))
        assert f"cwd '{cwd}' does not exist" in str(caught.value)
    with pytest.raises(CommandExitException) as missing:
        sandbox.commands.run("no-such-command-anywhere", cwd=str(workdir))
    assert missing.value.exit_code == 127
    if os.geteuid() != 0:
        pytest.skip("runs a command as nobody: needs root")
    # A cwd the user may not enter: the failing step is named, not taken for the program's error.
    private = workdir / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(InvalidArgumentException) as denied:
        sandbox.commands.run("true", cwd=str(private), user="nobody")
    assert f"chdir to '{private}': Permission denied" in str(denied.value)
    # Missing, under a directory the user may not search: missing as envd names it (its check is
    # root's stat), not the Permission denied of the user's chdir that the spawn fails with.
    with pytest.raises(InvalidArgumentException) as hidden:
        sandbox.commands.run("true", cwd=str(private / "missing"), user="nobody")
    assert f"cwd '{private / 'missing'}' does not exist" in str(hidden.value)
    home = pwd.getpwnam("nobody").pw_dir
    if os.path.isdir(home):
        pytest.skip(f"nobody's home {home} exists here")
    assert sandbox.commands.run("pwd", user="nobody").stdout == "/\n"


def test_streaming_callbacks_see_output_as_it_happens(sandbox: Any) -> None:
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    sandbox.commands.run(
        "echo first; sleep 0.5; echo second",
        on_stdout=lambda line: seen.append((time.monotonic() - start, line)),
    )
    assert [line for _, line in seen] == ["first\n", "second\n"]
    assert seen[1][0] - seen[0][0] > 0.3  # the first line arrived before the command finished


def test_background_wait_kill_and_list(sandbox: Any) -> None:
    handle = sandbox.commands.run("sleep 0.3; echo done", background=True)
    assert handle.pid > 0
    assert handle.wait().stdout == "done\n"

    sleeper = sandbox.commands.run("sleep 60", background=True)
    pids = [p.pid for p in sandbox.commands.list()]
    assert sleeper.pid in pids
    listed = next(p for p in sandbox.commands.list() if p.pid == sleeper.pid)
    assert listed.cmd == "/bin/bash"
    assert listed.args[-1] == "sleep 60"
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as caught:
        sleeper.wait()
    assert caught.value.exit_code == -1
    assert caught.value.error == "signal: killed"
    assert sandbox.commands.kill(999_999) is False


def test_stdin_send_close_and_stream_input(sandbox: Any) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello ")
    sandbox.commands.send_stdin(handle.pid, b"world\n")
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "hello world\n"

    handle = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, iter(["abc", b"def", "g"]))
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout.strip() == "7"


def test_stdin_disabled_is_a_clear_error(sandbox: Any) -> None:
    handle = sandbox.commands.run("sleep 5", background=True)
    with pytest.raises(Exception) as caught:
        sandbox.commands.send_stdin(handle.pid, "x")
    assert "stdin" in str(caught.value)
    sandbox.commands.kill(handle.pid)


def test_connect_replays_output_produced_while_detached(sandbox: Any) -> None:
    handle = sandbox.commands.run("echo before; sleep 0.5; echo while-away; sleep 0.5; echo after", background=True)
    time.sleep(0.1)
    handle.disconnect()
    time.sleep(0.7)  # "while-away" is printed with nobody attached
    again = sandbox.commands.connect(handle.pid)
    result = again.wait()
    assert "while-away\n" in result.stdout
    assert result.stdout.endswith("after\n")


def test_exited_process_stays_connectable(sandbox: Any) -> None:
    handle = sandbox.commands.run("echo bye", background=True)
    handle.wait()
    assert sandbox.commands.connect(handle.pid).wait().stdout == "bye\n"


def test_timeout_kills_the_process(sandbox: Any, workdir: Path) -> None:
    marker = workdir / "still-running"
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep 2; touch {marker}", timeout=1)
    time.sleep(1.5)
    assert not marker.exists()


def test_pty_create_input_resize_kill(sandbox: Any) -> None:
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), cwd="/tmp")
    output, reader = _read_terminal(terminal)
    sandbox.pty.send_stdin(terminal.pid, b"stty size; echo marker-$((6*7))\n")
    deadline = _wait_for(output, b"marker-42")
    assert b"24 80" in output
    sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
    while b"30 100" not in output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"30 100" in output
    assert sandbox.pty.kill(terminal.pid) is True
    reader.join(10)
    assert not reader.is_alive()


def _read_terminal(terminal: Any) -> tuple[bytearray, threading.Thread]:
    """What the terminal prints, gathered by a thread until it ends."""
    output = bytearray()

    def drain() -> None:
        with contextlib.suppress(CommandExitException):
            terminal.wait(on_pty=output.extend)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return output, reader


def _wait_for(output: bytearray, marker: bytes) -> float:
    """Wait up to 10 s for ``marker`` in ``output``; the deadline, for what waits after it."""
    deadline = time.monotonic() + 10
    while marker not in output and time.monotonic() < deadline:
        time.sleep(0.05)
    return deadline


def test_multibyte_characters_split_across_chunks_arrive_intact(sandbox: Any) -> None:
    script = (
        "import sys, time\n"
        "for part in (b'caf\\xc3', b'\\xa9 \\xe2\\x82', b'\\xac\\n'):\n"
        "    sys.stdout.buffer.write(part); sys.stdout.flush(); time.sleep(0.1)\n"
    )
    result = sandbox.commands.run(f"python3 -c {shlex.quote(script)}")
    assert result.stdout == "café €\n"


def _ids(stat: str) -> tuple[int, int, int]:
    """(pid, process group, session) from a ``/proc/<pid>/stat`` line."""
    pid, rest = stat.split(" (", 1)
    fields = rest.rsplit(") ", 1)[1].split()
    return int(pid), int(fields[2]), int(fields[3])


def test_a_command_leads_a_session_and_kill_reaches_its_tree(sandbox: Any) -> None:
    # A command leads a session and process group of its own, so a kill reaches its children
    # (docs/benchmarks.md, rtt4: leading only a group was tried and reverted).
    pid, pgid, sid = _ids(sandbox.commands.run("cat /proc/$$/stat").stdout)
    assert pgid == pid == sid
    handle = sandbox.commands.run("sleep 100 & echo $!; wait", background=True)
    child = 0
    for stdout, _, _ in handle:
        if stdout:
            child = int(stdout)
            break
    assert os.getpgid(child) == handle.pid
    assert sandbox.commands.kill(handle.pid) is True

    def dead() -> bool:  # gone, or a zombie its new parent has yet to reap
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 10
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dead(), "the command's child outlived the kill"


def test_hundred_concurrent_commands(agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)
    # An empty HOME: `bash -l` then reads /etc/profile only, as in a sandbox, not the test host's
    # ~/.profile (here pyenv's and cargo's set-up, ~0.1 s of CPU a shell, so 100 of them were most of
    # this test's time, which at load ran near the SDK's 60 s timeout: docs/benchmarks.md, rtt4).
    envs = {"HOME": str(tmp_path)}

    async def main() -> list[str]:
        sbx = await AsyncSandbox.create()
        results = await asyncio.gather(*(sbx.commands.run(f"echo {i}", envs=envs) for i in range(100)))
        return [r.stdout for r in results]

    assert asyncio.run(main()) == [f"{i}\n" for i in range(100)]


def test_stalled_client_does_not_delay_another(agent: Agent, sandbox: Any) -> None:
    handle = sandbox.commands.run(
        "sleep 0.5; head -c 50000000 /dev/zero | base64 -w 0; echo; echo finished", background=True
    )
    # A second client attaches to the same process and never reads a byte.
    stalled = httpx.Client(timeout=None)
    body = json.dumps({"process": {"pid": handle.pid}}).encode()
    request = stalled.build_request(
        "POST",
        f"{agent.url}/process.Process/Connect",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
    )
    response = stalled.send(request, stream=True)
    try:
        assert response.status_code == 200
        started = time.monotonic()
        result = handle.wait()
        elapsed = time.monotonic() - started
        assert result.stdout.endswith("finished\n")
        assert len(result.stdout) > 60_000_000
        # Generous bound, not a speed target: a reader blocked on the stalled client would hang forever.
        assert elapsed < 60
    finally:
        response.close()
        stalled.close()


def test_agent_stays_responsive_while_user_processes_spin(agent: Agent, sandbox: Any) -> None:
    spinners = [sandbox.commands.run("while :; do :; done", background=True) for _ in range(4)]
    try:
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            assert httpx.get(f"{agent.url}/health", timeout=10).status_code == 204
            latencies.append(time.monotonic() - started)
        assert sandbox.commands.run("echo alive").stdout == "alive\n"
        assert max(latencies) < 5
    finally:
        for spinner in spinners:
            sandbox.commands.kill(spinner.pid)


IGNORED_BY_THE_STARTER = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)
"""What ``nohup sandboxd agent &`` from a script leaves ignored (``nohup``: SIGHUP; a shell without
job control: SIGINT and SIGQUIT for a background job), and one more."""


def test_commands_and_terminals_start_with_no_signal_ignored_whatever_the_agent_was_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ignored dispositions survive ``fork`` and ``execve``: without a reset, an agent started by
    ``nohup`` gave every command a SIGHUP it could not receive, and one started in the background of
    a script gave them a SIGINT no Ctrl-C could deliver. The agent keeps what it was given (``nohup``
    is there so that it survives a hang-up); what it starts begins with every signal at its default,
    as a command on a freshly booted machine (envd's, under systemd) does. glibc's own 32 and 33
    included, which a ``posix_spawn`` parent (GNU make) leaves ignored and glibc's ``sigaction``
    cannot reset: a command kept them ignored."""
    from conftest import die_with_parent, free_port, wait_healthy
    from e2b import Sandbox

    ignore_glibcs = ignore_glibc_signals()

    def ignoring() -> None:
        die_with_parent()
        for sig in IGNORED_BY_THE_STARTER:
            signal.signal(sig, signal.SIG_IGN)
        ignore_glibcs()

    port = free_port()
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "agent", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=ignoring,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        agent_ignores = ignored_signals(Path(f"/proc/{process.pid}/status").read_text())
        assert agent_ignores & (1 << (signal.SIGHUP - 1)), "the agent itself no longer ignores nohup's SIGHUP"
        assert agent_ignores & GLIBC_SIGNALS == GLIBC_SIGNALS, f"{agent_ignores:x}"
        monkeypatch.setenv("E2B_DEBUG", "true")
        monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{port}")
        sbx = Sandbox.create()
        assert ignored_signals(sbx.commands.run("cat /proc/self/status").stdout) == 0
        assert ignored_signals(sbx.commands.run("cat /proc/self/status", user="root").stdout) == 0
        background = sbx.commands.run("sleep 30", background=True)
        # Once its bash has exec'd the sleep: bash itself ignores SIGQUIT while it runs (every bash,
        # whatever it was started with), and a read before the exec saw that (review7: 1 run in 2).
        deadline = time.monotonic() + 10
        while "Name:\tsleep" not in (status := sbx.commands.run(f"cat /proc/{background.pid}/status").stdout):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert ignored_signals(status) == 0
        background.kill()

        terminal = sbx.pty.create(PtySize(rows=24, cols=200))
        output, reader = _read_terminal(terminal)
        # A child of the terminal's shell: bash passes on what it was started with ignored.
        sbx.pty.send_stdin(terminal.pid, b"grep SigIgn /proc/self/status | tr -d '\\t'; echo done-$((6*7))\n")
        _wait_for(output, b"done-42")
        found = re.search(rb"SigIgn:([0-9a-f]{16})", output)
        assert found is not None, output.decode(errors="replace")
        assert ignored_signals(f"SigIgn: {found[1].decode()}") == 0, output.decode(errors="replace")
        # And Ctrl-C reaches a foreground command: the terminal's ^C is a SIGINT to its group.
        sleeping = f"pgrep -P {terminal.pid} -x sleep || true"  # the terminal's, not the one killed above
        sbx.pty.send_stdin(terminal.pid, b"sleep 300\n")
        deadline = time.monotonic() + 10
        while not sbx.commands.run(sleeping).stdout.strip():
            assert time.monotonic() < deadline, output.decode(errors="replace")
            time.sleep(0.1)
        sbx.pty.send_stdin(terminal.pid, b"\x03")
        deadline = time.monotonic() + 10
        while sbx.commands.run(sleeping).stdout.strip():
            assert time.monotonic() < deadline, "Ctrl-C did not interrupt the terminal's sleep"
            time.sleep(0.1)
        sbx.pty.kill(terminal.pid)
        reader.join(10)
    finally:
        process.terminate()
        process.wait(10)
