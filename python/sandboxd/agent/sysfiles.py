"""Files the agent and the zygote write into a sandbox for the runtime (``/etc/resolv.conf``, envd's
``/run/e2b`` files), where the sandbox's own root may have left anything before a pause.

What the sandbox left is never followed nor opened: each directory on the way is opened
``O_NOFOLLOW`` from ``/`` (no link, so no magic link of ``/proc`` to a host file, is written through),
and the new content goes to a new file made ``O_EXCL | O_NOFOLLOW`` under a random name (nothing
planted under a name can be opened: a FIFO there would block the open for ever, a hard link be
written through), then renamed over the path. Readers see the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat


def replace_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a new file beside the absolute ``path`` and rename it over ``path``, making
    missing directories (0755) on the way; a ``ValueError`` saying which part of the path is in the
    way (a link, not a directory, a directory at ``path``). Blocking: call it from a thread, or
    before an event loop runs."""
    *parents, name = path.strip("/").split("/")
    where = ""
    directory = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parents:
            where = f"{where}/{part}"
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                try:
                    inner = os.open(part, flags, dir_fd=directory)
                except FileNotFoundError:  # a template without it
                    os.mkdir(part, 0o755, dir_fd=directory)
                    inner = os.open(part, flags, dir_fd=directory)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                link = stat.S_ISLNK(os.lstat(part, dir_fd=directory).st_mode)
                raise ValueError(f"{where} is {'a link' if link else 'not a directory'}") from None
            os.close(directory)
            directory = inner
        # os.urandom, not the secrets module: its import (random, hmac) is not paid for a name.
        temp = f".{name}.sandboxd-{os.urandom(8).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
        try:
            # os.write, not a file object: fewer first-touch page faults in a fresh fork (cold4).
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
            except IsADirectoryError:
                raise ValueError(f"{where}/{name} is a directory") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=directory)
            raise
    finally:
        os.close(directory)
