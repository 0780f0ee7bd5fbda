"""Directory watching: ``WatchDir`` (stream) and ``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher``
(polling), on the Rust recursive inotify watcher (``sandboxd-watch``).

Each watcher's kernel queue is read by a thread of its own (Rust, ``_core.Watcher``) as fast as the
kernel fills it, into a buffer bounded by bytes, so a busy event loop or a slow client does not make
the kernel drop events. A ``WatchDir`` stream parks that thread and reads the queue on the loop, one
bounded read at a time, for as long as events come a few at a time (one thread wake-up per event
instead of two); the thread takes over on a burst or when a directory appears or goes, and by itself
when the loop leaves the queue readable and unread for a few milliseconds (busy, or off the CPU).

Never silently lossy: when the kernel queue overflows anyway (``IN_Q_OVERFLOW``) or a watcher's
buffer fills, the watcher rescans and goes on, and the client is told explicitly with a Connect
``data_loss`` error that names the cause (the stream ends with it; a polling watcher returns the
events it holds, then fails the next ``GetWatcherEvents`` once with it, then continues).

Uploads replace files atomically (a hidden temporary file renamed over the target); those
temporaries are hidden from watchers, and the rename onto the target is reported as the events envd
reports for a file it writes in place: CREATE, CHMOD, WRITE for a new file, CHMOD, WRITE for an
overwrite (see :mod:`..watch_hub`, which also makes sure the rename is never missed).

Creating a watcher walks the whole tree to add its watches, which grows with the directory: it runs
in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii

from sandboxd import _core
from sandboxd._proto.filesystem import filesystem_pb2 as pb

from ..errors import Code, RpcError, from_os_error
from ..paths import expand_and_resolve
from ..rpc import Batch, Context, Encoded, Kind, Method
from ..state import AgentState
from ..watch_hub import Commit, WatchHub
from .filesystem import SERVICE, entry_to_proto

MAX_WATCHERS = 256
"""Polling watchers per agent. Each holds an inotify instance (the kernel default
``max_user_instances`` is 128 per user, so this is rarely the binding limit), a drain thread and a
buffer."""


WATCHER_ID_ALPHABET = string.ascii_lowercase + string.digits
WATCHER_ID_LENGTH = 20


def new_watcher_id() -> str:
    """``w`` and 20 random letters and digits (~103 bits), from ``os.urandom``. Not ``secrets.choice``:
    ``secrets`` imports ``random``, ``hmac`` and ``hashlib`` (with every ``_sha*``, ``_md5`` and
    ``_blake2`` module), which the standalone agent kept for its life after its first watcher: 0.38 MiB
    of idle RSS (docs/benchmarks.md, ``rss8``). A byte at or above 252 (7 x 36) is drawn again, so that each
    character is uniform over the 36."""
    limit = 256 - 256 % len(WATCHER_ID_ALPHABET)
    chars: list[str] = []
    while len(chars) < WATCHER_ID_LENGTH:
        chars += [WATCHER_ID_ALPHABET[b % len(WATCHER_ID_ALPHABET)] for b in os.urandom(WATCHER_ID_LENGTH) if b < limit]
    return "w" + "".join(chars[:WATCHER_ID_LENGTH])


TRANSLATE_ITEMS = 1024
"""Events a stream takes from its watcher and sends before taking more, so a backlog waits in the
watcher's byte-bounded buffer (``_core.WATCH_BUFFER_BYTES``) rather than as Python objects."""

PARK_STREAMS = True
"""Whether a ``WatchDir`` stream parks its drain thread and reads the kernel queue on the loop (one
thread wake-up an event instead of two, write→event 0.83-0.98x; docs/benchmarks.md). It was off for a
while: the JS SDK's seed recursive example missed a new file's WRITE with it on, because the loop,
woken by an upload's IN_MOVED_FROM, read it alone and the translator did not carry the temporary
file's RENAME over to the next batch (fixed in ``EventTranslator``)."""

IDLE_EXPIRY_S = 600.0
"""A polling watcher nobody asked for events for this long is removed (its client is gone)."""

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "sshfs", "ceph", "glusterfs")
"""Filesystems where inotify misses changes made elsewhere; envd refuses them unless asked."""

_TEMP_NAME = re.compile(r"(^|/)\.[^/]*\.sandboxd-[0-9a-f]{16}\.tmp$")
_ENTRY_EVENTS = (pb.EVENT_TYPE_CREATE, pb.EVENT_TYPE_WRITE, pb.EVENT_TYPE_CHMOD)


def _mount_fstype(path: str) -> str:
    """The filesystem type of the mount that holds ``path`` (longest mount-point prefix)."""
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].encode().decode("unicode_escape")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, right.split()[0]
    except OSError:
        return ""
    return fstype


async def _open_watcher(path: str, recursive: bool, allow_network_mounts: bool) -> _core.Watcher:
    """A watcher on ``path``, made in a worker thread (it walks the tree)."""
    return await asyncio.to_thread(_open_watcher_blocking, path, recursive, allow_network_mounts)


def _open_watcher_blocking(path: str, recursive: bool, allow_network_mounts: bool) -> _core.Watcher:
    if not os.path.exists(path):
        raise RpcError(Code.NOT_FOUND, f"path '{path}' not found")
    if not os.path.isdir(path):
        raise RpcError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory")
    fstype = _mount_fstype(os.path.realpath(path))
    if not allow_network_mounts and fstype.split(".")[0] in NETWORK_FILESYSTEMS:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"'{path}' is on a {fstype} filesystem, where inotify misses changes made elsewhere; "
            "pass allow_network_mounts=True to watch it anyway",
        )
    try:
        return _core.Watcher(path, recursive)
    except FileNotFoundError:
        raise RpcError(Code.NOT_FOUND, f"path '{path}' not found") from None
    except NotADirectoryError:
        raise RpcError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"inotify watch limit reached while watching '{path}': raise fs.inotify.max_user_watches "
                f"(now {_sysctl('max_user_watches')})",
            ) from None
        if exc.errno == errno.EMFILE:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                "inotify instance limit reached: raise fs.inotify.max_user_instances "
                f"(now {_sysctl('max_user_instances')}) or remove unused watchers",
            ) from None
        raise from_os_error(exc, "cannot watch directory") from None


def _close_off_loop(watcher: _core.Watcher) -> None:
    """Closes ``watcher`` in a worker thread: removing one watch per directory grows with the tree."""
    asyncio.get_running_loop().run_in_executor(None, watcher.close)


def _sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def overflow_error(cause: str) -> RpcError:
    return RpcError(
        Code.DATA_LOSS,
        f"events were lost: {cause}; the watcher rescanned and continues, so list the directory to resync",
    )


KERNEL_OVERFLOW = "the kernel's inotify queue overflowed (fs.inotify.max_queued_events={})"
BUFFER_OVERFLOW = "{} events did not fit the watcher's {} MiB buffer while this client was not reading them"


_NEW_FILE = (pb.EVENT_TYPE_CREATE, pb.EVENT_TYPE_CHMOD, pb.EVENT_TYPE_WRITE)
_NEW_EMPTY_FILE = (pb.EVENT_TYPE_CREATE, pb.EVENT_TYPE_CHMOD)
_OVERWRITE = (pb.EVENT_TYPE_CHMOD, pb.EVENT_TYPE_WRITE)


def upload_events(commit: Commit | None) -> tuple[int, ...]:
    """envd's events for an upload's target (see :mod:`..watch_hub`); without a note (a rename of a
    temporary file the hub does not know), those of a new file."""
    if commit is None:
        return _NEW_FILE
    if commit.existed:
        return _OVERWRITE
    return _NEW_FILE if commit.wrote else _NEW_EMPTY_FILE


class EventTranslator:
    """Rust batch items → ``FilesystemEvent``s: hides upload temporaries and reports their commit as
    envd's events for the target, attaches entries."""

    def __init__(self, root: str, include_entry: bool, hub: WatchHub) -> None:
        self.root = root
        self.include_entry = include_entry
        self.hub = hub
        self.renamed_temp: str | None = None
        """The base name of an upload's temporary file whose RENAME was the last item translated: the
        next item, the target's CREATE, is the other half of the same ``rename(2)``. Kept from one
        batch to the next: the kernel queues the two events one after the other, and a reader woken
        by the first can read it alone (a parked stream's loop did, under load, and reported the new
        file as CREATE only)."""

    def translate(self, items: list[tuple[int, str]]) -> tuple[list[pb.FilesystemEvent], str | None, bool]:
        """Events, an overflow cause (or None), and whether the root went away."""
        events: list[pb.FilesystemEvent] = []
        overflow: str | None = None
        closed = False
        for kind, name in items:
            renamed_temp, self.renamed_temp = self.renamed_temp, None
            if kind == _core.WATCH_OVERFLOW:
                if name:  # the watcher's own buffer was full: ``name`` is how many events it dropped
                    overflow = overflow or BUFFER_OVERFLOW.format(name, _core.WATCH_BUFFER_BYTES >> 20)
                else:
                    overflow = overflow or KERNEL_OVERFLOW.format(_sysctl("max_queued_events"))
                continue
            if kind == _core.WATCH_CLOSED:
                closed = True
                continue
            if _TEMP_NAME.search(name):
                if kind == pb.EVENT_TYPE_RENAME:
                    self.renamed_temp = os.path.basename(name)
                continue
            if renamed_temp is not None and kind == pb.EVENT_TYPE_CREATE:
                # The rename of an upload's temporary file onto its target (RENAME(temp), CREATE(target)).
                for upload_kind in upload_events(self.hub.commit_for(renamed_temp)):
                    events.append(self._event(upload_kind, name))
            else:
                events.append(self._event(kind, name))
        return events, overflow, closed

    def _event(self, kind: int, name: str) -> pb.FilesystemEvent:
        event = pb.FilesystemEvent(name=name, type=kind)  # type: ignore[arg-type]
        if self.include_entry and kind in _ENTRY_EVENTS:
            # A path gone again already gets the event without an entry, as envd sends it.
            with contextlib.suppress(OSError):
                event.entry.CopyFrom(entry_to_proto(_core.entry_info(os.path.join(self.root, name))))
        return event


_EVENT_TYPE_JSON: dict[int, bytes] = {
    int(number): b'"type":"' + name.encode() + b'"}}' for name, number in pb.EventType.items() if number
}
"""The end of a :class:`WatchEvent`'s JSON for each event type (not 0: proto3 JSON leaves a default out)."""


class WatchEvent(Encoded):
    """``WatchDirResponse{filesystem: {name, type}}`` (an event without an entry), encoded without
    building the message: a stream's JSON frame straight from the name and the type, the same
    bytes as the JSON codec's (``encode_basestring_ascii`` is what its encoder does with a string;
    an empty name is left out, as proto3 JSON leaves out a default). ~1 us instead of ~9 us."""

    __slots__ = ("kind", "name")

    def __init__(self, name: str, kind: int) -> None:
        self.name = name
        self.kind = kind

    @staticmethod
    def of(event: pb.FilesystemEvent) -> WatchEvent | pb.WatchDirResponse:
        if event.type in _EVENT_TYPE_JSON and not event.HasField("entry"):
            return WatchEvent(event.name, event.type)
        return pb.WatchDirResponse(filesystem=event)

    def to_json(self) -> bytes:
        tail = _EVENT_TYPE_JSON[self.kind]
        if not self.name:
            return b'{"filesystem":{' + tail
        return b'{"filesystem":{"name":' + encode_basestring_ascii(self.name).encode() + b"," + tail

    def SerializeToString(self) -> bytes:  # protobuf's name, so serializers take either
        event = pb.FilesystemEvent(name=self.name, type=self.kind)  # type: ignore[arg-type]
        return pb.WatchDirResponse(filesystem=event).SerializeToString()


@dataclass(slots=True, eq=False)
class BufferedWatcher:
    """A watcher (whose thread buffers its events, bounded by bytes) and what its client has not
    been told yet: the cause of a loss, and whether the watched directory went away."""

    watcher: _core.Watcher
    translator: EventTranslator
    lost: str | None = None
    closed: bool = False
    last_poll: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        """Handles what the kernel holds right now (see :mod:`..watch_hub`)."""
        with contextlib.suppress(ValueError):  # closed meanwhile
            self.watcher.sync()

    def take(self, max_items: int | None) -> tuple[list[pb.FilesystemEvent], bool]:
        """Up to ``max_items`` buffered items as events (all for None); and whether items may be left
        (``max_items`` were taken, or an error came instead of items). Items buffered after a take
        that left none signal themselves: the thread writes the eventfd when its buffer turns
        non-empty, and a parked loop's own read sets ``changed``. (Taking again until a take came back
        empty cost every event a second ``read_batch``.)"""
        try:
            items = self.watcher.read_batch(max_items)
        except OSError as exc:
            self.lost = self.lost or f"the watcher failed: {exc}"
            return [], True
        events, overflow, closed = self.translator.translate(items)
        if overflow:
            self.lost = self.lost or overflow
        self.closed = self.closed or closed
        return events, max_items is not None and len(items) >= max_items


class WatchService:
    """``WatchDir`` and the polling watcher RPCs."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.watchers: dict[str, BufferedWatcher] = {}
        self._expiry: asyncio.Task[None] | None = None

    def methods(self) -> list[Method]:
        return [
            Method(
                SERVICE,
                "WatchDir",
                Kind.SERVER_STREAM,
                pb.WatchDirRequest,
                pb.WatchDirResponse,
                self.watch_dir,
                lambda: pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive()),
            ),
            Method(
                SERVICE,
                "CreateWatcher",
                Kind.UNARY,
                pb.CreateWatcherRequest,
                pb.CreateWatcherResponse,
                self.create_watcher,
            ),
            Method(
                SERVICE,
                "GetWatcherEvents",
                Kind.UNARY,
                pb.GetWatcherEventsRequest,
                pb.GetWatcherEventsResponse,
                self.get_watcher_events,
            ),
            Method(
                SERVICE,
                "RemoveWatcher",
                Kind.UNARY,
                pb.RemoveWatcherRequest,
                pb.RemoveWatcherResponse,
                self.remove_watcher,
            ),
        ]

    def _resolve(self, path: str, ctx: Context) -> str:
        return expand_and_resolve(path, ctx.user, self.state.default_workdir)

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: Context
    ) -> AsyncIterator[pb.WatchDirResponse | WatchEvent | Batch]:
        path = self._resolve(request.path, ctx)
        watcher = await _open_watcher(path, request.recursive, request.allow_network_mounts)
        buffered = BufferedWatcher(watcher, EventTranslator(path, request.include_entry, self.state.watch_hub))
        loop = asyncio.get_running_loop()
        # The loop reads the kernel queue itself (the drain thread parked) whenever the inotify
        # descriptor is readable, one bounded read at a time: an event then wakes one thread, the
        # loop, instead of the drain thread and then the loop through the buffer's eventfd. The
        # Rust side hands the queue back to the thread on a burst and on events that need a walk of
        # the tree (see ``_core.Watcher.read_kernel``); the stream takes it again once it has sent
        # everything. Both descriptors stay registered: each callback empties what made its
        # descriptor readable (the kernel's queue, the eventfd's counter, which the thread writes
        # only when the buffer turns non-empty), so a stream busy sending, or held up by its
        # client, does not make the loop spin. (Removing and re-adding a reader per event cost two
        # epoll_ctl calls an event.)
        # After a hand-back the stream parks the thread again only once the thread has buffered
        # something (the eventfd fired): the thread may be walking a new directory with the watcher
        # locked, and a loop parked meanwhile found the descriptor readable, could not read it, and
        # was woken again at once for the whole walk (as much loop CPU as the walk took). Left
        # unparked, the thread reads everything, as it does for polling watchers.
        fd = watcher.fileno()
        kernel_fd = watcher.kernel_fileno()
        parked = False
        handed_back = False

        def park() -> None:
            nonlocal parked
            if handed_back:
                return
            # Also when the stream thinks it is parked: the thread takes the queue back by itself
            # when the loop leaves it readable and unread for long (busy elsewhere, or off the CPU:
            # ``_core.WATCH_TAKEOVER_S``). A no-op when the thread is parked already.
            watcher.park()
            if not parked:
                loop.add_reader(kernel_fd, kernel_woken)
                parked = True

        def kernel_woken() -> None:
            nonlocal parked, handed_back
            if not watcher.read_kernel():  # handed back to the thread (or closed)
                loop.remove_reader(kernel_fd)
                parked = False
                handed_back = True
            buffered.changed.set()

        def woken() -> None:
            nonlocal handed_back
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)
            handed_back = False
            buffered.changed.set()

        loop.add_reader(fd, woken)
        self.state.watch_hub.add(buffered)
        try:
            yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
            while True:
                if PARK_STREAMS:
                    park()
                await buffered.changed.wait()
                buffered.changed.clear()
                more = True
                while more:
                    events, more = buffered.take(TRANSLATE_ITEMS)
                    if len(events) == 1:
                        yield WatchEvent.of(events[0])
                    elif events:  # a backlog: one write, not one per event (rpc.Batch)
                        yield Batch([WatchEvent.of(event) for event in events])
                    if buffered.lost:
                        raise overflow_error(buffered.lost)
                    if buffered.closed:
                        return
        finally:
            self.state.watch_hub.discard(buffered)
            loop.remove_reader(fd)
            if parked:
                loop.remove_reader(kernel_fd)
            _close_off_loop(watcher)

    async def create_watcher(self, request: pb.CreateWatcherRequest, ctx: Context) -> pb.CreateWatcherResponse:
        if len(self.watchers) >= MAX_WATCHERS:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, f"this agent already has {MAX_WATCHERS} watchers: remove unused ones first"
            )
        path = self._resolve(request.path, ctx)
        watcher = await _open_watcher(path, request.recursive, request.allow_network_mounts)
        if len(self.watchers) >= MAX_WATCHERS:  # others were made while this one walked its tree
            await asyncio.to_thread(watcher.close)
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, f"this agent already has {MAX_WATCHERS} watchers: remove unused ones first"
            )
        poll = BufferedWatcher(watcher, EventTranslator(path, request.include_entry, self.state.watch_hub))
        watcher_id = new_watcher_id()
        self.watchers[watcher_id] = poll  # its thread buffers the events between two polls
        self.state.watch_hub.add(poll)
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_idle())
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _get(self, watcher_id: str) -> BufferedWatcher:
        poll = self.watchers.get(watcher_id)
        if poll is None:
            raise RpcError(
                Code.NOT_FOUND, f"watcher '{watcher_id}' not found (removed, or idle for {IDLE_EXPIRY_S:.0f}s)"
            )
        poll.last_poll = time.monotonic()
        return poll

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: Context
    ) -> pb.GetWatcherEventsResponse:
        poll = self._get(request.watcher_id)
        if poll.lost:  # the call after the one that returned the events that came with the loss
            cause, poll.lost = poll.lost, None
            raise overflow_error(cause)
        # What the kernel holds right now, not only what the thread has read; in a worker thread, since
        # the drain thread may hold the watcher's lock for a walk of a tree just moved in.
        await asyncio.to_thread(poll.settle)
        events, _ = poll.take(None)
        if not events and poll.lost:
            cause, poll.lost = poll.lost, None
            raise overflow_error(cause)
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(self, request: pb.RemoveWatcherRequest, ctx: Context) -> pb.RemoveWatcherResponse:
        self._get(request.watcher_id)
        self._close(request.watcher_id)
        return pb.RemoveWatcherResponse()

    def _close(self, watcher_id: str) -> None:
        poll = self.watchers.pop(watcher_id)
        self.state.watch_hub.discard(poll)
        _close_off_loop(poll.watcher)

    async def _expire_idle(self) -> None:
        while self.watchers:
            await asyncio.sleep(IDLE_EXPIRY_S / 10)
            now = time.monotonic()
            for watcher_id, poll in list(self.watchers.items()):
                if now - poll.last_poll > IDLE_EXPIRY_S:
                    self._close(watcher_id)
