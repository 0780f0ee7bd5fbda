"""The agent's mutable configuration: what flags set at start and ``POST /init`` changes later."""

from __future__ import annotations

import threading
from _operator import _compare_digest
from collections.abc import Callable
from dataclasses import dataclass, field

from .users import User, lookup
from .watch_hub import WatchHub

compare_digest = _compare_digest
"""``hmac.compare_digest`` in a process without OpenSSL (the standalone agent's, ``lean.without_openssl``):
the same constant-time comparison of two strings of bytes, without importing ``hmac``, which imports
``hashlib`` and through it CPython's six digest modules (``_md5`` … ``_sha3``, each a shared library
mapped), on the first request of an agent with a token. Where OpenSSL is loaded ``hmac`` compares with
its ``CRYPTO_memcmp`` instead; both take a time that depends on the length only."""


@dataclass
class AgentState:
    """Settings shared by every transport.

    ``POST /init`` replaces fields while requests run; each field is replaced whole (never mutated in
    place), so readers see either the old or the new value. ``_lock`` serialises writers only.
    """

    default_user: str
    default_workdir: str | None = None
    access_token: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    env_vars_set: bool = False
    """Whether a ``POST /init`` has set env vars in this agent yet (``rest.init`` writes the first
    set's ``/run/e2b`` files inline, and later ones in a thread)."""
    watch_hub: WatchHub = field(default_factory=WatchHub, repr=False)
    """The directory watchers, as uploads need to reach them (see :mod:`.watch_hub`)."""
    freed: Callable[[], None] = field(default=lambda: None, repr=False)
    """Called on the event loop when memory was freed outside any request (exited processes
    forgotten), so that the server's idle trim gives it back (``IdleTrim.freed``)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def user(self, name: str | None = None) -> User:
        """The named account, or the default one. :class:`KeyError` when it does not exist."""
        return lookup(name or self.default_user)

    def token_matches(self, presented: str | None) -> bool:
        """True when no token is set, or ``presented`` equals it (compared in constant time)."""
        token = self.access_token
        if token is None:
            return True
        if presented is None:
            return False
        return compare_digest(presented.encode(), token.encode())

    def apply_init(
        self,
        *,
        access_token: str | None,
        env_vars: dict[str, str] | None,
        default_user: str | None,
        default_workdir: str | None,
    ) -> None:
        """What ``POST /init`` sets. Env vars replace the previous set, as in envd."""
        with self._lock:
            if access_token is not None:
                self.access_token = access_token or None
            if env_vars is not None:
                self.env_vars = dict(env_vars)
                self.env_vars_set = True
            if default_user:
                self.default_user = default_user
            if default_workdir is not None:
                self.default_workdir = default_workdir or None
