"""Path resolution exactly as envd's ``ExpandAndResolve`` (spec §3.2).

* empty ⇒ the default workdir if set, else the user's home;
* ``~`` / ``~/x`` ⇒ the user's home, cleaned (``~/x/`` is ``x``); ``~other`` ⇒ an error;
* absolute ⇒ used as given (no cleaning, as envd);
* relative ⇒ joined to the **user's home** (not the workdir) and cleaned.
"""

from __future__ import annotations

import os.path

from .errors import Code, RpcError
from .users import User


def expand_and_resolve(path: str, user: User, default_workdir: str | None = None) -> str:
    """Resolve ``path`` for ``user``; raises ``invalid_argument`` for what envd rejects."""
    if "\x00" in path:
        raise RpcError(Code.INVALID_ARGUMENT, "path contains a NUL byte")
    if path == "":
        return default_workdir or user.home
    if path.startswith("~"):
        if path == "~":
            return user.home
        if not path.startswith("~/"):
            raise RpcError(Code.INVALID_ARGUMENT, f"cannot expand user-specific home dir: '{path}'")
        path = os.path.normpath(os.path.join(user.home, path[2:]))  # envd's filepath.Join cleans
    if os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(user.home, path))
