"""Signed ``/files`` URLs that name no sandbox: which sandbox a signature belongs to.

With ``E2B_SANDBOX_URL`` set (how users point the SDK at sandboxd), ``sandbox.download_url(...)`` and
``upload_url(...)`` are ``<sandbox url>/files?path=…&username=…&signature=v1_…[&signature_expiration=…]``:
no ``E2b-Sandbox-Id`` header (a browser or ``curl`` sends none) and no sandbox in the host name. The
signature is ``v1_`` + unpadded base64 of sha256 of ``path:operation:username:token[:expiration]``,
so the sandbox is the one whose access token reproduces it.

Finding it must not leak which token matched, or how close a guess came: every candidate's
signature is computed and compared in constant time (:func:`hmac.compare_digest`), with no early
exit, so the time depends only on how many sandboxes are live, never on which one (if any) matched.
The request then goes to that sandbox's agent, which checks the signature (and its expiry) again and
answers exactly as envd does.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from sandboxd.agent.auth import signature_for

from .errors import ApiError


def operation_of(method: str) -> str | None:
    """The signed operation of a ``/files`` request: downloads are ``read``, uploads ``write``."""
    return {"GET": "read", "HEAD": "read", "POST": "write"}.get(method)


def find_signer(
    candidates: Iterable[tuple[str, str]],
    path: str,
    operation: str,
    username: str,
    signature: str,
    expiration: str | None,
) -> str | None:
    """The id of the sandbox whose token signed this URL, or None; ``candidates`` are (id, token)."""
    exp: int | None = None
    if expiration:
        if not expiration.isascii() or not expiration.lstrip("-").isdigit() or len(expiration) > 19:
            raise ApiError(400, "signature_expiration must be an integer")
        exp = int(expiration)
    presented = signature.encode("utf-8", errors="replace")
    found: str | None = None
    for sandbox_id, token in candidates:
        expected = signature_for(path, operation, username, token, exp).encode()
        if hmac.compare_digest(expected, presented) and found is None:
            found = sandbox_id
    return found
