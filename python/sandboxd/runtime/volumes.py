"""Volumes (E2B's ``Volume``): named, persistent file systems that outlive sandboxes, mounted into
the sandboxes that ask for them (``Sandbox.create(volume_mounts={"/mnt/data": volume})``) and read
and written from outside with the volume content API (:mod:`.volume_api`).

A volume is an ext4 file system in a sparse image, ``<data dir>/volumes/<id>/volume.img``, formatted
as sandbox disks are (:mod:`.disks`) and as large as a sandbox's disk (``--sandbox-disk-mb``): a
sandbox writing into a volume fills the volume, never the host's disk. The runtime mounts an image
once, detached (a descriptor, never attached on the host, so a crash leaves no mount), the first
time it is used; the content API works beneath that descriptor and sandboxes get an idmapped clone
of the same mount. ``volume.json`` beside the image holds its name, its content token and when it
was made. ``<data dir>/volumes`` is 0700: a sandbox's root can plant a setuid-root file in a volume,
and host users must not reach it (the mount is also nosuid).

Ownership is canonical, as in template layers: uid 1000 in any sandbox is uid 1000 on the volume's
disk, so every sandbox that mounts it sees the same owners. Files made through the content API are
owned by E2B's default sandbox user (1000:1000) unless the request names ids.

Paths from the content API are hostile: a sandbox can leave symlinks anywhere in a volume, pointing
anywhere. Every path is walked one component at a time from the mount's root descriptor with
``O_NOFOLLOW`` (a symlink on the way is refused, a symlink at the end is reported as one, never
followed), ``..`` is refused, and removal is :func:`shutil.rmtree` on descriptors. All of it is
blocking file I/O: callers run it in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxd import _core

from .errors import ApiError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Volume names: what E2B's names look like, and safe in a path and a log line."""

DEFAULT_ID = 1000
"""The owner of files and directories made through the content API when the request names none:
E2B's default sandbox user (``user``)."""

MAX_ID = 65535
"""Ids a sandbox has (0-65535 inside map to its host range): an owner outside it means nothing inside."""

MAX_PATH = 4096
MAX_DEPTH = 16
"""``GET /volumecontent/{id}/dir?depth=``: deeper listings are refused (each level is a walk)."""
MAX_ENTRIES = 10000
"""A listing stops with a 400 past this many entries, so one request's answer stays bounded."""
MAX_MOUNTS = 16
"""Volumes one sandbox may mount (each is a mount in its namespace and a descriptor at its start)."""
MAX_VOLUMES = 1000
"""Volumes a runtime keeps; each is a sparse image, and a mounted one holds a loop device."""

IMAGE = "volume.img"
RECORD = "volume.json"


@dataclass(frozen=True, slots=True)
class Volume:
    id: str
    name: str
    token: str
    created_at: float


def _load(directory: Path) -> Volume | None:
    try:
        raw = json.loads((directory / RECORD).read_text())
        return Volume(str(raw["id"]), str(raw["name"]), str(raw["token"]), float(raw["created_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _not_found(volume_id: str) -> ApiError:
    return ApiError(404, f"volume '{volume_id[:64]}' not found")


class Volumes:
    """The runtime's volumes: records, images, and their mounts (one per volume, made on first use)."""

    def __init__(self, data_dir: Path, size_mb: int) -> None:
        self.root = data_dir / "volumes"
        self.size_mb = size_mb
        self._lock = threading.Lock()
        self._mounts: dict[str, int] = {}
        # The records, read once here (this object is their only writer): lookups, token checks
        # included, never touch the disk, so they may run on the event loop.
        self._records: dict[str, Volume] = {}
        if self.root.is_dir():
            for directory in self.root.iterdir():
                volume = _load(directory)
                if volume is not None:
                    self._records[volume.id] = volume

    def all(self) -> list[Volume]:
        """Every volume, oldest first."""
        return sorted(self._records.values(), key=lambda v: (v.created_at, v.id))

    def get(self, volume_id: str) -> Volume:
        volume = self._records.get(volume_id)
        if volume is None:
            raise _not_found(volume_id)
        return volume

    def by_name(self, name: str) -> Volume:
        for volume in self._records.values():
            if volume.name == name:
                return volume
        raise ApiError(404, f"volume '{name[:64]}' not found; create it first (Volume.create)")

    def create(self, name: str) -> Volume:
        """A new, empty volume (blocking: formats its image)."""
        if not NAME.fullmatch(name):
            raise ApiError(400, "'name' must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")
        with self._lock:
            if any(v.name == name for v in self._records.values()):
                raise ApiError(409, f"a volume named '{name}' exists already")
            if len(self._records) >= MAX_VOLUMES:
                raise ApiError(403, f"this runtime keeps at most {MAX_VOLUMES} volumes; destroy one first")
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            volume = Volume(str(uuid.uuid4()), name, secrets.token_urlsafe(32), time.time())
            directory = self.root / volume.id
            directory.mkdir(mode=0o700)
            try:
                _core.format_disk_image(str(directory / IMAGE), self.size_mb)
                fd = _core.mount_disk(str(directory / IMAGE))
                try:
                    for made in ("lost+found", "upper", "work"):  # mkfs's and the sandbox disk format's
                        with contextlib.suppress(OSError):
                            os.rmdir(made, dir_fd=fd)
                    os.chown(".", DEFAULT_ID, DEFAULT_ID, dir_fd=fd)
                    os.chmod(f"/proc/self/fd/{fd}", 0o755)
                except BaseException:
                    os.close(fd)
                    raise
                self._mounts[volume.id] = fd
                record = directory / f".{RECORD}.tmp"
                record.write_text(
                    json.dumps({"id": volume.id, "name": name, "token": volume.token, "created_at": volume.created_at})
                )
                record.rename(directory / RECORD)
                self._records[volume.id] = volume
            except BaseException:
                fd = self._mounts.pop(volume.id, -1)
                if fd >= 0:
                    os.close(fd)
                shutil.rmtree(directory, ignore_errors=True)
                raise
            return volume

    def destroy(self, volume_id: str, in_use: list[str]) -> None:
        """Delete a volume and its data; 409 while ``in_use`` (the live sandboxes that mount it)."""
        volume = self.get(volume_id)
        if in_use:
            raise ApiError(
                409, f"volume '{volume.name}' is mounted by live sandboxes: {', '.join(in_use)}; kill them first"
            )
        with self._lock:
            self._records.pop(volume.id, None)
            fd = self._mounts.pop(volume.id, None)
            if fd is not None:
                os.close(fd)
            shutil.rmtree(self.root / volume.id, ignore_errors=True)

    def check_token(self, volume_id: str, authorization: str | None) -> Volume:
        """The volume, if ``authorization`` is ``Bearer <its token>`` (compared in constant time)."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "the volume content API needs 'Authorization: Bearer <the volume's token>'")
        volume = self.get(volume_id)
        if not hmac.compare_digest(presented.strip().encode(), volume.token.encode()):
            raise ApiError(401, "invalid volume token")
        return volume

    # ------------------------------------------------------------------------------ mounts

    def mount_fd(self, volume: Volume) -> int:
        """The descriptor of the volume's mount (the runtime keeps it; callers never close it)."""
        with self._lock:
            fd = self._mounts.get(volume.id)
            if fd is None:
                fd = _core.mount_disk(str(self.root / volume.id / IMAGE))
                self._mounts[volume.id] = fd
            return fd

    def mount_fd_of(self, name: str) -> int:
        """:meth:`mount_fd` of the volume named ``name``."""
        return self.mount_fd(self.by_name(name))

    def close(self) -> None:
        with self._lock:
            for fd in self._mounts.values():
                os.close(fd)
            self._mounts.clear()

    # ------------------------------------------------------------------------------ content

    def stat(self, volume: Volume, path: str) -> dict[str, Any]:
        parts = split(path)
        with self._parent(volume, parts) as parent:
            return _entry(parent, parts[-1] if parts else ".", "/" + "/".join(parts))

    def listdir(self, volume: Volume, path: str, depth: int) -> list[dict[str, Any]]:
        if not 1 <= depth <= MAX_DEPTH:
            raise ApiError(400, f"'depth' must be 1 to {MAX_DEPTH}")
        parts = split(path)
        with self._dir(volume, parts) as fd:
            found: list[dict[str, Any]] = []
            _list_into(fd, "/" + "/".join(parts), depth, found)
            return found

    def read(self, volume: Volume, path: str) -> tuple[int, int]:
        """An open descriptor of a regular file (the caller closes it) and its size."""
        parts = split(path)
        if not parts:
            raise ApiError(400, "'path' names the volume's root, a directory: list it instead")
        with self._parent(volume, parts) as parent:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
            except OSError as exc:
                raise _path_error(exc, path) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ApiError(400, f"'{path[:200]}' is not a regular file")
        return fd, info.st_size

    def begin_write(self, volume: Volume, path: str, uid: int | None, gid: int | None, mode: int | None) -> Upload:
        """Start replacing (or making) the file at ``path``, whole or not at all: the bytes go to a
        temporary file beside it, renamed over it by :meth:`Upload.commit`. Missing parent directories
        are made, owned as the file will be."""
        parts = split(path)
        if not parts:
            raise ApiError(400, "'path' names the volume's root, a directory")
        owner, group = _ids(uid, gid)
        file_mode = _mode(mode, 0o644)
        with self._parent(volume, parts, make=(owner, group)) as parent:
            held = os.dup(parent)
        temp = f".{parts[-1][:200]}.sandboxd-{secrets.token_hex(6)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=held)
        except OSError as exc:
            os.close(held)
            raise _path_error(exc, path) from None
        return Upload(held, temp, fd, parts[-1], "/" + "/".join(parts), owner, group, file_mode)

    def mkdir(
        self, volume: Volume, path: str, uid: int | None, gid: int | None, mode: int | None, parents: bool
    ) -> dict[str, Any]:
        """Make a directory; with ``parents`` (``force``) also its missing parents, and an existing
        directory is no error."""
        parts = split(path)
        if not parts:
            raise ApiError(409, "the volume's root exists already")
        owner, group = _ids(uid, gid)
        with self._parent(volume, parts, make=(owner, group) if parents else None) as parent:
            try:
                os.mkdir(parts[-1], _mode(mode, 0o755), dir_fd=parent)
            except FileExistsError:
                if not parents:
                    raise ApiError(409, f"'{path[:200]}' exists already") from None
            except OSError as exc:
                raise _path_error(exc, path) from None
            else:
                os.chown(parts[-1], owner, group, dir_fd=parent, follow_symlinks=False)
                os.chmod(parts[-1], _mode(mode, 0o755), dir_fd=parent)  # past the umask
            return _entry(parent, parts[-1], "/" + "/".join(parts))

    def set_metadata(
        self, volume: Volume, path: str, uid: int | None, gid: int | None, mode: int | None
    ) -> dict[str, Any]:
        parts = split(path)
        with self._parent(volume, parts) as parent:
            name = parts[-1] if parts else "."
            try:
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if uid is not None or gid is not None:
                    owner, group = _ids(
                        uid if uid is not None else info.st_uid, gid if gid is not None else info.st_gid
                    )
                    os.chown(name, owner, group, dir_fd=parent, follow_symlinks=False)
                if mode is not None:
                    if stat.S_ISLNK(info.st_mode):
                        raise ApiError(400, f"'{path[:200]}' is a symlink: its mode cannot be set")
                    os.chmod(name, _mode(mode, 0), dir_fd=parent)
            except OSError as exc:
                raise _path_error(exc, path) from None
            return _entry(parent, name, "/" + "/".join(parts))

    def remove(self, volume: Volume, path: str) -> None:
        parts = split(path)
        if not parts:
            raise ApiError(400, "the volume's root cannot be removed: destroy the volume instead")
        with self._parent(volume, parts) as parent:
            try:
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(parts[-1], dir_fd=parent)  # descriptor-based: never follows a symlink
                else:
                    os.unlink(parts[-1], dir_fd=parent)
            except OSError as exc:
                raise _path_error(exc, path) from None

    # ------------------------------------------------------------------------------ walking

    @contextlib.contextmanager
    def _dir(self, volume: Volume, parts: list[str], make: tuple[int, int] | None = None) -> Iterator[int]:
        """A descriptor of the directory at ``parts``, walked from the volume's root one component at
        a time with ``O_NOFOLLOW`` (a symlink on the way is refused); with ``make`` (owner, group),
        missing directories on the way are made."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.mount_fd(volume))
        try:
            for part in parts:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    try:
                        child = os.open(part, flags, dir_fd=fd)
                    except FileNotFoundError:
                        if make is None:
                            raise
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(part, 0o755, dir_fd=fd)
                            os.chown(part, *make, dir_fd=fd, follow_symlinks=False)
                        child = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    raise _path_error(exc, "/" + "/".join(parts)) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _parent(
        self, volume: Volume, parts: list[str], make: tuple[int, int] | None = None
    ) -> contextlib.AbstractContextManager[int]:
        """A descriptor of the directory holding ``parts[-1]`` (the root for the root itself)."""
        return self._dir(volume, parts[:-1], make)


class Upload:
    """A file being written through the content API (see :meth:`Volumes.begin_write`); blocking calls."""

    def __init__(
        self, parent: int, temp: str, fd: int, name: str, path: str, owner: int, group: int, mode: int
    ) -> None:
        self.parent, self.temp, self.fd, self.name, self.path = parent, temp, fd, name, path
        self.owner, self.group, self.mode = owner, group, mode

    def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise _path_error(exc, self.path) from None

    def commit(self) -> dict[str, Any]:
        """Put the file in place; the upload is over (closed) whatever happens."""
        try:
            os.fchown(self.fd, self.owner, self.group)
            os.fchmod(self.fd, self.mode)
            os.rename(self.temp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
            return _entry(self.parent, self.name, self.path)
        except OSError as exc:
            raise _path_error(exc, self.path) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop what was written (nothing of it stays) and close; safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.parent)
            os.close(self.parent)


def split(path: str) -> list[str]:
    """A content API path as its components (absolute or relative to the volume's root alike)."""
    if len(path) > MAX_PATH:
        raise ApiError(400, f"'path' is longer than {MAX_PATH} bytes")
    if "\0" in path:
        raise ApiError(400, "'path' contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ApiError(400, "'path' must not contain '..': paths are inside the volume")
    return parts


def _ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    owner = DEFAULT_ID if uid is None else uid
    group = DEFAULT_ID if gid is None else gid
    for name, value in (("uid", owner), ("gid", group)):
        if not 0 <= value <= MAX_ID:
            raise ApiError(400, f"'{name}' must be 0 to {MAX_ID} (the ids a sandbox has), got {value}")
    return owner, group


def _mode(mode: int | None, default: int) -> int:
    if mode is None:
        return default
    if not 0 <= mode <= 0o7777:
        raise ApiError(400, f"'mode' must be 0 to 0o7777 (permission bits), got {mode}")
    return mode & 0o1777  # no setuid/setgid through the API: ids here are the sandboxes' ids


def _path_error(exc: OSError, path: str) -> ApiError:
    shown = path[:200]
    if exc.errno in (errno.ENOENT,):
        return ApiError(404, f"'{shown}' not found")
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return ApiError(400, f"'{shown}' goes through a symlink: the content API does not follow symlinks")
    if exc.errno == errno.ENOTDIR:
        return ApiError(400, f"'{shown}': a component of the path is not a directory")
    if exc.errno == errno.EISDIR:
        return ApiError(400, f"'{shown}' is a directory")
    if exc.errno == errno.ENOTEMPTY:
        return ApiError(409, f"'{shown}' is not empty")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, f"the volume is full writing '{shown}'")
    if exc.errno == errno.ENAMETOOLONG:
        return ApiError(400, f"a component of '{shown}' is too long")
    return ApiError(500, f"'{shown}': {exc.strerror or exc}")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _entry(parent: int, name: str, path: str) -> dict[str, Any]:
    """E2B's ``VolumeEntryStat`` of ``name`` in ``parent`` (a symlink is described, never followed)."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as exc:
        raise _path_error(exc, path) from None
    kind = (
        "directory"
        if stat.S_ISDIR(info.st_mode)
        else "file"
        if stat.S_ISREG(info.st_mode)
        else "symlink"
        if stat.S_ISLNK(info.st_mode)
        else "unknown"
    )
    entry: dict[str, Any] = {
        "name": os.path.basename(path) or "/",
        "type": kind,
        "path": path or "/",
        "size": info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "atime": _iso(info.st_atime),
        "mtime": _iso(info.st_mtime),
        "ctime": _iso(info.st_ctime),
    }
    if kind == "symlink":
        with contextlib.suppress(OSError):
            entry["target"] = os.readlink(name, dir_fd=parent)
    return entry


def _list_into(fd: int, path: str, depth: int, found: list[dict[str, Any]]) -> None:
    for name in sorted(os.listdir(fd)):
        if len(found) >= MAX_ENTRIES:
            raise ApiError(400, f"the listing has more than {MAX_ENTRIES} entries: list a smaller directory or depth")
        child_path = f"{path.rstrip('/')}/{name}"
        entry = _entry(fd, name, child_path)
        found.append(entry)
        if depth > 1 and entry["type"] == "directory":
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue  # gone meanwhile (a sandbox is using the volume)
            try:
                _list_into(child, child_path, depth - 1, found)
            finally:
                os.close(child)
