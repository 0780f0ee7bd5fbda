"""The official E2B Python SDK against a real ``sandboxd serve``: every lifecycle example in E2B's
docs, over real namespaces, overlayfs and cgroups."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Runtime, ignore_glibc_signals, ignored_signals
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxException


def test_create_with_timeout_set_timeout_get_info_kill(e2b_env: Runtime) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.state == SandboxState.RUNNING
        assert 55 <= (info.end_at - info.started_at).total_seconds() <= 61
        assert sbx.commands.run("echo hi from the sandbox").stdout == "hi from the sandbox\n"
        sbx.set_timeout(600)
        info = sbx.get_info()
        assert (info.end_at - info.started_at).total_seconds() > 590
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_files_and_commands_inside_a_sandbox(e2b_env: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/notes.txt", "kept")
        assert sbx.files.read("notes.txt") == "kept"
        result = sbx.commands.run("id -un; pwd; cat notes.txt; echo; stat -c %U notes.txt")
        assert result.stdout == "user\n/home/user\nkept\nuser\n"
        # Paths like E2B's examples (/path/to/file) work: the agent writes as root and chowns.
        sbx.files.write("/path/to/file", "anywhere")
        assert sbx.commands.run("cat /path/to/file").stdout == "anywhere"
    finally:
        sbx.kill()


def test_an_account_added_or_changed_in_a_sandbox_is_used_at_once(e2b_env: Runtime) -> None:
    """The agent keeps its account lookups while its tripwire on /etc/passwd and /etc/group is
    quiet (``agent.users``): inside a sandbox's jail (its own root, mount namespace and /proc) a
    ``useradd`` and then a ``usermod`` are each seen by the very next request that names the user,
    the second with /etc/passwd's mtime set back.
    (Through the files API, which chowns to the user: a command would start in the sandbox's
    default workdir, /home/user, which a new account may not enter.)"""
    sbx = Sandbox.create()
    try:
        assert sbx.commands.run("id -un", user="user").stdout == "user\n"  # the cache is armed
        sbx.commands.run("useradd -u 4100 newcomer", user="root")
        sbx.files.write("/tmp/first", "x", user="newcomer")
        # The mtimes set back after the change (as two edits within one coarse tick leave them):
        # only the tripwire can tell, so this fails where the agent fell back to its stats.
        script = "touch -r /etc/passwd /tmp/ref; usermod -u 4200 newcomer; touch -r /tmp/ref /etc/passwd"
        sbx.commands.run(script, user="root")
        sbx.files.write("/tmp/second", "x", user="newcomer")
        assert sbx.commands.run("stat -c %u /tmp/first /tmp/second", user="root").stdout == "4100\n4200\n"
    finally:
        sbx.kill()


def test_sandbox_git_as_e2bs_docs_show_it(e2b_env: Runtime) -> None:
    """``sandbox.git`` (the SDK runs git through commands): init, commit, branch, push to a remote and
    clone it back, in ``base``."""
    sandbox = Sandbox.create()
    try:
        git = sandbox.git
        git.init("/home/user/repo", initial_branch="main")
        git.configure_user("Test User", "test@example.com")
        sandbox.files.write("/home/user/repo/README.md", "hello from git")
        git.add("/home/user/repo", all=True)
        git.commit("/home/user/repo", "first commit")
        assert git.status("/home/user/repo").current_branch == "main"
        git.create_branch("/home/user/repo", "feature")
        assert git.branches("/home/user/repo").branches == ["feature", "main"]
        sandbox.commands.run("git init --bare /tmp/remote.git")
        git.remote_add("/home/user/repo", "origin", "/tmp/remote.git")
        git.push("/home/user/repo", remote="origin", branch="feature")
        git.clone("/tmp/remote.git", path="/home/user/clone", branch="feature")
        assert sandbox.files.read("/home/user/clone/README.md") == "hello from git"
    finally:
        sandbox.kill()


def test_metadata_list_filters_and_pagination(e2b_env: Runtime) -> None:
    tag = uuid.uuid4().hex
    sandboxes = [Sandbox.create(metadata={"suite": tag, "n": str(i), "odd": str(i % 2)}) for i in range(5)]
    try:
        assert sandboxes[0].get_info().metadata == {"suite": tag, "n": "0", "odd": "0"}
        odd = Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "odd": "1"})).next_items()
        assert sorted(s.metadata["n"] for s in odd) == ["1", "3"]

        paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), limit=2)
        seen: list[str] = []
        pages = 0
        while paginator.has_next:
            items = paginator.next_items()
            assert len(items) <= 2
            seen += [s.sandbox_id for s in items]
            pages += 1
            if pages == 1:
                Sandbox.create(metadata={"other": tag}).kill()  # churn between pages changes nothing
        assert pages == 3
        assert sorted(seen) == sorted(s.sandbox_id for s in sandboxes)

        sandboxes[4].pause()
        paused = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sandboxes[4].sandbox_id]
        running = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING]))
        assert len(running.next_items()) == 4
    finally:
        for sbx in sandboxes:
            sbx.kill()


def test_metadata_filter_decodes_e2bs_double_encoding(e2b_env: Runtime) -> None:
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(metadata={"k": "v w", "a&b": "c=d", "suite": tag})
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"k": "v w", "a&b": "c=d", "suite": tag})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"k": "v", "suite": tag})).next_items() == []
    finally:
        sbx.kill()


def test_connect_by_id(e2b_env: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/x", "1")
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.files.read("/home/user/x") == "1"
        with pytest.raises(SandboxException):
            Sandbox.connect("doesnotexist00000000")
    finally:
        sbx.kill()


def test_pause_list_paused_then_connect_resumes_with_files(e2b_env: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/state.txt", "before pause")
        assert sbx.pause() is True
        assert sbx.pause() is False  # already paused: 409, which the SDK turns into False
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in paused]
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.files.read("/home/user/state.txt") == "before pause"
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    finally:
        sbx.kill()


@pytest.mark.parametrize("mode", ["full", "filesystem"])
def test_five_pause_resume_cycles_keep_files_and_processes(e2b_env: Runtime, mode: str) -> None:
    sbx = Sandbox.create()
    try:
        counter = sbx.commands.run(
            "while :; do date +%s%N >> /home/user/ticks; sleep 0.05; done", background=True, timeout=0
        )
        for cycle in range(5):
            sbx.files.write(f"/home/user/cycle-{cycle}", str(cycle))
            sbx.pause(mode=mode)
            resumed = Sandbox.connect(sbx.sandbox_id)
            for earlier in range(cycle + 1):
                assert resumed.files.read(f"/home/user/cycle-{earlier}") == str(earlier)
            if mode == "full":
                assert counter.pid in [p.pid for p in resumed.commands.list()]
                before = len(resumed.files.read("/home/user/ticks").splitlines())
                time.sleep(0.3)
                assert len(resumed.files.read("/home/user/ticks").splitlines()) > before
            else:
                assert resumed.commands.list() == []  # filesystem pause keeps files, not processes
    finally:
        sbx.kill()


def test_a_sandbox_that_expires_disappears(e2b_env: Runtime) -> None:
    sbx = Sandbox.create(timeout=2)
    assert sbx.is_running()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            Sandbox.get_info(sbx.sandbox_id)
        except NotFoundException:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the sandbox outlived its timeout")
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]


def test_on_timeout_pause_keeps_the_sandbox(e2b_env: Runtime) -> None:
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"})
    try:
        sbx.files.write("/home/user/keep", "me")
        deadline = time.monotonic() + 15
        while Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the sandbox was not paused at its timeout"
            time.sleep(0.2)
        assert Sandbox.connect(sbx.sandbox_id).files.read("/home/user/keep") == "me"
    finally:
        sbx.kill()


def test_bad_input_gets_clear_4xx(runtime: Runtime) -> None:
    api = httpx.Client(base_url=runtime.url, headers={"X-API-KEY": runtime.api_key})
    r = httpx.post(f"{runtime.url}/v2/sandboxes", json={"templateID": "base"})
    assert r.status_code == 401
    r = api.post("/v2/sandboxes", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": "soon"})
    assert r.status_code == 400
    assert "'timeout'" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 0})
    assert r.status_code == 400
    r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 10**7})
    assert r.status_code == 400
    assert "maximum" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"templateID": "nope"})
    assert r.status_code == 404
    assert "base" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"k": 1}})
    assert r.status_code == 400
    assert "metadata.k" in r.json()["message"]
    r = api.get("/v2/sandboxes", params={"limit": "lots"})
    assert r.status_code == 400
    r = api.get("/v2/sandboxes", params={"nextToken": "garbage!"})
    assert r.status_code == 400
    r = api.post("/sandboxes/nope/timeout", json={"timeout": 5})
    assert r.status_code == 404
    assert api.delete("/sandboxes/nope").status_code == 404


def test_templates_by_alias(e2b_env: Runtime) -> None:
    sbx = Sandbox.create(template="desktop")
    try:
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()


def test_every_agent_feature_works_inside_a_sandbox(e2b_env: Runtime) -> None:
    """The agent inside a sandbox was forked from the zygote and cannot import from the host:
    walk the paths that import lazily (map fields, gzip, PTYs, watches with entries)."""
    from e2b import PtySize

    sbx = Sandbox.create(envs={"FROM_CREATE": "yes"})
    try:
        assert sbx.commands.run("echo $FROM_CREATE $X", envs={"X": "1"}).stdout == "yes 1\n"
        sbx.files.write("/home/user/m.txt", "x" * 5000, metadata={"owner": "me"})
        assert sbx.files.get_info("/home/user/m.txt").metadata == {"owner": "me"}
        assert [e.metadata for e in sbx.files.list("/home/user") if e.name == "m.txt"] == [{"owner": "me"}]
        assert sbx.files.read("/home/user/m.txt", gzip=True) == "x" * 5000
        sbx.files.write("/home/user/z.txt", "zipped " * 100, gzip=True)
        assert sbx.files.read("/home/user/z.txt") == "zipped " * 100
        handle = sbx.files.watch_dir("/home/user", include_entry=True, recursive=True)
        sbx.files.write("/home/user/new/w.txt", "w")
        deadline = time.monotonic() + 10
        events: list[Any] = []
        while not any(e.entry for e in events) and time.monotonic() < deadline:
            events += handle.get_new_events()
            time.sleep(0.05)
        handle.stop()
        assert any(e.entry is not None for e in events)
        terminal = sbx.pty.create(PtySize(rows=24, cols=80), envs={"Z": "1"})
        sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=90))
        assert sbx.pty.kill(terminal.pid) is True
        agent_log = (e2b_env.data_dir / "sandboxes" / sbx.sandbox_id / "agent.log").read_text()
        assert "Error" not in agent_log, agent_log
    finally:
        sbx.kill()


def test_an_alias_reports_the_template_and_its_name(e2b_env: Runtime) -> None:
    sbx = Sandbox.create(template="desktop")
    try:
        info = sbx.get_info()
        assert info.template_id == "base"
        assert info.name == "desktop"
    finally:
        sbx.kill()


def test_nothing_in_a_sandbox_ignores_a_signal_because_of_how_the_runtime_was_started(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nohup sandboxd serve &`` from a script leaves the runtime SIGHUP, SIGINT and SIGQUIT ignored,
    and ignored dispositions survive ``fork`` and ``execve``: every sandbox's agent, and so its
    commands, terminals and code interpreter, ignored them too (a hang-up or a Ctrl-C that never
    arrives). The sandbox's agent starts with them at their defaults (it keeps CPython's SIGPIPE
    and SIGXFSZ, which every spawn resets). glibc's own 32 and 33 too, which a ``posix_spawn``
    parent (GNU make) leaves ignored and ``signal`` cannot reset: the agent and its commands kept
    them ignored."""
    ignore_glibcs = ignore_glibc_signals()

    def ignoring() -> None:
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        ignore_glibcs()

    runtime = start_runtime(preexec_fn=ignoring)
    runtime_ignores = ignored_signals(Path(f"/proc/{runtime.process.pid}/status").read_text())
    assert runtime_ignores & (1 << (signal.SIGHUP - 1))
    # 32 at least: glibc installs its handler for 33 (over SIG_IGN) once a threaded process changes ids.
    assert runtime_ignores & (1 << 31), f"{runtime_ignores:x}"
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sbx = Sandbox.create()
    try:
        assert ignored_signals(sbx.commands.run("cat /proc/self/status").stdout) == 0
        assert ignored_signals(sbx.commands.run("cat /proc/self/status", user="root").stdout) == 0
        pythons = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
        assert ignored_signals(sbx.commands.run("cat /proc/2/status", user="root").stdout) == pythons
        # A resume starts the agent again (through the zygote's fork, as a create): the same (review7).
        assert sbx.pause() is True
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert ignored_signals(resumed.commands.run("cat /proc/2/status", user="root").stdout) == pythons
        assert ignored_signals(resumed.commands.run("cat /proc/self/status").stdout) == 0
    finally:
        sbx.kill()
