"""Sandbox users: who a request acts as, looked up in the sandbox's own /etc/passwd."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Code, RpcError


@dataclass(frozen=True, slots=True)
class User:
    """A resolved account: what files are chowned to and what processes run as."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


_CACHE: dict[str, tuple[tuple[int, int], User]] = {}
"""name → (the account databases' mtimes when looked up, the user). Every RPC resolves its user;
``getgrouplist`` parses /etc/group each time, which cost ~50 µs per call."""


DATABASES = ("/etc/passwd", "/etc/group")


def _databases_version() -> tuple[int, int] | None:
    """The account databases' mtimes (0 for one that is missing), or None when one is there but is
    not a regular file: the C library's lookups open and read it, and a FIFO (which the sandbox's
    root can leave there) would block them for ever, the agent's start and its requests with them."""
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
