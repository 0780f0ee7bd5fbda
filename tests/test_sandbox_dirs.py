"""A killed sandbox's directory skeleton given to the next new sandbox (:mod:`sandboxd.runtime.sandbox_dirs`):
kept only when its directories are exactly what a create makes, its files unlinked, and carrying
nothing of the old sandbox (files, extended attributes, modes, owners, mounts, descriptors of its
files held elsewhere); anything else is removed as before.
Real directories on the data dir's filesystem, real mounts; and a real runtime whose second sandbox
gets the first one's directory while the first one's root did what it could inside."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Runtime
from sandboxd.runtime.sandbox_dirs import DISK_IMAGE, SandboxDirs

LAYERS = 3


def _skeleton(path: Path, layers: int = LAYERS) -> None:
    """What a create leaves in a sandbox's directory: the runtime's mkdir, A's (spec.rs
    ``Prepared::new``), the zygote's log and the disk pool's image."""
    path.mkdir()
    os.chmod(path, 0o711)
    for d in ("merged", "lower", "disk"):
        (path / d).mkdir()
        os.chmod(path / d, 0o755)
    for i in range(layers):
        (path / "lower" / str(i)).mkdir()
        os.chmod(path / "lower" / str(i), 0o755)
    (path / "boot_id").write_text("old boot id\n")
    os.chmod(path / "boot_id", 0o444)
    (path / "agent.log").write_text("the old sandbox's agent said this\n")
    os.chmod(path / "agent.log", 0o640)
    (path / DISK_IMAGE).write_bytes(b"old disk")


@pytest.fixture
def dirs(tmp_path: Path) -> SandboxDirs:
    if os.geteuid() != 0:
        pytest.skip("a skeleton is host root's (and the mount cases need root)")
    (tmp_path / "sandboxes").mkdir()
    return SandboxDirs(tmp_path, tmp_path / "sandboxes")


def test_a_killed_sandboxs_skeleton_is_emptied_and_given_to_the_next(dirs: SandboxDirs) -> None:
    old = dirs.sandboxes_dir / "old"
    _skeleton(old)
    inode = os.stat(old).st_ino
    dirs.release("old", processes_dead=True)
    assert not old.exists()
    assert [os.stat(p).st_ino for p in dirs.dir.iterdir()] == [inode]

    new = dirs.make("new")
    assert os.stat(new).st_ino == inode and dirs.recycled == 1
    assert sorted(os.listdir(new)) == ["disk", "lower", "merged"]  # no file of the old sandbox
    assert not any(dirs.dir.iterdir())
    # The next one has none to take: a new empty directory, as before.
    fresh = dirs.make("fresh")
    assert os.listdir(fresh) == [] and dirs.recycled == 1


def test_descriptors_of_the_old_files_do_not_reach_the_new_ones(dirs: SandboxDirs) -> None:
    """A writable descriptor of the old agent.log, or one of the old boot_id, kept elsewhere (passed
    over a unix socket on a shared volume): the next sandbox's files are new inodes."""
    old = dirs.sandboxes_dir / "old"
    _skeleton(old)
    log = os.open(old / "agent.log", os.O_WRONLY | os.O_APPEND)
    boot = os.open(old / "boot_id", os.O_RDONLY)
    try:
        dirs.release("old", processes_dead=True)
        new = dirs.make("new")
        assert dirs.recycled == 1
        # What the zygote and A do on a create (zygote._open_log, spec.rs Prepared::new).
        os.close(os.open(new / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
        (new / "boot_id").write_text("new boot id\n")
        os.write(log, b"written through the old descriptor\n")
        assert (new / "agent.log").read_bytes() == b""
        assert os.pread(boot, 100, 0) == b"old boot id\n"
        assert (new / "boot_id").read_text() == "new boot id\n"
    finally:
        os.close(log)
        os.close(boot)


def _extra_file(p: Path) -> None:
    (p / "merged" / "left").write_text("x")


def _file_in_a_layer_point(p: Path) -> None:
    (p / "lower" / "1" / ".hidden").write_text("x")


def _extra_top_entry(p: Path) -> None:
    (p / "snapshot.img").write_text("x")


def _odd_layer_name(p: Path) -> None:
    (p / "lower" / "01").mkdir(0o755)


def _user_xattr(p: Path) -> None:
    os.setxattr(p / "merged", "user.overlay.opaque", b"y")


def _trusted_xattr(p: Path) -> None:
    os.setxattr(p / "lower" / "0", "trusted.left", b"y")


def _acl_on_top(p: Path) -> None:
    subprocess.run(["setfacl", "-m", "u:1234:rwx", str(p)], check=True)


def _world_writable(p: Path) -> None:
    os.chmod(p / "disk", 0o777)


def _setgid(p: Path) -> None:
    os.chmod(p / "lower", 0o2755)


def _setuid(p: Path) -> None:
    os.chmod(p / "disk", 0o4755)


def _owner(p: Path) -> None:
    os.chown(p / "lower" / "0", 100000, 100000)


def _symlink(p: Path) -> None:
    os.rmdir(p / "merged")
    os.symlink("/etc", p / "merged")


def _fifo(p: Path) -> None:
    os.rmdir(p / "disk")
    os.mkfifo(p / "disk", 0o755)


def _disk_image_a_directory(p: Path) -> None:
    os.unlink(p / DISK_IMAGE)
    (p / DISK_IMAGE).mkdir()


@pytest.mark.parametrize(
    "tamper",
    [
        _extra_file,
        _file_in_a_layer_point,
        _extra_top_entry,
        _odd_layer_name,
        _user_xattr,
        _trusted_xattr,
        _acl_on_top,
        _world_writable,
        _setgid,
        _setuid,
        _owner,
        _symlink,
        _fifo,
        _disk_image_a_directory,
    ],
)
def test_a_skeleton_not_exactly_as_made_is_removed(dirs: SandboxDirs, tamper: Callable[[Path], None]) -> None:
    if tamper is _acl_on_top and subprocess.run(["which", "setfacl"], capture_output=True).returncode:
        pytest.skip("no setfacl")
    old = dirs.sandboxes_dir / "old"
    _skeleton(old)
    tamper(old)
    dirs.release("old", processes_dead=True)
    assert not old.exists()
    assert not any(dirs.dir.iterdir())
    assert os.listdir(dirs.make("new")) == [] and dirs.recycled == 0


@pytest.mark.parametrize("where", ["merged", "lower/2"])
def test_a_skeleton_with_a_mount_at_or_below_it_is_not_kept(dirs: SandboxDirs, tmp_path: Path, where: str) -> None:
    old = dirs.sandboxes_dir / "old"
    _skeleton(old)
    source = tmp_path / "elsewhere"
    source.mkdir(0o755)
    target = old / where
    # A bind mount of the same filesystem: the same st_dev, invisible to the entries' checks.
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        os.chmod(target, 0o755)  # so that only the mount tells it from a mount point as made
        dirs.release("old", processes_dead=True)
        assert not any(dirs.dir.iterdir())
        assert dirs.make("new") is not None and dirs.recycled == 0
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_sandbox_not_known_dead_leaves_no_skeleton(dirs: SandboxDirs) -> None:
    """A process still alive could write to agent.log after it is truncated: never kept."""
    _skeleton(dirs.sandboxes_dir / "old")
    dirs.release("old", processes_dead=False)
    assert not (dirs.sandboxes_dir / "old").exists() and not any(dirs.dir.iterdir())


def test_no_more_than_the_limit_is_kept(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a skeleton is host root's")
    (tmp_path / "sandboxes").mkdir()
    dirs = SandboxDirs(tmp_path, tmp_path / "sandboxes", limit=2)
    for i in range(3):
        _skeleton(dirs.sandboxes_dir / str(i))
        dirs.release(str(i), processes_dead=True)
    assert len(list(dirs.dir.iterdir())) == 2 and not any(dirs.sandboxes_dir.iterdir())


def test_a_runtime_gives_a_killed_sandboxs_directory_to_the_next_with_nothing_of_it(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sandbox's root does what it can (files, xattrs, modes, hard links, mounts, its
    agent's log); the second sandbox, in the same host directory, sees none of it."""
    from e2b import Sandbox

    runtime = start_runtime()
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sandboxes = runtime.data_dir / "sandboxes"

    first = Sandbox.create()
    directory = sandboxes / first.sandbox_id
    inode = os.stat(directory).st_ino
    old_boot_id = first.files.read("/proc/sys/kernel/random/boot_id")
    hostile = (
        "set +e; echo marker-of-the-first > /marker; mkdir -p /mnt/m; mount -t tmpfs t /mnt/m;"
        " echo in-tmpfs > /mnt/m/f; ln /marker /marker.link; chmod 4777 /marker;"
        " setfattr -n user.left -v 1 / 2>/dev/null; setfattr -n trusted.left -v 1 /etc 2>/dev/null;"
        " echo marker-of-the-first-log >&2; for p in /proc/1/root/.. /proc/self/root/..; do"
        " touch $p/escaped 2>/dev/null; done; true"
    )
    # Descriptors of the first sandbox's files that outlive it (a sandbox could pass its own to another).
    log = os.open(directory / "agent.log", os.O_WRONLY | os.O_APPEND)
    first.commands.run(hostile, user="root")
    assert first.commands.run("cat /marker /mnt/m/f", user="root").stdout == "marker-of-the-first\nin-tmpfs\n"
    first.kill()
    kept = list((runtime.data_dir / "sandbox-dirs").iterdir())
    assert [os.stat(p).st_ino for p in kept] == [inode], "the killed sandbox's skeleton was not kept"

    second = Sandbox.create()
    try:
        again = sandboxes / second.sandbox_id
        assert os.stat(again).st_ino == inode  # the same host directory
        assert sorted(os.listdir(again)) == ["agent.log", "disk", "disk.img", "lower", "merged"]
        os.write(log, b"marker-of-the-first through its descriptor\n")
        assert b"marker-of-the-first" not in (again / "agent.log").read_bytes()
        new_boot_id = second.files.read("/proc/sys/kernel/random/boot_id")
        assert new_boot_id != old_boot_id
        seen = second.commands.run(
            "ls -a / /mnt; grep -s /mnt/m /proc/mounts; getfattr -d / /etc 2>/dev/null; true", user="root"
        ).stdout
        assert "marker" not in seen and "escaped" not in seen and "left" not in seen and "/mnt/m" not in seen, seen
        assert second.commands.run("echo fine").stdout == "fine\n"
    finally:
        second.kill()
        os.close(log)
