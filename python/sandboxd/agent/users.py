"""Sandbox users: who a request acts as, looked up in the sandbox's own /etc/passwd."""

from __future__ import annotations

import os
import pwd
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


def _databases_version() -> tuple[int, int]:
    try:
        return (os.stat("/etc/passwd").st_mtime_ns, os.stat("/etc/group").st_mtime_ns)
    except OSError:
        return (0, 0)


def lookup(name: str) -> User:
    """The account called ``name``; :class:`KeyError` when there is none. Cached until /etc/passwd
    or /etc/group changes (``useradd`` inside a sandbox is seen at once)."""
    version = _databases_version()
    cached = _CACHE.get(name)
    if cached is not None and cached[0] == version:
        return cached[1]
    user = _lookup(name)
    _CACHE[name] = (version, user)
    return user


def _lookup(name: str) -> User:
    if "\x00" in name:  # no account has one, and getpwnam raises ValueError for it
        raise KeyError(name)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if name != "root":
            raise
        # A template without /etc/passwd (an image built FROM scratch): root is uid 0 anyway.
        return User("root", 0, 0, "/root" if os.path.isdir("/root") else "/", (0,))
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:  # pragma: no cover - broken group database
        groups = (entry.pw_gid,)
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/", groups)


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
    try:
        pwd.getpwnam("user")
        return "user"
    except KeyError:
        pass
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "root"  # no account database in this template
