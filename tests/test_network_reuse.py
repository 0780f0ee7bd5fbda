"""Network slots reused quickly: many short-lived sandboxes on one runtime, each running a command
through the proxy and killed right after, so every slot of the runtime's pool (64 for the default
/24) comes back more than once. A sandbox's veth pair lives as long as its network namespace, which
anything holding a socket in it keeps alive: a leftover must never make a later create fail, and
no link of a killed sandbox may outlive it for long. Real runtime, real namespaces, the official SDK."""

from __future__ import annotations

import time
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
