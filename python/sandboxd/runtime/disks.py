"""Sandbox disks: each sandbox's writable layer lives on its own ext4 filesystem in a sparse image
(``--sandbox-disk-mb``: a write past it fails with ENOSPC inside, and ``df`` inside shows it), and a
small pool of images formatted *and mounted* ahead of need keeps that work off the create path
(see ``crates/sandboxd-jail/src/disk.rs`` for the mechanism and the measurements behind it).

Files: ``<data dir>/disks/template-<format>-<size>m.img`` is formatted once per size (and per
version of the format, :data:`FORMAT`); the pool's copies are
``<data dir>/disks/pool-<n>.img``. A sandbox's image is moved into its directory
(``<data dir>/sandboxes/<id>/disk.img``) when it is created and stays there for the sandbox's whole
life, paused to disk included; it goes with that directory when the sandbox ends. A mounted disk is a
detached mount held only by a descriptor (never attached on the host), so a runtime that dies leaves
no mount behind: only pool images, which the next start removes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sandboxd import _core

log = logging.getLogger("sandboxd.runtime")

_T = TypeVar("_T")

FORMAT = "v4"
"""Names the mkfs options of the template image (v2: no journal, no resize inode; v3: and the
writable layer's ``upper`` and ``work`` directories made in it, so no copy's mount allocates them;
v4: its metadata packed and one backup superblock, 5 data extents to copy and write back instead of
16, ``_core.format_disk_image(template=True)``): an image made with other options is not reused,
and removed at the runtime's start."""

POOL_SIZE = 4
"""Disks kept ready: sequential creates never wait for one, and each costs a loop device and a small
mount (a few hundred KiB of kernel memory) while it waits. A burst larger than this mounts the rest
on demand, in worker threads."""

WORKERS = 32
"""Threads that copy and mount disks. Mounting one is latency-bound, not CPU-bound (measured: ~1 ms
of CPU, tens of ms of waiting for the image's first blocks to reach the disk under the loop
device's direct I/O), so a burst of creates that drains the pool gets its disks mounted side by
side rather than a handful at a time as the default executor (cores + 4 threads) would."""

REFILL_NICE = 10
"""The niceness of the thread that refills the pool (the warm sandboxes' own, :mod:`.warm`). A refill
(~1.5 ms of CPU: the copy, the loop device, the mount) started as a create took a disk, and so ran
beside that create's jail and agent start-up, each wanting one of a 2-core host's cores; niced, it
takes what they leave of the runtime's share (and it now waits :data:`REFILL_DELAY_S` as well).
Disks made on demand (the pool empty) are made at the default priority."""

REFILL_DELAY_S = 0.025
"""A refill starts this long after the last take, not at once, while the pool still has a disk: a
create takes its disk ~4 ms in, and its jail, its agent's start, its ``/init`` and the client's first
command follow within ~20 ms on a quiet 2-core host. Even niced, a refill beside them took a CPU they
waited for: its nice weighs only against the runtime's own threads, not the zygote's or the new
sandbox's groups. An empty pool refills at once. Measured (``docs/benchmarks.md``, ``cold19``)."""

REFILL_RETRY_S = 5.0
"""Wait before retrying after a refill failed (no loop device free, disk full): a failure that lasts
would otherwise spin; creates meanwhile make their disks themselves and report the error."""


class DiskPool:
    """Disks of ``size_mb`` MiB, ready to be given to new sandboxes."""

    def __init__(
        self, data_dir: Path, size_mb: int, target: int = POOL_SIZE, refill_delay: float = REFILL_DELAY_S
    ) -> None:
        self.dir = data_dir / "disks"
        self.size_mb = size_mb
        self.target = target
        self.refill_delay = refill_delay
        self._taken_at = -refill_delay
        self.template = self.dir / f"template-{FORMAT}-{size_mb}m.img"
        self._ready: deque[tuple[Path, int]] = deque()
        self._wake = asyncio.Event()
        self._refill: asyncio.Task[None] | None = None
        self._next = 0
        self._threads = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="sandbox-disk")
        self._refiller = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="sandbox-disk-refill", initializer=_lower_priority
        )
        """The pool's refills, one at a time (:data:`REFILL_NICE`)."""

    async def start(self) -> None:
        """Remove a previous runtime's pool, format the template if needed, and start filling."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        for stale in self.dir.glob("pool-*.img"):
            stale.unlink(missing_ok=True)
        for old in self.dir.glob("template-*.img"):  # an earlier format's (or size's) template
            if old != self.template:
                old.unlink(missing_ok=True)
        await asyncio.to_thread(self._format_template)
        self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def stop(self) -> None:
        """Stop filling and unmount (close) the disks nobody took."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        while self._ready:
            path, fd = self._ready.popleft()
            os.close(fd)
            path.unlink(missing_ok=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._refiller.shutdown(wait=False, cancel_futures=True)

    async def take(self, dest: Path) -> int:
        """A mounted disk for a new sandbox, whose image is moved to ``dest``. Returns the mount's
        descriptor: the caller owns it and closes it once the sandbox has started (or failed)."""
        self._taken_at = time.monotonic()
        self._wake.set()
        if self._ready:
            path, fd = self._ready.popleft()
            try:
                os.rename(path, dest)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            return fd
        return await self._in_thread(self._make, dest)

    async def mount(self, image: Path) -> int:
        """Mount a sandbox's existing disk (to resume it); the caller owns the descriptor."""
        return await self._in_thread(_mount_scratch, str(image))

    async def _in_thread(self, work: Callable[[_T], int], arg: _T) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._threads, work, arg)

    def _format_template(self) -> None:
        """Format the empty image every disk is copied from, unless it is there already."""
        if self.template.exists():
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.dir / f".{self.template.name}.tmp"
        _core.format_disk_image(str(partial), self.size_mb, template=True)
        partial.rename(self.template)

    def _make(self, dest: Path) -> int:
        """In a worker thread: copy the template to ``dest`` and mount it."""
        try:
            _core.copy_sparse(str(self.template), str(dest))
            return _mount_scratch(str(dest))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    async def _fill(self) -> None:
        while True:
            while len(self._ready) < self.target:
                wait = self._taken_at + self.refill_delay - time.monotonic()
                if wait > 0 and self._ready:  # an empty pool refills at once (REFILL_DELAY_S)
                    self._wake.clear()  # a take meanwhile may empty it
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                path = self.dir / f"pool-{self._next}.img"
                self._next += 1
                try:
                    fd = await asyncio.get_running_loop().run_in_executor(self._refiller, self._make, path)
                except OSError as exc:
                    log.warning("could not prepare a sandbox disk ahead of need: %s", exc)
                    await asyncio.sleep(REFILL_RETRY_S)
                    continue
                self._ready.append((path, fd))
            self._wake.clear()
            await self._wake.wait()


def _mount_scratch(image: str) -> int:
    """A sandbox's own disk, without write barriers: a flush inside (and the unmount at its end)
    stops at the image file. :func:`make_durable` is what makes a kept disk survive a host crash."""
    return _core.mount_disk(image, scratch=True)


RELEASE_WAIT_S = 2.0
"""How long a pause (and a resume) waits for a stopped sandbox's filesystem to be gone from its image.
Its unmount is normally over when its last process is (measured: gone before the pause's next step),
but a file of it sent over a unix socket and left in flight (a socket sent over itself, then closed)
lives until the kernel's unix garbage collector runs, in a worker soon after (~100 ms seen), and one
passed to another sandbox (a unix socket on a shared volume) lives as long as that one keeps it."""

_RELEASE_POLL_S = 0.005
"""The first wait between two scans of :func:`released`, doubled after each up to
:data:`_RELEASE_POLL_MAX_S`: a scan reads every loop device's backing file (~4 ms of CPU for 300
devices), and scans 5 ms apart for the whole wait kept about half a core busy per waiter."""

_RELEASE_POLL_MAX_S = 0.1


def loop_devices_of(image: Path) -> list[str]:
    """The loop devices ``image`` backs: each ``/sys/block/loop*/loop/backing_file`` names its file as
    the kernel finds it now (a rename followed), from this process's root."""
    target = os.path.realpath(image)
    found = []
    # One read per loop device (no glob: its stats doubled the cost, ~5 ms for 180 devices).
    for device in os.listdir("/sys/block"):
        if not device.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{device}/loop/backing_file") as f:
                name = f.read().rstrip("\n")
        except OSError:  # not bound, or unbound meanwhile
            continue
        if name.removesuffix(" (deleted)") == target:
            found.append(device)
    return found


async def released(image: Path, timeout: float = RELEASE_WAIT_S) -> bool:
    """Whether ``image``'s filesystem is gone (within ``timeout``): no loop device backs it any more.
    A sandbox's disk is a loop device that clears itself when its filesystem goes (``disk.rs``), and
    the filesystem goes with the last file open on it, wherever that file is, not with the sandbox's
    processes: one it sent out over a unix socket keeps it. Until then what it wrote may not be in
    the image (ext4 writes back at the unmount), and mounting the image again would make two
    filesystems write one image.

    Waited for on the event loop, scans further and further apart (``_RELEASE_POLL_S``): each scan in
    a worker thread, the sleeps between them not. How long a filesystem outlives its sandbox is its
    owner's doing (a file it sent out), so a wait that slept in a worker held one of the loop's
    default threads (cores + 4: six on two cores) for up to ``timeout`` per resume, pause or
    snapshot, and an owner resuming a few such sandboxes in a loop kept every other tenant's work
    that needs one of those threads queued behind them."""
    deadline = time.monotonic() + timeout
    pause = _RELEASE_POLL_S
    while await asyncio.to_thread(loop_devices_of, image):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, _RELEASE_POLL_MAX_S)
    return True


FS_IOC_SHUTDOWN = 0x8004587D
"""``_IOR('X', 125, __u32)`` (linux/fs.h): shut a filesystem down; ext4's since Linux 4.10."""

FS_SHUTDOWN_FLAGS_NOLOGFLUSH = 2
"""Shut down without writing anything back (ext4 calls it ``EXT4_GOING_FLAGS_NOLOGFLUSH``)."""


def open_root(disk: int) -> int:
    """A descriptor of a sandbox's disk's root directory, from its mount's (``O_PATH``, which no
    ``ioctl`` takes): the runtime keeps it while the sandbox runs, for :func:`discard`."""
    return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=disk)


def discard(root: int) -> None:
    """In a worker thread, before the processes of a sandbox whose disk is deleted next are killed:
    its filesystem shut down, so that what it holds unwritten is dropped, not written back to an
    image about to be unlinked. Without it the unmount at the sandbox's end ran ext4's whole
    ``sync_filesystem`` (its data, inode tables, bitmaps and directories through the loop device),
    and the kill waited for it: ~13 of a kill's ~16 ms on the CI VM, more after a sandbox wrote a
    lot, and that much disk traffic for nothing in a burst of kills. ``root`` (:func:`open_root`) is
    the sandbox's own disk: opened from the mount the runtime made for it, nothing inside can put
    another filesystem in its place. A filesystem that cannot shut down is written back as before."""
    try:
        fcntl.ioctl(root, FS_IOC_SHUTDOWN, struct.pack("I", FS_SHUTDOWN_FLAGS_NOLOGFLUSH))
    except OSError as exc:
        log.debug("could not shut down a sandbox's disk before its kill: %s", exc)


def make_durable(image: Path) -> None:
    """In a worker thread: ``image``'s writes (a sandbox's disk, mounted without barriers, its
    processes gone) on the host's disk, as a disk kept in the data dir must be."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lower_priority() -> None:
    """The refill thread's start: niceness is per thread on Linux (``setpriority`` of its id)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), REFILL_NICE)
