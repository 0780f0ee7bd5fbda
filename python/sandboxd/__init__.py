"""sandboxd: self-hosted, E2B-compatible sandboxes.

``sandboxd agent`` is an envd-compatible agent (runs inside a sandbox); ``sandboxd serve`` is the
runtime that creates sandboxes and serves E2B's control-plane API.
"""

from typing import Any

# The version is the extension's (maturin gives the package the binding crate's Cargo version), read
# on first use: ``importlib.metadata.version`` imports email, zipfile and csv, ~6.6 MiB of the agent's
# RSS for one string.

ENVD_VERSION = "0.6.13"
"""The envd protocol version the agent implements. The E2B SDKs gate features on it (spec §5.4);
it is separate from sandboxd's own version."""

__all__ = ["ENVD_VERSION", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from sandboxd import _core

        return _core.__version__
    raise AttributeError(f"module 'sandboxd' has no attribute {name!r}")
