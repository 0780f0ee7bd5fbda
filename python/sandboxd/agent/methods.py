"""Every RPC the agent serves, assembled once for all transports."""

from __future__ import annotations

from collections.abc import Callable

from .rpc import Method
from .services.process import ProcessService
from .state import AgentState

FILESYSTEM_PREFIX = "/filesystem.Filesystem/"
"""The paths of the filesystem and watch services' methods (both are ``filesystem.Filesystem``)."""


def build_methods(state: AgentState) -> list[Method]:
    """The filesystem, watch and process services' methods, wired to ``state``."""
    return [*filesystem_methods(state), *process_methods(state)]


def process_methods(state: AgentState) -> list[Method]:
    """The process service's methods alone (the standalone agent's, with the others built on first use:
    :func:`filesystem_later`)."""
    return ProcessService(state).methods()


def filesystem_methods(state: AgentState) -> list[Method]:
    """The filesystem and watch services' methods. Their modules import ``filesystem_pb2`` and with it
    protobuf's ``Timestamp`` and its Python helpers (``well_known_types``, ``field_mask``)."""
    from .services.filesystem import FilesystemService
    from .services.watch import WatchService

    return [*FilesystemService(state).methods(), *WatchService(state).methods()]


def filesystem_later(state: AgentState) -> tuple[str, Callable[[], list[Method]]]:
    """What ``ConnectTransport`` builds on the first request to a path under :data:`FILESYSTEM_PREFIX`:
    the standalone agent run only for commands never imports the filesystem and watch services (0.17
    MiB of idle RSS, docs/benchmarks.md ``rss8``). The zygote and the gRPC server build them at once."""
    return FILESYSTEM_PREFIX, lambda: filesystem_methods(state)
