"""The zygote's protocol with a real zygote process: a create the jail refuses is answered with the
reason, however long, and the zygote goes on serving.

What A (the zygote's fork that builds the sandbox) reports is one atomic pipe write that the zygote
answers as soon as it is read, before A has exited; an error that is not an ``OSError`` must be
reported too, and A must never fall back into the zygote's own loop (it would answer on a socket it
closed, and the runtime would see only "sandbox setup failed")."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandboxd import _core
from sandboxd.runtime import zygote
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.zygote_client import ZygoteClient


@pytest.fixture(scope="module")
def zygote_process() -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    sock, process = zygote.start()
    try:
        yield sock, process
    finally:
        sock.close()  # the zygote exits when its end closes (and so does its spare)
        assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def zygote_socket(zygote_process: tuple[socket.socket, subprocess.Popen[bytes]]) -> socket.socket:
    return zygote_process[0]


def ask(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    socket.send_fds(sock, [json.dumps(request).encode()], [])
    sock.settimeout(60)  # the first answer waits for the zygote's imports
    answer: dict[str, Any] = json.loads(sock.recv(zygote.MAX_MESSAGE))
    return answer


def refused(sandbox_id: str, tmp: Path) -> dict[str, Any]:
    return {
        "id": sandbox_id,
        "instance": "test-zygote",
        "id_base": 0,
        "template_dirs": [str(tmp / "no-template")],
        "sandbox_dir": str(tmp / "sandbox"),
        "log": str(tmp / "agent.log"),
    }


def test_a_refused_create_is_answered_with_its_reason(zygote_socket: socket.socket, tmp_path: Path) -> None:
    answer = ask(zygote_socket, refused("bad/id", tmp_path))
    assert answer["id"] == "bad/id"
    assert answer["ok"] is False
    assert "must be 1-64 bytes" in answer["error"]  # the jail's own words, not "sandbox setup failed"


def test_a_reason_longer_than_one_pipe_write_is_cut_and_the_zygote_goes_on(
    zygote_socket: socket.socket, tmp_path: Path
) -> None:
    long_id = "x" * (2 * select.PIPE_BUF)
    answer = ask(zygote_socket, refused(long_id, tmp_path))
    assert answer["id"] == long_id and answer["ok"] is False
    assert answer["error"].startswith('id "xxx')
    assert len(answer["error"].encode()) < select.PIPE_BUF
    assert "\n" not in answer["error"]
    # Still serving: the next create is answered too.
    assert ask(zygote_socket, refused("bad/again", tmp_path))["id"] == "bad/again"


def test_volumes_in_a_request_reach_the_jail(zygote_socket: socket.socket, tmp_path: Path) -> None:
    # Targets travel in "volumes", each volume's mount as a descriptor after the disk's; the jail's
    # refusal of the target proves they got there (refused before any cgroup or mount is made).
    request = refused("vol-target", tmp_path) | {"id_base": 0x70000000, "volumes": ["/mnt/../etc"]}
    disk = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    volume = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        socket.send_fds(zygote_socket, [json.dumps(request).encode()], [disk, volume])
    finally:
        os.close(disk)
        os.close(volume)
    zygote_socket.settimeout(60)
    answer = json.loads(zygote_socket.recv(zygote.MAX_MESSAGE))
    assert answer["ok"] is False
    assert 'volume mount path "/mnt/../etc" must be normalised' in answer["error"], answer


def test_a_request_the_zygote_cannot_read_whole_is_refused_and_it_goes_on(tmp_path: Path) -> None:
    # The zygote reads at most MAX_MESSAGE bytes a request: a longer one came cut and unreadable,
    # and stopped the zygote with every create in flight. Non-ASCII text in a request (a volume's
    # mount path from the API) was sent as \u escapes, 6 bytes a character: 15,000 of them are 90 kB
    # escaped, 30 kB in UTF-8, which the zygote reads and serves. 40,000 are 80 kB even so: refused
    # by the runtime (400) before they reach the zygote.
    async def main() -> None:
        client = ZygoteClient(zygote.start)
        await client.start()
        try:
            wide = refused("bad/wide", tmp_path) | {"files": {"/etc/motd": "\u00e9" * 15_000}}
            answer = await client.create(wide)
            assert answer["ok"] is False and "must be 1-64 bytes" in answer["error"], answer
            with pytest.raises(ApiError) as too_long:
                await client.create(refused("too-long", tmp_path) | {"files": {"/etc/motd": "\u00e9" * 40_000}})
            assert too_long.value.status == 400 and "more than the 65536" in too_long.value.message
            answer = await client.create(refused("bad/after", tmp_path))
            assert answer["id"] == "bad/after" and "must be 1-64 bytes" in answer["error"], answer
            assert client.restarts == 0 and client.down_reason is None
        finally:
            await client.stop()

    asyncio.run(main())


def test_a_request_cut_to_the_zygotes_buffer_is_named_so_when_it_stops(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The runtime never sends one (zygote_client.encode); if it did, the zygote's last words say
    # what happened, not that a string of JSON ended early.
    sock, process = zygote.start()
    try:
        request = refused("bad/cut", tmp_path) | {"files": {"/etc/motd": "x" * zygote.MAX_MESSAGE}}
        socket.send_fds(sock, [json.dumps(request).encode()], [])
        assert process.wait(timeout=120) == 1
    finally:
        sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    assert f"a request longer than {zygote.MAX_MESSAGE} bytes (cut)" in capfd.readouterr().err


def test_the_agents_log_is_never_opened_through_a_link(zygote_socket: socket.socket, tmp_path: Path) -> None:
    # The zygote opens the agent's log as host root, to append: through a link at its path it would
    # write wherever the link points. Only host root can make one there (the runtime's data dir):
    # a second lock behind that one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    (tmp_path / "agent.log").symlink_to(elsewhere)
    answer = ask(zygote_socket, refused("bad/link", tmp_path))
    assert answer["ok"] is False and "[Errno 40]" in answer["error"], answer  # ELOOP
    assert elsewhere.read_bytes() == b""


def spare_of(zygote_pid: int, timeout: float = 60) -> int:
    """The zygote's spare "A" (its only child while no create is in flight), once it is forked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{zygote_pid}/task/{zygote_pid}/children").read_text().split()
        if len(children) == 1:  # not the last create's A, exiting: the spare waits for a request
            with contextlib.suppress(OSError):
                if Path(f"/proc/{children[0]}/wchan").read_text() == "__skb_wait_for_more_packets":  # recvmsg
                    return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"the zygote has no single spare: children {children}")


def test_the_next_spare_waits_out_the_delay_and_a_create_meanwhile_forks_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A create's "A" exits once its agent runs, which is when the agent starts, the runtime links it
    # and the client's first command comes: the next spare's fork waits SPARE_DELAY_S (here 2 s) so
    # as not to take a CPU from them, and a create in the meantime is served by a fork on the spot.
    monkeypatch.setenv("SANDBOXD_SPARE_DELAY_S", "2")
    sock, process = zygote.start()
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")

    def without_children() -> float:
        deadline = time.monotonic() + 30
        while children.read_text().split():
            assert time.monotonic() < deadline, children.read_text()
            time.sleep(0.005)
        return time.monotonic()

    try:
        first = spare_of(process.pid)  # the first is forked at once
        assert "must be 1-64 bytes" in ask(sock, refused("bad/spare", tmp_path))["error"]
        without_children()  # its A has exited
        time.sleep(0.5)
        assert children.read_text().split() == [], "a spare forked within the delay"
        answer = ask(sock, refused("bad/on-the-spot", tmp_path))
        assert answer["id"] == "bad/on-the-spot" and "must be 1-64 bytes" in answer["error"], answer
        gone = without_children()
        second = spare_of(process.pid)
        assert second != first and time.monotonic() - gone >= 1.5
    finally:
        sock.close()
        assert process.wait(timeout=30) == 0


def test_the_spare_delay_is_shorter_on_a_host_with_more_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOXD_SPARE_DELAY_S", raising=False)
    assert zygote._spare_delay(1) == zygote._spare_delay(2) == zygote.SPARE_DELAY_S
    assert zygote._spare_delay(8) == pytest.approx(zygote.SPARE_DELAY_S / 4)
    assert 0 < zygote._spare_delay() <= zygote.SPARE_DELAY_S  # this host's
    monkeypatch.setenv("SANDBOXD_SPARE_DELAY_S", "0")
    assert zygote._spare_delay(2) == 0.0
    monkeypatch.setenv("SANDBOXD_SPARE_DELAY_S", "not a number")
    assert zygote._spare_delay(2) == zygote.SPARE_DELAY_S


def test_the_spare_holds_none_of_the_zygotes_descriptors(
    zygote_process: tuple[socket.socket, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # A sandbox is made from the spare, so what it holds, the sandbox's agent holds: not the socket
    # to the runtime (it could forge answers) nor the zygote's epoll set (it would see other
    # creates come and go). Only the standard streams, its report pipe and its request channel.
    sock, process = zygote_process
    ask(sock, refused("bad/first", tmp_path))  # the zygote has finished its preload
    spare = spare_of(process.pid)
    zygote_fds = {os.readlink(f"/proc/{process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{process.pid}/fd")}
    held = {int(fd): os.readlink(f"/proc/{spare}/fd/{fd}") for fd in os.listdir(f"/proc/{spare}/fd")}
    assert {0, 1, 2} <= set(held) and len(held) == 5, held
    extra = sorted(held[fd] for fd in set(held) - {0, 1, 2})
    assert extra[0].startswith("pipe:[") and extra[1].startswith("socket:["), held
    assert not any(target.startswith("anon_inode:") for target in held.values()), held
    runtime_socket = os.readlink(f"/proc/{process.pid}/fd/{sock_fd_of(process.pid)}")
    assert runtime_socket in zygote_fds and runtime_socket not in held.values(), held


@pytest.mark.skipif(not Path("/sys/fs/cgroup/pids/cgroup.procs").exists(), reason="no cgroup v1 pids hierarchy")
def test_a_fork_the_pids_limit_refuses_is_answered_and_the_zygote_goes_on(tmp_path: Path) -> None:
    # The zygote's forks (the spare, an "A" at request time) count against its own cgroup's pids.max
    # until A moves into its sandbox's: a fork refused there (EAGAIN) fails that create with the
    # reason, leaves no spare for the next, and the zygote serves again once forks are allowed.
    group = Path(f"/sys/fs/cgroup/pids/zygote-test-{os.getpid()}")
    group.mkdir()
    sock, process = zygote.start()
    try:
        (group / "cgroup.procs").write_text(str(process.pid))
        ask(sock, refused("bad/first", tmp_path))
        spare = spare_of(process.pid)
        (group / "pids.max").write_text("1")  # the zygote and its spare are 2: no fork more
        answer = ask(sock, refused("bad/spare", tmp_path))  # the spare takes it: no fork needed
        assert "must be 1-64 bytes" in answer["error"], answer
        answer = ask(sock, refused("bad/no-fork", tmp_path))  # no spare could be forked after it
        assert answer["id"] == "bad/no-fork" and answer["ok"] is False, answer
        assert "[Errno 11]" in answer["error"], answer
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        deadline = time.monotonic() + 30  # the first create's A exits just after its answer, and is reaped
        while children.read_text().split():
            assert time.monotonic() < deadline, children.read_text()
            time.sleep(0.01)
        (group / "pids.max").write_text("max")
        answer = ask(sock, refused("bad/again", tmp_path))  # forked at request time
        assert "must be 1-64 bytes" in answer["error"], answer
        assert spare_of(process.pid) != spare
    finally:
        sock.close()
        process.wait(timeout=30)
        with contextlib.suppress(OSError):
            (group / "pids.max").write_text("max")
        group.rmdir()


def sock_fd_of(zygote_pid: int) -> int:
    """The zygote's end of its socket to the runtime: the descriptor named on its command line."""
    return int(Path(f"/proc/{zygote_pid}/cmdline").read_bytes().split(b"\0")[-2])


def test_a_dead_spare_is_replaced_and_the_create_still_served(
    zygote_process: tuple[socket.socket, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sock, process = zygote_process
    ask(sock, refused("bad/warm-up", tmp_path))
    spare = spare_of(process.pid)
    os.kill(spare, signal.SIGKILL)
    while Path(f"/proc/{spare}/stat").read_text().split()[2] != "Z":  # dead; the zygote has not looked
        time.sleep(0.01)
    # The create is served by a fork made on the spot: the jail's own refusal comes back.
    answer = ask(sock, refused("bad/after-kill", tmp_path))
    assert answer["id"] == "bad/after-kill" and "must be 1-64 bytes" in answer["error"], answer
    assert spare_of(process.pid) != spare
    assert not Path(f"/proc/{spare}").exists()  # reaped, not left a zombie


def test_a_request_the_spare_cannot_take_leaves_no_zombie_nor_its_pipe(
    zygote_process: tuple[socket.socket, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # The spare's log cannot be opened (no "log": a KeyError, not an OSError): the create is refused,
    # and the spare is reaped with its report pipe closed, not left to every later sandbox to inherit.
    sock, process = zygote_process
    ask(sock, refused("bad/before", tmp_path))
    spare = spare_of(process.pid)
    before = sorted(os.listdir(f"/proc/{process.pid}/fd"))
    request = refused("no-log", tmp_path)
    del request["log"]
    answer = ask(sock, request)
    assert answer["id"] == "no-log" and answer["ok"] is False and "'log'" in answer["error"], answer
    assert spare_of(process.pid) != spare  # its only child again: the old spare is not a zombie
    assert not Path(f"/proc/{spare}").exists()
    assert sorted(os.listdir(f"/proc/{process.pid}/fd")) == before


def test_the_zygotes_loop_writes_few_of_its_pages_a_create(
    zygote_process: tuple[socket.socket, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # Every page the zygote writes after a fork is shared with the spare and every live sandbox: a
    # copy-on-write fault in the zygote. Its serve loop is Rust (_core.zygote_serve), which writes its
    # stack and a few pages of its own; the Python loop it replaced wrote ~230 pages for each create
    # here (reference counts, allocator free lists), ~23 now. Each create is handed to a spare, which
    # reports, exits and is replaced by a new fork: the whole loop of a create, the jail's refusal aside.
    sock, process = zygote_process
    for i in range(3):
        ask(sock, refused(f"bad/warm-{i}", tmp_path))
    spare_of(process.pid)

    def minflt() -> int:
        return int(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])

    before, creates = minflt(), 20
    for i in range(creates):
        assert ask(sock, refused(f"bad/pages-{i}", tmp_path))["ok"] is False
        spare_of(process.pid)  # the next spare forked: the loop is back in its wait
    per_create = (minflt() - before) / creates
    assert per_create < 80, per_create


def _premade(instance: str, pid: int | str = "*") -> list[Path]:
    """A spare's pre-made cgroup (``.spare-<pid>``) in every hierarchy of ``instance``."""
    return sorted(Path(p) for p in glob.glob(f"/sys/fs/cgroup/*/sandboxd/{instance}/.spare-{pid}"))


def test_a_spare_makes_its_cgroup_ahead_of_need_and_it_goes_with_the_spare(tmp_path: Path) -> None:
    # After a request, the next spare makes that request's instance its cgroup with its limits and
    # the device allow-list (cgroup v1; v2 cannot rename a group, so none is made there). A spare
    # whose request is refused leaves none; nor does a zygote that stops; nor a killed zygote's
    # spare, once the runtime starts again (configure_budget sweeps the instance).
    instance = f"test-premake-{os.getpid()}"
    _core.configure_budget(instance, host_memory_bytes=None, host_pids_max=None, memory_bytes=None, pids_max=None)
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    limits = {"instance": instance, "pids_max": 77, "memory_bytes": 64 << 20, "cpu_cores": 0.5}
    groups: list[Path] = []
    sock, process = zygote.start()
    try:
        ask(sock, refused("bad/first", tmp_path) | limits)
        spare = spare_of(process.pid)
        groups = _premade(instance, spare)
        if v2:
            assert groups == []
            return
        assert len(groups) == len({g.parent.parent.parent for g in groups}) >= 5, groups  # one per hierarchy
        for group in groups:
            controls = {f.name: f for f in group.iterdir()}
            if "pids.max" in controls:
                assert controls["pids.max"].read_text().strip() == "77"
            if "memory.limit_in_bytes" in controls:
                assert controls["memory.limit_in_bytes"].read_text().strip() == str(64 << 20)
            if "cpu.cfs_quota_us" in controls:
                assert controls["cpu.cfs_quota_us"].read_text().strip() == "50000"
            if "devices.list" in controls:
                assert "a *:* rwm" not in controls["devices.list"].read_text()
            assert (group / "cgroup.procs").read_text() == ""  # nothing has joined it
        # Its request is refused (a bad id): the spare is used up, and its group gone with it.
        ask(sock, refused("bad/second", tmp_path) | limits)
        assert _premade(instance, spare) == []
        assert len(_premade(instance, spare_of(process.pid))) == len(groups)
    finally:
        sock.close()
        assert process.wait(timeout=30) == 0
        try:
            assert _premade(instance) == [], "a stopped zygote's spare left its cgroup"
            # What a killed zygote's spare would leave: swept when a runtime of the instance starts.
            for instance_group in {g.parent for g in groups}:
                (instance_group / ".spare-1").mkdir()
            _core.configure_budget(
                instance, host_memory_bytes=None, host_pids_max=None, memory_bytes=None, pids_max=None
            )
            assert _premade(instance) == []
        finally:
            _core.remove_instance_if_empty(instance)
    assert glob.glob(f"/sys/fs/cgroup/*/sandboxd/{instance}") == []


PREPARED_IN_A_SANDBOX = r"""
import resource, sys
from sandboxd.agent.http_server import FD_RESERVE
from sandboxd.agent.server import prepare
from sandboxd.agent.http_server import limit_connections

prepared = prepare("127.0.0.1", 49983)  # as the zygote builds it, under the host's limit
before = prepared.config.http.guard.limits.max_connections
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))  # as the jail sets a sandbox's
limit_connections(prepared.config)
after = prepared.config.http.guard.limits.max_connections
state = prepared.state
print(before, after, 300 - FD_RESERVE, prepared.config.backlog, state.access_token, state.env_vars)
"""


def test_the_agent_settings_the_zygote_builds_follow_the_sandboxs_open_file_limit() -> None:
    """The zygote builds the agent's state and server settings once (``agent.server.prepare``); the
    agent in each sandbox caps its connections by its own ``RLIMIT_NOFILE``, not the zygote's, and
    starts with no token or environment from the zygote."""
    out = subprocess.run(
        [sys.executable, "-c", PREPARED_IN_A_SANDBOX], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, after, room, backlog = map(int, out[:4])
    assert after == room == backlog < before, out
    assert out[4:] == ["None", "{}"], out


def _write_files_as_in_a_sandbox(root: Path, log: Path) -> int:
    """:func:`zygote._write_files` of the runtime's resolv.conf in a child whose ``/`` is ``root``
    (a sandbox's agent writes it after its ``pivot_root``); its warnings go to ``log``. Its exit
    status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import logging

            import sandboxd.agent.server  # noqa: F401 (the zygote has it preloaded; the chroot has no Python)

            sys.stderr = open(log, "w")  # noqa: SIM115 (the child exits with it open)
            logging.root.handlers.clear()  # pytest's; the agent's own logging takes their place
            os.chroot(root)
            os.chdir("/")
            zygote._write_files({"/etc/resolv.conf": "nameserver 10.0.0.1\n"})
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
@pytest.mark.parametrize(
    ("plant", "refusal"),
    [
        ("nothing", None),  # a template without /etc: made
        ("the old fixed temporary as a directory", None),
        ("a FIFO at resolv.conf", None),  # replaced, never opened (no hang)
        ("a directory at resolv.conf", "/etc/resolv.conf is a directory"),
        ("/etc a link", "/etc is a link"),
        ("/etc a file", "/etc is not a directory"),
    ],
)
def test_the_runtimes_resolv_conf_is_written_only_through_the_sandboxs_own_directories(
    tmp_path: Path, plant: str, refusal: str | None
) -> None:
    # What root in a sandbox can leave on the way before a pause neither fails the agent's start nor
    # is followed: a refusal is a warning in the agent's log, and what was planted is left as it was.
    root, log, elsewhere = tmp_path / "root", tmp_path / "agent.log", tmp_path / "root" / "elsewhere"
    etc = root / "etc"
    elsewhere.mkdir(parents=True)
    if plant != "nothing" and plant != "/etc a link" and plant != "/etc a file":
        etc.mkdir()
    if plant == "the old fixed temporary as a directory":
        (etc / "resolv.conf.sandboxd-new").mkdir()
    elif plant == "a FIFO at resolv.conf":
        os.mkfifo(etc / "resolv.conf")
    elif plant == "a directory at resolv.conf":
        (etc / "resolv.conf").mkdir()
    elif plant == "/etc a link":
        etc.symlink_to("/elsewhere")
    elif plant == "/etc a file":
        etc.write_text("")
    assert _write_files_as_in_a_sandbox(root, log) == 0  # the agent would go on to start
    warned = log.read_text()
    assert not list(elsewhere.iterdir())  # nothing written through the link
    if refusal is None:
        assert warned == ""
        assert (etc / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    else:
        assert f"WARNING the sandbox's DNS was not set up (/etc/resolv.conf was not written): {refusal}" in warned
        assert "sandboxd.agent.dns" in warned
    if etc.is_dir() and not etc.is_symlink():  # no temporary left behind
        assert {p.name for p in etc.iterdir()} <= {"resolv.conf", "resolv.conf.sandboxd-new"}
    assert str(tmp_path) not in warned


_PRELOADED_HOLD = """
import json
from sandboxd.runtime import zygote
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.zygote_client import ZygoteClient
zygote.preload()
zygote.freeze_heap()
print(json.dumps([zygote.hold_free_chunks(), zygote.hold_free_chunks()]))
"""


def test_the_preloads_free_chunks_are_held_before_the_zygote_forks() -> None:
    # The preload leaves free chunks scattered through the heap; held, a fork's allocations come from
    # the heap's top instead (a few contiguous pages, not ~3 copy-on-write faults per allocation).
    command = [sys.executable, "-c", _PRELOADED_HOLD]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    first, second = json.loads(out.stdout)
    assert first >= 64 << 10  # ~355 kB in ~840 chunks when measured
    assert second < 8192  # all of them: nothing is left for a fork to take


_FORK_LOOKUPS = """
import json, os, resource, sys
from sandboxd.runtime import zygote
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.zygote_client import ZygoteClient

zygote.preload()
zygote.freeze_heap()
types = list({id(v): v for m in list(sys.modules.values()) for v in list(getattr(m, "__dict__", {}).values())
              if isinstance(v, type)}.values())

def faults_of_a_fork():
    # A fork that looks an attribute up on every preloaded type (each a miss of the type cache), and
    # counts the pages it faulted meanwhile: deterministic for a given parent.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for t in types:
            getattr(t, "_sandboxd_no_such_attribute", None)
        os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before).encode())
        os._exit(0)
    os.close(w)
    faults = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    return faults

kept = faults_of_a_fork()
zygote.clear_type_cache()
print(json.dumps([len(types), kept, faults_of_a_fork()]))
"""


def test_a_fork_of_the_zygote_misses_its_type_cache_without_faulting_on_old_names() -> None:
    # The preload's cache entries each hold a name; a fork's miss drops that name's reference, a write
    # to its page. Emptied, the entries hold None, and the fork's misses fault fewer pages.
    command = [sys.executable, "-c", _FORK_LOOKUPS]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    types, kept, cleared = json.loads(out.stdout)
    assert types > 1000
    assert cleared < kept - 100  # ~3,390 → ~3,035 when measured


def _huge_pages_usable() -> bool:
    """Whether this kernel can collapse anonymous memory (``MADV_COLLAPSE``: Linux 6.1, huge pages not
    ``never``)."""
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return "[never]" not in enabled and (major, minor) >= (6, 1)


def _anonymous_in_huge_pages(pid: int) -> tuple[int, int, list[str]]:
    """A process's private anonymous memory (KiB): mapped by huge-page entries (``AnonHugePages``),
    and in huge pages at all (``KPF_THP``: also those whose entry was split into 4 KiB ones, which a
    fork still copies in batches), with the mappings marked ``MADV_HUGEPAGE`` (``hg``). Needs root
    (``/proc/kpageflags``)."""
    mapped_huge, marked, ranges, mapping = 0, [], [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first, _, rest = line.partition(" ")
        if "-" in first and not first.endswith(":"):
            mapping = line
            fields = line.split()
            if fields[1] == "rw-p" and fields[4] == "0" and (len(fields) == 5 or fields[5] == "[heap]"):
                ranges.append(tuple(int(x, 16) for x in first.split("-")))
        elif first == "AnonHugePages:":
            mapped_huge += int(rest.split()[0])
        elif first == "VmFlags:" and "hg" in rest.split():
            marked.append(mapping)
    in_huge = 0
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpageflags:
        for start, end in ranges:
            pagemap.seek(start // 4096 * 8)
            entries = pagemap.read((end - start) // 4096 * 8)
            for (entry,) in struct.iter_unpack("<Q", entries):
                if entry >> 63:  # present
                    kpageflags.seek((entry & ((1 << 55) - 1)) * 8)
                    (flags,) = struct.unpack("<Q", kpageflags.read(8))
                    in_huge += 4 if flags >> 22 & 1 else 0  # KPF_THP
    return mapped_huge, in_huge, marked


@pytest.mark.skipif(not _huge_pages_usable(), reason="no MADV_COLLAPSE here (Linux < 6.1, or huge pages never)")
def test_the_zygotes_memory_is_forked_as_huge_pages_and_a_sandbox_still_faults_small_ones(tmp_path: Path) -> None:
    # The zygote's fork of "A" copies its page tables: a 2 MiB range held by one huge page is one
    # entry to copy instead of 512. The spare, a fork, holds the same huge pages. Nothing is marked
    # MADV_HUGEPAGE, so what a sandbox allocates later still comes in 4 KiB pages.
    sock, process = zygote.start()
    try:
        ask(sock, refused("bad/huge", tmp_path))  # the preload is done and the zygote serves
        spare = spare_of(process.pid)
        zygote_mapped, zygote_in_huge, zygote_marked = _anonymous_in_huge_pages(process.pid)
        spare_mapped, spare_in_huge, spare_marked = _anonymous_in_huge_pages(spare)
        # ~24 MiB of the ~46 collapsed when measured, and mapped by 4 KiB entries again
        # (split_huge_mappings): a fork that held 2 MiB entries would split each on its first write
        # into the range. The huge pages themselves stay (their entries a fork copies in batches).
        assert zygote_in_huge >= 16 << 10, zygote_in_huge
        assert spare_in_huge >= 16 << 10, spare_in_huge  # the same pages
        assert zygote_mapped == 0 and spare_mapped == 0, (zygote_mapped, spare_mapped)
        assert zygote_marked == [] and spare_marked == []
    finally:
        sock.close()
        assert process.wait(timeout=30) == 0
