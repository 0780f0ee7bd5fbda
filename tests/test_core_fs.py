"""The ``sandboxd._core`` file binding, exercised from Python on real temporary directories.

The Rust core has its own ``cargo test -p sandboxd-fs``; these tests check what the binding adds:
errno → ``OSError`` subclasses with ``filename``, ``bytes`` chunks, the writer's lifecycle from
Python (context manager, garbage collection), metadata dicts, and that the GIL is released.
"""

from __future__ import annotations

import errno
import gc
import grp
import importlib.metadata
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandboxd import _core
from sandboxd._proto.filesystem import filesystem_pb2 as pb
from sandboxd.agent.connect import Codec
from sandboxd.agent.services.filesystem import entry_to_proto


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_module_constants() -> None:
    assert _core.__version__ == importlib.metadata.version("sandboxd")
    assert (_core.FILE_TYPE_UNSPECIFIED, _core.FILE_TYPE_FILE, _core.FILE_TYPE_DIRECTORY, _core.FILE_TYPE_SYMLINK) == (
        0,
        1,
        2,
        3,
    )
    assert _core.READ_CHUNK == 1 << 20


def test_entry_info_of_a_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello")
    f.chmod(0o640)
    st = f.stat()
    e = _core.entry_info(str(f))
    assert (e.name, e.path, e.type, e.size, e.mode) == ("a.txt", str(f), _core.FILE_TYPE_FILE, 5, 0o640)
    assert e.permissions == "-rw-r-----"
    assert (e.owner, e.group) == (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)
    assert (e.mtime_sec, e.mtime_nsec) == divmod(st.st_mtime_ns, 10**9)
    assert e.symlink_target is None
    assert e.is_symlink is False
    assert e.metadata == {}
    assert "a.txt" in repr(e)
    with pytest.raises(AttributeError):
        e.name = "other"


def test_permissions_strings(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    suid = tmp_path / "suid"
    suid.write_bytes(b"")
    suid.chmod(0o4755)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o644)
    assert _core.entry_info(str(sticky)).permissions == "dtrwxrwxrwx"
    assert _core.entry_info(str(suid)).permissions == "urwxr-xr-x"
    assert _core.entry_info(str(fifo)).permissions == "prw-r--r--"
    assert _core.entry_info(str(fifo)).type == _core.FILE_TYPE_UNSPECIFIED
    assert _core.entry_info("/dev/null").permissions == "Dcrw-rw-rw-"


def test_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"0123456789")
    (tmp_path / "link").symlink_to("target")
    (tmp_path / "broken").symlink_to("nowhere")
    link = _core.entry_info(str(tmp_path / "link"))
    assert (link.is_symlink, link.type, link.permissions) == (True, _core.FILE_TYPE_FILE, "Lrwxrwxrwx")
    assert link.symlink_target == str(target.resolve())
    assert link.size == len("target")
    broken = _core.entry_info(str(tmp_path / "broken"))
    assert (broken.type, broken.mode, broken.symlink_target) == (
        _core.FILE_TYPE_UNSPECIFIED,
        0,
        str(tmp_path / "broken"),
    )


def test_errors_are_oserror_subclasses_with_errno_and_filename(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    file = str(tmp_path / "file")

    with pytest.raises(FileNotFoundError) as info:
        _core.entry_info(missing)
    assert (info.value.errno, info.value.strerror, info.value.filename) == (
        errno.ENOENT,
        os.strerror(errno.ENOENT),
        missing,
    )
    assert str(info.value) == f"[Errno 2] No such file or directory: {missing!r}"

    with pytest.raises(FileNotFoundError):
        _core.list_dir(missing, 1)
    with pytest.raises(NotADirectoryError):
        _core.list_dir(file, 1)
    with pytest.raises(FileExistsError):
        _core.make_dir(str(tmp_path), 0, 0)
    with pytest.raises(NotADirectoryError):
        _core.make_dir(file, 0, 0)
    with pytest.raises(NotADirectoryError):
        _core.make_dir(file + "/sub", 0, 0)
    with pytest.raises(IsADirectoryError):
        _core.FileReader(str(tmp_path))
    with pytest.raises(IsADirectoryError):
        _core.AtomicWriter(str(tmp_path), 0, 0)
    with pytest.raises(FileNotFoundError) as info:
        _core.rename(missing, str(tmp_path / "dst"), 0, 0)
    assert (info.value.filename, info.value.filename2) == (missing, str(tmp_path / "dst"))
    with pytest.raises(ValueError):
        _core.entry_info(str(tmp_path / "nul\0byte"))


def test_list_dir_depth_order_and_paths(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "deep").write_bytes(b"")
    (tmp_path / "d" / "f").write_bytes(b"")
    (tmp_path / "B").write_bytes(b"")
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "d")

    def listed(path: Path, depth: int) -> list[str]:
        return [os.path.relpath(e.path, path) for e in _core.list_dir(str(path), depth)]

    assert listed(tmp_path, 0) == ["B", "a", "d", "link"]
    assert listed(tmp_path, 2) == ["B", "a", "d", "d/f", "d/sub", "link"]
    assert listed(tmp_path, 10) == ["B", "a", "d", "d/f", "d/sub", "d/sub/deep", "link"]
    # A symlinked root is followed; paths stay under the requested (link) path.
    assert listed(tmp_path / "link", 2) == ["f", "sub", "sub/deep"]
    assert _core.list_dir(str(tmp_path / "link"), 1)[0].path == str(tmp_path / "link" / "f")


def _varied_tree(root: Path) -> None:
    """Entries of every kind ListDir reports: files, directories two deep, symlinks to a file, to a
    directory, to nothing and to themselves, metadata, names that JSON must escape or that are not
    UTF-8, modification times of every precision protobuf's JSON distinguishes, before 1970 and zero."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "leaf.txt").write_text("leaf")
    (root / "plain.txt").write_text("x" * 300)
    (root / "empty").write_bytes(b"")
    (root / 'quote"back\\slash\ttab\x01ctl').write_text("q")
    (root / "ünïcödé 文件 🙂").write_text("u")
    os.close(os.open(os.path.join(os.fsencode(root), b"not-utf8-\xff"), os.O_CREAT | os.O_WRONLY, 0o600))
    (root / "link-to-file").symlink_to(root / "plain.txt")
    (root / "link-to-dir").symlink_to(root / "sub")
    (root / "dangling").symlink_to(root / "missing")
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")
    os.chmod(root / "plain.txt", 0o4755)
    _core.set_metadata(str(root / "plain.txt"), {"owner": "me", "b": "", "a": 'ü"\n'})
    times = {"empty": 0, "plain.txt": 1_700_000_000_123_000_000, "sub": 1_700_000_000_000_123_000}
    times |= {"fifo": 1_700_000_000_000_000_007, "ünïcödé 文件 🙂": -1_500_000_000, "loop": 5}
    for name, ns in times.items():
        os.utime(root / name, ns=(ns, ns), follow_symlinks=False)


def _listing_in_python(root: Path, depth: int) -> pb.ListDirResponse:
    """The response as the agent built it before it was encoded in Rust: a message per entry."""
    return pb.ListDirResponse(entries=[entry_to_proto(e) for e in _core.list_dir(str(root), depth)])


@pytest.mark.parametrize("depth", [1, 3])
def test_list_dir_encoded_is_the_response_python_would_encode(tmp_path: Path, depth: int) -> None:
    _varied_tree(tmp_path)
    want = _listing_in_python(tmp_path, depth)
    assert len(want.entries) == (13 if depth > 1 else 11)
    assert _core.list_dir_encoded(str(tmp_path), depth, False) == want.SerializeToString(deterministic=True)
    got_json = _core.list_dir_encoded(str(tmp_path), depth, True)
    assert json.loads(got_json) == json.loads(Codec("json").encode(want))
    assert json.loads(got_json)["entries"][0]["name"] == "dangling"  # the walk's order, kept


def test_list_dir_encoded_of_an_empty_directory_and_its_errors(tmp_path: Path) -> None:
    assert _core.list_dir_encoded(str(tmp_path), 1, True) == Codec("json").encode(pb.ListDirResponse()) == b"{}"
    assert _core.list_dir_encoded(str(tmp_path), 1, False) == b""
    with pytest.raises(FileNotFoundError):
        _core.list_dir_encoded(str(tmp_path / "missing"), 1, True)
    (tmp_path / "f").write_text("f")
    with pytest.raises(NotADirectoryError):
        _core.list_dir_encoded(str(tmp_path / "f"), 1, False)


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs (``/dev/shm``) when there is one, which stores any 64-bit time (ext4 stops
    at year 2446); else ``tmp_path``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    made = Path(tempfile.mkdtemp(dir=shm))
    try:
        yield made
    finally:
        shutil.rmtree(made)


def test_a_time_json_cannot_write_is_left_out_not_the_listing(tmpfs_dir: Path) -> None:
    """Year 10000 and later have no RFC 3339 form (protobuf's JSON fails the whole message): in JSON
    the entry is still listed, without its time; the binary form carries the time, as envd's does."""
    far = tmpfs_dir / "far"
    far.write_text("f")
    (tmpfs_dir / "near").write_text("n")
    os.utime(far, ns=(260_000_000_000 * 10**9,) * 2)
    if os.stat(far).st_mtime < 253_402_300_800:
        pytest.skip("this filesystem cannot store a time after year 9999")
    entries = json.loads(_core.list_dir_encoded(str(tmpfs_dir), 1, True))["entries"]
    assert [e["name"] for e in entries] == ["far", "near"]
    assert "modifiedTime" not in entries[0] and "modifiedTime" in entries[1]
    message = pb.ListDirResponse.FromString(_core.list_dir_encoded(str(tmpfs_dir), 1, False))
    assert message.entries[0].modified_time.seconds == 260_000_000_000
    assert message == _listing_in_python(tmpfs_dir, 1)


def test_list_dir_encoded_releases_the_gil(tmp_path: Path) -> None:
    """A thread that only runs when the GIL is free (the switch interval made long, so nothing is
    taken from a holder) counts during one call: it advances only if the call released the GIL."""
    for i in range(3000):
        (tmp_path / f"f{i:05d}").write_text("")
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)  # lets the GIL go at once, back to a caller that wants it

    interval = sys.getswitchinterval()
    sys.setswitchinterval(5)
    counter = threading.Thread(target=count)
    counter.start()
    try:
        before = ticks
        _core.list_dir_encoded(str(tmp_path), 1, True)
        during = ticks - before
    finally:
        done.set()
        counter.join()
        sys.setswitchinterval(interval)
    assert during > 0


def test_make_dir_rename_remove_all(tmp_path: Path) -> None:
    e = _core.make_dir(str(tmp_path / "x" / "y"), os.getuid(), os.getgid())
    assert (e.name, e.type) == ("y", _core.FILE_TYPE_DIRECTORY)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755 & ~current_umask()
    (tmp_path / "src").write_bytes(b"data")
    e = _core.rename(str(tmp_path / "src"), str(tmp_path / "p" / "q" / "dst"), os.getuid(), os.getgid())
    assert (e.path, e.size) == (str(tmp_path / "p" / "q" / "dst"), 4)
    assert not (tmp_path / "src").exists()
    (tmp_path / "x" / "keep").write_bytes(b"")
    (tmp_path / "p" / "link").symlink_to(tmp_path / "x")
    _core.remove_all(str(tmp_path / "p"))
    assert names(tmp_path) == ["x"]
    assert (tmp_path / "x" / "keep").exists()
    _core.remove_all(str(tmp_path / "never-existed"))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_set_metadata_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.unrelated", b"x")
    _core.set_metadata(str(f), {"a": "1", "b": "two words"})
    assert _core.entry_info(str(f)).metadata == {"a": "1", "b": "two words"}
    _core.set_metadata(str(f), {"b": "3"})
    assert _core.entry_info(str(f)).metadata == {"b": "3"}
    assert os.getxattr(f, "user.e2b.b") == b"3"
    _core.set_metadata(str(f), {})
    assert _core.entry_info(str(f)).metadata == {}
    assert os.getxattr(f, "user.unrelated") == b"x"


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes(i * 7 % 251 for i in range(10_000))
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, data


def test_reader_chunks_and_ranges(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with _core.FileReader(str(path), chunk=4096) as reader:
        assert reader.size == len(data)
        chunks = list(reader)
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert all(type(c) is bytes for c in chunks)
    assert b"".join(chunks) == data

    reader = _core.FileReader(str(path), offset=100, length=300, chunk=128)
    assert [len(c) for c in iter(reader.read, b"")] == [128, 128, 44]
    assert reader.read() == b""
    assert b"".join(_core.FileReader(str(path), 9990)) == data[9990:]
    assert b"".join(_core.FileReader(str(path), 20_000, 5)) == b""
    assert b"".join(_core.FileReader(str(path), 0, 0)) == b""
    default = _core.FileReader(str(path))
    assert default.read() == data
    default.close()
    default.close()
    with pytest.raises(ValueError):
        default.read()
    with pytest.raises(ValueError):
        _core.FileReader(str(path), chunk=0)
    with pytest.raises(OverflowError):
        _core.FileReader(str(path), offset=-1)


def test_reader_short_read_when_the_file_shrinks(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    reader = _core.FileReader(str(path), chunk=8192)
    os.truncate(path, 1000)
    assert reader.read() == data[:1000]
    assert reader.read() == b""


def test_writer_commit(tmp_path: Path) -> None:
    target = tmp_path / "dir" / "out.txt"
    with _core.AtomicWriter(str(target), os.getuid(), os.getgid()) as w:
        assert w.path == str(target)
        (temp,) = names(target.parent)
        assert temp.startswith(".out.txt.sandboxd-") and temp.endswith(".tmp")
        w.write(b"hello ")
        w.write(b"world")
        assert w.written == 11
        assert not target.exists()
        w.commit({"k": "v", "empty": ""})
    assert target.read_bytes() == b"hello world"
    assert names(target.parent) == ["out.txt"]
    assert _core.entry_info(str(target)).metadata == {"k": "v", "empty": ""}
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    with pytest.raises(ValueError):
        w.write(b"more")
    with pytest.raises(ValueError):
        w.commit()
    w.abort()  # a no-op once committed
    assert target.read_bytes() == b"hello world"


def test_writer_replaces_old_content_metadata_only_on_commit(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o666)
    _core.set_metadata(str(target), {"old": "1"})
    w = _core.AtomicWriter(str(target), os.getuid(), os.getgid())
    w.write(b"new")
    assert target.read_bytes() == b"old"
    w.commit()
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666
    assert _core.entry_info(str(target)).metadata == {}


def test_writer_abort_exception_and_gc_leave_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    w = _core.AtomicWriter(str(target), 0, 0)
    w.write(b"partial")
    w.abort()
    with pytest.raises(ValueError):
        w.write(b"x")
    assert names(tmp_path) == ["f"]

    with pytest.raises(RuntimeError), _core.AtomicWriter(str(target), 0, 0) as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert names(tmp_path) == ["f"]

    # Leaving the block without an exception neither commits nor aborts.
    with _core.AtomicWriter(str(target), 0, 0) as w:
        w.write(b"partial")
    assert len(names(tmp_path)) == 2
    del w
    gc.collect()
    assert names(tmp_path) == ["f"]
    assert target.read_bytes() == b"old"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, to fill up; skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_writer_enospc(tiny_fs: Path) -> None:
    w = _core.AtomicWriter(str(tiny_fs / "big"), 0, 0)
    with pytest.raises(OSError) as info:
        for _ in range(100):
            w.write(b"x" * 4096)
    assert info.value.errno == errno.ENOSPC
    w.abort()
    assert names(tiny_fs) == []


@pytest.mark.timeout(10)
def test_blocking_read_releases_the_gil(tmp_path: Path) -> None:
    """A read blocked in the kernel must not stop other Python threads: the main thread has to run
    to unblock it. Holding the GIL would deadlock (and time out)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDWR)  # a writer exists, so the read blocks instead of seeing EOF
    try:
        reader = _core.FileReader(str(fifo), chunk=16)
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.append(reader.read()), name="blocked-reader")
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()
        os.write(keep_open, b"unblock")
        thread.join(5)
        assert got == [b"unblock"]
    finally:
        os.close(keep_open)
