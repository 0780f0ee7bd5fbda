"""Every RPC the agent serves, assembled once for all transports."""

from __future__ import annotations

from .rpc import Method
from .services.filesystem import FilesystemService
from .services.process import ProcessService
from .services.watch import WatchService
from .state import AgentState


def build_methods(state: AgentState) -> list[Method]:
    """The filesystem, watch and process services' methods, wired to ``state``."""
    return [
        *FilesystemService(state).methods(),
        *WatchService(state).methods(),
        *ProcessService(state).methods(),
    ]
