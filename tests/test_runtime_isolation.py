"""What a sandbox cannot see or touch, and how the runtime survives faults: real namespaces,
overlayfs and cgroups, driven through the official SDK."""

from __future__ import annotations

import glob
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import TEMPLATE_STORE, Runtime
from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException


@pytest.fixture
def pair(e2b_env: Runtime) -> Iterator[tuple[Sandbox, Sandbox]]:
    a, b = Sandbox.create(), Sandbox.create()
    yield a, b
    a.kill()
    b.kill()


def test_hostname_is_the_sandbox_id(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    assert a.commands.run("hostname").stdout.strip() == a.sandbox_id


def test_host_files_outside_the_template_are_invisible(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    secret = runtime.data_dir / "host-secret.txt"
    secret.write_text("host only")
    for path in (str(secret), "/work", str(runtime.data_dir), "/root/.bash_history"):
        assert a.commands.run(f"test -e {path} && echo visible || echo hidden").stdout == "hidden\n", path
    # /etc is the sandbox's own; root may write /usr, but only into the sandbox's own layer.
    assert "user:x:1000" in a.commands.run("cat /etc/passwd").stdout
    a.commands.run("touch /usr/sandboxd-probe", user="root")
    assert not os.path.exists("/usr/sandboxd-probe")
    assert not list(TEMPLATE_STORE.glob("layers/*/usr/sandboxd-probe")), "a template layer was written"
    # In the host template, /usr is the host's, read-only.
    host = Sandbox.create(template="host")
    try:
        result = host.commands.run("touch /usr/sandboxd-probe 2>&1 || echo refused", user="root")
        assert "refused" in result.stdout
        assert not os.path.exists("/usr/sandboxd-probe")
    finally:
        host.kill()


def test_host_processes_are_invisible(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    pids = [int(p) for p in a.commands.run("ls /proc | grep -E '^[0-9]+$'").stdout.split()]
    assert 1 in pids
    assert len(pids) < 20  # init, the agent, bash, ls: not the host's hundreds
    everything = a.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
    assert "pytest" not in everything  # this test's own process is on the host


def test_runtime_secrets_do_not_leak_into_sandboxes(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    probe = "cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"
    seen = a.commands.run(probe, user="root").stdout
    assert runtime.api_key not in seen
    assert "--api-key" not in seen


def test_sandboxes_cannot_see_each_other(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    a.files.write("/home/user/mine.txt", "a's")
    a.commands.run("sleep 300", background=True, timeout=0)
    assert b.commands.run("test -e /home/user/mine.txt && echo seen || echo unseen").stdout == "unseen\n"
    assert b.commands.run("pgrep -x sleep || echo none").stdout == "none\n"
    assert b.commands.run("ls /tmp").stdout == a.commands.run("ls /tmp").stdout == ""


def test_host_loopback_services_are_unreachable(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted: list[object] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    try:
        result = a.commands.run(
            f"timeout 3 bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo reached || echo blocked"
        )
        assert result.stdout.strip().endswith("blocked")
        assert accepted == []
        ifaces = a.commands.run("ls /sys/class/net").stdout.split()
        assert ifaces == ["eth0", "lo"]  # loopback, and the link its egress goes through
    finally:
        listener.close()


def test_limits_are_applied(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    # The cgroup namespace shows the sandbox's own cgroup as the root.
    assert a.commands.run("cat /proc/self/cgroup").stdout.strip() != ""
    metrics = a.get_metrics()
    assert metrics and metrics[-1].mem_total == 1024 << 20


# ------------------------------------------------------------------------------------------ faults


@pytest.fixture
def fault_runtime(start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch) -> Runtime:
    runtime = start_runtime()
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return runtime


def test_kill_9_of_the_runtime_then_restart_keeps_every_sandbox(fault_runtime: Runtime) -> None:
    running = Sandbox.create()
    paused = Sandbox.create()
    running.files.write("/home/user/survivor", "still here")
    handle = running.commands.run("sleep 600", background=True, timeout=0)
    paused.files.write("/home/user/p", "paused")
    paused.pause()
    fault_runtime.process.send_signal(signal.SIGKILL)
    fault_runtime.process.wait(10)
    fault_runtime.restart()
    try:
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        assert {running.sandbox_id, paused.sandbox_id} <= listed
        again = Sandbox.connect(running.sandbox_id)
        assert again.files.read("/home/user/survivor") == "still here"
        assert handle.pid in [p.pid for p in again.commands.list()]
        assert Sandbox.connect(paused.sandbox_id).files.read("/home/user/p") == "paused"
    finally:
        Sandbox.kill(running.sandbox_id)
        Sandbox.kill(paused.sandbox_id)


def test_kill_9_of_an_agent_is_reported(fault_runtime: Runtime) -> None:
    sbx = Sandbox.create()
    os.kill(_agent_host_pid(sbx.sandbox_id), signal.SIGKILL)
    api = httpx.Client(base_url=fault_runtime.url, headers={"X-API-KEY": fault_runtime.api_key})
    deadline = time.monotonic() + 10
    while api.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 200:
        assert time.monotonic() < deadline, "the dead sandbox is still reported as running"
        time.sleep(0.1)
    r = api.get(f"/sandboxes/{sbx.sandbox_id}")
    assert r.status_code == 404
    assert "agent died" in r.json()["message"]
    # The death is recorded first; reclaiming the host's side of it follows in the background.
    deadline = time.monotonic() + 30
    while (kinds := [e["kind"] for e in api.get(f"/sandboxes/{sbx.sandbox_id}/events").json()])[-1] != "reclaimed":
        assert kinds == ["created", "died"], kinds
        assert time.monotonic() < deadline, "the dead sandbox was never reclaimed"
        time.sleep(0.1)
    assert kinds == ["created", "died", "reclaimed"]
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxException) as caught:
        sbx.commands.run("true")
    assert "agent died" in str(caught.value)
    # Reclaimed: nothing of it is left on the host, and killing it answers as for any gone sandbox.
    assert not (fault_runtime.data_dir / "sandboxes" / sbx.sandbox_id).exists()
    assert glob.glob(f"/sys/fs/cgroup/**/{sbx.sandbox_id}", recursive=True) == []
    assert api.delete(f"/sandboxes/{sbx.sandbox_id}").status_code == 404


def _agent_host_pid(sandbox_id: str) -> int:
    """The host pid of the sandbox's agent: the process in its cgroup whose in-sandbox pid is 2."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            with open(f"/proc/{pid}/cgroup") as f:
                cgroup = f.read()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if sandbox_id in cgroup and nspid[-1:] == ["2"]:
            return int(pid)
    raise AssertionError(f"no agent process found for {sandbox_id}")


def test_the_data_dir_and_database_are_owner_only(runtime: Runtime) -> None:
    assert runtime.data_dir.stat().st_mode & 0o777 == 0o700
    assert (runtime.data_dir / "sandboxd.db").stat().st_mode & 0o777 == 0o600
