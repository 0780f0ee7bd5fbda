"""The seam between the control-plane API (and proxy) and whatever runs the sandboxes.

:class:`Backend` is what :mod:`.api` and :mod:`.proxy` need: the E2B lifecycle calls on sandboxes,
a page of the listing, and a TCP connection to a port inside a sandbox. Two implementations:

* :class:`LocalBackend` here: this machine's :class:`~.manager.SandboxManager` (``sandboxd serve``);
* ``sandboxd.kube.backend.KubernetesBackend``: Pods on a Kubernetes cluster, each run by a
  ``sandboxd node`` (``sandboxd serve --backend kubernetes``).

Both answer with :class:`~.store.SandboxRow`, so the API formats one shape, and both raise
:class:`~.errors.ApiError` for answers a client can act on.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ApiError
from .lifecycle import LifecycleEvent, LifecycleQuery
from .logs import LogEntry
from .manager import CreateRequest, SandboxManager
from .metrics import MetricsSample
from .network import NetworkConfig
from .store import SandboxRow, TemplateRow
from .template_builder import BUILD_METADATA


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ``GET /sandboxes`` query."""

    states: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    started_after: float | None = None
    descending: bool = False
    limit: int = 100
    cursor: str | None = None
    """Where the previous page ended, as the backend gave it out (the API wraps it as ``nextToken``)."""

    def keep(self, row: SandboxRow) -> bool:
        """Whether ``row`` passes the filters (metadata pairs ANDed, template or alias, start time)."""
        if any(row.metadata.get(k) != v for k, v in self.metadata.items()):
            return False
        if self.template and self.template not in (row.template_id, row.alias):
            return False
        return self.started_after is None or row.started_at >= self.started_after


class Backend(Protocol):
    """What the API and the proxy do to sandboxes; see the module docstring."""

    async def create(self, request: CreateRequest) -> SandboxRow: ...
    async def get(self, sandbox_id: str) -> SandboxRow: ...
    async def kill(self, sandbox_id: str, reason: str) -> None: ...
    async def set_timeout(self, sandbox_id: str, timeout: int) -> None: ...
    async def connect(self, sandbox_id: str, timeout: int | None) -> tuple[SandboxRow, bool]: ...
    async def pause(self, sandbox_id: str, mode: str, reason: str) -> None: ...
    async def resume(self, sandbox_id: str, timeout: int | None) -> SandboxRow: ...
    async def metrics(self, sandbox_id: str, start: int | None, end: int | None) -> list[MetricsSample]: ...
    async def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]: ...
    async def lifecycle(self, query: LifecycleQuery) -> list[LifecycleEvent]: ...
    async def log_entries(self, sandbox_id: str) -> list[LogEntry]: ...
    async def list_page(self, query: ListQuery) -> tuple[list[SandboxRow], str | None]: ...
    def end_at(self, row: SandboxRow) -> float: ...
    def network_config(self, sandbox_id: str) -> NetworkConfig: ...
    async def traffic_token(self, sandbox_id: str) -> str | None: ...
    async def update_network(self, sandbox_id: str, update: NetworkConfig) -> None: ...
    async def snapshot(self, sandbox_id: str, name: str | None) -> TemplateRow: ...
    async def snapshots(self, sandbox_id: str | None) -> list[TemplateRow]: ...
    async def open_socket(self, sandbox_id: str, port: int) -> socket.socket: ...
    def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None: ...
    async def ensure_reachable(self, sandbox_id: str) -> None: ...


class LocalBackend:
    """:class:`Backend` over this machine's sandbox manager (a thin adapter: the manager is the owner)."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.on_gone: list[Callable[[str], None]] = manager.on_gone

    async def create(self, request: CreateRequest) -> SandboxRow:
        return await self.manager.create(request)

    async def get(self, sandbox_id: str) -> SandboxRow:
        return self.manager.get(sandbox_id)

    async def kill(self, sandbox_id: str, reason: str) -> None:
        await self.manager.kill(sandbox_id, reason)

    async def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        await self.manager.set_timeout(sandbox_id, timeout)

    async def connect(self, sandbox_id: str, timeout: int | None) -> tuple[SandboxRow, bool]:
        return await self.manager.connect(sandbox_id, timeout)

    async def pause(self, sandbox_id: str, mode: str, reason: str) -> None:
        await self.manager.pause(sandbox_id, mode, reason)

    async def resume(self, sandbox_id: str, timeout: int | None) -> SandboxRow:
        return await self.manager.resume(sandbox_id, timeout)

    async def metrics(self, sandbox_id: str, start: int | None, end: int | None) -> list[MetricsSample]:
        return await self.manager.metrics(sandbox_id, start, end)

    async def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]:
        return self.manager.events(sandbox_id)

    async def lifecycle(self, query: LifecycleQuery) -> list[LifecycleEvent]:
        return await self.manager.lifecycle(query)

    async def log_entries(self, sandbox_id: str) -> list[LogEntry]:
        return await self.manager.log_entries(sandbox_id)

    async def list_page(self, query: ListQuery) -> tuple[list[SandboxRow], str | None]:
        """A keyset page over ``(startedAt, sandboxID)``: stable while sandboxes come and go."""
        after = _decode_cursor(query.cursor) if query.cursor else None

        builds = BUILD_METADATA in query.metadata

        def keep(row: SandboxRow) -> bool:
            # A template build's sandbox is the runtime's, not a user's: listed only when asked for by
            # its metadata key (an operator looking for one build's sandbox).
            return (builds or BUILD_METADATA not in row.metadata) and query.keep(row)

        rows, next_after = self.manager.list_page(query.states, after, query.descending, query.limit, keep)
        return rows, (f"{next_after[0]!r}__{next_after[1]}" if next_after is not None else None)

    def end_at(self, row: SandboxRow) -> float:
        return self.manager.end_at(row)

    def network_config(self, sandbox_id: str) -> NetworkConfig:
        return self.manager.network_config(sandbox_id)

    async def traffic_token(self, sandbox_id: str) -> str | None:
        return self.manager.traffic_token(sandbox_id)

    async def update_network(self, sandbox_id: str, update: NetworkConfig) -> None:
        await self.manager.update_network(sandbox_id, update)

    async def snapshot(self, sandbox_id: str, name: str | None) -> TemplateRow:
        return await self.manager.snapshot(sandbox_id, name)

    async def snapshots(self, sandbox_id: str | None) -> list[TemplateRow]:
        return self.manager.snapshot_rows(sandbox_id)

    async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
        return await self.manager.open_socket(sandbox_id, port)

    def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None:
        return self.manager.kept_socket(sandbox_id, port)

    async def ensure_reachable(self, sandbox_id: str) -> None:
        await self.manager.ensure_reachable(sandbox_id)


def _decode_cursor(cursor: str) -> tuple[float, str]:
    started, sep, sandbox_id = cursor.partition("__")
    try:
        if not sep:
            raise ValueError(cursor)
        return float(started), sandbox_id
    except ValueError:
        raise ApiError(400, "'nextToken' is not a token this API gave out") from None
