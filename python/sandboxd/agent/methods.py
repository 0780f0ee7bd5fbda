"""Every RPC the agent serves, assembled once for all transports."""

from __future__ import annotations

from sandboxd._proto.filesystem import filesystem_pb2
from sandboxd._proto.process import process_pb2

from .rpc import Method, unimplemented
from .services.filesystem import FilesystemService
from .state import AgentState


def build_methods(state: AgentState) -> list[Method]:
    """The filesystem and process services' methods, wired to ``state``."""
    fs = filesystem_pb2.DESCRIPTOR.services_by_name["Filesystem"]
    proc = process_pb2.DESCRIPTOR.services_by_name["Process"]
    return [
        *FilesystemService(state).methods(),
        *unimplemented(
            fs,
            ["WatchDir", "CreateWatcher", "GetWatcherEvents", "RemoveWatcher"],
            "directory watching is not available in this build yet",
        ),
        *unimplemented(proc, None, "process management is not available in this build yet"),
    ]
