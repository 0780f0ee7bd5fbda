"""Checks of values that reach the kernel: environment variables and command lines.

``execve(2)`` takes C strings, so a NUL cannot be passed; a name with ``=`` (or an empty one) makes an
entry that means something else (``A=B=C`` is ``A`` set to ``B=C``). envd passes such input to Go's
``exec``, which fails at start; the agent refuses it where it enters, with ``invalid_argument`` naming
the field, so a bad ``/init`` never leaves a sandbox whose every command fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import Code, RpcError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A portable environment variable name (POSIX's "portable character set" rule, as shells accept)."""


def check_env_vars(envs: Mapping[str, str], field: str) -> None:
    """``invalid_argument`` unless every name is ``[A-Za-z_][A-Za-z0-9_]*`` and no value has a NUL."""
    for name, value in envs.items():
        if not ENV_NAME.fullmatch(name):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"{field}: invalid environment variable name {shown!r}: use letters, digits and '_', "
                "not starting with a digit",
            )
        if "\x00" in value:
            raise RpcError(Code.INVALID_ARGUMENT, f"{field}: the value of {name} contains a NUL byte")


def check_no_nul(values: Iterable[str], field: str) -> None:
    """``invalid_argument`` if any of ``values`` contains a NUL byte (it cannot reach ``execve``)."""
    for value in values:
        if "\x00" in value:
            raise RpcError(Code.INVALID_ARGUMENT, f"{field} contains a NUL byte")
