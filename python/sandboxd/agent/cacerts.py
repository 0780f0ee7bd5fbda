"""envd's ``caBundle`` (``POST /init``): certificates the orchestrator wants the sandbox to trust.

The runtime passes its egress CA, whose certificates the egress proxy presents for hosts with
header rules. Like envd, the PEM is appended to the system bundle that OpenSSL, curl, Python and
most tools read (:data:`BUNDLE`), once: a sandbox resumed from disk already has it. It is also kept
in :data:`EXTRA` when that directory is writable, so ``update-ca-certificates`` keeps it.
"""

from __future__ import annotations

import contextlib
import os

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
EXTRA = "/usr/local/share/ca-certificates/sandboxd-egress.crt"


def install(pem: str, bundle: str = BUNDLE, extra: str = EXTRA) -> None:
    """Append ``pem`` to ``bundle`` unless it is there already (blocking: call from a thread)."""
    pem = pem.strip() + "\n"
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("'caBundle' holds no PEM certificate")
    try:
        with open(bundle, encoding="ascii", errors="replace") as f:
            present = pem.strip() in f.read()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(bundle), exist_ok=True)
        present = False
    if not present:
        with open(bundle, "a", encoding="ascii") as f:
            f.write(("\n" if f.tell() else "") + pem)
    with contextlib.suppress(OSError):  # a read-only /usr (the built-in template) keeps none
        os.makedirs(os.path.dirname(extra), exist_ok=True)
        with open(extra, "w", encoding="ascii") as f:
            f.write(pem)
