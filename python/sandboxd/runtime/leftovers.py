"""What a runtime killed outright (SIGKILL, the OOM killer) leaves on the host, and its removal by the
next runtime that starts there.

A runtime that stops cleans up after itself (``server._serve``'s clean-up): its nftables table, its
links, its cgroup instance group, its warm sandboxes. One killed outright cannot, and its data dir may
be gone before anyone starts it again. Its table then stays in the kernel for good, and it is not
inert: besides its sandboxes' rules, its ``input`` chain drops every packet from outside the host to
the two ports its DNS resolver and egress proxy had, ports that any later program may be given. And
its sandboxes outlive it: the ones it could adopt again (it does when it restarts on the same data
dir: their rows are there) are meant to, but its warm sandboxes have no row, and once its data dir is
gone none has: those stay on the host for good, with their memory, disks, loop devices, links and id
ranges (CI saw a harness's SIGKILLed runtime leave its four warm sandboxes so).

So each runtime holds a *mark* while it lives: an ``flock`` on ``/run/sandboxd/runtime-<instance>.lock``
(tmpfs: marks vanish at reboot, with everything they name), whose file names its table, its links and
its data dir. A runtime that starts sweeps the marks nobody holds: the lock is free only once its
holder's every descriptor on it has closed, that is, once it has exited. The sweep holds each such
lock until it is done, so a runtime that starts on that data dir meanwhile waits (``RuntimeMark``)
before it reads its rows and adopts. For each, it

* kills the sandboxes nobody can adopt, found by the instance's cgroup group (``sandboxd/<instance>/``,
  in every hierarchy, v1 and v2) and killed through it (``cgroup.kill``; on v1 frozen, killed and
  thawed), as the runtime's own kill does: every one if the data dir the mark records is gone, else
  those without a running or paused row in its database (warm ones, creates cut short), as the
  runtime's own start there would. The others are left alone, and so is everything when it cannot
  tell: a mark from before marks recorded the data dir, one whose data dir is not its instance's, a
  database it cannot read. A killed sandbox's disk (a detached mount, whose loop device goes with it)
  and links (with its network namespace) go with its processes; its id range is freed by the
  registry's ``reclaim_stale`` right after the sweep once its data dir is gone (else by the
  runtime's start there, with the sandbox's directory, whose files the range owns);
* removes the table, **only if no link of that runtime is left**: a link means a sandbox of it still
  runs, one it will adopt, and that sandbox's egress rules and its ingress drop are in the table;
  removing it would free the sandbox from its policy while nobody watches. The table stays until that
  runtime returns or its sandboxes end;
* removes its instance's cgroup group, if no sandbox's group is in it (a pre-made spare's is removed
  first);

and then the mark. A runtime's own mark is never swept (it holds it), and tables without a mark (made
by runtimes before marks existed, or by a ``sandboxd node``, which has none) are never touched."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from . import store

log = logging.getLogger("sandboxd.runtime")

MARK_DIR = Path("/run/sandboxd")
"""Where the marks are (the network's block locks are there too)."""

_PREFIX = "runtime-"

LINKS_GONE_S = 5.0
"""How long a sweep that killed every sandbox of a runtime waits for their links to go (the kernel
removes them with each network namespace, in a worker of its own) before it leaves the runtime's
table and mark for the next sweep."""

_INSTANCE = re.compile(r"d-[0-9a-f]{16}")
_TABLE = re.compile(r"inet sandboxd_[0-9a-f]{6}")
_LINKS = re.compile(r"sd[0-9a-f]{6}h")
_OCTAL = re.compile(rb"\\([0-7]{3})")


class MarkHeld(OSError):
    """A live runtime holds the mark (it runs on the same data dir), or one on a data dir whose
    network tag is this one's."""


class RuntimeMark:
    """This runtime's mark, held until :meth:`close` (or the process's end)."""

    def __init__(
        self, instance: str, table: str, link_prefix: str, mark_dir: Path = MARK_DIR, data_dir: str | None = None
    ) -> None:
        mark_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.path = mark_dir / f"{_PREFIX}{instance}.lock"
        deadline = time.monotonic() + 10
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweeper may have unlinked the file between our open and our lock: a lock on an
                # unlinked file is no mark anybody can see, so take the one at the path again.
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except (BlockingIOError, FileNotFoundError):
                # Held: another runtime's sweep holds it for a moment, or a runtime on this data dir
                # lives (they would share its sandboxes' groups, table and database).
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise MarkHeld(
                        f"another sandboxd runtime is running on this data dir ({self.path} is held)"
                    ) from None
                time.sleep(0.05)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self.fd = fd
        # Written over what was there, then cut to its length: never empty on the way (a mark left
        # unparseable by a death mid-write is removed by the next sweep, see _sweep_one).
        # The data dir (resolved, as the instance is derived from it): whether its sandboxes can be
        # adopted again once this runtime is gone (see _adoptable).
        fields: dict[str, object] = {"instance": instance, "table": table, "link_prefix": link_prefix}
        if data_dir is not None:
            fields["data_dir"] = data_dir
            # And the file system it is on: a data dir not found later is deleted only if what is
            # left of its path is still on that file system (see _deleted).
            with contextlib.suppress(OSError):
                fields["data_fs"] = filesystem_of(Path(data_dir))
        self.fields = fields
        self._write()
        # The table and links are named by a 24-bit tag of the data dir (addressing.tag_for): two
        # data dirs can share one, ~1 in 16.7 million a pair, and two live runtimes on them would
        # share one table and one link prefix, each flushing the other's rules. Checked after our
        # own mark is written, so of two such runtimes starting at once, the later check sees the
        # other (both may refuse; neither shares).
        other = _live_holder_of(table, self.path, mark_dir)
        if other is not None:
            self.close()
            raise MarkHeld(
                f"the runtime on {other} uses the same network tag as this data dir ({table}); "
                "start this runtime on another --data-dir"
            )

    def _write(self) -> None:
        data = json.dumps(self.fields).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        """At a clean stop: the mark goes, as everything it names has (a failed clean-up leaves it,
        for the next runtime's sweep)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)

    def release(self) -> None:
        """At a clean stop that leaves sandboxes running (for this data dir's next runtime to adopt):
        the mark stays, free, as a runtime killed outright leaves it. Should the data dir go before
        a runtime starts on it again, the next runtime's sweep finds them by it and kills them;
        without it, nothing on the host would name them any more.

        It records the clean stop: this runtime made its database, so a data dir found without one
        later is not one whose runtime died before any sandbox (:func:`_adoptable`) but one not
        there for now (a volume unmounted at its mount point, a restore under way), whose sandboxes
        are left alone (``review7``)."""
        with contextlib.suppress(OSError):
            self.fields["stopped"] = True
            self._write()
        os.close(self.fd)


def sweep(
    remove_table: Callable[[str], None] | None,
    remove_instance: Callable[[str], None],
    mark_dir: Path = MARK_DIR,
    links: Callable[[], list[str]] | None = None,
    sandboxes: Sandboxes | None = None,
) -> list[str]:
    """Remove what the runtimes that are gone left (see the module's docstring); returns the instances
    swept. ``remove_table``: ``None`` when this host has no nftables (then tables stay, and so do
    their marks). ``links``: the host's interface names (tests give their own). ``sandboxes``: how an
    instance's sandboxes are listed and killed; ``None`` kills none."""
    swept: list[str] = []
    try:
        names = sorted(p.name for p in mark_dir.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(".lock"))
    except OSError:
        return swept
    # First every mark's state: the free ones locked (kept so until they are swept), and the tables
    # the held ones name. A tag is 24 bits of a hash of the data dir: two data dirs can share one, and
    # so one table name. A gone runtime's table that a live runtime also names is that live runtime's.
    free: dict[str, int] = {}  # each free mark's locked descriptor, until it is let go (below)
    live_tables: set[str] = set()
    try:
        for name in names:
            path = mark_dir / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its runtime lives
                if (table := _table_of(fd)) is not None:
                    live_tables.add(table)
                os.close(fd)
                continue
            free[name] = fd
        # Each lock let go once its mark is swept, not at the sweep's end: a runtime restarting on
        # that data dir waits for it (10 s at most, RuntimeMark), and a clean stop that leaves
        # sandboxes keeps its mark for exactly that restart, while another mark's sandboxes can take
        # seconds to kill and their links up to LINKS_GONE_S to go (review7). Unless a mark still to
        # be swept names the same table: a runtime started meanwhile on the first one's data dir
        # would be live with that table, which live_tables, read above, does not know.
        tables = {name: _table_of(fd) for name, fd in free.items()}
        order = list(free)
        for n, name in enumerate(order):
            try:
                if _sweep_one(
                    mark_dir / name, name, free[name], live_tables, remove_table, remove_instance, links, sandboxes
                ):
                    swept.append(name.removeprefix(_PREFIX).removesuffix(".lock"))
            finally:
                if tables[name] is None or tables[name] not in (tables[later] for later in order[n + 1 :]):
                    os.close(free.pop(name))
    finally:
        for fd in free.values():
            os.close(fd)
    if swept:
        log.info("removed what %d runtimes killed outright left on this host: %s", len(swept), ", ".join(swept))
    return swept


def _live_holder_of(table: str, own: Path, mark_dir: Path) -> str | None:
    """The data dir (or mark) of a live runtime, other than ``own``'s, whose mark names ``table``."""
    try:
        names = sorted(p.name for p in mark_dir.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(".lock"))
    except OSError:
        return None
    for name in names:
        path = mark_dir / name
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _table_of(fd) != table:
                continue
            # Only a mark naming our table is tried (a collision, ~never): a sweep that meets the
            # try's moment of lock takes that mark for a live runtime's and sweeps it next time.
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:  # held: its runtime lives
                with contextlib.suppress(ValueError, KeyError, TypeError, OSError, RecursionError):
                    return str(json.loads(os.pread(fd, 4096, 0))["data_dir"])
                return str(path)
        finally:
            os.close(fd)
    return None


def _table_of(fd: int) -> str | None:
    """The table a mark names, if it can be read. RecursionError: a mark nested past json's depth
    (only root writes here, but a mark never stops a runtime's start)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, OSError, RecursionError):
        return str(json.loads(os.pread(fd, 4096, 0))["table"])
    return None


def _sweep_one(
    path: Path,
    name: str,
    fd: int,
    live_tables: set[str],
    remove_table: Callable[[str], None] | None,
    remove_instance: Callable[[str], None],
    links: Callable[[], list[str]] | None,
    sandboxes: Sandboxes | None,
) -> bool:
    """One free mark, locked on ``fd``: whether what it names was removed, and the mark with it."""
    # Still the mark at its path: one unlinked between our open and our lock (its runtime stopped
    # cleanly, or another sweep took it) is nobody's any more, and that runtime may have started
    # again since, with a new mark naming the same table, which is live.
    try:
        if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
            return False
        content = os.pread(fd, 4096, 0)
    except OSError:
        return False
    try:
        mark = json.loads(content)
        instance, table, prefix = str(mark["instance"]), str(mark["table"]), str(mark["link_prefix"])
    except (ValueError, KeyError, TypeError, RecursionError):
        # Free and naming nothing: its runtime died while writing it (or before: a runtime between
        # its open and its lock finds the file gone once it holds the lock, and makes another).
        if not content.strip() or content[:1] == b"{":
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False
    # Only the names a runtime writes: nothing else is ever passed to nftables or the cgroup tree.
    if not (_INSTANCE.fullmatch(instance) and _TABLE.fullmatch(table) and _LINKS.fullmatch(prefix)):
        return False
    # And only as one runtime writes them together (RuntimeMark): its file named for its instance,
    # its table and its links one tag. The links are what keep a table with a running sandbox's
    # rules; a mark whose table is another tag's would have that table removed by the absence of
    # links that never were its own (a live runtime's, whose sandboxes would lose their policy),
    # and one whose file is not its instance's would have a live runtime's groups emptied.
    if name != f"{_PREFIX}{instance}.lock" or table.removeprefix("inet sandboxd_") != prefix[2:-1]:
        return False
    # Its sandboxes that nobody can adopt, killed while the mark is locked: a runtime that starts on
    # its data dir meanwhile waits for the lock (RuntimeMark) before it reads its rows and adopts.
    # By instance, not by tag: no other runtime's sandbox is in this instance's groups.
    killed, spared = (
        (0, 0)
        if sandboxes is None
        else _kill_unadoptable(
            instance, _data_dir(mark, instance), sandboxes, stopped=mark.get("stopped") is True, fs=_data_fs(mark)
        )
    )
    if table in live_tables:
        return False  # a live runtime on a data dir with the same tag: the table is its own
    if not _swept(instance, table, prefix, remove_table, remove_instance, links, wait=killed > 0 and not spared):
        return False
    if sandboxes is not None and _any_left(instance, sandboxes):
        # One its runtime will adopt, on a runtime without links (--no-network), or one a zygote
        # forked as its runtime died, after the list above: the mark stays, for the next sweep.
        return False
    with contextlib.suppress(OSError):
        os.unlink(path)
    return True


def _swept(
    instance: str,
    table: str,
    prefix: str,
    remove_table: Callable[[str], None] | None,
    remove_instance: Callable[[str], None],
    links: Callable[[], list[str]] | None,
    wait: bool = False,
) -> bool:
    """Whether everything the mark names is gone now. ``wait``: every sandbox of it was just killed,
    and their links go with their network namespaces, which the kernel tears down a moment later
    (a worker of its own): they are waited for, for up to :data:`LINKS_GONE_S`."""
    done = True
    deadline = time.monotonic() + (LINKS_GONE_S if wait else 0)
    while (linked := _linked(prefix, links)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not prefix or linked:
        done = False  # a sandbox of it still runs: its table holds its rules
    elif remove_table is not None:
        try:
            remove_table(table)
        except OSError as exc:
            log.warning("could not remove the table %s of a runtime that is gone: %s", table, exc)
            done = False
    else:
        done = False
    if done:
        with contextlib.suppress(OSError):
            remove_instance(instance)
    return done


def _linked(prefix: str, links: Callable[[], list[str]] | None) -> bool:
    names = links() if links is not None else _links()
    return any(n.startswith(prefix) for n in names)


class Sandboxes(Protocol):
    """How the sweep finds and kills a gone runtime's sandboxes (``_core``'s, through the cgroup
    tree, every hierarchy; tests give their own)."""

    def ids(self, instance: str) -> list[str]:
        """The ids of the sandboxes whose groups are in the instance's group."""
        ...

    def kill(self, instance: str, sandbox_id: str) -> None:
        """Kill every process in the sandbox's group (``cgroup.kill``, or freeze, kill and thaw on v1),
        wait until it is empty, and remove the group."""
        ...


def _any_left(instance: str, sandboxes: Sandboxes) -> bool:
    try:
        return bool(sandboxes.ids(instance))
    except OSError:
        return True


def _data_dir(mark: dict[str, object], instance: str) -> Path | None:
    """The data dir a mark records, if it is the one its instance is derived from
    (:func:`.host.instance_name`); ``None`` for a mark from before marks recorded it, or any other."""
    recorded = mark.get("data_dir")
    if not isinstance(recorded, str) or not recorded.startswith("/"):
        return None
    if f"d-{hashlib.sha256(recorded.encode()).hexdigest()[:16]}" != instance:
        return None
    return Path(recorded)


def filesystem_of(path: Path) -> list[object]:
    """Where ``path`` is, as a mark records its data dir: its device number, and the mount it is
    under (the mount point, the kernel's id of that mount, and the directory of the file system
    that mount shows at its point, from ``/proc/self/mountinfo``). The device alone cannot tell a
    volume's mount point from the volume when both are on one file system (a bind mount), nor the
    mount point and device a bind mount of another directory of that file system put there since.
    The mount id is recorded, as marks always have, but not compared (see :func:`_same_mount`).
    ``OSError`` when ``path`` cannot be seen."""
    device = os.stat(path).st_dev
    mount_id, mount_point, root = _mount_of(os.path.abspath(path))
    return [device, mount_point, mount_id, root]


def _mount_of(path: str) -> tuple[int, str, str]:
    """The mount ``path`` (absolute, as the kernel spells it) is under: the longest mount point that
    is it or one of its ancestors, the last one mounted there when several are (the top one); its id,
    its point, and its root (the directory of its file system it shows there)."""
    best: tuple[int, str, str] = (-1, "", "")
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ", 5)
            point = _unescape(fields[4])
            under = path == point or path.startswith(point.rstrip("/") + "/")
            if under and len(point) >= len(best[1]):
                best = (int(fields[0]), point, _unescape(fields[3]))
    if best[0] < 0:
        raise OSError(f"no mount of {path} in /proc/self/mountinfo")
    return best


def _unescape(field: bytes) -> str:
    """A path of ``/proc/self/mountinfo``: its space, tab, newline and backslash escaped as octal (\\040)."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), field))


def _data_fs(mark: dict[str, object]) -> list[object] | None:
    """Where a mark records its data dir (:func:`filesystem_of`); ``None`` for a mark from before
    marks recorded it, or one that is not a device number, an absolute path, a mount id and (since
    marks record it) the mount's root."""
    recorded = mark.get("data_fs")
    if not isinstance(recorded, list) or len(recorded) not in (3, 4):
        return None
    device, point, mount_id = recorded[:3]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (device, mount_id)):
        return None
    if not isinstance(point, str) or not point.startswith("/"):
        return None
    if len(recorded) == 4 and not (isinstance(recorded[3], str) and recorded[3].startswith("/")):
        return None
    return list(recorded)


def _same_mount(found: list[object], recorded: list[object]) -> bool:
    """Whether ``found`` (:func:`filesystem_of`) is under the mount a mark recorded: the same device,
    mount point and, when the mark has it, root. Not the mount id: a volume unmounted and mounted
    again has a new one (or its old one, when the kernel hands the freed id out again), and it is
    the same volume (an anonymous device, a tmpfs's, is reused only once the tmpfs it numbered is
    gone, and its files with it). The root tells that volume from a bind mount of another directory
    of its file system put at its point since."""
    if found[:2] != recorded[:2]:
        return False
    return len(recorded) < 4 or found[3] == recorded[3]


def _deleted(data_dir: Path, fs: list[object] | None) -> bool:
    """Whether a data dir that cannot be found was deleted, rather than is not there for now: only
    when its nearest ancestor that can be seen is under the mount the data dir was (``fs``,
    :func:`_same_mount`). A volume unmounted at its mount point leaves the path's upper part under
    another mount (the mount point's directory, or the mount point gone too): its data dir may come
    back, with its sandboxes' rows, so they are not killed (``fixes35``). Without ``fs`` (a mark
    from before marks recorded it) it cannot be told: not deleted."""
    if fs is None:
        return False
    ancestor = data_dir.parent
    while True:
        try:
            return _same_mount(filesystem_of(ancestor), fs)
        except FileNotFoundError:
            if ancestor.parent == ancestor:
                return False
            ancestor = ancestor.parent
        except OSError:
            return False


def _adoptable(data_dir: Path | None, stopped: bool = False, fs: list[object] | None = None) -> set[str] | None:
    """The sandboxes a runtime that starts on ``data_dir`` would adopt (its running and paused rows,
    as ``SandboxManager.start`` reads them); ``None`` when that cannot be told (the data dir unknown
    or unreadable, not found but maybe not deleted, on another file system than the mark's ``fs``,
    or without the database a runtime that ``stopped`` cleanly had): then every sandbox is taken for
    adoptable. Killing one wrongly loses a user's work; sparing one wrongly, some memory."""
    if data_dir is None:
        return None
    try:
        found = filesystem_of(data_dir)
    except FileNotFoundError:
        # Gone, nobody can start on it and find them; or not there for now (review7).
        return set() if _deleted(data_dir, fs) else None
    except OSError:
        return None
    if fs is not None and not _same_mount(found, fs):
        # Another device or mount there now: the volume's mount point without the volume, or
        # another directory mounted there. (A new mount id alone is the volume mounted again.)
        return None
    database = data_dir / store.DATABASE
    try:
        if not database.exists():
            # Its runtime died before it made its database, so before any sandbox; unless it stopped
            # cleanly (RuntimeMark.release), with one: then the data dir is not there for now.
            return None if stopped else set()
        return store.live_ids(database)
    except (sqlite3.Error, OSError) as exc:
        log.warning("could not read %s, so its sandboxes are left alone: %s", database, exc)
        return None


def _kill_unadoptable(
    instance: str,
    data_dir: Path | None,
    sandboxes: Sandboxes,
    stopped: bool = False,
    fs: list[object] | None = None,
) -> tuple[int, int]:
    """Kill the gone runtime's sandboxes that nobody can adopt: all of them when its data dir is gone,
    else those without a running or paused row (its warm ones, and creates it did not finish), as its
    own start there would (``SandboxManager.start``). Returns how many were killed, and how many were
    left (adoptable, or not killed). What else a sandbox holds goes with its processes: its disk is a
    detached mount (its loop device is freed with the mount), its links go with its network
    namespace; its id range is freed by the registry's ``reclaim_stale`` once its data dir is gone
    and no process has its ids (else by the runtime's own start there, with its directory, whose
    files those ids own)."""
    try:
        ids = sandboxes.ids(instance)
    except OSError as exc:
        log.warning("could not list the sandboxes of %s, a runtime that is gone: %s", instance, exc)
        return 0, 1
    if not ids:
        return 0, 0
    adoptable = _adoptable(data_dir, stopped, fs)
    if adoptable is None:
        return 0, len(ids)
    killed: list[str] = []
    for sandbox_id in ids:
        if sandbox_id in adoptable:
            continue
        try:
            sandboxes.kill(instance, sandbox_id)
            killed.append(sandbox_id)
        except OSError as exc:
            log.warning("could not kill sandbox %s of %s, a runtime that is gone: %s", sandbox_id, instance, exc)
    if killed:
        log.info(
            "killed %d sandboxes that nobody can adopt of %s, a runtime that is gone (data dir %s): %s",
            len(killed),
            instance,
            data_dir,
            ", ".join(killed),
        )
    return len(killed), len(ids) - len(killed)


def _links() -> list[str]:
    try:
        return os.listdir("/sys/class/net")
    except OSError:
        return []
