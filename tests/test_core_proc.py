"""The ``sandboxd._core`` process binding, exercised from Python with real processes.

The Rust core has its own ``cargo test -p sandboxd-proc`` (flow control, PTY, reaping, users); these
tests check what the binding adds: argument mapping (env, path, cwd, user, pty, oom_score_adj),
errno → ``OSError`` subclasses naming the binary or cwd, ``LookupError`` for unknown users,
``Batch`` objects, the eventfd for asyncio, closing subscribers, and that waits release the GIL.
"""

from __future__ import annotations

import asyncio
import binascii
import errno
import io
import json
import os
import pwd
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sandboxd import _core

pytestmark = pytest.mark.timeout(30)

SH = "/bin/sh"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def sh(script: str, **kwargs: Any) -> _core.Process:
    """Spawns ``/bin/sh -c script`` with no extra environment."""
    return _core.Process.spawn(SH, ["-c", script], {}, **kwargs)


@dataclass
class Output:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    pty: bytearray = field(default_factory=bytearray)
    end: _core.End | None = None
    lagged: int = 0
    batches: list[_core.Batch] = field(default_factory=list)


def collect(process: _core.Process, from_oldest: bool = True, timeout: float = 10) -> Output:
    """Reads everything a process prints, through a subscriber, until its end."""
    out = Output()
    deadline = time.monotonic() + timeout
    with process.subscribe(from_oldest) as sub:
        while True:
            assert sub.wait(max(deadline - time.monotonic(), 0)), f"no end within {timeout} s"
            batch = sub.next_batch()
            out.batches.append(batch)
            out.lagged += batch.lagged_bytes
            for stream, data in batch.chunks:
                if stream == _core.STREAM_STDOUT:
                    out.stdout += data
                elif stream == _core.STREAM_STDERR:
                    out.stderr += data
                else:
                    assert stream == _core.STREAM_PTY
                    out.pty += data
            if batch.end is not None:
                out.end = batch.end
                return out


def run(script: str, **kwargs: Any) -> Output:
    return collect(sh(script, **kwargs))


def is_dead(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (an orphan's reaper may be slow in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def eventually(predicate: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# ----------------------------------------------------------------------------------- basics


def test_stream_constants_are_envd_field_numbers() -> None:
    assert (_core.STREAM_STDOUT, _core.STREAM_STDERR, _core.STREAM_PTY) == (1, 2, 3)


def test_echo() -> None:
    process = _core.Process.spawn("echo", ["hello", "world"], {}, path=PATH)
    assert process.pid > 0
    assert not process.has_pty
    out = collect(process)
    assert out.stdout == b"hello world\n"
    assert out.stderr == b""
    assert out.lagged == 0
    assert process.end() is not None
    assert "exit status 0" in repr(process)


@pytest.mark.parametrize(
    ("script", "exited", "exit_code", "status", "error"),
    [
        ("exit 0", True, 0, "exit status 0", None),
        ("exit 3", True, 3, "exit status 3", "exit status 3"),
        ("kill -9 $$", False, -1, "signal: killed", "signal: killed"),
        ("kill -15 $$", False, -1, "signal: terminated", "signal: terminated"),
    ],
)
def test_end_maps_like_envd(script: str, exited: bool, exit_code: int, status: str, error: str | None) -> None:
    end = run(script).end
    assert end is not None
    assert (end.exited, end.exit_code, end.status, end.error) == (exited, exit_code, status, error)


def test_stdout_and_stderr_are_separate_streams() -> None:
    out = run("echo out; echo err >&2; echo out2")
    assert out.stdout == b"out\nout2\n"
    assert out.stderr == b"err\n"
    assert out.pty == b""


def test_batches_join_runs_of_one_stream_and_respect_max_bytes() -> None:
    process = sh("for i in 1 2 3 4; do echo $i; sleep 0.02; done; echo e >&2")
    assert process.wait(10) is not None
    with process.subscribe() as sub:
        whole = sub.next_batch()
        assert whole.chunks == [(_core.STREAM_STDOUT, b"1\n2\n3\n4\n"), (_core.STREAM_STDERR, b"e\n")]
        assert whole.end is not None and not whole.more
    with process.subscribe() as sub:
        first = sub.next_batch(1)
        assert first.chunks == [(_core.STREAM_STDOUT, b"1\n")]
        assert first.more and first.end is None
        assert "more=True" in repr(first)


# ------------------------------------------------------------------------- env, path, cwd, user


def test_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_TEST_LEAK", "1")
    me = pwd.getpwuid(os.getuid())
    process = _core.Process.spawn("env", [], {"FOO": "bar", "HOME": "/custom"}, path=PATH)
    lines = sorted(collect(process).stdout.decode().splitlines())
    # The caller's env wins over HOME; nothing of ours leaks.
    assert lines == sorted(["HOME=/custom", f"USER={me.pw_name}", f"LOGNAME={me.pw_name}", f"PATH={PATH}", "FOO=bar"])
    out = collect(_core.Process.spawn("env", [], {}, path=PATH))
    assert f"HOME={me.pw_dir}\n".encode() in out.stdout


def test_path_defaults_to_the_agents_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/bin:/usr/bin:/sandboxd-test")
    assert run('echo "$PATH"').stdout == b"/bin:/usr/bin:/sandboxd-test\n"
    monkeypatch.delenv("PATH")
    assert run('echo "$PATH"').stdout == b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"


def test_cwd(tmp_path: Path) -> None:
    assert run("pwd", cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()


def test_missing_cwd_names_it() -> None:
    with pytest.raises(FileNotFoundError) as info:
        sh("pwd", cwd="/does/not/exist")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "/does/not/exist"
    assert "/does/not/exist" in str(info.value)


def test_cwd_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        sh("pwd", cwd=str(tmp_path / "file"))
    assert info.value.filename == str(tmp_path / "file")


def test_missing_binary_names_it() -> None:
    with pytest.raises(FileNotFoundError) as info:
        _core.Process.spawn("no-such-command-xyz", ["arg"], {}, path=PATH)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "no-such-command-xyz"
    assert "no-such-command-xyz" in str(info.value)
    with pytest.raises(FileNotFoundError, match="/nonexistent/tool"):
        _core.Process.spawn("/nonexistent/tool", [], {})


def test_binary_without_execute_permission(tmp_path: Path) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError) as info:
        _core.Process.spawn(str(plain), [], {})
    assert info.value.errno == errno.EACCES
    assert info.value.filename == str(plain)


def test_unknown_user_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="'no-such-user-xyz' does not exist"):
        sh("true", user="no-such-user-xyz")


def test_runs_as_a_named_user() -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    assert run("id -un; echo $USER $LOGNAME", user=me, path=PATH).stdout == f"{me}\n{me} {me}\n".encode()
    if os.geteuid() != 0:
        return
    out = run("id -u; id -g; echo $HOME $USER", user="nobody", path=PATH)
    assert out.stdout.decode().splitlines() == ["65534", "65534", "/nonexistent nobody"]


def test_runs_as_a_resolved_identity_without_looking_it_up() -> None:
    # The identity is used as given (the agent resolves and caches its users): a name that is in no
    # account database, with the caller's own ids so that this also runs unprivileged.
    uid, gid = os.getuid(), os.getgid()
    identity = ("not-in-passwd", uid, gid, "/given/home", [gid])
    out = run("id -u; id -g; echo $HOME $USER $LOGNAME", identity=identity, path=PATH)
    assert out.stdout.decode().splitlines() == [str(uid), str(gid), "/given/home not-in-passwd not-in-passwd"]


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        _core.Process.spawn("true", [], {"A=B": "c"}, path=PATH)
    with pytest.raises(ValueError, match="nul byte"):
        _core.Process.spawn("echo", ["a\0b"], {}, path=PATH)
    with pytest.raises(ValueError, match="oom_score_adj"):
        _core.Process.spawn("true", [], {}, path=PATH, oom_score_adj=5000)


def test_oom_score_adj_is_set_in_the_child() -> None:
    ours = Path("/proc/self/oom_score_adj").read_bytes()
    assert run("cat /proc/self/oom_score_adj", path=PATH).stdout == ours
    assert run("cat /proc/self/oom_score_adj", path=PATH, oom_score_adj=100).stdout == b"100\n"


def test_a_command_inherits_no_descriptor_but_its_three() -> None:
    """A descriptor our process holds without close-on-exec (one an embedding orchestrator or a
    launcher passed down) does not reach the command: it sees 0, 1 and 2 only."""
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        listing = run("ls /proc/self/fd", path=PATH).stdout.split()
    finally:
        os.close(read_end)
        os.close(write_end)
    # `ls` itself has one open: the directory it lists.
    assert listing[:3] == [b"0", b"1", b"2"] and len(listing) == 4, f"the command holds more: {listing}"


F_GETPIPE_SZ = 1032  # <linux/fcntl.h>
STDOUT_PIPE_BYTES = 1 << 20  # sandboxd-proc's STDOUT_PIPE_BYTES


def test_stdout_pipe_is_enlarged_once_it_floods_and_not_before() -> None:
    """The child reports its stdout pipe's size before and after writing 1 MiB into it: 64 KiB
    while quiet (a process that prints little holds no share of the pipe budget), 1 MiB once the
    reader thread has seen a full read (so a flood moves in fewer wake-ups)."""
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < STDOUT_PIPE_BYTES:
        pytest.skip("this kernel's pipe-max-size is below the size the agent asks for")
    script = (
        "import fcntl, os, sys\n"
        f"quiet = fcntl.fcntl(1, {F_GETPIPE_SZ})\n"
        "os.write(1, bytes(1 << 20))\n"
        f"sys.stderr.write(f'{{quiet}} {{fcntl.fcntl(1, {F_GETPIPE_SZ})}}')\n"
    )
    out = collect(_core.Process.spawn(sys.executable, ["-c", script], {}, path=PATH))
    assert len(out.stdout) == 1 << 20
    assert out.stderr.decode().split() == ["65536", str(STDOUT_PIPE_BYTES)]


def test_ring_bytes_bounds_what_is_kept_for_replay() -> None:
    process = sh("head -c 100000 /dev/zero", path=PATH, ring_bytes=8192)
    # Closing the first subscriber (registered at spawn) lets the process run with nobody to wait for.
    process.subscribe().close()
    assert process.wait(10) is not None
    out = collect(process)
    assert 0 < len(out.stdout) <= 8192
    assert out.lagged == 0, "a subscriber is only told about output lost while it was attached"


# ----------------------------------------------------------------------------------- stdin


def test_stdin_pipe_write_and_close() -> None:
    process = _core.Process.spawn("cat", [], {}, path=PATH)
    process.write_stdin(b"hello ", 5)
    process.write_stdin(b"world", 5)
    assert process.wait(0.2) is None, "cat ends only when stdin closes"
    process.close_stdin()
    process.close_stdin()  # idempotent
    out = collect(process)
    assert out.stdout == b"hello world"
    assert out.end is not None and out.end.exit_code == 0
    with pytest.raises(BrokenPipeError):
        process.write_stdin(b"late", 1)


def test_stdin_disabled_is_a_broken_pipe() -> None:
    process = _core.Process.spawn("cat", [], {}, path=PATH, stdin=False)
    out = collect(process)
    assert out.stdout == b"" and out.end is not None and out.end.exit_code == 0
    with pytest.raises(BrokenPipeError) as info:
        process.write_stdin(b"x", 1)
    assert info.value.errno == errno.EPIPE
    assert "stdin not enabled or closed" in str(info.value)


def test_stdin_write_times_out() -> None:
    process = sh("exec sleep 100")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="of 4194304 bytes"):
        process.write_stdin(b"x" * (4 << 20), 0.2)
    assert time.monotonic() - started < 3
    process.signal(9)
    assert process.wait(10) is not None


# ------------------------------------------------------------------------------------- PTY


def test_pty_output_and_resize() -> None:
    process = sh("stty size; read line; stty size; tty", pty=(100, 30), path=PATH)
    assert process.has_pty
    with process.subscribe() as sub:
        text = b""
        deadline = time.monotonic() + 10
        while b"30 100" not in text:
            assert sub.wait(deadline - time.monotonic())
            text += b"".join(data for _, data in sub.next_batch().chunks)
        process.resize(120, 40)
        process.write_pty(b"\n", 5)
    out = collect(process)
    assert out.stdout == b"" and out.stderr == b""
    lines = out.pty.decode().split("\r\n")
    assert "30 100" in lines and "40 120" in lines, lines
    assert any(line.startswith("/dev/pts/") for line in lines), lines
    assert out.end is not None and out.end.exit_code == 0


def test_pipe_only_and_pty_only_operations_are_refused() -> None:
    pty = sh("exec sleep 100", pty=(80, 24))
    with pytest.raises(io.UnsupportedOperation):
        pty.write_stdin(b"x", 1)
    with pytest.raises(io.UnsupportedOperation):
        pty.close_stdin()
    pty.signal(9)
    pipes = sh("exec sleep 100")
    with pytest.raises(io.UnsupportedOperation):
        pipes.write_pty(b"x", 1)
    with pytest.raises(io.UnsupportedOperation):
        pipes.resize(80, 24)
    pipes.signal(9)
    # io.UnsupportedOperation is an OSError (and a ValueError), so services can catch OSError.
    assert issubclass(io.UnsupportedOperation, OSError)


def test_an_ended_pty_process_keeps_no_descriptor_open() -> None:
    """The master is closed with the end, not kept with the process: the agent keeps ended processes
    connectable for 30 s, and every descriptor it holds is copied into (and closed again by) each
    later child, 0.1-0.2 us per descriptor on every spawn (docs/benchmarks.md, ``rtt7``)."""
    before = len(os.listdir("/proc/self/fd"))
    processes = [sh("exit 3", pty=(80, 24)) for _ in range(20)]
    for process in processes:
        # Read as the agent does (which also takes the subscriber each process holds until then).
        end = collect(process, timeout=20).end
        assert end is not None and end.exit_code == 3
    # The handles are alive (as the agent's are), yet hold no descriptor: their masters are closed.
    assert len(os.listdir("/proc/self/fd")) <= before
    ended = processes[0]
    assert ended.has_pty  # still a PTY process, for the refusals' messages
    with pytest.raises(BrokenPipeError):
        ended.write_pty(b"x", 1)
    with pytest.raises(BrokenPipeError):
        ended.resize(80, 24)
    with pytest.raises(io.UnsupportedOperation):
        ended.write_stdin(b"x", 1)


# --------------------------------------------------------------------------------- signals


def test_signal_kills_the_whole_group() -> None:
    process = sh("sleep 100 & echo $!; wait")
    with process.subscribe() as sub:
        assert sub.wait(10)
        grandchild = int(sub.next_batch().chunks[0][1])
    assert not is_dead(grandchild)
    process.signal(9)
    end = process.wait(10)
    assert end is not None and end.status == "signal: killed"
    assert eventually(lambda: is_dead(grandchild))


def test_sigterm_and_invalid_signals() -> None:
    process = sh("exec sleep 100")
    for bad in (0, -1, 99):
        with pytest.raises(ValueError, match="signal"):
            process.signal(bad)
    process.signal(15)
    end = process.wait(10)
    assert end is not None and end.status == "signal: terminated"
    # Once reaped, signalling can never hit a recycled pid.
    with pytest.raises(ProcessLookupError):
        process.signal(9)


# ----------------------------------------------------------------------------- subscribers


def test_subscriber_replays_after_exit() -> None:
    process = sh("echo hello; echo world >&2")
    end = process.wait(10)
    assert end is not None and end.exit_code == 0
    out = collect(process)
    assert (bytes(out.stdout), bytes(out.stderr)) == (b"hello\n", b"world\n")
    # The end stays readable, and a subscriber "from now" sees only the end.
    late = collect(process, from_oldest=False)
    assert (bytes(late.stdout), bytes(late.stderr), late.end is not None) == (b"", b"", True)


def test_subscriber_fd_is_readable_when_there_is_something_to_read() -> None:
    process = sh("sleep 0.3; echo hi; sleep 0.3")
    with process.subscribe(False) as sub:
        fd = sub.fileno()
        assert select.select([fd], [], [], 0.1)[0] == []
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert sub.next_batch().chunks == [(_core.STREAM_STDOUT, b"hi\n")]
        assert select.select([fd], [], [], 0)[0] == [], "reading resets it"
        assert select.select([fd], [], [], 5)[0] == [fd], "no wake-up for the end"
        assert sub.next_batch().end is not None


def test_subscriber_close_is_idempotent_and_final() -> None:
    process = sh("echo x")
    sub = process.subscribe()
    assert sub.fileno() >= 0
    sub.close()
    sub.close()
    assert "closed" in repr(sub)
    with pytest.raises(ValueError, match="closed"):
        sub.fileno()
    with pytest.raises(ValueError, match="closed"):
        sub.next_batch()
    with pytest.raises(ValueError, match="closed"):
        sub.wait(0)
    assert process.wait(10) is not None


def test_waits_time_out() -> None:
    process = sh("exec sleep 100")
    started = time.monotonic()
    assert process.wait(0.2) is None
    with process.subscribe() as sub:
        assert not sub.wait(0.2)
        assert not sub.wait(-1)
    assert 0.4 <= time.monotonic() - started < 3
    process.signal(9)
    assert process.wait(None) is not None


def test_waits_release_the_gil() -> None:
    process = sh("exec sleep 100")
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        assert process.wait(0.5) is None
        with process.subscribe() as sub:
            before = ticks
            assert not sub.wait(0.3)
            assert ticks > before, "a Python thread made no progress while we waited"
    finally:
        stop.set()
        thread.join()
        process.signal(9)


# ---------------------------------------------------------------------------- flow control


def test_eager_reader_gets_all_of_a_fast_writer() -> None:
    total = 64 << 20
    process = sh(f"head -c {total} /dev/zero", path=PATH)
    out = collect(process, timeout=20)
    assert (len(out.stdout), out.lagged) == (total, 0)


def test_first_subscriber_misses_nothing_even_when_it_comes_late() -> None:
    total = 32 << 20
    process = sh(f"head -c {total} /dev/zero", path=PATH)
    time.sleep(0.3)  # the process fills the ring many times over in this time
    assert process.end() is None, "the output should be held for the first subscriber"
    out = collect(process, timeout=20)
    assert (len(out.stdout), out.lagged) == (total, 0)
    # Later subscribers start at what the ring still holds.
    with process.subscribe() as late:
        assert 0 < len(b"".join(data for _, data in late.next_batch().chunks)) <= 1 << 20


def test_a_first_subscriber_from_now_releases_the_held_output() -> None:
    process = sh("head -c 16000000 /dev/zero", path=PATH)
    process.subscribe(False).close()
    started = time.monotonic()
    assert process.wait(10) is not None
    assert time.monotonic() - started < 1.5


def test_a_subscriber_that_never_reads_does_not_slow_a_reading_one() -> None:
    total = 32 << 20
    process = sh(f"head -c {total} /dev/zero", path=PATH)
    with process.subscribe() as idle:
        started = time.monotonic()
        out = collect(process, timeout=20)
        assert (len(out.stdout), out.lagged) == (total, 0)
        assert time.monotonic() - started < 1.5, "the reading subscriber waited for the idle one"
        assert idle.next_batch().lagged_bytes > 0


def test_closing_a_stalled_subscriber_releases_the_process() -> None:
    # The only subscriber does not read, so the process waits for it (up to the 2 s stall
    # timeout); closing it lets the process run on at once.
    process = sh("head -c 16000000 /dev/zero", path=PATH)
    sub = process.subscribe()
    assert process.wait(0.3) is None
    released = time.monotonic()
    sub.close()
    assert process.wait(10) is not None
    assert time.monotonic() - released < 1.5


# ------------------------------------------------------------------------------------- asyncio


def test_asyncio_add_reader_wakes_on_output() -> None:
    async def main() -> tuple[bytes, _core.End, int]:
        process = sh("sleep 0.1; echo hi; sleep 0.2; echo bye; exit 4")
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        data = b""
        wakeups = 0
        with process.subscribe() as sub:
            loop.add_reader(sub.fileno(), ready.set)
            try:
                while True:
                    ready.clear()
                    batch = sub.next_batch()
                    data += b"".join(chunk for _, chunk in batch.chunks)
                    if batch.end is not None:
                        return data, batch.end, wakeups
                    if not batch.more:
                        await asyncio.wait_for(ready.wait(), 10)
                        wakeups += 1
            finally:
                loop.remove_reader(sub.fileno())

    data, end, wakeups = asyncio.run(main())
    assert data == b"hi\nbye\n"
    assert end.exit_code == 4
    assert 2 <= wakeups <= 6


# ----------------------------------------------------------------------------- the allocator's heap

_SCATTERED_FREE_CHUNKS = r"""
import ctypes, json, sys
from sandboxd import _core

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2
# 2,000-byte blocks (past glibc's per-thread cache and fast bins), every other one freed: free chunks
# that cannot merge, scattered through the heap as a preload leaves them.
blocks = [libc.malloc(1992) for _ in range(400)]
freed = blocks[::2]
for block in freed:
    libc.free(block)
before = libc.mallinfo2()
held = _core.hold_free_chunks()
after = libc.mallinfo2()
again = _core.hold_free_chunks()
new = [libc.malloc(1992) for _ in range(50)]
print(json.dumps({
    "free_before": before.ordblks, "free_after": after.ordblks,
    "held": held, "again": again, "new_in_a_hole": len(set(new) & set(freed)),
}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc")
def test_hold_free_chunks_leaves_later_allocations_to_the_heaps_top() -> None:
    # In a process of its own (its main thread, the main arena: as the zygote calls it).
    out = subprocess.run([sys.executable, "-c", _SCATTERED_FREE_CHUNKS], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["free_before"] >= 200  # the scattered chunks (and the top, counted by glibc)
    assert seen["held"] >= 200 * 2000
    assert seen["free_after"] <= 2  # the top, at most one chunk the report's own reading left
    assert seen["again"] < 8192  # nothing left to take
    assert seen["new_in_a_hole"] == 0  # later blocks come from the top, not the freed ones


def test_base64_between_encodes_a_batchs_pieces_as_their_joined_bytes() -> None:
    """The JSON streams' encoder (``Codec._encode_parts``) is given ``next_batch(views=True)``'s data
    as it comes: ``OutputChunk`` views of the ring and the small reads between them, joined; its
    result must be ``before + base64(all of it) + after`` whatever the pieces' sizes (3-byte groups
    cross their edges)."""
    script = "head -c 100001 /dev/urandom; printf ab; sleep 0.05; head -c 70000 /dev/urandom"
    process = sh(script, path=PATH)
    assert process.wait(10) is not None
    before, after = b'{"event":{"data":{"stdout":"', b'"}}}'
    kinds: set[str] = set()
    with process.subscribe() as sub:
        batch = sub.next_batch(views=True)
        for _, data in batch.chunks:
            pieces = [data] if isinstance(data, bytes) else data
            kinds.update(type(piece).__name__ for piece in pieces)
            joined = b"".join(pieces)
            want = before + binascii.b2a_base64(joined, newline=False) + after
            assert _core.base64_between(before, data, after) == want
            assert _core.base64_between(before, tuple(pieces), after) == want
    assert "OutputChunk" in kinds
    assert _core.base64_between(b"", [], b"") == b""
    for n in range(8):  # one-byte pieces: a group carried across several
        data = bytes(range(n))
        assert _core.base64_between(b"<", [data[i : i + 1] for i in range(n)], b">") == (
            b"<" + binascii.b2a_base64(data, newline=False) + b">"
        )
    with pytest.raises(TypeError, match="bytes or OutputChunk, not str"):
        _core.base64_between(b"", [b"ok", "text"], b"")
    with pytest.raises(TypeError, match="list or tuple"):
        _core.base64_between(b"", iter([b"a"]), b"")  # type: ignore[arg-type]
