"""``sandboxd serve --backend kubernetes``: E2B's API over Pods, stateless.

Every sandbox is a Pod (:mod:`.pods`); the API server and etcd hold all the state, so any number
of replicas serve the same sandboxes. Each replica keeps two caches by watch (:class:`.Informer`:
sandbox Pods in its namespace, sandboxd Nodes), used where a stale read is harmless (the proxy's
routing, waiting for a Pod to run); reads that answer the API (get, list) go to the API server.

* create: a Pod; the scheduler picks a node and the node runs it; the answer comes when the Pod is
  Running (or fails with the node's reason, or is unschedulable: 403 with the scheduler's words).
* list: label selectors (state, template, metadata) and ``status.phase=Running``, paged with
  Kubernetes' own ``limit``/``continue`` (the ``nextToken`` is the continue token). Names sort newest
  first (:func:`.pods.new_id`), so pages run in E2B's default order; ``order=asc`` is refused.
* pause/resume: the Pod's state label; the node acts and reports the ``Paused`` condition.
* kill: delete the Pod; the node stops the sandbox and removes the Pod.
* timeouts and lost nodes: one replica at a time, elected with a ``coordination.k8s.io`` Lease
  (``kubernetes_asyncio``'s leader election), kills or pauses Pods past their ``end-at`` and marks
  the Pods of a NotReady node Failed (reason ``NodeLost``).
* the proxy: a tunnel to the node that runs the sandbox (:mod:`.tunnel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from typing import Any

import aiohttp

from sandboxd.runtime.backend import ListQuery
from sandboxd.runtime.errors import ApiError, not_found
from sandboxd.runtime.lifecycle import LifecycleEvent, LifecycleQuery
from sandboxd.runtime.logs import LogEntry, from_events
from sandboxd.runtime.manager import DEFAULT_TIMEOUT_S, CreateRequest, Limits, validate_timeout
from sandboxd.runtime.metrics import MetricsSample
from sandboxd.runtime.network import NetworkConfig
from sandboxd.runtime.store import SandboxRow, TemplateRow

from . import pods
from .client import MERGE, Informer, Kube, KubeError, path_of
from .e2b_secrets import KubeSecrets
from .secrets import API_SECRET, NODE_SECRET, shared_secret
from .tunnel import TunnelError, fetch_metrics, open_tunnel

_LIFECYCLE_REASONS = {
    "Started": "created",
    "Killing": "killed",
    "Died": "died",
    "Paused": "paused",
    "Resumed": "resumed",
}
"""The reasons of the Events a node records on a sandbox Pod, as the runtime's event kinds."""


def _recorded_at(event: dict[str, Any]) -> float:
    """When a node recorded an Event: its annotation (to the microsecond), else its timestamps."""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return float(event["metadata"]["annotations"][pods.RECORDED_AT_ANNOTATION])
    return _event_time(event)


def _event_time(event: dict[str, Any]) -> float:
    """An Event's own time (to the second): its last occurrence, else when it was made."""
    return pods.parse_time(
        event.get("lastTimestamp") or event.get("eventTime") or event["metadata"]["creationTimestamp"]
    )


log = logging.getLogger("sandboxd.kube.backend")

START_TIMEOUT_S = 60.0
"""How long a create waits for its Pod to run: scheduling and a sandbox boot take well under a
second, but a burst of creates on a busy cluster queues in the scheduler."""

NODE_LOST_RETRY_S = 0.5
"""A create whose Pod was bound to a node that then stopped reporting starts a new Pod after this
long (the Pod is marked ``NodeLost`` by the leader; see :meth:`KubernetesBackend._reap`), while
:data:`START_TIMEOUT_S` lasts."""

TRANSITION_TIMEOUT_S = 30.0
"""How long pause, resume and kill wait for the node to report that it acted."""

REAPER_INTERVAL_S = 0.25
"""The leader's look for expired sandboxes and lost nodes (timeouts are whole seconds)."""

LEASE_NAME = "sandboxd-serve"
LEASE_DURATION_S = 8
RENEW_DEADLINE_S = 6
RETRY_PERIOD_S = 1
"""Leader election timing: a killed leader is replaced within ~8 s; these are the smallest values
``kubernetes_asyncio`` accepts with margin (it requires retry >= 1 s and renew > 1.2 x retry)."""


class KubernetesBackend:
    """The :class:`~sandboxd.runtime.backend.Backend` of ``serve --backend kubernetes``."""

    def __init__(self, kube: Kube, namespace: str, limits: Limits) -> None:
        self.kube = kube
        self.namespace = namespace
        self.limits = limits
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pods = Informer(kube, path_of("pods", namespace), labelSelector=f"{pods.MANAGED_LABEL}=true")
        self.nodes = Informer(kube, path_of("nodes"), labelSelector=f"{pods.NODE_LABEL}=true")
        self.token_key = b""
        self.tunnel_key = ""
        self.api_key = ""
        self.waiters: dict[str, list[tuple[Any, asyncio.Future[dict[str, Any] | None]]]] = {}
        self.on_gone: list[Any] = []
        self.leading = False
        self.busy: set[str] = set()
        """Pods the leader is timing out right now."""
        self.secrets = KubeSecrets(kube, namespace)
        """E2B's secrets (``/secrets``), which header rules name."""
        self.identities: dict[str, tuple[str, str, str]] = {}
        """Each live Pod's namespace, name and uid, as last seen (what its tokens derive from)."""
        self.network_notes: dict[str, str | None] = {}
        """Each live Pod's network annotation as last seen, by a read of this replica or its watch
        (what :meth:`network_config` answers from: the API formats a sandbox's detail after a read)."""
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------------------- start/stop

    async def start(self, api_key: str | None) -> str:
        """Read (or create) the shared keys, start the caches and the leader election; the API key."""
        node_keys = await shared_secret(self.kube, self.namespace, NODE_SECRET)
        self.token_key = node_keys["token-key"].encode()
        self.tunnel_key = node_keys["tunnel-key"]
        given = {"api-key": api_key} if api_key else None
        self.api_key = api_key or (await shared_secret(self.kube, self.namespace, API_SECRET, given))["api-key"]
        await self.secrets.ensure()
        self.pods.handlers.append(self._pod_event)
        self.pods.start()
        self.nodes.start()
        await asyncio.gather(self.pods.synced.wait(), self.nodes.synced.wait())
        self._spawn(self._elect())
        return self.api_key

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.pods.stop()
        await self.nodes.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --------------------------------------------------------------------------------- waiting

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if kind == "DELETED":
            self.network_notes.pop(name, None)
            self.identities.pop(name, None)
        else:
            self._saw_network(pod)
        waiting = self.waiters.get(name)
        if not waiting:
            return
        for predicate, future in list(waiting):
            if future.done():
                continue
            if kind == "DELETED":
                future.set_result(None)
            elif predicate(pod):
                future.set_result(pod)

    async def _wait_for(self, name: str, predicate: Any, timeout: float, current: dict[str, Any] | None) -> Any:
        """The first version of Pod ``name`` (from the watch) that satisfies ``predicate``; None if
        it is deleted first. ``current`` is checked first (it may already be there); versions older
        than it (the watch's cache, or its events still on their way) are passed over: they may
        answer an earlier request the same way (a node's refusal of the same settings)."""
        if current is not None:
            if predicate(current):
                return current
            floor, test = _version(current), predicate

            def predicate(pod: dict[str, Any]) -> bool:
                version = _version(pod)
                return (version is None or floor is None or version >= floor) and bool(test(pod))

        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self.waiters.setdefault(name, []).append(entry)
        try:
            cached = self.pods.items.get(f"{self.namespace}/{name}")
            if cached is not None and predicate(cached):
                return cached
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self.waiters.get(name, [])
            with contextlib.suppress(ValueError):
                waiting.remove(entry)
            if not waiting:
                self.waiters.pop(name, None)

    # --------------------------------------------------------------------------------- lookups

    def _path(self, name: str | None = None, sub: str | None = None) -> str:
        return path_of("pods", self.namespace, name, sub)

    async def _pod(self, sandbox_id: str) -> dict[str, Any]:
        """The Pod, read from the API server (a strong read); 404 when it does not exist."""
        if not sandbox_id or len(sandbox_id) > 253:
            raise not_found(sandbox_id)
        try:
            pod = await self.kube.get(self._path(sandbox_id))
        except KubeError as exc:
            if exc.status in (404, 400):
                raise not_found(sandbox_id) from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        if (pod["metadata"].get("labels") or {}).get(pods.MANAGED_LABEL) != "true":
            raise not_found(sandbox_id)
        return pod

    def _live(self, pod: dict[str, Any]) -> SandboxRow:
        """The row of a live sandbox Pod; 404 with the reason when it ended."""
        name = pod["metadata"]["name"]
        phase = pod.get("status", {}).get("phase", "Pending")
        if phase in ("Failed", "Succeeded"):
            status = pod["status"]
            reason = status.get("message") or status.get("reason") or phase.lower()
            raise ApiError(404, f'Sandbox "{name}" is no longer running: {reason}')
        if pod["metadata"].get("deletionTimestamp"):
            raise ApiError(404, f'Sandbox "{name}" is no longer running: it is being killed')
        if phase != "Running":
            raise ApiError(404, f'Sandbox "{name}" is not running yet (its Pod is {phase})')
        return self.row(pod)

    def _saw_network(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.network_notes[meta["name"]] = (meta.get("annotations") or {}).get(pods.NETWORK_ANNOTATION)
        self.identities[meta["name"]] = (meta["namespace"], meta["name"], meta["uid"])

    def row(self, pod: dict[str, Any]) -> SandboxRow:
        self._saw_network(pod)
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        notes = meta.get("annotations") or {}
        container = (pod["spec"].get("containers") or [{}])[0]
        limits = (container.get("resources") or {}).get("limits") or {}
        status = pod.get("status", {})
        started = pods.parse_time(status.get("startTime") or meta["creationTimestamp"])
        state = "paused" if labels.get(pods.STATE_LABEL) == "paused" else "running"
        end_at = pods.parse_time(notes[pods.END_AT_ANNOTATION]) if pods.END_AT_ANNOTATION in notes else math.inf
        remaining = float(notes[pods.REMAINING_ANNOTATION]) if pods.REMAINING_ANNOTATION in notes else None
        try:
            metadata = json.loads(notes.get(pods.METADATA_ANNOTATION, "{}"))
        except ValueError:
            metadata = {}
        return SandboxRow(
            id=meta["name"],
            template_id=str(container.get("image", "")),
            alias=notes.get(pods.ALIAS_ANNOTATION),
            state=state,
            started_at=started,
            end_at=end_at,
            access_token=pods.access_token(self.token_key, meta["namespace"], meta["name"], meta["uid"]),
            cpu_count=max(1, math.ceil(pods.quantity_cores(limits["cpu"]))) if "cpu" in limits else 1,
            memory_mb=pods.quantity_bytes(limits["memory"]) >> 20 if "memory" in limits else 0,
            disk_mb=self.limits.disk_mb,
            metadata=metadata if isinstance(metadata, dict) else {},
            remaining_s=remaining if state == "paused" else None,
            pause_mode=notes.get(pods.PAUSE_MODE_ANNOTATION) if state == "paused" else None,
            on_timeout=notes.get(pods.ON_TIMEOUT_ANNOTATION, "kill"),
            auto_resume=notes.get(pods.AUTO_RESUME_ANNOTATION) == "true",
        )

    def end_at(self, row: SandboxRow) -> float:
        if row.state == "paused" and row.remaining_s is not None:
            return time.time() + row.remaining_s
        return row.end_at if math.isfinite(row.end_at) else row.started_at + self.limits.max_timeout_s

    def _validate_timeout(self, timeout: int) -> int:
        return validate_timeout(timeout, self.limits)

    async def _patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.kube.patch(self._path(name), body, MERGE)
        except KubeError as exc:
            if exc.status == 404:
                raise not_found(name) from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None

    # --------------------------------------------------------------------------------- create

    async def create(self, request: CreateRequest) -> SandboxRow:
        timeout = self._validate_timeout(request.timeout if request.timeout is not None else DEFAULT_TIMEOUT_S)
        pods.check_network(request.network)
        await self.secrets.check_references(request.network)
        if request.volume_mounts:
            raise ApiError(
                400, "volumes are not available with --backend kubernetes (yet): 'volumeMounts' must be empty"
            )
        if len(request.template) > 253 or any(c.isspace() for c in request.template):
            raise ApiError(400, f"'templateID' {request.template[:80]!r} is not a template name")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            pod = await self._start_pod(request, timeout, deadline)
            status = pod.get("status", {})
            if status.get("phase") == "Running":
                return self.row(pod)
            await self._force_delete(pod["metadata"]["name"])
            if status.get("reason") == "NodeLost" and time.monotonic() + NODE_LOST_RETRY_S < deadline:
                # Bound to a node that died before it started the sandbox: nothing of it ran, so the
                # create goes on with a new Pod, which the scheduler places elsewhere once the node
                # controller has tainted the dead one (until then it may pick it again).
                log.warning("create: %s; starting the sandbox again", status.get("message"))
                await asyncio.sleep(NODE_LOST_RETRY_S)
                continue
            unschedulable = _unschedulable(pod)
            if unschedulable is not None:
                raise ApiError(403, f"no sandboxd node has room for the sandbox: {unschedulable}")
            if status.get("reason") == "UnknownTemplate":
                raise ApiError(404, status.get("message", "unknown template"))
            if status.get("reason") == "NodeLost":
                raise ApiError(503, f"the sandbox could not start: {status.get('message')}")
            raise ApiError(400, f"the sandbox could not start: {status.get('reason')}: {status.get('message')}")

    async def _start_pod(self, request: CreateRequest, timeout: int, deadline: float) -> dict[str, Any]:
        """A new sandbox Pod, once it is Running, or ended, or refused by the scheduler, within
        ``deadline``."""
        name = pods.new_id()
        body = pods.sandbox_pod(
            name=name,
            template=request.template,
            alias=None,
            env_vars=request.env_vars,
            metadata=request.metadata,
            cpu_count=self.limits.cpu_count,
            memory_mb=self.limits.memory_mb,
            timeout_s=timeout,
            on_timeout=request.on_timeout,
            pause_mode="full" if request.pause_memory else "filesystem",
            auto_resume=request.auto_resume,
            network=request.network,
        )
        try:
            created = await self.kube.create(self._path(), body)
        except KubeError as exc:
            if exc.status in (400, 422):
                raise ApiError(400, f"the sandbox was refused: {exc.body.get('message', exc)}") from None
            if exc.status == 403:
                raise ApiError(403, f"the sandbox was refused: {exc.body.get('message', exc)}") from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        try:
            pod: dict[str, Any] | None = await self._wait_for(
                name, _settled, max(deadline - time.monotonic(), 0.0), created
            )
        except TimeoutError:
            await self._force_delete(name)
            raise ApiError(503, f"no sandboxd node started the sandbox within {START_TIMEOUT_S:.0f}s") from None
        if pod is None:
            raise ApiError(409, f'Sandbox "{name}" was deleted while it started')
        return pod

    async def _force_delete(self, name: str) -> None:
        with contextlib.suppress(KubeError):
            await self.kube.delete(self._path(name), {"gracePeriodSeconds": 0})

    # ---------------------------------------------------------------------------- lifecycle

    async def get(self, sandbox_id: str) -> SandboxRow:
        return self._live(await self._pod(sandbox_id))

    async def kill(self, sandbox_id: str, reason: str) -> None:
        pod = await self._pod(sandbox_id)
        self._live(pod)
        for callback in self.on_gone:
            callback(sandbox_id)
        node_ok = self._node_ready(pod.get("spec", {}).get("nodeName"))
        grace = 5 if node_ok else 0
        try:
            await self.kube.delete(
                self._path(sandbox_id), {"gracePeriodSeconds": grace, "preconditions": {"uid": pod["metadata"]["uid"]}}
            )
        except KubeError as exc:
            if exc.status in (404, 409):
                raise not_found(sandbox_id) from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        if grace:
            # The node stops the sandbox, then removes the Pod: answer once it is gone, as the
            # single-machine DELETE does (synchronous).
            await self._wait_gone(sandbox_id)

    async def _wait_gone(self, name: str) -> None:
        """Until the Pod is deleted: the watch's DELETED event, checked against the API server every
        second (the event may have come before we started waiting)."""
        deadline = time.monotonic() + TRANSITION_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await self._wait_for(name, lambda _pod: False, 1.0, None)
                return
            try:
                await self.kube.get(self._path(name))
            except KubeError as exc:
                if exc.status == 404:
                    return

    async def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        """As on one machine (``SandboxManager.set_timeout``): 0, and any negative value, ends the
        sandbox at once as an expiring timeout does (killed, or paused with auto-pause); a paused
        sandbox keeps the time for its resume, and 0 kills it unless it pauses on timeout."""
        pod = await self._pod(sandbox_id)
        row = self._live(pod)
        timeout = max(timeout, 0)
        if timeout > 0:
            self._validate_timeout(timeout)
        if timeout == 0:
            if row.on_timeout == "pause":
                if row.state != "paused":
                    mode = (pod["metadata"].get("annotations") or {}).get(pods.PAUSE_MODE_ANNOTATION, "full")
                    await self.pause(sandbox_id, mode, "timed out (timeout set to 0)")
            else:
                await self.kill(sandbox_id, "timed out (timeout set to 0)")
            return
        if row.state == "paused":
            notes = {pods.REMAINING_ANNOTATION: str(timeout)}
        else:
            notes = {pods.END_AT_ANNOTATION: pods.iso(time.time() + timeout)}
        await self._patch(sandbox_id, {"metadata": {"annotations": notes}})

    async def connect(self, sandbox_id: str, timeout: int | None) -> tuple[SandboxRow, bool]:
        pod = await self._pod(sandbox_id)
        row = self._live(pod)
        if row.state == "paused":
            return await self.resume(sandbox_id, timeout), True
        if timeout is not None:
            self._validate_timeout(timeout)
            if time.time() + timeout > row.end_at:
                pod = await self._patch(
                    sandbox_id, {"metadata": {"annotations": {pods.END_AT_ANNOTATION: pods.iso(time.time() + timeout)}}}
                )
        return self.row(pod), False

    async def pause(self, sandbox_id: str, mode: str, reason: str) -> None:
        def change(row: SandboxRow) -> dict[str, Any]:
            if row.state == "paused":
                raise ApiError(409, f'Sandbox "{sandbox_id}" is already paused')
            remaining = max(row.end_at - time.time(), 1.0) if math.isfinite(row.end_at) else float(DEFAULT_TIMEOUT_S)
            for callback in self.on_gone:
                callback(sandbox_id)
            return {
                "labels": {pods.STATE_LABEL: "paused"},
                "annotations": {pods.PAUSE_MODE_ANNOTATION: mode, pods.REMAINING_ANNOTATION: f"{remaining:.3f}"},
            }

        await self._transition(sandbox_id, change, "True")

    async def resume(self, sandbox_id: str, timeout: int | None) -> SandboxRow:
        def change(row: SandboxRow) -> dict[str, Any]:
            if row.state != "paused":
                raise ApiError(409, f'Sandbox "{sandbox_id}" is already running')
            if timeout is not None:
                self._validate_timeout(timeout)
            remaining = float(timeout) if timeout is not None else (row.remaining_s or DEFAULT_TIMEOUT_S)
            end_at = pods.iso(time.time() + remaining)
            return {
                "labels": {pods.STATE_LABEL: "running"},
                "annotations": {pods.END_AT_ANNOTATION: end_at, pods.REMAINING_ANNOTATION: None},
            }

        return self.row(await self._transition(sandbox_id, change, "False"))

    async def _guarded_patch(self, sandbox_id: str, change: Any) -> dict[str, Any]:
        """Write the metadata ``change(row, pod)`` computes from the live Pod, guarded by its
        resourceVersion (a concurrent writer makes us read again); the patched Pod."""
        for _attempt in range(5):
            pod = await self._pod(sandbox_id)
            metadata = change(self._live(pod), pod)
            metadata["resourceVersion"] = pod["metadata"]["resourceVersion"]
            try:
                return await self.kube.patch(self._path(sandbox_id), {"metadata": metadata}, MERGE)
            except KubeError as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    raise not_found(sandbox_id) from None
                if exc.status in (400, 422):  # e.g. annotations past Kubernetes' 256 KiB
                    raise ApiError(400, f"the change was refused: {exc.body.get('message', exc)}") from None
                raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        raise ApiError(409, f'Sandbox "{sandbox_id}" kept changing meanwhile; try again')

    async def _transition(self, sandbox_id: str, change: Any, paused: str) -> dict[str, Any]:
        """Write the desired state computed by ``change`` from the current row, then wait until the
        node reports it in the Paused condition."""
        patched = await self._guarded_patch(sandbox_id, lambda row, _pod: change(row))

        def done(pod: dict[str, Any]) -> bool:
            if pod.get("status", {}).get("phase") in ("Failed", "Succeeded"):
                return True
            return _condition(pod, pods.PAUSED_CONDITION) == paused

        try:
            pod = await self._wait_for(sandbox_id, done, TRANSITION_TIMEOUT_S, patched)
        except TimeoutError:
            raise ApiError(
                503, f"the node of sandbox {sandbox_id} did not act within {TRANSITION_TIMEOUT_S:.0f}s"
            ) from None
        if pod is None:
            raise not_found(sandbox_id)
        if pod.get("status", {}).get("phase") != "Running":
            self._live(pod)
        return dict(pod)

    # -------------------------------------------------------------------------- read-only calls

    async def metrics(self, sandbox_id: str, start: int | None, end: int | None) -> list[MetricsSample]:
        """The node's live sample (the node keeps no history for the control plane yet), when it lies
        inside ``[start, end]``."""
        sample = await self._live_sample(sandbox_id)
        at = int(sample.timestamp)
        return [sample] if (start is None or at >= start) and (end is None or at <= end) else []

    async def log_entries(self, sandbox_id: str) -> list[LogEntry]:
        """The Pod's lifecycle events as log entries (the agent's own log stays on its node)."""
        return from_events(sandbox_id, await self.events(sandbox_id))

    async def _live_sample(self, sandbox_id: str) -> MetricsSample:
        pod = await self._pod(sandbox_id)
        self._live(pod)
        host, port = self._endpoint(pod)
        local_id = pods.sandbox_id_of(pod)
        if local_id is None:
            raise ApiError(404, f'Sandbox "{sandbox_id}" is not running yet')
        try:
            status, body = await fetch_metrics(host, port, self.tunnel_key, local_id)
        except OSError as exc:
            raise ApiError(502, f"the sandbox's node is unreachable: {exc}") from None
        if status != 200:
            raise ApiError(404 if status == 404 else 502, body.decode(errors="replace"))
        try:
            return MetricsSample(**json.loads(body))
        except (ValueError, TypeError) as exc:
            raise ApiError(502, f"the sandbox's node answered metrics this replica cannot read: {exc}") from None

    async def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]:
        """The Pod's Kubernetes Events (the node records Started, Paused, Resumed, Killing, Died)."""
        selector = f"involvedObject.name={sandbox_id},involvedObject.kind=Pod"
        try:
            found = await self.kube.get(path_of("events", self.namespace), fieldSelector=selector)
        except KubeError as exc:
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        items = found.get("items", [])
        if not items:
            await self._pod(sandbox_id)  # 404 for a sandbox that never existed
        out = []
        for event in items:
            out.append((_event_time(event), str(event.get("reason", "")).lower(), event.get("message")))
        return sorted(out)

    async def lifecycle(self, query: LifecycleQuery) -> list[LifecycleEvent]:
        """E2B's lifecycle events from the Events the nodes record on sandbox Pods (``Started``,
        ``Paused``, ``Resumed``, ``Killing``, ``Died``). The API server keeps Events for its
        ``--event-ttl`` (an hour by default), not 7 days; a Pod's template is known while it exists."""
        selector = "involvedObject.kind=Pod"
        if query.sandbox_id is not None:
            selector += f",involvedObject.name={query.sandbox_id}"
        try:
            found = await self.kube.get(path_of("events", self.namespace), fieldSelector=selector)
            listed = await self.kube.get(self._path(), labelSelector=f"{pods.MANAGED_LABEL}=true")
        except KubeError as exc:
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        templates = {
            p["metadata"]["name"]: str(p["spec"]["containers"][0].get("image", "")) for p in listed.get("items", [])
        }
        recorded = []
        for event in found.get("items", []):
            kind = _LIFECYCLE_REASONS.get(str(event.get("reason", "")))
            if kind is None or (event.get("source") or {}).get("component") != "sandboxd-node":
                continue
            at = _recorded_at(event)
            name = str(event["involvedObject"].get("name", ""))
            pod_uid = str(event["involvedObject"].get("uid", ""))
            recorded.append((at, str(event["metadata"].get("name", "")), name, pod_uid, kind, event))
        recorded.sort()
        runs: dict[str, str] = {}
        events = []
        for at, key, name, pod_uid, kind, event in recorded:
            if kind in ("created", "resumed") or name not in runs:
                runs[name] = f"{pod_uid}/{key}"
            if kind in query.kinds:
                message = event.get("message")
                events.append(LifecycleEvent(key, name, at, kind, message, runs[name], templates.get(name), None))
        if not query.ascending:
            events.reverse()
        return events[query.offset : query.offset + query.limit]

    async def list_page(self, query: ListQuery) -> tuple[list[SandboxRow], str | None]:
        if not query.descending:
            raise ApiError(400, "'order=asc' is not supported by the kubernetes backend (it pages newest first)")
        selector = [f"{pods.MANAGED_LABEL}=true", f"{pods.STATE_LABEL} in ({','.join(sorted(set(query.states)))})"]
        if query.template:
            selector.append(f"{pods.TEMPLATE_LABEL}={pods.label_value(query.template)}")
        selector += pods.metadata_selector(query.metadata)
        params: dict[str, Any] = {
            "labelSelector": ",".join(selector),
            "fieldSelector": "status.phase=Running",
            "limit": query.limit,
        }
        if query.cursor:
            params["continue"] = query.cursor
        try:
            found = await self.kube.get(self._path(), **params)
        except KubeError as exc:
            if exc.status == 410:
                raise ApiError(400, "'nextToken' has expired: list again from the start") from None
            if exc.status in (400, 422):
                raise ApiError(400, f"bad list query: {exc.body.get('message', exc)}") from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        rows = [self.row(pod) for pod in found.get("items", []) if not pod["metadata"].get("deletionTimestamp")]
        next_cursor = found.get("metadata", {}).get("continue") or None
        return [r for r in rows if query.keep(r)], next_cursor

    # -------------------------------------------------------------------------------- network

    def network_config(self, sandbox_id: str) -> NetworkConfig:
        """The settings in the Pod's network annotation as last seen (what the detail shows and the
        proxy's host mask and HTTPS ports use; the defaults for a Pod not seen yet)."""
        try:
            return pods.parse_network(self.network_notes.get(sandbox_id))
        except ApiError:
            return NetworkConfig()

    async def traffic_token(self, sandbox_id: str) -> str | None:
        """The token its URLs need (``allowPublicTraffic: false`` in its Pod's network annotation), or
        None when they are public. A Pod this replica has not seen yet (created through another one a
        moment ago) is read first, so its first request is not let through unchecked; a read that
        fails (the API server's 5xx, or out of reach) is a 503, never "public": the proxy's next read
        (to connect) could succeed, and the request would reach the port without the token."""
        if sandbox_id not in self.identities:
            try:
                self._saw_network(await self._cached_pod(sandbox_id))
            except ApiError as exc:
                if exc.status != 404:
                    raise
            except (OSError, aiohttp.ClientError) as exc:  # no answer at all: _pod maps only the API's
                raise ApiError(503, f"the Kubernetes API server failed: {exc!r}") from None
        identity = self.identities.get(sandbox_id)
        if identity is None:
            return None  # no such sandbox: the proxy answers that next
        try:
            public = pods.parse_network(self.network_notes.get(sandbox_id)).allow_public_traffic is not False
        except ApiError:
            public = False  # an annotation that does not parse (edited by hand) asks for the token: fail closed
        return None if public else pods.traffic_token(self.token_key, *identity)

    async def update_network(self, sandbox_id: str, update: NetworkConfig) -> None:
        """E2B's full replace of a running sandbox's egress: the Pod's network annotation rewritten
        (guarded by resourceVersion), then the node's answer awaited in the Network condition (a
        refusal there is this call's 400)."""
        pods.check_network(update)
        await self.secrets.check_references(update)

        def change(row: SandboxRow, pod: dict[str, Any]) -> dict[str, Any]:
            if row.state != "running":
                raise ApiError(
                    409, f'Sandbox "{sandbox_id}" is {row.state}: only a running sandbox\'s network can be updated'
                )
            try:
                current = pods.network_of(pod)[0]
            except ApiError:  # written by someone else; replaced whole anyway
                current = NetworkConfig()
            return {"annotations": {pods.NETWORK_ANNOTATION: pods.network_annotation(current.with_egress(update))}}

        patched = await self._guarded_patch(sandbox_id, change)
        digest = pods.network_digest((patched["metadata"].get("annotations") or {}).get(pods.NETWORK_ANNOTATION))
        if _condition(patched, pods.NETWORK_CONDITION) == "False" and _condition_message(
            patched, pods.NETWORK_CONDITION
        ).startswith(digest):
            # The node refused these very settings before, and a refusal may pass (a secret created
            # since, nftables failing no more); an unchanged annotation is no event for the node,
            # so its old answer would be this call's forever: ask it again.
            patched = await self._ask_network_again(sandbox_id)

        def superseded(pod: dict[str, Any]) -> bool:
            """Another writer replaced the annotation: the node answers only the newest."""
            return (
                pods.network_digest((pod["metadata"].get("annotations") or {}).get(pods.NETWORK_ANNOTATION)) != digest
            )

        def answered(pod: dict[str, Any]) -> bool:
            if pod.get("status", {}).get("phase") in ("Failed", "Succeeded") or superseded(pod):
                return True
            return _condition_message(pod, pods.NETWORK_CONDITION).startswith(digest)

        try:
            pod = await self._wait_for(sandbox_id, answered, TRANSITION_TIMEOUT_S, patched)
        except TimeoutError:
            raise ApiError(
                503,
                f"the node of sandbox {sandbox_id} did not apply its network settings within "
                f"{TRANSITION_TIMEOUT_S:.0f}s",
            ) from None
        if pod is None:
            raise not_found(sandbox_id)
        self._live(pod)
        if superseded(pod):
            raise ApiError(409, f'Sandbox "{sandbox_id}"\'s network settings were changed meanwhile; try again')
        if _condition(pod, pods.NETWORK_CONDITION) != "True":
            message = _condition_message(pod, pods.NETWORK_CONDITION).partition(": ")[2]
            raise ApiError(400, f"the sandbox's node refused the network settings: {message}")

    async def _ask_network_again(self, sandbox_id: str) -> dict[str, Any]:
        """Replace the node's answer in the Pod's Network condition by one that answers no settings:
        the node applies the annotation again on the event this write makes."""
        condition = {
            "type": pods.NETWORK_CONDITION,
            "status": "Unknown",
            "reason": "Requested",
            "message": "asked to apply the settings again",
            "lastTransitionTime": pods.iso(time.time()),
        }
        try:
            return await self.kube.patch(self._path(sandbox_id, "status"), {"status": {"conditions": [condition]}})
        except KubeError as exc:
            if exc.status == 404:
                raise not_found(sandbox_id) from None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None

    # ------------------------------------------------------------------------------ snapshots

    async def snapshot(self, sandbox_id: str, name: str | None) -> TemplateRow:
        raise ApiError(
            400,
            "snapshots and forks are not available with --backend kubernetes (yet): a node's template store is its own",
        )

    async def snapshots(self, sandbox_id: str | None) -> list[TemplateRow]:
        return []

    # ---------------------------------------------------------------------------------- proxy

    def _node_ready(self, node_name: str | None) -> bool:
        node = self.nodes.items.get(f"/{node_name}") if node_name else None
        return node is not None and _condition(node, "Ready") == "True"

    def _endpoint(self, pod: dict[str, Any]) -> tuple[str, int]:
        node_name = pod.get("spec", {}).get("nodeName")
        node = self.nodes.items.get(f"/{node_name}")
        if node is None:
            raise ApiError(502, f"The sandbox was not found: its node {node_name} is gone")
        address = next(
            (a["address"] for a in node.get("status", {}).get("addresses", []) if a.get("type") == "InternalIP"),
            None,
        )
        port = (node["metadata"].get("annotations") or {}).get(pods.TUNNEL_PORT_ANNOTATION)
        if address is None or port is None or not port.isdigit():
            raise ApiError(502, f"The sandbox was not found: node {node_name} publishes no tunnel")
        return address, int(port)

    async def _cached_pod(self, sandbox_id: str) -> dict[str, Any]:
        pod = self.pods.items.get(f"{self.namespace}/{sandbox_id}")
        if pod is None or pods.sandbox_id_of(pod) is None:
            pod = await self._pod(sandbox_id)  # created through another replica a moment ago
        return pod

    async def open_socket(self, sandbox_id: str, port: int) -> socket.socket:
        try:
            pod = await self._cached_pod(sandbox_id)
            host, tunnel_port = self._endpoint(pod)
        except ApiError as exc:
            raise ConnectionRefusedError(exc.message) from None
        local_id = pods.sandbox_id_of(pod)
        if local_id is None:
            raise ConnectionRefusedError(f"sandbox {sandbox_id} is not running")
        try:
            return await open_tunnel(host, tunnel_port, self.tunnel_key, local_id, port)
        except TunnelError as exc:
            raise ConnectionRefusedError(exc.message) from None

    def kept_socket(self, sandbox_id: str, port: int) -> socket.socket | None:
        return None  # each connection is a new tunnel to the node; none is kept

    async def ensure_reachable(self, sandbox_id: str) -> None:
        """Running, or resumed now if paused with auto-resume; else the E2B edge's 502."""
        try:
            pod = await self._cached_pod(sandbox_id)
            row = self._live(pod)
        except ApiError as exc:
            reason = exc.message.partition(": ")[2] if exc.status == 404 and ": " in exc.message else ""
            raise ApiError(502, f"The sandbox was not found{': ' + reason if reason else ''}") from None
        if row.state == "paused":
            if row.auto_resume:
                with contextlib.suppress(ApiError):
                    await self.resume(sandbox_id, None)
                return
            raise ApiError(502, "The sandbox was not found: it is paused (Sandbox.connect resumes it)")
        node = pod.get("spec", {}).get("nodeName")
        if not self._node_ready(node):
            raise ApiError(502, f"The sandbox was not found: its node {node} is not ready")

    # ------------------------------------------------------------------------ the leader's work

    async def _elect(self) -> None:
        from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
        from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

        async def lead() -> None:
            self.leading = True
            log.info("%s leads: enforcing timeouts and lost nodes", self.identity)
            try:
                await self._reap()
            finally:
                self.leading = False

        async def follow() -> None:
            self.leading = False

        lock = LeaseLock(LEASE_NAME, self.namespace, self.identity, self.kube.api)
        config = electionconfig.Config(lock, LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S, lead, follow)
        while True:
            try:
                await leaderelection.LeaderElection(config).run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader election failed: %r", exc)
            self.leading = False
            await asyncio.sleep(RETRY_PERIOD_S)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.time()
            for pod in list(self.pods.items.values()):
                meta = pod["metadata"]
                name = meta["name"]
                if name in self.busy or meta.get("deletionTimestamp"):
                    continue
                phase = pod.get("status", {}).get("phase")
                if phase not in ("Running", "Pending"):
                    continue
                node = pod.get("spec", {}).get("nodeName")
                # Pending and bound: the node died before it started the sandbox, and no one else
                # will (its create starts a new Pod; it waited START_TIMEOUT_S for nothing). Only a
                # node this replica knows and sees NotReady: one it has not heard of yet may have
                # registered a moment ago, and the scheduler may bind to it before the watch says so.
                lost = phase == "Running" or f"/{node}" in self.nodes.items
                if node and lost and not self._node_ready(node):
                    self._start_reaping(name, self._node_lost(pod, node))
                    continue
                if phase != "Running":
                    continue
                notes = meta.get("annotations") or {}
                if (meta.get("labels") or {}).get(pods.STATE_LABEL) == "paused" or pods.END_AT_ANNOTATION not in notes:
                    continue
                if pods.parse_time(notes[pods.END_AT_ANNOTATION]) > now:
                    continue
                if notes.get(pods.ON_TIMEOUT_ANNOTATION) == "pause":
                    mode = notes.get(pods.PAUSE_MODE_ANNOTATION, "full")
                    self._start_reaping(name, self.pause(name, mode, "timed out (onTimeout=pause)"))
                else:
                    self._start_reaping(name, self.kill(name, "timed out"))

    def _start_reaping(self, name: str, work: Any) -> None:
        self.busy.add(name)

        async def run() -> None:
            try:
                await work
            except ApiError as exc:
                log.info("timing out %s: %s", name, exc.message)
            except Exception:
                log.exception("timing out %s failed", name)
            finally:
                self.busy.discard(name)

        self._spawn(run())

    async def _node_lost(self, pod: dict[str, Any], node_name: str) -> None:
        """Mark a Pod whose node stopped reporting as Failed, with the node controller's words."""
        node = self.nodes.items.get(f"/{node_name}")
        ready: dict[str, Any] = next(
            (c for c in (node or {}).get("status", {}).get("conditions", []) if c.get("type") == "Ready"), {}
        )
        message = f"its node {node_name} is not ready: {ready.get('message') or 'the node is gone'}"
        now = pods.iso(time.time())
        status = {
            "phase": "Failed",
            "reason": "NodeLost",
            "message": message,
            "conditions": [{"type": "Ready", "status": "False", "reason": "NodeLost", "lastTransitionTime": now}],
        }
        meta = pod["metadata"]
        with contextlib.suppress(KubeError):
            await self.kube.patch(path_of("pods", meta["namespace"], meta["name"], "status"), {"status": status})
        log.warning("sandbox %s: %s", meta["name"], message)


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return str(condition.get("status"))
    return None


def _version(pod: dict[str, Any]) -> int | None:
    """The Pod's resourceVersion as a number (etcd's revision, which orders a watch's versions);
    None when the server's is not one."""
    try:
        return int(pod["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _condition_message(obj: dict[str, Any], kind: str) -> str:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return str(condition.get("message", ""))
    return ""


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return str(condition.get("message", "unschedulable"))
    return None


def _settled(pod: dict[str, Any]) -> bool:
    """Running with its sandbox id reported, ended, or refused by the scheduler."""
    phase = pod.get("status", {}).get("phase")
    if phase == "Running":
        return pods.sandbox_id_of(pod) is not None
    return phase in ("Failed", "Succeeded") or _unschedulable(pod) is not None
