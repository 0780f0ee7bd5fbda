"""Snapshots and forks (E2B's ``create_snapshot``, ``list_snapshots``, ``delete_snapshot``, ``fork``).

A snapshot is a template: the sandbox's template's layers with one more on top, made from what the
sandbox changed (its disk's overlay upper dir, through :mod:`.build_layer`, exactly as a template
build keeps its build sandbox's work). ``Sandbox.create(snapshot_id)`` starts from it like from any
template, and ``delete_snapshot`` is ``DELETE /templates/{id}``. A fork is a snapshot and ``count``
creates from it.

What is kept is the filesystem. Running processes and memory are not: E2B restores a full
snapshot's memory into a new microVM; here a sandbox started from a snapshot boots fresh from its
disk, which is what E2B's ``mode="filesystem"`` gives. Both modes are accepted and behave alike
(docs/runtime.md says so).

Taking one, the source keeps running. Its disk image is copied while its processes are frozen (the
cgroup freezer, as ``pause`` does) after a ``syncfs`` of its root, so the copy holds one consistent
moment of the file system, and the processes are thawed as soon as the copy is made; the layer is
then made from the copy (the image is mounted again, detached, by the runtime, never by the
sandbox: it is kernel-written ext4, which the sandbox cannot write as raw blocks). The freeze lasts
as long as the copy, which is as long as the sandbox's disk is used (a sparse copy).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from sandboxd import _core

SOURCE_KEY = "snapshot_of"
"""The template config key naming the sandbox a snapshot was taken of (``list_snapshots(sandbox_id)``)."""

MAX_FORKS = 20
"""E2B's bound on ``fork(count)`` (the SDK refuses more before sending)."""

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """``syncfs(2)`` on the file system holding ``path`` (Python has no ``os.syncfs``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def copy_disk(image: Path, copy: Path, handle: _core.SandboxHandle | None, running: bool) -> None:
    """In a worker thread: ``image`` copied to ``copy`` (sparse), consistent. ``handle``: the
    sandbox's, when its disk is mounted (running, or paused with its memory); ``running``: freeze
    its processes for the copy (a sandbox paused with its memory is frozen already)."""
    if running and handle is not None:
        handle.freeze()
    try:
        if handle is not None:
            # Through the sandbox's root, an overlay: its sync reaches the upper dir's ext4, whose
            # writes reach the image file before the copy reads it.
            syncfs(f"/proc/{handle.init_pid}/root")
        _core.copy_sparse(str(image), str(copy))  # as the disk pool copies its images
    except OSError:
        copy.unlink(missing_ok=True)
        raise
    finally:
        if running and handle is not None:
            handle.thaw()
