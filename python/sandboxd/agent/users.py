"""Sandbox users: who a request acts as, looked up in the sandbox's own /etc/passwd."""

from __future__ import annotations

import os
import pwd
import select
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _core
from .errors import Code, RpcError


@dataclass(frozen=True, slots=True)
class User:
    """A resolved account: what files are chowned to and what processes run as."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


_CACHE: dict[str, tuple[tuple[int, int, int], User]] = {}
"""name → (the account databases' version when looked up, the user). Every RPC resolves its user;
``getgrouplist`` parses /etc/group each time, which cost ~50 µs per call."""


DATABASES = ("/etc/passwd", "/etc/group")

MOUNTINFO = "/proc/self/mountinfo"
"""Polled for ``POLLPRI``, which it reports once after any mount or unmount in the agent's mount
namespace (a file bind-mounted over /etc/passwd changes no watched inode)."""


class _Tripwire:
    """What tells :func:`_databases_version` that the databases may have changed, without a
    ``stat`` of each per RPC (10-14 µs each on the CI VM, two per RPC: the path walk).

    An inotify instance (``_core.Tripwire``) watches each database and every directory from its
    parent up to ``/`` (an edit in place, a write through another hard link, a rename over it, a
    new or removed entry, an ancestor moved), and ``/proc/self/mountinfo`` reports mounts. While
    neither is readable, a ``poll`` with no timeout (one syscall, ~2 µs) says the version is the
    one read when it was armed. The kernel queues the event before the modifying syscall returns,
    so a change that finished before a request arrived is seen by that request's poll, as the
    ``stat`` saw it; unlike the ``stat``, also when the file's mtime did not move (coarse
    timestamps, or set back). Once tripped it is re-armed in place (``Tripwire.rearm``: the paths
    watched again, the events discarded), not closed: closing an inotify instance with watches
    waits for an RCU grace period, 1-50 ms on the CI VM, on the thread of the lookup.

    Not armed, so that every lookup takes the ``stat`` s as before, where a change could pass it
    by: a database or a directory on its path is a symlink (its target's changes are not on the
    watched inodes), /proc is not mounted, or inotify refuses (``EMFILE``, ``ENOSPC``). Armed
    again only when the ``stat`` s see the databases change, not tried on every lookup.

    Not seen: a write through a shared mapping of a database kept after its descriptor was closed
    (inotify reports no ``mmap`` write; the close's ``IN_CLOSE_WRITE`` trips it before the write).
    Only a writer of /etc/passwd can do it, root inside, whose own agent then keeps the old entry
    until the next change; the ``stat`` s saw it on ext4, where such a write moves the mtime.

    It holds an inotify instance (of the 64 root inside a sandbox may hold, which ``watch_dir``'s
    watchers share) and two descriptors. A sandbox that changes ``/etc``'s entries without pause
    makes each of its lookups re-arm it and read both databases again: its own agent's cost."""

    __slots__ = ("_inotify", "_lock", "_mounts", "_poll", "armed_for", "generation", "mtimes", "unarmed_for", "version")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # select.poll refuses concurrent poll() calls; worker threads look up too
        self._inotify: _core.Tripwire | None = None
        self._mounts: int | None = None
        self._poll: Any = None
        self.armed_for: tuple[str, ...] | None = None
        """The databases the armed tripwire covers (tests point ``DATABASES`` elsewhere)."""
        self.unarmed_for: tuple[str, ...] | None = None
        """The databases it could not be armed for: their ``stat`` s are taken at each lookup."""
        self.generation = 0
        """Bumped whenever the databases are read again: a change that kept the mtimes misses the cache all the same."""
        self.mtimes: tuple[int, int] | None = None
        self.version: tuple[int, int, int] | None = None

    def fileno(self) -> int | None:
        """The inotify descriptor, once made: kept for the process's life, armed or not (for tests)."""
        return None if self._inotify is None else self._inotify.fileno()

    def current(self) -> tuple[int, int, int] | None:
        with self._lock:
            if self.armed_for is DATABASES:
                if not self._poll.poll(0):
                    return self.version
                # Tripped: re-armed in place below (closing it would wait for an RCU grace period).
            elif self.unarmed_for is DATABASES and _stat_version() == self.mtimes:
                return self.version
            # The first lookup, a change, or a tripwire set for other databases: read them again.
            self.generation += 1
            armed = self._arm()  # before the stat: a change from now on trips it
            self.mtimes = _stat_version()
            self.armed_for = DATABASES if armed else None
            self.unarmed_for = None if armed else DATABASES
            self.version = None if self.mtimes is None else (self.generation, *self.mtimes)
            return self.version

    def _arm(self) -> bool:
        """Watches the databases' paths, on the instance it has if any: one that could not be armed
        is kept too (unpolled; its watches removed or reused by the next ``rearm``), so that no
        lookup closes one, not even where a hostile root flips a database between a file and a
        symlink or holds inotify's watch limit nearly full."""
        paths: list[str] = []
        for database in DATABASES:
            if os.path.realpath(database) != database:  # a symlink somewhere on its path
                return False
            directory = os.path.dirname(database)
            while directory not in paths:
                paths.append(directory)
                directory = os.path.dirname(directory)
        paths += [database for database in DATABASES if os.path.lexists(database)]
        try:
            if self._inotify is None:
                self._inotify = _core.Tripwire([])
                self._poll = select.poll()
                self._poll.register(self._inotify.fileno(), select.POLLIN)
            if self._mounts is None:  # kept: the poll that saw its POLLPRI consumed it
                self._mounts = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
                self._poll.register(self._mounts, select.POLLPRI)
            self._inotify.rearm(paths)
        except OSError:
            return False
        # A symlink put on the path between the check above and its watch: the watches are in
        # place now, so a swap from here on trips them, and one before is seen here.
        return all(os.path.realpath(database) == database for database in DATABASES)

    def forget(self) -> None:
        """In a child just forked: the descriptors are copies of the parent's, for its view of the
        files (a sandbox's agent is forked from the zygote, then in a mount namespace and a root of
        its own), and the lock may be held by a thread the child does not have. The next lookup
        arms a tripwire of the child's own."""
        self._lock = threading.Lock()
        self._disarm()
        self.unarmed_for = None

    def _disarm(self) -> None:
        self._poll = None
        self.armed_for = None
        if self._inotify is not None:
            self._inotify.close()
        if self._mounts is not None:
            os.close(self._mounts)
        self._inotify = self._mounts = None


_TRIPWIRE = _Tripwire()
os.register_at_fork(after_in_child=_TRIPWIRE.forget)


def _databases_version() -> tuple[int, int, int] | None:
    """The account databases' version: a number that changes with them (see :class:`_Tripwire`),
    or None when one is there but is not a regular file: the C library's lookups open and read it,
    and a FIFO (which the sandbox's root can leave there) would block them for ever, the agent's
    start and its requests with them."""
    return _TRIPWIRE.current()


def _stat_version() -> tuple[int, int] | None:
    """The account databases' mtimes (0 for one that is missing), or None when one is not a
    regular file (see :func:`_databases_version`)."""
    versions = [0, 0]
    for i, path in enumerate(DATABASES):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            return None
        versions[i] = st.st_mtime_ns
    return versions[0], versions[1]


def lookup(name: str) -> User:
    """The account called ``name``; :class:`KeyError` when there is none. Cached until /etc/passwd
    or /etc/group changes (``useradd`` inside a sandbox is seen at once). With a database that is not
    a regular file (see :func:`_databases_version`) there are no accounts but root, which needs none:
    the sandbox's root can still reach its files through the agent and put the file back."""
    version = _databases_version()
    if version is None:
        return _without_databases(name)
    cached = _CACHE.get(name)
    if cached is not None and cached[0] == version:
        return cached[1]
    user = _lookup(name)
    _CACHE[name] = (version, user)
    return user


def _without_databases(name: str) -> User:
    """Root as a template without /etc/passwd has it (an image built FROM scratch): uid 0 anyway."""
    if name != "root":
        raise KeyError(name)
    return User("root", 0, 0, "/root" if os.path.isdir("/root") else "/", (0,))


def _lookup(name: str) -> User:
    if "\x00" in name:  # no account has one, and getpwnam raises ValueError for it
        raise KeyError(name)
    found = _passwd_entry(lambda fields: fields[0] == name)
    if found is not None:
        return User(found[0], found[1], found[2], found[3], _groups_of(found[0], found[2]))
    try:  # not in the files: the C library's other sources (nsswitch.conf), loaded only now
        entry = pwd.getpwnam(name)
    except KeyError:
        return _without_databases(name)
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:  # pragma: no cover - broken group database
        groups = (entry.pw_gid,)
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/", groups)


def _lines(path: str) -> list[list[str]]:
    """The colon-separated entries of an account database, without blank lines, comments and the
    ``+``/``-`` lines of NIS's compat syntax (the C library's ``files`` source does not read those
    either); nothing when it cannot be read."""
    try:  # O_NONBLOCK: a FIFO put there after _databases_version looked is not waited on
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        with open(fd, "rb", closefd=False) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return []
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return []
    finally:
        os.close(fd)
    entries = (line.lstrip(" \t") for line in text.split("\n"))
    return [line.split(":") for line in entries if line and line[0] not in "#+-"]


def _passwd_entry(match: Callable[[list[str]], bool]) -> tuple[str, int, int, str] | None:
    """(name, uid, gid, home) of the first well-formed /etc/passwd entry ``match`` accepts, read as
    the C library's ``files`` source reads it, or None. Read here rather than through ``pwd``:
    ``getpwnam`` loads the other NSS sources of ``nsswitch.conf`` into the process at the first
    lookup (``libnss_systemd`` on Debian: 0.23 MiB of RSS for the agent's life), and the accounts
    the agent acts as are the template's local ones; Go's ``os/user``, which envd uses, reads these
    same files. A name that is not there is still looked up through ``pwd`` (:func:`_lookup`)."""
    for fields in _lines(DATABASES[0]):
        if len(fields) < 7 or not fields[0]:
            continue
        uid, gid = _id(fields[2]), _id(fields[3])
        if uid is None or gid is None:
            continue
        if match(fields):
            return fields[0], uid, gid, fields[5] or "/"
    return None


def _id(field: str) -> int | None:
    """A uid or gid field as a number the C library's ``files`` source would give too: ASCII digits,
    below ``(uid_t) -1``. ``int()`` alone takes ``-1``, ``+5``, ``1_000``, spaces and non-ASCII
    digits, which glibc reads differently or not at all; such an entry is skipped, as a malformed
    one is."""
    if not (field.isascii() and field.isdigit()):
        return None
    value = int(field)
    return value if value < 0xFFFFFFFF else None


def _groups_of(name: str, gid: int) -> tuple[int, ...]:
    """``getgrouplist(name, gid)`` from /etc/group: ``gid`` first, then every group that lists
    ``name`` as a member, in the file's order, each once."""
    groups = [gid]
    for fields in _lines(DATABASES[1]):
        if len(fields) < 4 or name not in fields[3].split(","):
            continue
        group = _id(fields[2])
        if group is None:
            continue
        if group not in groups:
            groups.append(group)
    return tuple(groups)


def lookup_or_unauthenticated(name: str) -> User:
    """The account called ``name``, or the ``unauthenticated`` error envd gives for an unknown one."""
    try:
        return lookup(name)
    except KeyError:
        raise RpcError(Code.UNAUTHENTICATED, f"invalid username: '{name}'") from None


def default_user_name(requested: str | None) -> str:
    """``--user`` if given, else ``user`` when that account exists (as in E2B's templates), else the
    account running the agent."""
    if requested:
        return requested
    if _databases_version() is None:
        return "root"
    try:
        lookup("user")
        return "user"
    except KeyError:
        pass
    euid = os.geteuid()
    found = _passwd_entry(lambda fields: int(fields[2]) == euid)
    if found is not None:
        return found[0]
    try:
        return pwd.getpwuid(euid).pw_name
    except KeyError:
        return "root"  # no account database in this template
