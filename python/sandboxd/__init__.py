"""sandboxd: self-hosted, E2B-compatible sandboxes.

``sandboxd agent`` is an envd-compatible agent (runs inside a sandbox); ``sandboxd serve`` is the
runtime that creates sandboxes and serves E2B's control-plane API.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sandboxd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

ENVD_VERSION = "0.6.13"
"""The envd protocol version the agent implements. The E2B SDKs gate features on it (spec §5.4);
it is separate from sandboxd's own version."""

__all__ = ["ENVD_VERSION", "__version__"]
