"""Sandbox lifecycle: create, timeouts, pause/resume, kill, and re-adoption after a restart.

State is in SQLite (:mod:`.store`); the processes are in the kernel. A sandbox is an init (PID 1
of its pid namespace) with the agent as its only child, forked by the zygote (:mod:`.zygote`)
into fresh namespaces over an overlay (``crates/sandboxd-jail``). The runtime holds a handle per
live sandbox and watches the init's pidfd, so a sandbox whose agent died is noticed at once and
recorded as such.

Pause ``full`` freezes the cgroup (processes stay in memory; resume takes milliseconds).
Pause ``filesystem`` kills the processes and keeps the writable layer; resume starts a fresh agent
on it. Paused time does not count against the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd import _core

from .errors import ApiError, not_found
from .store import SandboxRow, Store
from .templates import Templates

log = logging.getLogger("sandboxd.runtime")

DEFAULT_TIMEOUT_S = 300
"""E2B's default sandbox lifetime."""

REAPER_INTERVAL_S = 0.25
"""How often expired sandboxes are looked for: timeouts are whole seconds, so a quarter second
of lateness is invisible while costing nothing measurable."""

AGENT_READY_TIMEOUT_S = 10.0
"""How long a new agent may take to answer /init before the create fails."""

CONNECT_TIMEOUT_S = 5.0
"""Connect timeout for a TCP connection into a sandbox (it is local: a refusal is immediate)."""

AGENT_PORT = 49983


@dataclass(frozen=True, slots=True)
class Limits:
    """What every sandbox gets (``sandboxd serve`` flags)."""

    cpu_count: int = 2
    memory_mb: int = 1024
    disk_mb: int = 10240
    pids_max: int = 4096
    max_sandboxes: int = 256
    max_timeout_s: int = 24 * 3600


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A validated create body."""

    template: str
    timeout: int | None
    metadata: dict[str, str]
    env_vars: dict[str, str]
    on_timeout: str = "kill"
    pause_memory: bool = True
    auto_resume: bool = False


def new_id() -> str:
    """20 characters of ``[a-z0-9]``, like E2B's ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(20))


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (``/proc/<pid>/stat`` field 22), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class SandboxManager:
    """Owns every sandbox of this runtime."""

    def __init__(self, store: Store, templates: Templates, data_dir: Path, zygote: socket.socket, limits: Limits):
        self.store = store
        self.templates = templates
        self.sandboxes_dir = data_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.zygote = zygote
        self.zygote.setblocking(False)
        self.zygote_lock = asyncio.Lock()
        """Serialises writes to the zygote's socket (one message per send)."""
        self._zygote_waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._zygote_reader: asyncio.Task[None] | None = None
        self.limits = limits
        self.handles: dict[str, _core.SandboxHandle] = {}
        self.busy: set[str] = set()
        """Sandboxes being killed, paused or resumed by us: their init's exit is expected."""
        self.on_gone: list[Callable[[str], None]] = []
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ start/stop

    async def start(self) -> None:
        """Re-adopt what a previous runtime left running or paused, then start the reaper."""
        for row in self.store.live():
            if row.state == "paused" and row.pause_mode == "filesystem":
                continue  # no processes to adopt: only the writable layer, which is on disk
            if row.init_pid is None or _proc_start_time(row.init_pid) != row.init_start:
                self._mark_died(row, "its init was gone when the runtime restarted")
                continue
            try:
                self._watch(row.id, _core.SandboxHandle.adopt(row.id, row.init_pid))
            except OSError as exc:
                self._mark_died(row, f"could not be re-adopted after a restart: {exc}")
                continue
            self.store.event(row.id, "adopted", "re-adopted after a runtime restart")
        self._reaper = asyncio.get_running_loop().create_task(self._reap_expired())

    async def stop(self) -> None:
        """Stop watching (sandboxes keep running; a restarted runtime re-adopts them)."""
        for task in (self._reaper, self._zygote_reader):
            if task is not None:
                task.cancel()
        loop = asyncio.get_running_loop()
        for handle in self.handles.values():
            loop.remove_reader(handle.pidfd())
        self.handles.clear()

    # -------------------------------------------------------------------------------- lookups

    def _row(self, sandbox_id: str) -> SandboxRow:
        row = self.store.get(sandbox_id)
        if row is None:
            raise not_found(sandbox_id)
        if row.state == "ended":
            raise ApiError(404, f'Sandbox "{sandbox_id}" is no longer running: {row.ended_reason or "it ended"}')
        return row

    def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]:
        """The sandbox's lifecycle events (also after it ended), oldest first."""
        if self.store.get(sandbox_id) is None:
            raise not_found(sandbox_id)
        return self.store.events(sandbox_id)

    def get(self, sandbox_id: str) -> SandboxRow:
        return self._row(sandbox_id)

    def end_at(self, row: SandboxRow) -> float:
        if row.state == "paused" and row.remaining_s is not None:
            return time.time() + row.remaining_s
        return row.end_at

    def list_page(
        self,
        states: list[str],
        after: tuple[float, str] | None,
        descending: bool,
        limit: int,
        keep: Callable[[SandboxRow], bool],
    ) -> tuple[list[SandboxRow], tuple[float, str] | None]:
        """Up to ``limit`` rows that ``keep`` accepts, after the cursor; and the next cursor if
        more may follow (keyset over (started_at, id), stable while sandboxes come and go)."""
        found: list[SandboxRow] = []
        cursor = after
        while len(found) < limit:
            batch = self.store.page(states, cursor, descending, max(limit, 64))
            if not batch:
                return found, None
            for row in batch:
                cursor = (row.started_at, row.id)
                if keep(row):
                    found.append(row)
                    if len(found) == limit:
                        more = self.store.page(states, cursor, descending, 1)
                        return found, cursor if more else None
        return found, None

    def _validate_timeout(self, timeout: int) -> int:
        if timeout <= 0:
            raise ApiError(400, f"'timeout' must be a positive number of seconds, got {timeout}")
        if timeout > self.limits.max_timeout_s:
            raise ApiError(400, f"'timeout' {timeout}s exceeds this runtime's maximum of {self.limits.max_timeout_s}s")
        return timeout

    # --------------------------------------------------------------------------------- create

    async def create(self, request: CreateRequest) -> SandboxRow:
        template = self.templates.resolve(request.template)
        timeout = self._validate_timeout(request.timeout if request.timeout is not None else DEFAULT_TIMEOUT_S)
        running = sum(1 for r in self.store.live() if r.state == "running")
        if running >= self.limits.max_sandboxes:
            raise ApiError(
                403,
                f"sandbox limit reached: {running} running sandboxes (the runtime's --max-sandboxes is "
                f"{self.limits.max_sandboxes}); kill or pause one first",
            )
        now = time.time()
        row = SandboxRow(
            id=new_id(),
            template_id=template.id,
            alias=request.template if request.template != template.id else None,
            state="running",
            started_at=now,
            end_at=now + timeout,
            access_token=secrets.token_urlsafe(24),
            cpu_count=self.limits.cpu_count,
            memory_mb=self.limits.memory_mb,
            disk_mb=self.limits.disk_mb,
            metadata=request.metadata,
            env_vars=request.env_vars,
            on_timeout=request.on_timeout,
            pause_mode="full" if request.pause_memory else "filesystem",
            auto_resume=request.auto_resume,
        )
        await self._boot(row, template.root, template.host_usr)
        self.store.insert(row)
        self.store.event(row.id, "created", f"template {request.template}, timeout {timeout}s")
        return row

    async def _boot(self, row: SandboxRow, template_root: Path, host_usr: bool) -> None:
        """Fork the sandbox from the zygote, watch its init, and hand the agent its settings."""
        sandbox_dir = self.sandboxes_dir / row.id
        sandbox_dir.mkdir(parents=True, exist_ok=True)
        request = {
            "id": row.id,
            "template_dirs": [str(template_root)],
            "sandbox_dir": str(sandbox_dir),
            "host_usr_ro": host_usr,
            "memory_bytes": row.memory_mb << 20,
            "cpu_cores": float(row.cpu_count),
            "pids_max": self.limits.pids_max,
            "log": str(sandbox_dir / "agent.log"),
        }
        answer = await self._zygote_create(request)
        if not answer.get("ok"):
            with contextlib.suppress(OSError):
                _core.kill_sandbox(row.id)
            raise ApiError(500, f"could not start the sandbox: {answer.get('error')}")
        handle = _core.SandboxHandle.adopt(row.id, answer["init_pid"])
        row.init_pid = handle.init_pid
        row.init_start = _proc_start_time(handle.init_pid)
        self._watch(row.id, handle)
        try:
            await self._init_agent(row)
        except Exception:
            await asyncio.to_thread(self._destroy, row.id, keep_files=False)
            raise

    async def _zygote_create(self, request: dict[str, Any]) -> dict[str, Any]:
        """Ask the zygote for a sandbox; answers arrive out of order, matched by sandbox id."""
        loop = asyncio.get_running_loop()
        if self._zygote_reader is None or self._zygote_reader.done():
            self._zygote_reader = loop.create_task(self._read_zygote())
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._zygote_waiting[request["id"]] = answer
        try:
            async with self.zygote_lock:
                await loop.sock_sendall(self.zygote, json.dumps(request).encode())
            return await answer
        finally:
            self._zygote_waiting.pop(request["id"], None)

    async def _read_zygote(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.zygote, 1 << 16)
            if not data:
                for waiting in self._zygote_waiting.values():
                    if not waiting.done():
                        waiting.set_exception(ApiError(500, "the runtime's zygote exited: restart sandboxd serve"))
                return
            answer = json.loads(data)
            pending = self._zygote_waiting.get(answer.get("id"))
            if pending is not None and not pending.done():
                pending.set_result(answer)

    async def _init_agent(self, row: SandboxRow) -> None:
        """``POST /init`` with the sandbox's access token and env vars, retried until the agent listens.

        The agent starts without a token (the zygote never holds one) and nothing but the agent runs
        in the sandbox yet, so this first /init is the one that sets it."""
        body = json.dumps({"envVars": row.env_vars, "accessToken": row.access_token}).encode()
        head = (
            "POST /init HTTP/1.1\r\nHost: sandbox\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
        delay = 0.002
        while True:
            try:
                sock = await self.open_socket(row.id, AGENT_PORT)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ApiError(500, f"the sandbox's agent did not start listening: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(head + body)
                status_line = await asyncio.wait_for(reader.readline(), AGENT_READY_TIMEOUT_S)
            finally:
                writer.close()
            if b" 204 " not in status_line:
                raise ApiError(500, f"the sandbox's agent refused /init: {status_line.decode(errors='replace')}")
            return

    async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
        """A TCP connection to ``port`` inside the sandbox (its own network namespace)."""
        handle = self.handles.get(sandbox_id)
        if handle is None:
            raise ConnectionRefusedError(f"sandbox {sandbox_id} is not running")
        fd = await asyncio.to_thread(handle.connect, port, CONNECT_TIMEOUT_S)
        return socket.socket(fileno=fd)

    async def ensure_reachable(self, sandbox_id: str) -> None:
        """For the proxy: running, or resumed now if paused with auto-resume; else a 502 the SDK
        turns into ``SandboxNotRunningException`` (it looks for "was not found")."""
        row = self.store.get(sandbox_id)
        if row is None or row.state == "ended":
            reason = f": {row.ended_reason}" if row is not None and row.ended_reason else ""
            raise ApiError(502, f"The sandbox was not found{reason}")
        if row.state == "paused":
            if row.auto_resume:
                await self.resume(sandbox_id, None)
                return
            raise ApiError(502, "The sandbox was not found: it is paused (Sandbox.connect resumes it)")

    # ---------------------------------------------------------------------------- watch/kill

    def _watch(self, sandbox_id: str, handle: _core.SandboxHandle) -> None:
        self.handles[sandbox_id] = handle
        asyncio.get_running_loop().add_reader(handle.pidfd(), self._init_exited, sandbox_id, handle)

    def _init_exited(self, sandbox_id: str, handle: _core.SandboxHandle) -> None:
        asyncio.get_running_loop().remove_reader(handle.pidfd())
        if self.handles.get(sandbox_id) is handle:
            del self.handles[sandbox_id]
        if sandbox_id in self.busy:
            return
        row = self.store.get(sandbox_id)
        if row is None or row.state != "running":
            return
        code = handle.exit_code()
        detail = f"exit status {code}" if code is not None else "exit status unknown"
        self._mark_died(row, f"its agent died ({detail})")
        with contextlib.suppress(OSError):
            handle.kill()

    def _mark_died(self, row: SandboxRow, reason: str) -> None:
        log.warning("sandbox %s ended: %s", row.id, reason)
        self.store.update(row.id, state="ended", ended_reason=reason)
        self.store.event(row.id, "died", reason)
        self._notify_gone(row.id)

    def _notify_gone(self, sandbox_id: str) -> None:
        for callback in self.on_gone:
            callback(sandbox_id)

    def _destroy(self, sandbox_id: str, keep_files: bool) -> None:
        """Kill every process and free the cgroup; remove the writable layer unless kept."""
        self.busy.add(sandbox_id)
        try:
            handle = self.handles.get(sandbox_id)
            if handle is not None:
                handle.kill()
            else:
                with contextlib.suppress(OSError):
                    _core.kill_sandbox(sandbox_id)
            if not keep_files:
                shutil.rmtree(self.sandboxes_dir / sandbox_id, ignore_errors=True)
        finally:
            self.busy.discard(sandbox_id)

    def _forget_handle(self, sandbox_id: str) -> None:
        handle = self.handles.pop(sandbox_id, None)
        if handle is not None:
            asyncio.get_running_loop().remove_reader(handle.pidfd())

    async def kill(self, sandbox_id: str, reason: str) -> None:
        row = self._row(sandbox_id)
        self.busy.add(sandbox_id)
        try:
            self._notify_gone(sandbox_id)
            if row.state == "paused" and row.pause_mode == "full":
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self.handles[sandbox_id].thaw)
            await asyncio.to_thread(self._destroy, sandbox_id, False)
            self._forget_handle(sandbox_id)
        finally:
            self.busy.discard(sandbox_id)
        self.store.update(sandbox_id, state="ended", ended_reason=reason)
        self.store.event(sandbox_id, "killed", reason)

    # ------------------------------------------------------------------------------ timeouts

    def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        row = self._row(sandbox_id)
        timeout = self._validate_timeout(timeout)
        if row.state == "paused":
            self.store.update(sandbox_id, remaining_s=float(timeout))
        else:
            self.store.update(sandbox_id, end_at=time.time() + timeout)
        self.store.event(sandbox_id, "timeout_set", f"{timeout}s from now")

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.time()
            for row in self.store.live():
                if row.state != "running" or row.end_at > now or row.id in self.busy:
                    continue
                try:
                    if row.on_timeout == "pause":
                        await self.pause(row.id, row.pause_mode or "full", "timed out (onTimeout=pause)")
                    else:
                        await self.kill(row.id, "timed out")
                except Exception:
                    log.exception("reaping sandbox %s failed", row.id)

    # -------------------------------------------------------------------------- pause/resume

    async def pause(self, sandbox_id: str, mode: str, reason: str) -> None:
        row = self._row(sandbox_id)
        if row.state == "paused":
            raise ApiError(409, f'Sandbox "{sandbox_id}" is already paused')
        remaining = max(row.end_at - time.time(), 1.0)
        self.busy.add(sandbox_id)
        try:
            self._notify_gone(sandbox_id)
            if mode == "full":
                await asyncio.to_thread(self.handles[sandbox_id].freeze)
            else:
                await asyncio.to_thread(self._destroy, sandbox_id, True)
                self._forget_handle(sandbox_id)
        finally:
            self.busy.discard(sandbox_id)
        self.store.update(sandbox_id, state="paused", pause_mode=mode, remaining_s=remaining)
        self.store.event(sandbox_id, "paused", f"{reason} ({mode})")

    async def resume(self, sandbox_id: str, timeout: int | None) -> SandboxRow:
        row = self._row(sandbox_id)
        if row.state != "paused":
            raise ApiError(409, f'Sandbox "{sandbox_id}" is already running')
        if timeout is not None:
            self._validate_timeout(timeout)
        remaining = float(timeout) if timeout is not None else (row.remaining_s or DEFAULT_TIMEOUT_S)
        if row.pause_mode == "full" and sandbox_id in self.handles:
            await asyncio.to_thread(self.handles[sandbox_id].thaw)
            changes: dict[str, Any] = {}
        else:
            template = self.templates.resolve(row.template_id)
            self.busy.add(sandbox_id)
            try:
                await self._boot(row, template.root, template.host_usr)
            finally:
                self.busy.discard(sandbox_id)
            changes = {"init_pid": row.init_pid, "init_start": row.init_start}
        self.store.update(
            sandbox_id, state="running", end_at=time.time() + remaining, remaining_s=None, pause_mode=None, **changes
        )
        self.store.event(sandbox_id, "resumed", row.pause_mode)
        return self._row(sandbox_id)

    async def connect(self, sandbox_id: str, timeout: int | None) -> tuple[SandboxRow, bool]:
        """Resume a paused sandbox (True) or extend a running one's timeout, never shortening it."""
        row = self._row(sandbox_id)
        if row.state == "paused":
            return await self.resume(sandbox_id, timeout), True
        if timeout is not None:
            self._validate_timeout(timeout)
            if time.time() + timeout > row.end_at:
                self.store.update(sandbox_id, end_at=time.time() + timeout)
        return self._row(sandbox_id), False

    # -------------------------------------------------------------------------------- metrics

    def metrics(self, sandbox_id: str) -> dict[str, Any]:
        row = self._row(sandbox_id)
        handle = self.handles.get(sandbox_id)
        stats = handle.stats() if handle is not None else None
        now = time.time()
        disk_used = _dir_size(self.sandboxes_dir / sandbox_id / "upper")
        from .api import iso

        return {
            "timestamp": iso(now),
            "timestampUnix": int(now),
            "cpuCount": row.cpu_count,
            "cpuUsedPct": _cpu_pct(sandbox_id, stats.cpu_usage_ns or 0, row.cpu_count) if stats else 0.0,
            "memUsed": (stats.memory_bytes or 0) if stats else 0,
            "memTotal": row.memory_mb << 20,
            "memCache": 0,
            "diskUsed": disk_used,
            "diskTotal": row.disk_mb << 20,
        }


_CPU_SAMPLES: dict[str, tuple[float, int]] = {}


def _cpu_pct(sandbox_id: str, usage_ns: int, cpus: int) -> float:
    """CPU use since the previous metrics call, in percent of the sandbox's cores."""
    now = time.monotonic()
    previous = _CPU_SAMPLES.get(sandbox_id)
    _CPU_SAMPLES[sandbox_id] = (now, usage_ns)
    if previous is None or now <= previous[0]:
        return 0.0
    return round(100 * (usage_ns - previous[1]) / 1e9 / (now - previous[0]) / max(cpus, 1), 2)


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
