"""Network slots reused quickly: many short-lived sandboxes on one runtime, each running a command
through the proxy and killed right after, so every slot of the runtime's pool (64 for the default
/24) comes back more than once. A sandbox's veth pair lives as long as its network namespace, which
anything holding a socket in it keeps alive: a leftover must never make a later create fail, and
no link of a killed sandbox may outlive it for long. Real runtime, real namespaces, the official SDK."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import types
from collections.abc import Callable

import pytest
from conftest import Runtime
from sandboxd import _core
from sandboxd.runtime.network.addressing import tag_for

CYCLES = 150
"""More than twice the pool of a runtime with ``--max-sandboxes 4`` (64 slots: the smallest block, a
/24), so every slot is reused at least twice."""

TIME_LIMIT_S = 200
"""Bound on the loop (about 20 s here): a hang fails the test instead of stalling the suite."""

LINGER_S = 20
"""How long a killed sandbox's link may outlive it: the kernel frees a namespace within
milliseconds of its last process and last socket; a leaked socket keeps it forever."""


def test_quick_create_run_kill_cycles_never_fail_nor_leave_links(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = start_runtime("--max-sandboxes", "4")
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    from e2b import Sandbox

    prefix = f"sd{tag_for(runtime.data_dir)}h"
    deadline = time.monotonic() + TIME_LIMIT_S
    for cycle in range(CYCLES):
        assert time.monotonic() < deadline, f"only {cycle} cycles in {TIME_LIMIT_S} s"
        try:
            sbx = Sandbox.create()
        except Exception as exc:
            pytest.fail(f"cycle {cycle}: create failed: {exc!r}")
        assert sbx.commands.run("true").exit_code == 0
        sbx.kill()
    # Every killed sandbox's link goes with its namespace (the kernel tears it down a moment later).
    linger_deadline = time.monotonic() + LINGER_S
    while (left := _core.net_list_links(prefix)) and time.monotonic() < linger_deadline:
        time.sleep(0.2)
    assert left == [], f"links of killed sandboxes still there: {left}"


PEER = """
import os, socket, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 9999))
server.listen(0)
fillers = []
for _ in range(3):  # the accept queue full: the kernel drops any further SYN to the port
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", 9999))
    fillers.append(c.getsockname()[1])
time.sleep(0.5)
print("full", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
while True:
    conn, (_, port) = server.accept()
    if port not in fillers:
        break
print("accepted", flush=True)
conn.recv(1)
print("closed", flush=True)
"""


def test_a_connect_cancelled_while_it_hangs_leaves_no_socket(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime connects into a sandbox on its event loop (a socket made in the sandbox's namespace,
    connected non-blocking); the task awaiting it can be cancelled (an ``_agent_up`` race, a tunnel's
    client gone) while the connect hangs. Here code in the sandbox fills a port's accept queue, so the
    kernel drops the connect's SYN and it hangs; the awaiting task is cancelled; its socket must be
    closed then, not leaked (it would pin the sandbox's namespace, link and slot): no descriptor is
    left, and once the queue drains the peer inside never sees the connect land (a socket still open
    would retransmit its SYN a second later and connect). The handle is the runtime's own kind,
    adopted from the running sandbox."""
    runtime = start_runtime()
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    from e2b import Sandbox
    from sandboxd.runtime.host import instance_name
    from sandboxd.runtime.manager import SandboxManager

    sbx = Sandbox.create()
    try:
        sbx.files.write("/tmp/peer.py", PEER)
        sbx.commands.run("python3 /tmp/peer.py > /tmp/peer.log 2>&1", background=True)

        def log() -> str:
            return sbx.commands.run("cat /tmp/peer.log 2>/dev/null || true").stdout

        deadline = time.monotonic() + 10
        while "full" not in (said := log()):
            assert time.monotonic() < deadline, said
            time.sleep(0.1)
        with sqlite3.connect(runtime.data_dir / "sandboxd.db") as db:
            (init_pid,) = db.execute("SELECT init_pid FROM sandboxes WHERE id = ?", (sbx.sandbox_id,)).fetchone()
        handle = _core.SandboxHandle.adopt(instance_name(runtime.data_dir), sbx.sandbox_id, init_pid)
        holder = types.SimpleNamespace(handles={sbx.sandbox_id: handle})

        def sockets() -> set[str]:
            """The sockets this process holds open, by inode (``socket:[N]``): the SDK's own
            connections may open or close meanwhile (a pool dropping an idle one), so the connect's
            socket is told apart by name, not by a count of descriptors."""
            found = set()
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith("socket:"):
                        found.add(target)
            return found

        async def cancelled() -> None:
            before = sockets()
            task = asyncio.ensure_future(SandboxManager._open_now(holder, sbx.sandbox_id, 9999))  # type: ignore[arg-type]
            await asyncio.sleep(0.3)  # the connect waits for its SYN's answer
            assert not task.done(), "the connect did not hang (the peer's accept queue is not full)"
            opened = sockets() - before
            assert opened, "the connect's socket is open while it hangs"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not opened & sockets(), "the cancelled connect's socket was leaked, still open"
            # The queue drains: a socket left open would now connect with its retransmitted SYN.
            await asyncio.to_thread(sbx.files.write, "/tmp/go", "")
            await asyncio.sleep(3)

        asyncio.run(cancelled())
        said = log()
        assert "full" in said and "accepted" not in said, f"the cancelled connect landed: {said!r}"
    finally:
        sbx.kill()
