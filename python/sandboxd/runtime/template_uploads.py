"""The files of template builds' ``COPY`` steps, uploaded ahead of a build (``<store>/uploads``), and
their collection.

The SDKs name a ``copy`` step's files by a hash of them and ask whether they are here before
uploading (``GET /templates/{id}/files/{hash}``: ``present``, else an upload URL); a ``present``
answer means they skip the upload, and then trigger the build. So an upload is kept while it may be
used:

* a build in flight holds each of its uploads open under a shared ``flock`` from its trigger to its
  end, and its ``COPY`` steps read that descriptor (the store may be shared by several runtimes:
  the lock is what each of them honours);
* answering ``present`` renews the upload's mtime, so the build the SDK triggers next finds it;
* an upload that no build holds and that nobody asked for in :data:`UPLOAD_TTL_S` is deleted, by a
  pass every :data:`COLLECT_EVERY_S` and after each build, in a worker thread, removing at most
  :data:`MAX_REMOVALS` files a pass. A later build of the same files asks again, gets ``present:
  false`` and uploads them again.

Half-written uploads (``.part``, of a runtime that died mid-upload) older than the same age go too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path

from .errors import ApiError

log = logging.getLogger("sandboxd.runtime")

UPLOAD_TTL_S = 3600.0
"""An upload no build holds is deleted once nobody asked for it this long (E2B's SDK asks right
before each build that copies it)."""

COLLECT_EVERY_S = 600.0
"""How often the collection runs besides after each build (uploads are large; an hour and ten
minutes at most past their last use)."""

MAX_REMOVALS = 1000
"""Files deleted per pass: a pass is bounded however many uploads piled up; the next pass goes on."""

HASH = re.compile(r"[0-9a-f]{64}")
"""A ``copy`` step's files hash (the SDK's sha256 in hex): a step's argument and an upload's file name."""


class Held:
    """The uploads one build uses, open and share-locked until :meth:`close`."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, files_hash: str) -> int:
        return self.fds[files_hash]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)  # releases the flock
        self.fds.clear()


class Uploads:
    """``<store>/uploads/<hash>.tar``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)

    def path(self, files_hash: str) -> Path:
        if not HASH.fullmatch(files_hash):
            raise ApiError(400, "the files hash must be a sha256 in hex")
        return self.directory / f"{files_hash}.tar"

    def refresh(self, files_hash: str) -> bool:
        """Whether an upload is here (the SDK's ``present``), renewing it if so. Blocking."""
        try:
            os.utime(self.path(files_hash))
        except FileNotFoundError:
            return False
        return True

    def hold(self, hashes: list[str]) -> Held:
        """Open and share-lock each upload a build copies; 400 naming the first that is not here.
        A few syscalls per upload (at most one per step)."""
        held = Held()
        try:
            for files_hash in hashes:
                if files_hash in held.fds:
                    continue
                path = self.path(files_hash)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise ApiError(400, f"the files {files_hash} were not uploaded") from None
                held.fds[files_hash] = fd
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    current = os.stat(path).st_ino
                except (BlockingIOError, FileNotFoundError):  # being collected right now
                    current = -1
                if current != os.fstat(fd).st_ino:
                    raise ApiError(400, f"the files {files_hash} were not uploaded (they expired: upload them again)")
        except BaseException:
            held.close()
            raise
        return held

    def collect(self, now: float | None = None) -> list[str]:
        """Delete the uploads that no build holds and nobody asked for in :data:`UPLOAD_TTL_S`, and
        stale half-written ones; returns their names. Blocking: call it in a worker thread."""
        cutoff = (time.time() if now is None else now) - UPLOAD_TTL_S
        removed: list[str] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if len(removed) >= MAX_REMOVALS:
                    break
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if entry.name.endswith(".part"):
                        os.unlink(entry.path)
                        removed.append(entry.name)
                    elif (
                        entry.name.endswith(".tar")
                        and HASH.fullmatch(entry.name[:-4])
                        and self._remove_unheld(entry.path, cutoff)
                    ):
                        removed.append(entry.name)
        if removed:
            log.info("template uploads: removed %d unused for %ds", len(removed), UPLOAD_TTL_S)
        return removed

    @staticmethod
    def _remove_unheld(path: str, cutoff: float) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a build in flight holds it
            st = os.fstat(fd)
            if os.stat(path).st_ino != st.st_ino or st.st_mtime >= cutoff:
                return False  # uploaded again, or asked for, since the scan
            os.unlink(path)
            return True
        finally:
            os.close(fd)
