"""Warm sandboxes (``serve --warm-sandboxes N``): a create served from the pool is indistinguishable
from a fresh one and carries nothing over from the pool or from an earlier sandbox; the pool's
sandboxes go with the runtime, also one that was killed. Real runtime, real sandboxes, the SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Runtime
from sandboxd.cli import build_parser
from sandboxd.runtime.host import (
    HostFacts,
    SandboxFlags,
    default_warm_sandboxes,
    instance_name,
    read_host,
    sandbox_limits,
    warm_growth_cap,
)


def _dirs(runtime: Runtime) -> set[str]:
    return {p.name for p in (runtime.data_dir / "sandboxes").iterdir()}


def _wait_warm(runtime: Runtime, n: int, exclude: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """The ids of ``n`` warm sandboxes, once they are all booted (directories without a row)."""
    deadline = time.monotonic() + 120
    while True:
        warm = _dirs(runtime) - exclude
        if len(warm) >= n and all(_cgroup_procs(runtime, i) for i in warm):
            return warm
        assert time.monotonic() < deadline, f"no {n} warm sandboxes after 120 s:\n{runtime.log.read_text()[-3000:]}"
        time.sleep(0.2)


def _cgroup_procs(runtime: Runtime, sandbox_id: str) -> list[int]:
    group = Path("sandboxd") / instance_name(runtime.data_dir) / sandbox_id
    for directory in (Path("/sys/fs/cgroup") / group, Path("/sys/fs/cgroup/memory") / group):
        try:
            return [int(x) for x in (directory / "cgroup.procs").read_text().split()]
        except OSError:
            continue
    return []


def _pool_ready(runtime: Runtime, n: int) -> None:
    """Wait until ``n`` warm sandboxes are warmed up and claimable (the runtime's own gauge): a booted
    sandbox's directory shows up before its warm-up ends, and a create before then is made cold."""
    deadline = time.monotonic() + 120
    while True:
        text = httpx.get(f"{runtime.url}/metrics", headers={"Authorization": f"Bearer {runtime.api_key}"}).text
        ready = [line.split()[-1] for line in text.splitlines() if line.startswith("sandboxd_warm_sandboxes ")]
        if ready and float(ready[0]) >= n:
            return
        assert time.monotonic() < deadline, f"no {n} claimable warm sandboxes after 120 s"
        time.sleep(0.2)


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Runtime], None]:
    def point(runtime: Runtime) -> None:
        for name, value in runtime.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("E2B_DEBUG", raising=False)

    return point


def test_a_warm_sandbox_is_a_fresh_sandbox_with_the_claims_identity(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    from e2b import Sandbox

    runtime = start_runtime("--warm-sandboxes", "2")
    sdk_env(runtime)
    warm = _wait_warm(runtime, 2)
    time.sleep(1.5)  # time in the pool must not show in the sandbox's start
    before = time.time()
    first = Sandbox.create(envs={"FIRST_SECRET": "one"}, metadata={"who": "first"})
    try:
        assert first.sandbox_id in warm  # it came from the pool
        # Its trust store has the egress CA from the runtime's trust layer, as a cold create's has.
        assert len(list((runtime.data_dir / "trust").iterdir())) == 1
        ca = (runtime.data_dir / "egress-ca.pem").read_text().strip()
        assert first.files.read("/etc/ssl/certs/ca-certificates.crt").count(ca) == 1
        info = first.get_info()
        assert info.started_at.timestamp() >= before - 1
        assert info.metadata == {"who": "first"}
        out = first.commands.run(
            "hostname; cat /etc/hostname; echo $FIRST_SECRET; cat /proc/sys/kernel/random/boot_id; nice; "
            "ps -L -o ni= -p 1,2"
        )
        hostname, etc_hostname, secret, first_boot, *nice = out.stdout.split()
        assert hostname == etc_hostname == first.sandbox_id
        assert secret == "one"
        # It booted at a lower priority and was given the default back: every thread of the init and
        # the agent (its event loop's workers included), and the command.
        assert len(nice) > 3 and set(nice) == {"0"}, nice
        first.files.write("/tmp/left-behind", "first's file")
        first.commands.run("sleep 600", background=True)
    finally:
        first.kill()

    warm = _wait_warm(runtime, 2, exclude={first.sandbox_id})
    other = Sandbox.create(template="host")  # another template: made cold, the warm ones stay
    try:
        assert other.sandbox_id not in warm
    finally:
        other.kill()
    assert warm <= _dirs(runtime)
    second = Sandbox.create(envs={"SECOND": "two"})
    try:
        assert second.sandbox_id in warm
        out = second.commands.run(
            "hostname; echo ${FIRST_SECRET:-unset}; cat /proc/sys/kernel/random/boot_id; "
            "test -e /tmp/left-behind && echo leaked || echo clean; ps -eo comm= | sort | uniq -c"
        )
        lines = out.stdout.splitlines()
        assert lines[0] == second.sandbox_id
        assert lines[1] == "unset"  # nothing of the first sandbox's environment
        assert lines[2] != first_boot
        assert lines[3] == "clean"
        assert "sleep" not in out.stdout  # no process of the first sandbox
        assert second._envd_access_token != first._envd_access_token  # type: ignore[attr-defined]
    finally:
        second.kill()


def _cpu_group(runtime: Runtime, sandbox_id: str) -> Path:
    """The sandbox's cgroup directory that holds its CPU weight (v1: the ``cpu`` hierarchy's)."""
    group = Path("sandboxd") / instance_name(runtime.data_dir) / sandbox_id
    v2 = Path("/sys/fs/cgroup") / group
    return v2 if (v2 / "cpu.weight").exists() else Path("/sys/fs/cgroup/cpu") / group


def _weight(runtime: Runtime, sandbox_id: str) -> int:
    """The sandbox's cgroup CPU weight in v2's units (v1's ``cpu.shares`` 1024 is v2's 100)."""
    directory = _cpu_group(runtime, sandbox_id)
    if (directory / "cpu.weight").exists():
        return int((directory / "cpu.weight").read_text())
    return round(int((directory / "cpu.shares").read_text()) * 100 / 1024)


def _threads(runtime: Runtime, sandbox_id: str) -> dict[int, tuple[int, int]]:
    """Every thread in the sandbox's cgroup: tid → (scheduling policy, niceness)."""
    directory = _cpu_group(runtime, sandbox_id)
    listing = directory / ("cgroup.threads" if (directory / "cpu.weight").exists() else "tasks")
    threads = {}
    for tid in map(int, listing.read_text().split()):
        try:
            threads[tid] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # it exited since the listing
            continue
    return threads


def test_a_claim_gives_a_warm_sandbox_the_default_priority_also_while_the_pool_refills(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    """A warm sandbox boots, and waits, at the least CPU weight in its cgroup and nice 10 (so a refill
    runs on what the creates leave); its claim gives it the kernel's defaults back, the cgroup and
    every thread in it, before anything of the user's runs: none of a sandbox's own processes stays
    low. Two claims in a row, the second while the pool refills beside it, and the refill's
    sandboxes still low."""
    from e2b import Sandbox

    runtime = start_runtime("--warm-sandboxes", "2")
    sdk_env(runtime)
    _pool_ready(runtime, 2)
    warm = _wait_warm(runtime, 2)
    for sandbox_id in warm:
        assert _weight(runtime, sandbox_id) == 1
        threads = _threads(runtime, sandbox_id)
        assert len(threads) >= 2 and {nice for _, nice in threads.values()} == {10}, threads  # init, agent
    first = Sandbox.create()
    second = Sandbox.create()  # the pool is refilling now: its first refill boots beside this claim
    try:
        assert {first.sandbox_id, second.sandbox_id} == warm
        for sandbox in (first, second):
            sandbox.commands.run("sleep 600", background=True)  # started by the claimed agent
            assert _weight(runtime, sandbox.sandbox_id) == 100
            threads = _threads(runtime, sandbox.sandbox_id)
            assert len(threads) > 3, threads
            assert set(threads.values()) == {(os.SCHED_OTHER, 0)}, threads
        refilled = _wait_warm(runtime, 2, exclude=warm)  # the claimed two keep their directories
        for sandbox_id in refilled:
            assert _weight(runtime, sandbox_id) == 1
    finally:
        first.kill()
        second.kill()


def test_a_steady_stream_of_creates_keeps_being_served_warm(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    """Creates one after another, each used a moment (a command, then 80 ms): the emptied pool refills
    at once, in the gaps between creates, rather than waiting for the refill delay after a claim
    (0.1 s). Where gaps are shorter than that delay (a quiet machine) the pool was never refilled and
    only the first was served warm; on a busy machine gaps are longer, and this test then only shows
    that the pool keeps serving. (A refill never runs while a create boots: creates with no gap
    between them at all are served cold once the pool is empty.)"""
    from e2b import Sandbox

    runtime = start_runtime("--warm-sandboxes", "1")
    sdk_env(runtime)
    _wait_warm(runtime, 1)
    served_warm = 0
    created = []
    try:
        for _ in range(20):
            before = _dirs(runtime)
            created.append(Sandbox.create())
            served_warm += created[-1].sandbox_id in before
            created[-1].commands.run("true")
            time.sleep(0.08)
    finally:
        for sandbox in created:
            sandbox.kill()
    assert served_warm >= 3, f"only {served_warm} of 20 creates one after another were served from the pool"


def test_warm_sandboxes_go_with_the_runtime_even_one_that_was_killed(start_runtime: Callable[..., Runtime]) -> None:
    runtime = start_runtime("--warm-sandboxes", "2")
    warm = _wait_warm(runtime, 2)
    os.kill(runtime.process.pid, signal.SIGKILL)  # leaves its warm sandboxes behind, with no row
    runtime.process.wait()
    assert all(_cgroup_procs(runtime, i) for i in warm)
    runtime.restart()  # its start kills them and frees their disks and id ranges
    deadline = time.monotonic() + 30
    while any(_cgroup_procs(runtime, i) for i in warm) or warm & _dirs(runtime):
        assert time.monotonic() < deadline, "a dead runtime's warm sandboxes outlived its restart"
        time.sleep(0.2)
    fresh = _wait_warm(runtime, 2)
    assert not fresh & warm
    runtime.process.send_signal(signal.SIGTERM)  # a clean stop kills them too
    runtime.process.wait(30)
    assert not any(_cgroup_procs(runtime, i) for i in fresh)
    assert not fresh & _dirs(runtime)


def test_a_sized_warm_template_is_served_warm_at_its_size(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None], base_template: bool
) -> None:
    """``--warm-template`` of a template built with ``cpu_count``/``memory_mb``: the pool's sandboxes
    have its size; after a rebuild with another size the pool's older sandbox is not served (it is
    dropped) and the pool refills at the new size."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    from e2b import Template

    name = f"warm-sized-{os.urandom(4).hex()}"
    runtime = start_runtime("--warm-sandboxes", "1", "--warm-template", name)
    sdk_env(runtime)
    Template.build(Template().from_template("base").run_cmd("true"), name, cpu_count=2, memory_mb=1536)
    warm = _wait_warm(runtime, 1)
    _pool_ready(runtime, 1)
    sandbox_id, size = _created_size(name)
    assert sandbox_id in warm and size == (2, 1536)

    stale = _wait_warm(runtime, 1, exclude={sandbox_id})
    _pool_ready(runtime, 1)
    Template.build(Template().from_template("base").run_cmd("true"), name, cpu_count=1, memory_mb=768)
    cold_id, size = _created_size(name)
    assert cold_id not in stale and size == (1, 768)
    warm = _wait_warm(runtime, 1, exclude=stale | {sandbox_id, cold_id})
    _pool_ready(runtime, 1)
    again_id, size = _created_size(name)
    assert again_id in warm and size == (1, 768)


def _created_size(template: str) -> tuple[str, tuple[int, int]]:
    """A sandbox of ``template`` made and killed: its id and its (cpu_count, memory_mb)."""
    from e2b import Sandbox

    sandbox = Sandbox.create(template, timeout=60)
    try:
        info = sandbox.get_info()
        return sandbox.sandbox_id, (info.cpu_count, info.memory_mb)
    finally:
        sandbox.kill()


def _host(memory_gib: float) -> HostFacts:
    return HostFacts(
        cpus=2,
        memory_bytes=int(memory_gib * (1 << 30)),
        pid_max=4 << 20,
        file_max=1 << 20,
        files_open=1000,
        inotify_instances=128,
        inotify_watches=8192,
        nofile_hard=1 << 20,
        data_free_mb=100_000,
    )


def test_the_default_pool_is_small_sized_from_memory_and_within_max_sandboxes() -> None:
    """``sandboxd serve`` without ``--warm-sandboxes`` (or with ``auto``) keeps one warm sandbox per
    2 GiB of the sandboxes' memory budget (the host's memory less its reserve), at most 4, none on a
    small host, and never more than ``--max-sandboxes``."""
    assert build_parser().parse_args(["serve"]).warm_sandboxes is None
    assert build_parser().parse_args(["serve", "--warm-sandboxes", "auto"]).warm_sandboxes is None
    assert build_parser().parse_args(["serve", "--warm-sandboxes", "0"]).warm_sandboxes == 0
    assert [default_warm_sandboxes(_host(gib), 256) for gib in (1, 2, 2.5, 4, 8, 24, 512)] == [0, 0, 1, 1, 3, 4, 4]
    assert default_warm_sandboxes(_host(24), 2) == 2
    assert default_warm_sandboxes(_host(24), 0) == 0


def test_the_default_pool_grows_only_within_memory_and_max_sandboxes_and_a_fixed_one_never() -> None:
    """How far the default pool may follow the bursts it sees: at most 128 warm sandboxes, one per
    128 MiB of the sandboxes' memory budget, never more than ``--max-sandboxes``; a host too small for
    a default pool grows none, and ``--warm-sandboxes N`` (``0`` too) is a fixed size."""
    assert [warm_growth_cap(_host(gib), 256) for gib in (1, 2, 4, 8, 24, 512)] == [4, 12, 28, 56, 128, 128]
    assert warm_growth_cap(_host(24), 20) == 20

    def grows_to(gib: float, flag: int | None) -> int:
        return sandbox_limits(_host(gib), SandboxFlags(warm_sandboxes=flag)).warm_grows_to

    assert grows_to(24, None) == 128
    assert grows_to(1, None) == 0  # no default pool there, none to grow
    assert grows_to(24, 4) == grows_to(24, 0) == 0


def _gauge(runtime: Runtime, name: str) -> float:
    text = httpx.get(f"{runtime.url}/metrics", headers={"Authorization": f"Bearer {runtime.api_key}"}).text
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(f"{name} ")]
    assert values, f"no {name} in /metrics"
    return float(values[0])


def _burst(n: int) -> None:
    """``n`` concurrent creates through the async SDK, then their kills."""
    import asyncio

    from e2b import AsyncSandbox

    async def burst() -> None:
        sandboxes = await asyncio.gather(*(AsyncSandbox.create(timeout=120) for _ in range(n)))
        await asyncio.gather(*(sandbox.kill() for sandbox in sandboxes))

    asyncio.run(burst())


def _until(what: str, done: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
        time.sleep(0.2)


def test_the_default_pool_grows_to_a_burst_and_shrinks_back_after_a_quiet_period(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    """A burst past the default pool: the pool grows to the burst's size and refills to it (the next
    such burst is served warm), then, once no burst as large came for its quiet period (shortened to
    15 s here through the runtime's environment), shrinks back to its default size, the extra warm
    sandboxes killed (their cgroups and directories gone)."""
    runtime = start_runtime("--warm-sandboxes", "auto", env={"SANDBOXD_WARM_DECAY_S": "15"})
    base = default_warm_sandboxes(read_host(runtime.data_dir), 256)
    if base == 0:
        pytest.skip("this host is too small for a default pool (under 2 GiB for sandboxes)")
    sdk_env(runtime)
    _pool_ready(runtime, base)
    assert _gauge(runtime, "sandboxd_warm_target") == base
    n = base + 3
    _burst(n)
    assert _gauge(runtime, "sandboxd_warm_target") == n
    _until("the pool refilled past its default size", lambda: _gauge(runtime, "sandboxd_warm_sandboxes") > base)
    grown = _dirs(runtime)
    assert len(grown) > base
    _until("the pool shrank back", lambda: _gauge(runtime, "sandboxd_warm_target") == base, 60)
    _until("the extra warm sandboxes were killed", lambda: len(_dirs(runtime)) == base, 60)
    for sandbox_id in grown - _dirs(runtime):
        assert not _cgroup_procs(runtime, sandbox_id)
    assert _gauge(runtime, "sandboxd_warm_sandboxes") <= base


def test_a_fixed_pool_keeps_its_size_after_a_burst(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    runtime = start_runtime("--warm-sandboxes", "2")
    sdk_env(runtime)
    _pool_ready(runtime, 2)
    _burst(5)
    assert _gauge(runtime, "sandboxd_warm_target") == 2
    _pool_ready(runtime, 2)
    time.sleep(1.0)
    assert len(_dirs(runtime)) == 2


def test_serve_keeps_its_default_pool_and_serves_creates_from_it(
    start_runtime: Callable[..., Runtime], sdk_env: Callable[[Runtime], None]
) -> None:
    """The default pool (``auto``, what a runtime started with no flag keeps) boots ahead of need and
    a create is served from it; ``--max-sandboxes`` bounds it. The pool's sandbox is a fresh one with
    the create's identity (the first test's guarantees hold for it: the same code path)."""
    from e2b import Sandbox

    runtime = start_runtime("--warm-sandboxes", "auto", "--max-sandboxes", "2")
    expected = default_warm_sandboxes(read_host(runtime.data_dir), 2)
    if expected == 0:
        pytest.skip("this host is too small for a default pool (under 2 GiB for sandboxes)")
    sdk_env(runtime)
    warm = _wait_warm(runtime, expected)
    _pool_ready(runtime, expected)
    time.sleep(0.5)
    assert len(_dirs(runtime)) == expected  # the pool stops at its size
    sandbox = Sandbox.create(envs={"WHO": "default-pool"})
    try:
        assert sandbox.sandbox_id in warm
        out = sandbox.commands.run("hostname; echo $WHO")
        assert out.stdout.split() == [sandbox.sandbox_id, "default-pool"]
    finally:
        sandbox.kill()


def test_the_default_pool_never_starts_a_build_of_its_template(
    start_runtime: Callable[..., Runtime], tmp_path: Path
) -> None:
    """A runtime started with no flag over a template store without ``base`` fetches nothing: its
    default pool waits for a create to build the template (``--warm-sandboxes N`` builds it at once,
    as an operator who asked for the pool expects)."""
    runtime = start_runtime("--warm-sandboxes", "auto", env={"SANDBOXD_TEMPLATE_STORE": str(tmp_path / "store")})
    deadline = time.monotonic() + 60
    while "the warm pool waits for template base to be built by a create" not in runtime.log.read_text():
        assert time.monotonic() < deadline, runtime.log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # past the pool's first look: a build would have started by now
    log = runtime.log.read_text()
    assert "template base: building" not in log, log[-3000:]
    assert not (runtime.data_dir / "sandboxes").exists() or not _dirs(runtime)


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-5", "0"])
def test_a_warm_decay_that_is_not_a_positive_number_of_seconds_stops_serve_with_its_name(value: str) -> None:
    # A typo must not crash later inside the pool, nor (as "nan" would) keep a grown pool for ever.
    result = subprocess.run(
        [sys.executable, "-c", "import sandboxd.runtime.warm"],
        env={**os.environ, "SANDBOXD_WARM_DECAY_S": value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"SANDBOXD_WARM_DECAY_S must be a number of seconds above 0, not {value!r}" in result.stderr
    assert "Traceback" not in result.stderr
