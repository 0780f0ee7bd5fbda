"""Killed sandboxes' directory skeletons, kept for the next creates instead of removed and made again.

A new sandbox's directory (``<data dir>/sandboxes/<id>/``, ``crates/sandboxd-jail/src/spec.rs``) is
~7 new inodes: the directory, ``merged/``, ``lower/``, ``lower/<n>/`` per layer (and one more, empty,
under the ``host`` template's ``/usr`` overlay), ``disk/`` and
``agent.log`` (opened by the zygote; a ``boot_id`` there is from an older version: the boot id is now
on the sandbox's own ``/dev``, so that no file of the host's disk is reachable inside). On a data dir
where sandboxes are made and removed all day, ext4's inode allocator is dear
(``__ext4_new_inode`` → ``recently_deleted`` reads the inode table block of each inode freed in the
last seconds, to skip it): ~18 % of the runtime's CPU in a cold burst (docs/benchmarks.md,
``cold8``). So a killed sandbox's directory, once emptied of its files and checked to be exactly
the directories a create makes, is renamed into ``<data dir>/sandbox-dirs/`` and renamed again to
the next new sandbox's directory: A finds its mount points there (``mkdir``'s ``EEXIST`` is
accepted and the modes set again), the zygote makes ``agent.log``.
Measured in docs/benchmarks.md, "A killed sandbox's directory given to the next create".

Nothing of the old sandbox may reach the new one. The sandbox's root never has write access to
these directories (host root's, ``0711``/``0755``; the sandbox's writable layer is on its own disk
image), but the check does not rely on that: a skeleton is kept only if every entry is one a
create makes, with the type, owner, mode and link count a create gives it, no extended attribute,
on the same filesystem and with no mount at or below it in the runtime's mount namespace, and
only once every process of the sandbox is known dead (its handle's kill returned). The files are
never kept, only unlinked: a descriptor of the old ``agent.log`` (writable) may
outlive the sandbox's processes (passed to another sandbox over a unix socket on a shared volume),
and must not reach the next sandbox's. Anything else is removed as before.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
import threading
from collections import deque
from pathlib import Path

DISK_IMAGE = "disk.img"
"""A sandbox's disk image, in its directory; never reused (its blocks are the old sandbox's)."""

_FILES = (DISK_IMAGE, "boot_id", "agent.log")
"""Unlinked before the check, whatever they are (a directory in their place fails the unlink)."""

LIMIT = 256
"""Skeletons kept at most (~6 inodes each): enough for a burst as large as ``--max-sandboxes``'s
default after as many kills."""

_DIR_MODE = 0o711
_MOUNT_POINT_MODE = 0o755
_MOUNT_POINTS = ("merged", "lower", "disk")


class SandboxDirs:
    """The free skeletons of ``sandboxes_dir`` (kept in ``data_dir/sandbox-dirs``, the same filesystem)."""

    def __init__(self, data_dir: Path, sandboxes_dir: Path, limit: int = LIMIT) -> None:
        self.sandboxes_dir = sandboxes_dir
        self.dir = data_dir / "sandbox-dirs"
        self.limit = limit
        self._free: deque[str] = deque()
        self._names = itertools.count()
        self._lock = threading.Lock()
        # A previous runtime's list is not trusted (it may have stopped half way): removed.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700)
        self._owner = (os.geteuid(), os.getegid())
        self.recycled = 0
        """Skeletons given to new sandboxes (for tests and the docs' counts)."""

    def make(self, sandbox_id: str) -> Path:
        """The new sandbox's directory: a free skeleton renamed to it, or a new empty directory."""
        path = self.sandboxes_dir / sandbox_id
        while True:
            with self._lock:
                name = self._free.popleft() if self._free else None
            if name is None:
                path.mkdir(parents=True, exist_ok=True)
                return path
            try:
                # Only for a create (a new id): rename(2) would also replace an empty directory.
                os.rename(self.dir / name, path)
            except OSError:
                shutil.rmtree(self.dir / name, ignore_errors=True)
                if path.exists():
                    return path
                continue
            self.recycled += 1
            return path

    def release(self, sandbox_id: str, processes_dead: bool) -> None:
        """In a worker thread: keep the ended sandbox's emptied skeleton, or remove its directory."""
        path = self.sandboxes_dir / sandbox_id
        if processes_dead and len(self._free) < self.limit:
            try:
                for name in _FILES:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path / name)
                if self._is_skeleton(path):
                    with self._lock:
                        name = str(next(self._names))
                    os.rename(path, self.dir / name)
                    with self._lock:
                        self._free.append(name)
                    return
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)

    def _is_skeleton(self, path: Path) -> bool:
        """Whether ``path`` holds exactly the directories a create makes there, as a create makes them."""
        top = os.lstat(path)
        if not self._plain(path, top, stat.S_IFDIR, _DIR_MODE, 2 + len(_MOUNT_POINTS), top.st_dev):
            return False
        names = set(os.listdir(path))
        if names != set(_MOUNT_POINTS):
            return False
        for name in ("merged", "disk"):
            if not self._empty_dir(path / name, top.st_dev):
                return False
        lower = path / "lower"
        layers = os.listdir(lower)
        if not all(n.isascii() and n.isdigit() and str(int(n)) == n for n in layers):
            return False
        if not self._plain(lower, os.lstat(lower), stat.S_IFDIR, _MOUNT_POINT_MODE, 2 + len(layers), top.st_dev):
            return False
        for n in layers:
            if not self._empty_dir(lower / n, top.st_dev):
                return False
        return not _mounted_at_or_under(path)

    def _empty_dir(self, path: Path, dev: int) -> bool:
        return self._plain(path, os.lstat(path), stat.S_IFDIR, _MOUNT_POINT_MODE, 2, dev) and not os.listdir(path)

    def _plain(self, path: Path, st: os.stat_result, kind: int, mode: int, links: int, dev: int) -> bool:
        """The type, mode (with no set-id or sticky bit), owner, link count and filesystem a create
        gives, and no extended attribute (no ACL, no capability, no overlayfs marker)."""
        return (
            stat.S_IFMT(st.st_mode) == kind
            and stat.S_IMODE(st.st_mode) == mode
            and (st.st_uid, st.st_gid) == self._owner
            and st.st_nlink == links
            and st.st_dev == dev
            and not os.listxattr(path, follow_symlinks=False)
        )


def _mounted_at_or_under(path: Path) -> bool:
    """Whether a mount of the runtime's mount namespace is at ``path`` or below it (a bind mount of
    the same filesystem keeps its ``st_dev``, so the check above cannot see one)."""
    top = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = _unescape(line.split(b" ", 5)[4])
            if point == top or point.startswith(top + b"/"):
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """mountinfo's octal escapes (``\\040`` for a space, and so on)."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)
