"""envd's ``caBundle`` (``POST /init``): certificates the orchestrator wants the sandbox to trust.

The runtime passes its egress CA, whose certificates the egress proxy presents for hosts with
header rules. Like envd, the PEM is added to the system bundle that OpenSSL, curl, Python and
most tools read (:data:`BUNDLE`), once: a sandbox resumed from disk already has it. It is also kept
in :data:`EXTRA` when that directory is writable, so ``update-ca-certificates`` keeps it.
"""

from __future__ import annotations

import contextlib
import os

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
EXTRA = "/usr/local/share/ca-certificates/sandboxd-egress.crt"


def install(pem: str, bundle: str = BUNDLE, extra: str = EXTRA) -> None:
    """Add ``pem`` to ``bundle`` unless it is there already (blocking: call from a thread).

    The bundle is replaced whole (a new file beside it, then ``rename``), not appended to: in a
    sandbox it is a file of the template's read-only layer, and the first write to such a file
    makes overlayfs copy it up into the sandbox's disk *and fsync the copy*, which on the
    loop-mounted disk is a flush to the host's disk: 5-40 ms of every create's ``/init`` on a
    busy host (``docs/benchmarks.md``). A new file is not synced. Readers see the old bundle or
    the new one, never half of it. A symlinked bundle has its target replaced."""
    data = pem.strip().encode("ascii") + b"\n"  # UnicodeEncodeError is a ValueError: a 400
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError("'caBundle' holds no PEM certificate")
    target = os.path.realpath(bundle)
    try:
        with open(target, "rb") as f:
            current = f.read()
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        current, mode = b"", 0o644
    if data.strip() not in current:
        _replace(target, current + (b"\n" if current else b"") + data, mode)
    with contextlib.suppress(OSError):  # a read-only /usr (the built-in template) keeps none
        os.makedirs(os.path.dirname(extra), exist_ok=True)
        with open(extra, "wb") as f:
            f.write(data)


def _replace(path: str, content: bytes, mode: int) -> None:
    """Write ``content`` to a new file beside ``path`` and rename it over ``path``. The new file's
    name is made here (``mkstemp``: ``O_EXCL``), so nothing left in the directory (a link a sandbox
    planted under a fixed name) is written through, and two ``/init`` at once each rename their own."""
    import tempfile  # here: it imports random, which the standalone agent loads only when used (lean.py)

    fd, temp = tempfile.mkstemp(prefix=".sandboxd-ca-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask must not narrow it
            f.write(content)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
