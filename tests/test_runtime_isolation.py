"""How the runtime survives faults, and the sandbox's own identity and limits: real namespaces,
overlayfs and cgroups, driven through the official SDK. What a sandbox cannot see or touch is the
escape drill suite (test_escape_drills.py)."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException
from sandboxd import _core


def test_hostname_is_the_sandbox_id(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    assert a.commands.run("hostname").stdout.strip() == a.sandbox_id


def test_limits_are_applied(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    # The cgroup namespace shows the sandbox's own cgroup as the root.
    assert a.commands.run("cat /proc/self/cgroup").stdout.strip() != ""
    metrics = a.get_metrics()
    assert metrics and metrics[-1].mem_total == 1024 << 20


def _ids(sbx: Sandbox) -> tuple[int, int]:
    """The sandbox's host id range (uid map base) and its uid inside."""
    fields = sbx.commands.run("cat /proc/self/uid_map").stdout.split()
    assert fields[0] == "0" and fields[2] == "65536", fields
    return int(fields[1]), int(sbx.commands.run("id -u").stdout)


def _boot_id(sbx: Sandbox) -> str:
    return sbx.files.read("/proc/sys/kernel/random/boot_id").strip()


def test_each_sandbox_has_its_own_id_range_claimed_host_wide(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, b = pair
    (base_a, uid), (base_b, _) = _ids(a), _ids(b)
    assert uid == 1000
    assert base_a != base_b and abs(base_a - base_b) >= 65536
    registry = Path(_core.DEFAULT_ID_REGISTRY)
    for base, sbx in ((base_a, a), (base_b, b)):
        claim = (registry / str(base)).read_text()
        assert f"sandbox={sbx.sandbox_id}" in claim and f"data_dir={runtime.data_dir.resolve()}" in claim
    a.kill()
    assert not (registry / str(base_a)).exists(), "the range is released with the sandbox"
    assert not (runtime.data_dir / "sandboxes" / a.sandbox_id).exists(), "and its disk"


def test_uploads_as_user_or_root_get_the_right_owner(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    base, _ = _ids(a)
    a.files.write("/home/user/by-user.txt", "u")
    a.files.write("/root/by-root.txt", "r", user="root")
    a.files.write("/tmp/made/deep/by-root.txt", "r", user="root")
    owners = a.commands.run(
        "stat -c '%n %u:%g' /home/user/by-user.txt /root/by-root.txt /tmp/made /tmp/made/deep/by-root.txt",
        user="root",
    ).stdout.splitlines()
    assert owners == [
        "/home/user/by-user.txt 1000:1000",
        "/root/by-root.txt 0:0",
        "/tmp/made 0:0",
        "/tmp/made/deep/by-root.txt 0:0",
    ]
    # On the host (through the init's root), they belong to the sandbox's range.
    init = next(
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/comm")
        if _read(p) == "sandboxd-init\n" and a.sandbox_id in _read(p.parent / "cgroup")
    )
    host_file = Path(f"/proc/{init}/root/home/user/by-user.txt").stat()
    assert (host_file.st_uid, host_file.st_gid) == (base + 1000, base + 1000)
    assert Path(f"/proc/{init}/root/root/by-root.txt").stat().st_uid == base


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("mode", ["full", "filesystem"])
def test_pause_and_resume_keep_the_ids_and_set_the_boot_id(e2b_env: Runtime, mode: str) -> None:
    sbx = Sandbox.create()
    try:
        base, _ = _ids(sbx)
        boot = _boot_id(sbx)
        assert boot != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        sbx.files.write("/home/user/kept.txt", "kept")
        sbx.pause(mode=mode)  # type: ignore[arg-type]
        again = Sandbox.connect(sbx.sandbox_id)
        assert _ids(again)[0] == base
        assert again.commands.run("stat -c %u:%g /home/user/kept.txt").stdout == "1000:1000\n"
        # E2B: a resume with memory keeps the boot; a resume from the filesystem boots anew.
        assert (_boot_id(again) == boot) == (mode == "full")
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_every_sandbox_boots_with_its_own_boot_id(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    ids = {_boot_id(a), _boot_id(b), Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
    assert len(ids) == 3


def test_metrics_report_the_disk_quota(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    a.commands.run("head -c 20000000 /dev/zero > /home/user/twenty-mb && sync")
    sample = a.get_metrics()[-1]
    df_total = int(a.commands.run("df -B1 / | tail -1 | awk '{print $2}'").stdout)
    assert sample.disk_total == df_total
    assert sample.disk_used >= 20_000_000


def _ext4_options_of(image: Path) -> list[str]:
    """The options of the ext4 filesystem in ``image``, as ext4 shows them for the loop device
    that backs it (the runtime's mounts are detached: no mount table lists them)."""
    want = os.path.realpath(image)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if os.path.realpath(backing.read_text().strip()) == want:
            return Path(f"/proc/fs/ext4/{backing.parent.parent.name}/options").read_text().split()
    raise AssertionError(f"no loop device backs {image}")


def test_a_sandboxs_disk_has_no_write_barriers_and_a_volume_keeps_them(
    pair: tuple[Sandbox, Sandbox], runtime: Runtime
) -> None:
    """A sandbox's disk is scratch space: a flush inside stops at its image, where a loop device
    would turn it into an ``fsync`` of the whole image through the host's journal (20-60 ms an
    unmount, on every kill's path). A volume's writes are meant to outlive a host crash."""
    from e2b import Volume

    a, _ = pair
    assert a.commands.run("echo data > /home/user/f && sync").exit_code == 0
    options = _ext4_options_of(runtime.data_dir / "sandboxes" / a.sandbox_id / "disk.img")
    assert "nobarrier" in options and "barrier" not in options, options
    volume = Volume.create(f"barriers-{os.getpid()}-{time.monotonic_ns()}")
    try:
        options = _ext4_options_of(runtime.data_dir / "volumes" / volume.volume_id / "volume.img")
        assert "barrier" in options and "nobarrier" not in options, options
    finally:
        Volume.destroy(volume.volume_id)


def _loops_of(image: Path) -> list[str]:
    """The loop devices ``image`` backs (each one a live filesystem over it)."""
    want = os.path.realpath(image)
    return [
        backing.parent.parent.name
        for backing in Path("/sys/block").glob("loop*/loop/backing_file")
        if backing.read_text().strip().removesuffix(" (deleted)") == want
    ]


HOLD = r"""
import array, socket, time
listener = socket.socket(socket.AF_UNIX)
listener.bind("/mnt/v/hold.sock")
listener.listen()
conn, _ = listener.accept()
_, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
held = array.array("i", ancillary[0][2])[0]
print("holding", held, flush=True)
time.sleep(600)
"""
"""Run in one sandbox: keeps the descriptor another sandbox sends over a unix socket on their volume."""

SEND = r"""
import array, os, socket
fd = os.open("/home/user/kept", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"kept\n")
s = socket.socket(socket.AF_UNIX)
s.connect("/mnt/v/hold.sock")
s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
print("sent")
"""
"""Run in the sandbox to pause: a file of its disk, written, sent to the holder."""


def test_a_kill_drops_what_the_sandboxs_disk_had_not_written_back(e2b_env: Runtime) -> None:
    """A killed sandbox's disk is deleted, so what its filesystem holds unwritten is dropped (the
    filesystem is shut down before the kill): the unmount at the sandbox's end wrote all of it back
    to the image first, through the loop device, and the kill waited for it (~90 ms after 64 MB
    written, ~35 with the shutdown). Here 16 MB written just before the kill never reach the image."""
    sbx = Sandbox.create()
    image = e2b_env.data_dir / "sandboxes" / sbx.sandbox_id / "disk.img"
    held = os.open(image, os.O_RDONLY | os.O_CLOEXEC)  # the image outlives its unlink while held
    try:
        sbx.commands.run("head -c 16000000 /dev/urandom > /home/user/scratch")
        before = os.fstat(held).st_blocks * 512
        sbx.kill()
        written = os.fstat(held).st_blocks * 512 - before
        assert written < 4_000_000, f"{written} bytes were written back to the deleted disk's image"
    finally:
        os.close(held)


def test_a_resume_never_mounts_a_disk_whose_last_filesystem_lives_on(e2b_env: Runtime) -> None:
    """A sandbox's disk is unmounted when the last file open on it closes, wherever that file is, not
    with the sandbox's processes: a descriptor it sent over a unix socket (to another sandbox, on a
    shared volume; or in flight, a socket sent over itself, until the kernel's unix garbage collector
    runs) keeps its filesystem alive after a pause to disk killed it, with what it wrote not yet in
    the image. A resume then mounted the image a second time beside it (two loop devices, two ext4
    filesystems writing one image) and found the files it had written missing. A resume (and a
    snapshot) now waits for the image to be released and refuses while it is not; the pause waits for
    it before it syncs the image."""
    from e2b import Volume

    volume = Volume.create(f"hold-{os.getpid()}-{time.monotonic_ns()}")
    holder = Sandbox.create(volume_mounts={"/mnt/v": volume})
    sbx = Sandbox.create(volume_mounts={"/mnt/v": volume})
    image = e2b_env.data_dir / "sandboxes" / sbx.sandbox_id / "disk.img"
    try:
        holder.commands.run(f"python3 -c '{HOLD}'", user="user", background=True, timeout=0)
        deadline = time.monotonic() + 30
        while holder.commands.run("test -S /mnt/v/hold.sock && echo up || echo down").stdout != "up\n":
            assert time.monotonic() < deadline, "the holder never listened"
            time.sleep(0.1)
        assert sbx.commands.run(f"python3 -c '{SEND}'", user="user").stdout == "sent\n"
        sbx.pause(mode="filesystem")
        assert len(_loops_of(image)) == 1  # its filesystem lives on, held by the holder
        refused: Exception | None = None
        try:
            Sandbox.connect(sbx.sandbox_id)
        except Exception as exc:  # the SDK's ServiceBusyException (503)
            refused = exc
        assert len(_loops_of(image)) == 1, "the image was mounted a second time beside its live filesystem"
        assert refused is not None and "still mounted" in str(refused), refused
        with pytest.raises(Exception, match="still mounted"):  # nor copies it into a snapshot
            Sandbox.create_snapshot(sbx.sandbox_id)
        holder.kill()  # the held file closes: the filesystem writes back what it had and goes
        deadline = time.monotonic() + 30
        while _loops_of(image):
            assert time.monotonic() < deadline, "the disk stayed mounted after its holder was killed"
            time.sleep(0.05)
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.files.read("/home/user/kept") == "kept\n"
        assert len(_loops_of(image)) == 1
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(holder.sandbox_id)
        Sandbox.kill(sbx.sandbox_id)
        Volume.destroy(volume.volume_id)


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
    bases = {sbx.sandbox_id: _ids(sbx)[0] for sbx in (running, paused)}
    paused.pause()
    fault_runtime.process.send_signal(signal.SIGKILL)
    fault_runtime.process.wait(10)
    fault_runtime.restart()
    registry = Path(_core.DEFAULT_ID_REGISTRY)
    try:
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        assert {running.sandbox_id, paused.sandbox_id} <= listed
        for sandbox_id, base in bases.items():  # the restarted runtime keeps both claims
            assert f"sandbox={sandbox_id}" in (registry / str(base)).read_text()
        again = Sandbox.connect(running.sandbox_id)
        assert again.files.read("/home/user/survivor") == "still here"
        assert handle.pid in [p.pid for p in again.commands.list()]
        resumed = Sandbox.connect(paused.sandbox_id)
        assert resumed.files.read("/home/user/p") == "paused"
        assert _ids(resumed)[0] == bases[paused.sandbox_id]
    finally:
        Sandbox.kill(running.sandbox_id)
        Sandbox.kill(paused.sandbox_id)
    assert not any((registry / str(base)).exists() for base in bases.values())


def test_kill_9_of_an_agent_is_reported(fault_runtime: Runtime) -> None:
    sbx = Sandbox.create()
    fault_runtime.booted(sbx.sandbox_id)  # else it dies as it starts: a failed start, not a death
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


def _init_host_pid(sandbox_id: str) -> int:
    """The host pid of the sandbox's init (``sandboxd-init``, in its cgroup)."""
    return next(
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/comm")
        if _read(p) == "sandboxd-init\n" and sandbox_id in _read(p.parent / "cgroup")
    )


KCMP_VM = 1
"""kcmp(2)'s type for "do these two processes share one memory (mm)?"."""

SYS_KCMP = {"x86_64": 312, "aarch64": 272}


def _same_memory(pid1: int, pid2: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(SYS_KCMP[platform.machine()], pid1, pid2, KCMP_VM, 0, 0)
    assert r >= 0, os.strerror(ctypes.get_errno())
    return bool(r == 0)


def test_the_agent_and_the_init_share_one_memory(pair: tuple[Sandbox, Sandbox]) -> None:
    """The agent (PID 2) is a ``CLONE_VM`` clone of the init, as the init is of the zygote's fork:
    no page tables copied for it, no copy-on-write faults on what the fork had made its own
    (crates/sandboxd-jail/src/init.rs, ``clone_payload_and_serve``). A fork would give it a memory
    of its own, which kcmp tells apart."""
    a, b = pair
    for sbx in (a, b):
        assert _same_memory(_init_host_pid(sbx.sandbox_id), _agent_host_pid(sbx.sandbox_id))
    # One sandbox's processes never share the other's memory.
    assert not _same_memory(_agent_host_pid(a.sandbox_id), _agent_host_pid(b.sandbox_id))
    assert a.commands.run("echo ok").stdout == "ok\n"


SHARED_MEMORY_ATTACKS = r"""
import ctypes, errno, os, signal, subprocess
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": (310, 311, 101), "aarch64": (270, 271, 117)}[os.uname().machine]
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local = Iovec(ctypes.addressof(buf), 8)
def call(name, r):
    print(f"{name}:", "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno()), flush=True)
# A control: root inside's own process (a sleep: dumpable, its credentials), which the calls reach.
control = subprocess.Popen(["sleep", "60"])
for pid in (1, 2, control.pid):
    label = "control" if pid == control.pid else pid
    # The remote address is the local buffer's: the two are one memory for PID 1 and 2 (and the
    # prober's own is its own), so only the permission check can refuse.
    remote = Iovec(ctypes.addressof(buf), 8)
    # Every integer a long: a variadic int leaves the register's upper half undefined.
    one, zero, p = ctypes.c_long(1), ctypes.c_long(0), ctypes.c_long(pid)
    iovs = (ctypes.byref(local), one, ctypes.byref(remote), one, zero)
    call(f"readv{label}", libc.syscall(ctypes.c_long(NR[0]), p, *iovs))
    call(f"writev{label}", libc.syscall(ctypes.c_long(NR[1]), p, *iovs))
    call(f"seize{label}", libc.syscall(ctypes.c_long(NR[2]), ctypes.c_long(0x4206), p, zero, zero))
    for what in ("mem", "map_files", "fd", "maps"):
        path = f"/proc/{pid}/{what}"
        try:
            if what == "mem":
                os.close(os.open(path, os.O_RDWR))
            elif what == "maps":
                open(path).read()
            else:
                os.listdir(path)
            print(f"{what}{label}: ok", flush=True)
        except OSError as e:
            print(f"{what}{label}:", errno.errorcode[e.errno], flush=True)
control.kill()
# Signals root inside may send the init: none reaches it (no handler: the kernel drops them).
for sig in (signal.SIGSTOP, signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL):
    try:
        os.kill(1, sig)
    except OSError as e:
        print("kill", sig, errno.errorcode[e.errno], flush=True)
print("attack over", flush=True)
"""
"""What root inside could try on the memory its agent shares with the init (PID 1 and 2, one
memory): read or write it across processes, trace them, open their memory, mapped files,
descriptors or maps, and signal the init."""


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in _read(Path(f"/proc/{pid}/status")).splitlines() if ":\t" in line)


def test_the_memory_the_init_and_agent_share_is_out_of_reach_of_root_inside(pair: tuple[Sandbox, Sandbox]) -> None:
    """Whoever can write the agent's memory writes the init's (``CLONE_VM``): root inside must reach
    neither (the memory is not dumpable: A changed credentials), and the init, once the agent runs,
    must be worth nothing (no capability, the agent's seccomp filter, no descriptor but /dev/null)
    and deaf to root inside's signals."""
    a, _ = pair
    init, agent = _init_host_pid(a.sandbox_id), _agent_host_pid(a.sandbox_id)
    a.files.write("/tmp/attack.py", SHARED_MEMORY_ATTACKS, user="root")
    out = a.commands.run("python3 /tmp/attack.py 2>&1", user="root").stdout
    assert "attack over" in out, out
    for pid in (1, 2):
        for name in ("readv", "writev", "seize"):
            assert _field(out, f"{name}{pid}") == "EPERM", out
        for name in ("mem", "map_files", "fd", "maps"):
            assert _field(out, f"{name}{pid}") in ("EACCES", "EPERM"), out
    # The same calls reach root inside's own process: the refusals above are the kernel's about PID 1
    # and 2, not a refusal of the calls (or of their arguments) themselves.
    assert _field(out, "readvcontrol") in ("ok", "EFAULT") and _field(out, "seizecontrol") == "ok", out
    for name in ("mem", "fd", "maps"):  # (map_files needs CAP_SYS_ADMIN over the host, even for one's own)
        assert _field(out, f"{name}control") == "ok", out
    # The init lives on, not stopped, and the sandbox serves.
    assert a.commands.run("echo ok").stdout == "ok\n"
    assert _read(Path(f"/proc/{init}/stat")).rsplit(")", 1)[-1].split()[0] in ("S", "R")  # not stopped (T)
    assert _init_host_pid(a.sandbox_id) == init and _agent_host_pid(a.sandbox_id) == agent
    status = _status(init)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["Seccomp"].strip() == "2" and _status(agent)["Seccomp"].strip() == "2"
    assert {fd: os.readlink(f"/proc/{init}/fd/{fd}") for fd in os.listdir(f"/proc/{init}/fd")} == {
        "0": "/dev/null",
        "1": "/dev/null",
        "2": "/dev/null",
    }
    # The agent's bounding set is the payload's (crates/sandboxd-jail/src/capabilities.rs), not A's.
    payload_capabilities = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31)
    assert int(_status(agent)["CapBnd"], 16) == sum(1 << c for c in payload_capabilities)


def _field(out: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(f"{name}:"))


def test_orphans_are_reaped_and_an_agent_killed_from_inside_ends_the_sandbox(e2b_env: Runtime) -> None:
    """The init, sharing the agent's memory, serves with raw system calls only: it still reaps the
    orphans re-parented to it, and exits (ending the sandbox) when the agent dies, here killed by
    root inside."""
    sbx = Sandbox.create()
    try:
        # The shell exits at once: its sleeps become the init's, which must reap them.
        sbx.commands.run("sh -c 'for i in 1 2 3; do sleep 0.1 & done'")
        time.sleep(1)
        states = sbx.commands.run("cat /proc/[0-9]*/stat", user="root").stdout.splitlines()
        assert [line for line in states if line.rsplit(")", 1)[-1].split()[0] == "Z"] == []
        # The agent answering dies with the command: whatever the SDK raises then, the sandbox's end is
        # what is checked.
        with contextlib.suppress(Exception):
            sbx.commands.run("kill -9 2", user="root", timeout=10)
        api = httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key})
        deadline = time.monotonic() + 10
        while api.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 200:
            assert time.monotonic() < deadline, "the sandbox whose agent was killed is still running"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id)


def test_the_data_dir_and_database_are_owner_only(runtime: Runtime) -> None:
    assert runtime.data_dir.stat().st_mode & 0o777 == 0o700
    assert (runtime.data_dir / "sandboxd.db").stat().st_mode & 0o777 == 0o600


WRITER = (
    "python3 -c 'import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    '    os.pwrite(fd, b"%012d" % i, 0)\n\' '
)


def test_a_frozen_sandbox_killed_runs_not_one_more_instruction(e2b_env: Runtime) -> None:
    """A sandbox paused with its memory is frozen; killing it must not let its processes run again.
    The kill signals the init, which makes the kernel kill the rest of its PID namespace, and thaws
    the group (on cgroup v1 a frozen task dies of a SIGKILL only once thawed): every task must have
    its SIGKILL before the thaw, or those but the init run between the thaw and the init's exit,
    here writing to a volume a second sandbox reads."""
    from e2b import Volume

    volume = Volume.create(f"frozen-kill-{os.getpid()}-{time.monotonic_ns()}")
    reader = Sandbox.create(volume_mounts={"/mnt/v": volume})
    try:
        for round_ in range(6):
            path = f"/mnt/v/n{round_}"
            writer = Sandbox.create(volume_mounts={"/mnt/v": volume})
            writer.commands.run(WRITER + path, user="root", background=True)
            deadline = time.monotonic() + 30
            while not reader.commands.run(f"test -s {path} && echo yes || true").stdout.strip():
                assert time.monotonic() < deadline, "the writer never wrote"
                time.sleep(0.05)
            writer.pause()
            paused_at = reader.files.read(path)
            time.sleep(0.1)
            assert reader.files.read(path) == paused_at, "the writer runs on while paused"  # frozen indeed
            writer.kill()
            after = reader.files.read(path)
            assert after == paused_at, f"round {round_}: written {paused_at} when paused, {after} after the kill"
    finally:
        reader.kill()
        Volume.destroy(volume.volume_id)


def test_the_agent_holds_nothing_of_the_zygotes_but_dev_null(e2b_env: Runtime) -> None:
    """The agent is a clone of the zygote's fork: every descriptor the zygote held and did not close
    in the fork would be the sandbox's. The zygote's socket to the runtime (answers could be forged),
    its spare's channel and pipe, the runtime's log on its standard streams: none of them is the
    agent's. What the agent holds is its own (its log, its sockets) and /dev/null (review6)."""
    zygote = next(
        int(pid)
        for task in Path(f"/proc/{e2b_env.process.pid}/task").iterdir()  # started from a worker thread
        for pid in _read(task / "children").split()
        if b"sandboxd.runtime.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and _status(int(pid))["Uid"].split()[0] == "0"
    )
    sbx = Sandbox.create()
    try:
        # A create is answered before the agent's /init: read its descriptors once that is done, not
        # while /init opens and closes them (a readlink of one closed meanwhile fails).
        e2b_env.booted(sbx.sandbox_id)
        agent = _agent_host_pid(sbx.sandbox_id)

        def held(pid: int) -> set[str]:
            return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}

        zygotes = held(zygote)
        assert str(e2b_env.log) in zygotes and any(t.startswith("socket:[") for t in zygotes), zygotes
        agents = held(agent)
        assert agents & zygotes <= {"/dev/null"}, (agents, zygotes)
        assert str(e2b_env.data_dir / "sandboxes" / sbx.sandbox_id / "agent.log") in agents, agents
    finally:
        sbx.kill()
