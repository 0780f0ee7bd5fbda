"""The operators' endpoints on the runtime's port, and their wire shapes.

* ``GET /health``: liveness. 200 while the process serves requests, also when degraded (the
  runtime restarts its zygote by itself; the body says what is wrong). No key needed.
* ``GET /ready``: readiness (:mod:`.probes`). 200 ``{"status": "ready"}`` or 503 ``{"status":
  "not ready", "checks": {...}}`` naming each failed check. No key needed, as probes send none; it
  tells nothing a sandbox could use.
* ``GET /metrics``: Prometheus text (or OpenMetrics when asked), protected like the rest of the API.
  Why on the API port rather than a separate one: one listener and one secret to manage, and a
  scraper elsewhere can reach it with the key (``X-API-KEY``, or ``Authorization: Bearer <key>``,
  which every Prometheus scrape config can send), where an unauthenticated loopback port would have
  to be exposed, unprotected, to be scraped from another machine.
* ``GET /status``: sandboxd's own summary for ``sandboxd status`` (version, uptime, sandboxes by
  state, the host budget, readiness, the zygote, the last errors); same key.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from sandboxd import ENVD_VERSION, __version__
from sandboxd.agent.asgi import Receive, Scope, Send, header_map, send_bytes, send_json

from ..api import check_api_key, iso
from ..errors import ApiError
from .logs import RecentErrors
from .metrics import RuntimeMetrics, RuntimeView, SandboxView
from .probes import Readiness

if TYPE_CHECKING:
    from ..manager import SandboxManager
    from ..store import SandboxRow
    from ..zygote_client import ZygoteClient

PATHS = frozenset({"/health", "/ready", "/metrics", "/status"})


class OperatorEndpoints:
    """Serves :data:`PATHS`."""

    def __init__(
        self,
        manager: SandboxManager,
        zygote: ZygoteClient,
        readiness: Readiness,
        metrics: RuntimeMetrics,
        recent: RecentErrors | None,
        api_key: str,
        data_dir: Path,
    ) -> None:
        self.manager = manager
        self.zygote = zygote
        self.readiness = readiness
        self.metrics = metrics
        self.recent = recent
        self.api_key = api_key
        self.data_dir = data_dir
        self.started_at = time.time()
        self._scrapes = ThreadPoolExecutor(1, thread_name_prefix="sandboxd-metrics")
        """One scrape at a time, in its own thread: it never takes a worker that API requests need."""
        metrics.max_sandboxes.set(manager.limits.max_sandboxes)

    def close(self) -> None:
        self._scrapes.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise ApiError(405, f"{scope['method']} is not allowed on {path} (use GET)")
            if path == "/health":
                await self.health(send)
            elif path == "/ready":
                await self.ready(send)
            else:
                check_api_key(header_map(scope), self.api_key, bearer=True)
                if path == "/metrics":
                    await self.scrape(scope, send)
                else:
                    await send_json(send, 200, await self.status())
        except ApiError as exc:
            await send_json(send, exc.status, exc.body())

    async def health(self, send: Send) -> None:
        # Alive (200) even while degraded: the runtime serves its API and running sandboxes, and
        # restarts the zygote by itself; the body says what is wrong.
        down = self.zygote.down_reason
        health = {"status": "degraded", "reason": down} if down else {"status": "ok"}
        await send_json(send, 200, {**health, "version": __version__})

    async def ready(self, send: Send) -> None:
        checks = await self.readiness.check()
        if any(checks.values()):
            failed = {name: problem for name, problem in checks.items() if problem}
            await send_json(send, 503, {"status": "not ready", "checks": failed})
        else:
            await send_json(send, 200, {"status": "ready"})

    def view(self, rows: list[SandboxRow] | None = None) -> RuntimeView:
        """The bookkeeping a scrape needs, taken on the event loop (one indexed query, no I/O)."""
        manager = self.manager
        if rows is None:
            rows = manager.store.live()
        view = RuntimeView(
            states={"running": 0, "paused": 0},
            zygote_up=self.zygote.down_reason is None,
            zygote_restarts=self.zygote.restarts,
            warm_ready=len(manager.warm.ready),
            warm_target=manager.warm.size,
            disk_used=manager.disk_used_now,
        )
        for row in rows:
            view.states[row.state] = view.states.get(row.state, 0) + 1
            if row.state == "running":
                handle = manager.handles.get(row.id)
                view.running.append(
                    SandboxView(
                        row.id,
                        row.template_id,
                        handle.init_pid if handle else None,
                        handle.stats if handle else None,
                    )
                )
        view.states["starting"] = max(manager.slots_taken - view.states["running"], 0)
        return view

    async def scrape(self, scope: Scope, send: Send) -> None:
        accept = header_map(scope).get("accept", "")
        loop = asyncio.get_running_loop()
        body, content_type = await loop.run_in_executor(self._scrapes, self.metrics.render, self.view(), accept)
        await send_bytes(send, 200, body, content_type)

    async def status(self) -> dict[str, Any]:
        live = self.manager.store.live()
        view = self.view(live)
        rows = [row for row in live if row.state == "running"]
        checks = await self.readiness.check()
        host = await asyncio.to_thread(_host, self.data_dir)
        limits = self.manager.limits
        return {
            "version": __version__,
            "envdVersion": ENVD_VERSION,
            "pid": os.getpid(),
            "startedAt": iso(self.started_at),
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "ready": not any(checks.values()),
            "checks": checks,
            "sandboxes": view.states,
            "limits": {
                "maxSandboxes": limits.max_sandboxes,
                "sandboxCpus": limits.cpu_count,
                "sandboxMemoryMB": limits.memory_mb,
                "maxTimeoutSeconds": limits.max_timeout_s,
            },
            "budget": {
                "slotsUsed": self.manager.slots_taken,
                "slotsMax": limits.max_sandboxes,
                "cpusCommitted": sum(row.cpu_count for row in rows),
                "memoryCommittedBytes": sum(row.memory_mb << 20 for row in rows),
                **host,
            },
            "zygote": {"up": view.zygote_up, "reason": self.zygote.down_reason, "restarts": view.zygote_restarts},
            "recentErrors": list(self.recent.records) if self.recent is not None else [],
        }


def _host(data_dir: Path) -> dict[str, int]:
    memory = psutil.virtual_memory()
    disk = os.statvfs(data_dir)
    return {
        "cpusHost": os.cpu_count() or 1,
        "memoryHostBytes": memory.total,
        "memoryHostUsedBytes": memory.total - memory.available,
        "dataDirBytes": disk.f_blocks * disk.f_frsize,
        "dataDirFreeBytes": disk.f_bavail * disk.f_frsize,
    }
