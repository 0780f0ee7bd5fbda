"""The escape drill suite: every attack a hostile sandbox (root inside included) can try with the
official SDK and nothing else, each in a test named for it, each of which must fail. docs/security.md
lists exactly what these prove.

Every attack runs through ``commands.run(..., user="root")`` (or as ``user``) against a real
``sandboxd serve``; the host side checks what the attack aimed at (the cgroup's limits, the host's
keyring, host root's inotify instances, the host's disk) from outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEMPLATE_STORE, Runtime
from e2b import NotEnoughSpaceException, Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException
from sandboxd.runtime.host import instance_name

CGROUP_ROOT = Path("/sys/fs/cgroup")

SMALL_MEMORY_MB = 512
"""The memory limit of the drill runtimes' sandboxes: small, so allocating past it is quick."""

SMALL_DISK_MB = 128
"""The disk quota of the drill runtime's sandboxes."""

KEY_SPEC_USER_KEYRING = -4
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEYCTL_UNLINK, KEYCTL_SEARCH, KEYCTL_READ = 9, 10, 11

PROBE = r"""
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(f"{name}:", "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno()), flush=True)
"""
"""Python run inside a sandbox to make raw system calls and print ``name: ok|ERRNO`` per call."""


def sh(sbx: Sandbox, script: str, user: str = "root", timeout: float = 60) -> str:
    """Run ``script`` with bash in the sandbox; stdout and stderr together, whatever the exit code."""
    try:
        result = sbx.commands.run(f"bash -c {_quote(script)}", user=user, timeout=timeout)
    except CommandExitException as exc:
        return f"{exc.stdout}{exc.stderr}"
    return f"{result.stdout}{result.stderr}"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def python(sbx: Sandbox, code: str, user: str = "root") -> str:
    """Run Python (the host's, through the sandbox's read-only /usr) with :data:`PROBE` loaded."""
    return sh(sbx, f"python3 - <<'EOF'\n{PROBE}\n{code}\nEOF", user=user)


def field(out: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(f"{name}:"))


V2_NAMES = {"memory.limit_in_bytes": "memory.max", "cpu.cfs_quota_us": "cpu.max"}
"""v1 control files' v2 counterparts (the others keep their names), so that a check of a limit reads it on
either host rather than finding no file on v2 and checking nothing."""


def cgroup_v2() -> bool:
    """Whether the host is cgroup v2 (the unified hierarchy at ``/sys/fs/cgroup``)."""
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def cgroup_file(runtime: Runtime, sandbox_id: str, controller: str, name: str) -> Path:
    """A control file of the sandbox's cgroup, read from the host (v1: the controller's hierarchy), by its
    v1 name (:data:`V2_NAMES`)."""
    group = Path("sandboxd") / instance_name(runtime.data_dir) / sandbox_id
    if cgroup_v2():
        return CGROUP_ROOT / group / V2_NAMES.get(name, name)
    hierarchy = next(d for d in CGROUP_ROOT.iterdir() if controller in d.name.split(","))
    return hierarchy / group / name


def use(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return runtime


@pytest.fixture(scope="module")
def small_runtime(start_runtime: Callable[..., Runtime]) -> Runtime:
    """Sandboxes with a small memory limit and disk quota."""
    return start_runtime("--sandbox-memory-mb", str(SMALL_MEMORY_MB), "--sandbox-disk-mb", str(SMALL_DISK_MB))


@pytest.fixture(scope="module")
def nested_runtime(start_runtime: Callable[..., Runtime]) -> Runtime:
    """Sandboxes allowed to create nested user namespaces (the seccomp filter out of the way)."""
    return start_runtime("--allow-nested-userns", "--sandbox-memory-mb", str(SMALL_MEMORY_MB))


@pytest.fixture
def small(small_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    use(small_runtime, monkeypatch)
    sbx = Sandbox.create()
    yield sbx
    sbx.kill()


# ------------------------------------------------------------------------------------ limits


REMOUNT_AND_RAISE = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def mount(fstype, options, target):
    os.makedirs(target, exist_ok=True)
    data = options.encode() if options else None
    if libc.mount(b"none", target.encode(), fstype.encode(), 0, data) == 0:
        print(f"mounted {fstype} {options}", flush=True)
        return True
    print(f"mount {fstype} {options}:", errno.errorcode[ctypes.get_errno()], flush=True)
    return False
def write(path, value, what):
    try:
        with open(path, "w") as f:
            f.write(value)
        print("raised", what, flush=True)
    except OSError as e:
        print(f"write {what}:", errno.errorcode[e.errno], flush=True)
for controller, name, value in [("memory", "memory.limit_in_bytes", "3221225472"), ("pids", "pids.max", "max"),
                                ("cpu", "cpu.cfs_quota_us", "-1")]:
    target = f"/tmp/c-{controller}"
    if mount("cgroup", controller, target):
        write(f"{target}/{name}", value, controller)
        try:
            os.mkdir(f"{target}/escape")
            print("made a group", flush=True)
        except OSError as e:
            print("mkdir group:", errno.errorcode[e.errno], flush=True)
if mount("cgroup2", None, "/tmp/c2"):
    write("/tmp/c2/memory.max", "max", "v2 memory")
    try:
        os.mkdir("/tmp/c2/escape")
        print("made a group", flush=True)
    except OSError as e:
        print("mkdir v2 group:", errno.errorcode[e.errno], flush=True)
print("attack over", flush=True)
"""
"""The issue's attack, in a nested user namespace with its own cgroup namespace (``unshare -U -r -C
-m``): mount the hierarchy and write the limits (it lifted the memory limit from 1 to 3 GiB before
user namespaces). Raw system calls, so no tool missing from a template can make it look refused."""


def _limits_hold_after_remount(runtime: Runtime, sbx: Sandbox) -> str:
    before = {
        (c, n): cgroup_file(runtime, sbx.sandbox_id, c, n).read_text()
        for c, n in [("memory", "memory.limit_in_bytes"), ("pids", "pids.max"), ("cpu", "cpu.cfs_quota_us")]
        if cgroup_file(runtime, sbx.sandbox_id, c, n).exists()
    }
    sbx.files.write("/tmp/attack.py", REMOUNT_AND_RAISE, user="root")
    out = sh(sbx, "unshare -U -r -C -m python3 /tmp/attack.py 2>&1; echo exit=$?")
    assert "raised" not in out and "made a group" not in out, out
    for (c, n), value in before.items():
        assert cgroup_file(runtime, sbx.sandbox_id, c, n).read_text() == value, n
    # And the limit is real: `user` allocating 1.5x the memory limit is killed.
    big = f"b = bytearray({SMALL_MEMORY_MB * 3 // 2} << 20); b[::4096] = b'x' * len(b[::4096]); print('allocated')"
    assert "allocated" not in sh(sbx, f"python3 -c {_quote(big)}", user="user")
    return out


def test_cgroup_remount_from_a_nested_userns_cannot_raise_limits(small_runtime: Runtime, small: Sandbox) -> None:
    out = _limits_hold_after_remount(small_runtime, small)
    assert "Operation not permitted" in out and "attack over" not in out, out  # refused outright


def test_cgroup_remount_cannot_raise_limits_even_with_nested_userns_allowed(
    nested_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(nested_runtime, monkeypatch)
    sbx = Sandbox.create()
    try:
        # With nested namespaces allowed the attack runs and may mount; writing the host-owned files
        # or making a group never works.
        out = _limits_hold_after_remount(nested_runtime, sbx)
        if cgroup_v2():  # the controllers are v2's: no v1 hierarchy of them can be mounted
            assert "mounted cgroup2" in out and "write v2 memory: EACCES" in out, out
        else:
            assert "mounted cgroup memory" in out and "write memory: EACCES" in out, out
        assert "mkdir v2 group: EACCES" in out, out
    finally:
        sbx.kill()


def test_raising_limits_by_any_other_route_fails(small_runtime: Runtime, small: Sandbox) -> None:
    out = sh(
        small,
        """
ulimit -Hn $(( $(ulimit -Hn) + 1 )) 2>/dev/null && echo raised-nofile || echo nofile-held
prlimit --pid $$ --nproc=unlimited 2>/dev/null && echo raised-nproc || echo nproc-held
echo -1000 > /proc/self/oom_score_adj 2>/dev/null && echo oom-immune || echo oom-held
python3 -c 'import os; os.nice(-10)' 2>/dev/null && echo reniced || echo nice-held
chrt -f 50 true 2>/dev/null && echo realtime || echo rt-held
ionice -c 1 true 2>/dev/null && echo realtime-io || echo io-held
echo 1000 > /proc/sys/user/max_inotify_instances 2>/dev/null && echo raised-inotify || echo inotify-held
echo 100 > /proc/sys/user/max_user_namespaces 2>/dev/null && echo raised-userns || echo userns-held
sysctl -w kernel.pid_max=4194304 >/dev/null 2>&1 && echo raised-pid-max || echo pid-max-held
python3 -c 'import ctypes; l = ctypes.CDLL(None); exit(l.mount(b"none", b"/mnt", b"cgroup", 0, b"memory"))' \
  && echo mounted-cgroup || echo cgroup-held
ls /sys/fs/cgroup 2>/dev/null | head -1; echo cgroupfs-listed
""",
    )
    for held in ("nofile-held", "nproc-held", "oom-held", "nice-held", "rt-held", "io-held", "inotify-held"):
        assert held in out, out
    for held in ("userns-held", "pid-max-held", "cgroup-held"):
        assert held in out, out
    assert Path("/proc/sys/kernel/pid_max").read_text().strip() != "4194304"
    memory = cgroup_file(small_runtime, small.sandbox_id, "memory", "memory.limit_in_bytes")
    if memory.exists():
        assert int(memory.read_text()) == SMALL_MEMORY_MB << 20


def test_a_fork_bomb_is_bounded_and_spares_the_host_and_other_sandboxes(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(5)\n"
    a.commands.run(
        f"python3 -c {_quote(bomb)}",
        user="user",
        background=True,
        timeout=0,
    )
    time.sleep(3)
    # The host still forks, and another sandbox still runs commands.
    assert subprocess.run(["true"], check=False).returncode == 0
    assert b.commands.run("echo alive").stdout == "alive\n"
    a.kill()  # and the bombed sandbox can be destroyed


# ----------------------------------------------------------------------- kernel-wide state


def _keyctl() -> tuple[ctypes.CDLL, Callable[..., int]]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(*args: object) -> int:
        return int(libc.syscall(*args))

    return libc, call


def test_keyring_read_plant_and_unlink_across_host_and_sandboxes_fail(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    _, call = _keyctl()
    name = f"sandboxd-drill-{uuid.uuid4().hex}".encode()
    key = call(SYS_ADD_KEY, b"user", name, b"host secret", 11, KEY_SPEC_USER_KEYRING)
    assert key > 0, os.strerror(ctypes.get_errno())
    try:
        attack = f"""
call("search_host_key", 250, {KEYCTL_SEARCH}, {KEY_SPEC_USER_KEYRING}, b"user", {name!r}, 0)
call("read_host_key", 250, {KEYCTL_READ}, {key}, 0, 0)
call("unlink_host_key", 250, {KEYCTL_UNLINK}, {key}, {KEY_SPEC_USER_KEYRING})
call("plant_key", 248, b"user", b"planted", b"x", 1, {KEY_SPEC_USER_KEYRING})
"""
        for sbx in (a, b):
            for user in ("root", "user"):
                out = python(sbx, attack, user=user)
                for step in ("search_host_key", "read_host_key", "unlink_host_key", "plant_key"):
                    assert field(out, step) == "EPERM", out
            assert sh(sbx, "cat /proc/keys; echo end") == "end\n"  # masked
        buf = ctypes.create_string_buffer(64)
        assert call(SYS_KEYCTL, KEYCTL_READ, key, buf, 64) == 11 and buf.value == b"host secret"
    finally:
        call(SYS_KEYCTL, KEYCTL_UNLINK, key, KEY_SPEC_USER_KEYRING)


def test_inotify_exhaustion_in_one_sandbox_spares_other_sandboxes_and_the_host(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    hold = """
import ctypes, os, time
libc = ctypes.CDLL(None)
n = 0
while n < 100000 and libc.inotify_init() >= 0:
    n += 1
print(n, flush=True)
time.sleep(120)
"""
    a.files.write("/tmp/hold.py", hold)
    held = []
    for user in ("root", "user"):  # every uid of the sandbox takes what it can
        handle = a.commands.run(f"python3 /tmp/hold.py > /tmp/held-{user}", user=user, background=True, timeout=0)
        held.append(handle)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = sh(a, "cat /tmp/held-root /tmp/held-user 2>/dev/null").split()
        if len(counts) == 2:
            break
        time.sleep(0.2)
    assert len(counts) == 2, counts
    host_limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert sum(int(c) for c in counts) <= host_limit
    # The sandbox's own watches fail now...
    with pytest.raises(Exception):  # noqa: B017 - the SDK reports it as a SandboxException subclass
        a.files.watch_dir("/tmp")
    # ...while another sandbox and host root keep theirs.
    watcher = b.files.watch_dir("/tmp")
    b.files.write("/tmp/seen", "x")
    deadline = time.monotonic() + 10
    events = []
    while not events and time.monotonic() < deadline:
        events = watcher.get_new_events()
        time.sleep(0.05)
    watcher.stop()
    assert events
    libc = ctypes.CDLL(None)
    fd = libc.inotify_init()
    assert fd >= 0
    os.close(fd)


def test_proc_sys_and_sysrq_writes_fail(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    out = sh(
        a,
        """
echo '|/tmp/evil' > /proc/sys/kernel/core_pattern 2>/dev/null && echo core-pattern-set || echo core-pattern-held
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo sysrq-enabled || echo sysrq-held
echo h > /proc/sysrq-trigger 2>/dev/null && echo sysrq-triggered || echo trigger-held
echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo dropped || echo drop-held
head -c 16 /proc/kcore 2>/dev/null | wc -c | sed 's/^/kcore-bytes: /'
""",
    )
    for held in ("core-pattern-held", "sysrq-held", "trigger-held", "drop-held"):
        assert held in out, out
    assert field(out, "kcore-bytes") == "0"
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern


# ---------------------------------------------------------------------------- devices, mounts


def test_device_nodes_cannot_be_made_or_reached(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    out = sh(
        a,
        """
mknod /tmp/sda b 8 0 2>/dev/null && echo made-block || echo block-refused
mknod /tmp/mem c 1 1 2>/dev/null && echo made-char || echo char-refused
ls /dev | tr '\\n' ' '; echo
""",
    )
    assert "block-refused" in out and "char-refused" in out, out
    devices = set(out.strip().splitlines()[-1].split())
    assert devices <= {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"} | {
        "fd",
        "stdin",
        "stdout",
        "stderr",
    }, devices
    # From the host: a root shell moved into the sandbox's cgroup cannot open a host device either.
    procs = {cgroup_file(runtime, a.sandbox_id, c, "cgroup.procs") for c in ("devices", "pids", "memory", "freezer")}
    probe = " ".join(f"echo $$ > {p};" for p in procs if p.exists())
    probe += " (exec 3</dev/loop-control) 2>/dev/null && echo opened || echo refused"
    assert subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout.strip() == "refused"


def test_mount_and_umount_fail(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    out = python(
        a,
        """
MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH, CLONE_NEWNS = 1, 32, 4096, 2, 0x20000
call("mount_tmpfs", 165, b"none", b"/mnt", b"tmpfs", 0, 0)
call("bind_root", 165, b"/", b"/mnt", 0, MS_BIND, 0)
call("remount_usr_rw", 165, 0, b"/usr", 0, MS_REMOUNT | MS_BIND, 0)
call("remount_proc_sys_rw", 165, 0, b"/proc/sys", 0, MS_REMOUNT | MS_BIND, 0)
call("umount_proc_sys", 166, b"/proc/sys", 0)
call("umount_boot_id", 166, b"/proc/sys/kernel/random/boot_id", MNT_DETACH)
call("unshare_mount_ns", 272, CLONE_NEWNS)
call("fsopen", 430, b"tmpfs", 0)
call("open_tree", 428, -100, b"/", 1)
""",
    )
    for step in (
        "mount_tmpfs",
        "bind_root",
        "remount_usr_rw",
        "remount_proc_sys_rw",
        "umount_proc_sys",
        "umount_boot_id",
        "unshare_mount_ns",
        "fsopen",
        "open_tree",
    ):
        assert field(out, step) == "EPERM", out


# ---------------------------------------------------------------------------------- processes


def test_ptrace_of_the_agent_fails(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    out = python(
        a,
        """
import os
call("ptrace_attach_agent", 101, 16, 2, 0, 0)          # PTRACE_ATTACH to PID 2, the agent
call("ptrace_attach_init", 101, 16, 1, 0, 0)
for path in ("/proc/2/environ", "/proc/2/mem", "/proc/1/environ"):
    try:
        open(path, "rb").read(1)
        print(path + ": ok")
    except OSError as e:
        print(path + ":", errno.errorcode[e.errno])
""",
    )
    assert field(out, "ptrace_attach_agent") == "EPERM", out
    assert field(out, "ptrace_attach_init") == "EPERM", out
    for path in ("/proc/2/environ", "/proc/2/mem", "/proc/1/environ"):
        assert field(out, path) in ("EACCES", "EPERM"), out


def test_signals_cannot_reach_another_sandbox(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    b.commands.run("sleep 600", background=True, timeout=0)
    # Root in A kills everything it can see (its own agent too, so the call itself fails); B's
    # processes are not among them.
    with contextlib.suppress(Exception):
        sh(a, "kill -9 -1 2>/dev/null; true")
    assert "sleep 600" in b.commands.run("ps -eo args").stdout


def test_setuid_root_inside_is_only_the_sandboxes_root(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    base = int(sh(a, "cat /proc/self/uid_map").split()[1])
    sh(a, "cp /usr/bin/id /tmp/suid-id && cp /usr/bin/sleep /tmp/suid-sleep && chmod 4755 /tmp/suid-*")
    assert sh(a, "/tmp/suid-id -u", user="user") == "0\n"  # root inside, as sudo would make it
    # On the host, that root is the sandbox's own unprivileged id, not host root.
    marker = str(7000 + os.getpid() % 1000)
    a.commands.run(f"/tmp/suid-sleep {marker}", user="user", background=True, timeout=0)
    deadline = time.monotonic() + 10
    uids: list[str] = []
    while not uids and time.monotonic() < deadline:
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                cmdline = (status.parent / "cmdline").read_bytes()
                text = status.read_text()
            except OSError:
                continue
            if cmdline == f"/tmp/suid-sleep\0{marker}\0".encode():
                uids = next(line.split()[1:] for line in text.splitlines() if line.startswith("Uid:"))
        time.sleep(0.1)
    assert uids == [str(base + 1000), str(base), str(base), str(base)], uids


# ------------------------------------------------------------------------------------- disk


def test_writing_past_the_disk_quota_fails_with_enospc(small_runtime: Runtime, small: Sandbox) -> None:
    out = sh(
        small,
        f"""
df -m / | tail -1 | awk '{{print "df-total-mb:", $2}}'
dd if=/dev/zero of=/home/user/fill bs=1M count={SMALL_DISK_MB * 2} 2>&1 | grep -o 'No space left on device'
rm -f /home/user/fill; echo removed
""",
        user="user",
    )
    assert "No space left on device" in out, out
    assert SMALL_DISK_MB * 0.8 < int(field(out, "df-total-mb")) <= SMALL_DISK_MB, out
    metrics = small.get_metrics()[-1]
    assert SMALL_DISK_MB * 0.8 * (1 << 20) < metrics.disk_total <= SMALL_DISK_MB << 20
    assert metrics.disk_used < metrics.disk_total
    image = small_runtime.data_dir / "sandboxes" / small.sandbox_id / "disk.img"
    assert image.stat().st_blocks * 512 <= (SMALL_DISK_MB + 8) << 20  # the host gave it no more


def test_a_gzip_upload_inflating_past_the_quota_fails_and_leaves_no_file(small: Sandbox) -> None:
    payload = bytes(SMALL_DISK_MB * 3 << 20)  # three times the quota; a few hundred KiB gzipped
    with pytest.raises(NotEnoughSpaceException):
        small.files.write("/home/user/bomb.bin", payload, gzip=True)
    assert not small.files.exists("/home/user/bomb.bin")
    leftovers = sh(small, "find / -xdev -newer /etc/hostname -size +1M 2>/dev/null; echo end")
    assert leftovers == "end\n", leftovers
    small.files.write("/home/user/after.txt", "there is room again")  # nothing partial holds space


def _flushes(path: Path) -> int:
    """Cache flushes completed so far by the block device holding ``path`` (its ``stat``'s 16th
    field, Linux 5.5+), or of the whole disk when that device is a partition."""
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not (block / "stat").exists():
        pytest.skip(f"{path} is on no block device (st_dev {os.major(dev)}:{os.minor(dev)})")
    fields = (block / "stat").read_text().split()
    if len(fields) < 17:
        pytest.skip("this kernel does not count flushes (Linux 5.5+)")
    return int(fields[15])


def _check_flushes_counted(data: Path) -> None:
    """The control: the host's own fsyncs under ``data`` do reach its disk, and the counter sees them."""
    before = _flushes(data)
    fd = os.open(data / "flush-control", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(20):
            os.write(fd, b"x")
            os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(data / "flush-control")
    control = _flushes(data) - before
    if control < 20:
        pytest.skip(f"the disk under {data} counts {control} flushes for 20 fsyncs (no volatile cache?)")


def _run_counting_flushes(sandbox: Sandbox, data: Path, script: str, user: str, limit: int) -> tuple[str, int, int]:
    """``script``'s output in ``sandbox``, the flushes of the disk under ``data`` while it ran, and
    the most that disk made in either of two waits as long right after: the host's own (its
    journal's commits, other tests and jobs), which a drill must not count against a sandbox. Tens
    a second on a loaded host, and bursty: other runtimes' SQLite commits and disks kept by pauses
    once made one window read ~400 more than the two after it (CI, beside a benchmark's bursts of
    creates). So up to three tries, until one's excess is under ``limit``: a sandbox that does make
    the disk flush exceeds it in every try (thousands for a ``sync`` loop, hundreds for fsyncs), the
    host's bursts rarely thrice. Skips where the disk does not count the host's own fsyncs."""
    _check_flushes_counted(data)
    for _ in range(3):
        started = time.monotonic()
        at = _flushes(data)
        out = sh(sandbox, script, user=user)
        took = time.monotonic() - started
        during = _flushes(data) - at
        windows = []
        for _ in range(2):
            at = _flushes(data)
            time.sleep(took)
            windows.append(_flushes(data) - at)
        if during - max(windows) < limit:
            break
    return out, during, max(windows)


def test_syncs_inside_a_sandbox_never_flush_the_hosts_disk(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    """``sync(2)`` is not namespaced: it writes back and flushes every filesystem of the host, so a
    loop of ``sync`` inside (root's included) kept the host's disk flushing its cache, against
    every other tenant's I/O (5,626 flushes for 200 calls). It now succeeds without running; and a
    sandbox's disk has no write barriers, so its own ``syncfs`` and ``fsync`` stop at its image."""
    a, _ = pair
    data = runtime.data_dir
    syncs = 200
    out, flushes, background = _run_counting_flushes(
        a,
        data,
        f"for i in $(seq {syncs}); do echo $i >> /home/user/f; sync; sync -f /home/user/f;"
        " dd if=/home/user/f of=/home/user/g conv=fsync status=none; done; echo done",
        user="root",
        limit=syncs // 2,
    )
    assert out == "done\n", out
    # Unfixed: thousands (14-28 a sync). The host's own flushes go on meanwhile: a loaded host (other
    # tests, other jobs) makes tens a second, counted here as the background and allowed for.
    assert flushes - background < syncs // 2, (
        f"{syncs} rounds of syncs inside made the host's disk flush {flushes} times ({background} meanwhile without)"
    )


def test_no_file_a_sandbox_can_open_lets_it_flush_the_hosts_disk(
    pair: tuple[Sandbox, Sandbox], runtime: Runtime
) -> None:
    """``fsync`` of a file, even a clean one opened read-only through a read-only mount, makes ext4
    flush its disk's cache, and ``syncfs`` writes back and flushes its whole filesystem: on a file
    of the host's own filesystem (the data dir's), either is ``sync(2)`` for that disk. The boot id
    was such a file: bound from the sandbox's directory onto ``/proc/sys/kernel/random/boot_id``,
    readable by every user inside. No file a sandbox reaches may be one of the host's (a volume is
    by design: its barriers are kept so that its writes survive a host crash)."""
    a, _ = pair
    data = runtime.data_dir
    rounds = 200
    out, flushes, background = _run_counting_flushes(
        a,
        data,
        f"for i in $(seq {rounds}); do sync /proc/sys/kernel/random/boot_id;"
        " sync -f /proc/sys/kernel/random/boot_id; done; cat /proc/sys/kernel/random/boot_id",
        user="user",
        limit=rounds // 2,
    )
    out = out.strip()
    assert len(out) == 36 and out.count("-") == 4, out  # still the sandbox's boot id, readable
    # Unfixed: two a round (the fsync's flush, the syncfs's commit), 400 here.
    assert flushes - background < rounds // 2, (
        f"{rounds} rounds of fsync/syncfs of the boot id flushed the host's disk {flushes} times"
        f" ({background} meanwhile without)"
    )


@pytest.mark.parametrize("user", ["user", "root"])
def test_no_file_of_the_host_templates_usr_lets_it_flush_the_hosts_disk(e2b_env: Runtime, user: str) -> None:
    """The ``host`` template's ``/usr`` is the host's own, idmapped and read-only: ``fsync`` of any
    file there (a clean one, read-only, as ``user``: ``/usr/bin/ls``, a directory, the running
    program through ``/proc/self/exe``) made ext4 flush the host's disk, and ``syncfs`` wrote back
    and flushed its whole filesystem. It is now under a read-only overlay, which syncs no lower
    file and, with no upper layer, no filesystem. The rest of what a sandbox can open is checked
    beside it: its root (template layers and its disk: overlayfs), ``/etc/hostname`` (written at
    every start, on its disk) and the host's device nodes (devtmpfs)."""
    data = e2b_env.data_dir
    if os.stat("/usr").st_dev != os.stat(data).st_dev:
        pytest.skip("the host's /usr is not on the data dir's disk, whose flushes are counted")
    sandbox = Sandbox.create(template="host")
    try:
        rounds = 200
        out, flushes, background = _run_counting_flushes(
            sandbox,
            data,
            f"for i in $(seq {rounds}); do sync /usr/bin/ls /usr /proc/self/exe /etc/passwd /etc/hostname /;"
            " sync /dev/null 2>/dev/null; sync -f /usr/bin/ls; sync -f /etc/passwd; done;"
            " ls /usr/bin/ls; touch /usr/bin/sandboxd-probe 2>&1 | grep -o 'Read-only file system'",
            user=user,
            limit=rounds // 2,
        )
    finally:
        sandbox.kill()
    # /usr is still the host's, still read-only.
    assert out == "/usr/bin/ls\nRead-only file system\n", out
    # Unfixed: four a round (the fsyncs of the three files under /usr, the syncfs's), 800 here.
    assert flushes - background < rounds // 2, (
        f"{rounds} rounds of fsync/syncfs under the host template's /usr flushed the host's disk {flushes} times"
        f" ({background} meanwhile without)"
    )


# -------------------------------------------------------------------------- the host, others


def test_reading_host_files_and_the_data_dir_fails(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    secret = runtime.data_dir / "host-secret.txt"
    secret.write_text("host only")
    for path in (str(secret), "/work", str(runtime.data_dir), "/root/.bash_history", "/var/lib/sandboxd-ids"):
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
    # Opening host files by handle (the "shocker" escape) is refused.
    out = python(a, 'call("open_by_handle_at", 304, -100, 0, 0)')
    assert field(out, "open_by_handle_at") == "EPERM"


def test_seeing_host_processes_fails(pair: tuple[Sandbox, Sandbox]) -> None:
    a, _ = pair
    pids = [int(p) for p in a.commands.run("ls /proc | grep -E '^[0-9]+$'").stdout.split()]
    assert 1 in pids
    assert len(pids) < 20  # init, the agent, bash, ls: not the host's hundreds
    everything = a.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
    assert "pytest" not in everything  # this test's own process is on the host


def test_reading_the_runtimes_secrets_fails(pair: tuple[Sandbox, Sandbox], runtime: Runtime) -> None:
    a, _ = pair
    probe = "cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"
    seen = a.commands.run(probe, user="root").stdout
    assert runtime.api_key not in seen
    assert "--api-key" not in seen


def test_seeing_another_sandboxes_files_and_processes_fails(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    a.files.write("/home/user/mine.txt", "a's")
    a.commands.run("sleep 300", background=True, timeout=0)
    assert b.commands.run("test -e /home/user/mine.txt && echo seen || echo unseen").stdout == "unseen\n"
    assert b.commands.run("pgrep -x sleep || echo none").stdout == "none\n"
    assert b.commands.run("ls /tmp").stdout == a.commands.run("ls /tmp").stdout == ""
    # Each sandbox's ids are its own range on the host.
    maps = {sh(s, "cat /proc/self/uid_map").split()[1] for s in (a, b)}
    assert len(maps) == 2


def test_reaching_host_loopback_services_fails(pair: tuple[Sandbox, Sandbox]) -> None:
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
        assert set(ifaces) <= {"eth0", "lo"}  # loopback, and the link its egress goes through
        vsock = "import socket\ntry:\n    socket.socket(40, 1)\n    print('vsock: ok')\nexcept OSError as e:\n"
        out = python(a, vsock + "    print('vsock:', errno.errorcode[e.errno])")
        assert field(out, "vsock") == "EPERM"  # nor the hypervisor, through vsock
    finally:
        listener.close()
