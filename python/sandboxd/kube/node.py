"""``sandboxd node``: one machine's sandboxes as a Kubernetes Node (the virtual-kubelet pattern).

Like a virtual-kubelet provider, it registers a Node (capacity: CPU, memory, ephemeral storage,
pods; the :data:`~.pods.NODE_LABEL` label and the :data:`~.pods.NODE_TAINT` taint so that only
sandbox Pods land here), renews its Lease in ``kube-node-lease`` every
:data:`LEASE_RENEW_S` and posts its status, and watches the Pods bound to it
(``spec.nodeName=<name>``). Each Pod becomes a sandbox through the single-machine runtime's
lifecycle code (:class:`~sandboxd.runtime.manager.SandboxManager`: the same jail, zygote, agent and
re-adoption after a restart) and its status follows the sandbox: ``Running`` with Ready
conditions, ``Failed`` (reason ``SandboxDied``, ``UnknownTemplate``, ``CreateFailed``,
``SandboxLost``) or ``Succeeded``. The Pod's ``sandboxd.io/state`` label asks for pause and
resume; the node reports the result in the ``sandboxd.io/Paused`` condition. Deleting the Pod
kills the sandbox, after which the node removes the Pod (as a kubelet does, with grace 0).

Sandboxes get the single machine's networking (:class:`~sandboxd.runtime.network.SandboxNetworks`:
a link each, the same firewall, egress controls and helper, all named from the data dir so nodes
sharing a machine never collide); the Pod's ``podIPs`` are the sandbox's addresses.

Its tunnel (:mod:`.tunnel`) lets ``serve`` replicas reach ports inside these sandboxes. Nothing
here enforces timeouts: that is one ``serve`` replica's job (:mod:`.backend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import platform
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxd import __version__, _core
from sandboxd.agent.http_server import bind_listeners
from sandboxd.runtime import host
from sandboxd.runtime.debian import DEFAULT_MIRROR
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.manager import CreateRequest, Limits, SandboxManager
from sandboxd.runtime.network import NetworkConfig, NetworkOptions, SandboxNetworks
from sandboxd.runtime.network.policy import secret_references
from sandboxd.runtime.store import DATABASE, Store
from sandboxd.runtime.templates import Templates, default_store_dir

from . import pods
from .client import MERGE, Informer, Kube, KubeError, path_of
from .e2b_secrets import SECRETS_NAME, KubeSecrets, NodeCopy
from .secrets import NODE_SECRET, await_secret
from .tunnel import TunnelServer

log = logging.getLogger("sandboxd.kube.node")

LEASE_DURATION_S = 40
"""The kubelet's default node lease duration (``nodeLeaseDurationSeconds``)."""

LEASE_RENEW_S = 2.0
"""How often the lease is renewed: well inside the node controller's grace period (8 s in the
local cluster, 50 s by default), so only a dead node misses it."""

STATUS_INTERVAL_S = 10.0
"""Node status heartbeat, the kubelet's ``nodeStatusUpdateFrequency``."""

NODE_SANDBOX_TIMEOUT_S = 10 * 365 * 24 * 3600
"""The local lifetime given to each sandbox: timeouts are enforced by ``serve`` (one replica, by
Lease) on the Pod, never by the node's local reaper."""

KUBELET_VERSION = f"v1.34.4-sandboxd-{__version__}"
"""What the Node reports as its kubelet version: the Kubernetes release whose node API it speaks
(tested against that control plane), tagged with sandboxd's own version, as virtual-kubelet does."""

_SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass
class NodeOptions:
    """``sandboxd node`` flags."""

    name: str
    data_dir: Path
    namespace: str = "sandboxd"
    kubeconfig: Path | None = None
    address: str = "127.0.0.1"
    tunnel_port: int = 10250
    capacity_cpu: int = field(default_factory=lambda: os.cpu_count() or 1)
    capacity_memory_mb: int = field(default_factory=lambda: _host_memory_mb())
    max_sandboxes: int = 110
    limits: Limits = field(default_factory=Limits)
    template_store: Path | None = None
    """Template layers (None: ``<data dir>/templates``), shareable with other runtimes and nodes."""
    debian_mirror: str = DEFAULT_MIRROR
    id_registry: Path = field(default_factory=lambda: Path(_core.DEFAULT_ID_REGISTRY))
    """The host-wide registry of sandbox id ranges, shared with every runtime and node on the host."""
    network: NetworkOptions | None = field(default_factory=NetworkOptions)
    """Sandbox networking, as ``sandboxd serve`` sets it up; None gives sandboxes loopback only
    (``--no-network``). Its address block, nftables table, link names and helper are derived from the
    data dir and the Node's name (:func:`node_key`), so several nodes (and runtimes) on one machine
    never share them, even when each container sees its own host folder at the same path."""


def _host_memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) >> 20


def _now() -> str:
    return pods.iso(time.time())


def _micro_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"


class SandboxNode:
    """The provider: Pods bound to this Node in, sandboxes and Pod statuses out."""

    def __init__(
        self, options: NodeOptions, kube: Kube, manager: SandboxManager, store: Store, listeners: list[socket.socket]
    ) -> None:
        self.options = options
        self.kube = kube
        self.manager = manager
        self.store = store
        self.name = options.name
        self.token_key = b""
        self.tunnel: TunnelServer | None = None
        self.listeners = listeners
        """The tunnel's listening sockets, bound before the sandbox firewall (see :func:`_run`)."""
        self.tunnel_port = int(listeners[0].getsockname()[1])
        self.pods = Informer(kube, "/api/v1/pods", fieldSelector=f"spec.nodeName={options.name}")
        self.secrets = KubeSecrets(kube, options.namespace)
        self.secret_watch = Informer(
            kube, path_of("secrets", options.namespace), fieldSelector=f"metadata.name={SECRETS_NAME}"
        )
        """E2B's secrets, mirrored into this node's database for its egress proxy (see :mod:`.e2b_secrets`)."""
        self.secrets_copy = NodeCopy(manager.secrets)
        self.local: dict[str, str] = {}
        """Pod key (namespace/name) -> local sandbox id, for the sandboxes this node runs."""
        self.latest: dict[str, dict[str, Any] | None] = {}
        """The newest version of each Pod waiting to be reconciled (None: it was deleted)."""
        self.working: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.node_uid = ""

    # ----------------------------------------------------------------------------- start/stop

    async def start(self) -> None:
        keys = await await_secret(self.kube, self.options.namespace, NODE_SECRET)
        self.token_key = keys["token-key"].encode()
        self.tunnel = TunnelServer(keys["tunnel-key"], self._open_socket, self.manager_metrics)
        await self.tunnel.start(self.listeners)
        for row in self.store.live():
            key = row.metadata.get("k8s.pod")
            if key:
                self.local[key] = row.id
        self.manager.on_gone.append(self._sandbox_gone)
        await self._register()
        self._spawn(self._lease_loop())
        self._spawn(self._status_loop())
        self.secret_watch.handlers.append(self._secrets_event)
        self.secret_watch.start()
        self.pods.handlers.append(self._pod_event)
        self.pods.start()
        await asyncio.gather(self.pods.synced.wait(), self.secret_watch.synced.wait())
        if not self.secret_watch.items:
            # No Secret (deleted while this node was down): no event will say so, and the copy kept
            # from the last run must not go on filling header rules with values the cluster dropped.
            self._secrets_event("DELETED", {})
        self._spawn(self._kill_orphans())
        log.info("node %s ready: tunnel on %s:%d", self.name, self.options.address, self.tunnel_port)

    async def stop(self) -> None:
        await self.pods.stop()
        await self.secret_watch.stop()
        for task in list(self.tasks):
            task.cancel()
        if self.tunnel is not None:
            await self.tunnel.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---------------------------------------------------------------------------------- Node

    def _node_status(self) -> dict[str, Any]:
        o = self.options
        disk = shutil.disk_usage(o.data_dir)
        capacity = {
            "cpu": str(o.capacity_cpu),
            "memory": f"{o.capacity_memory_mb}Mi",
            "ephemeral-storage": str(disk.total),
            "pods": str(o.max_sandboxes),
        }
        now = _now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "sandboxd node is posting ready status",
            "lastHeartbeatTime": now,
        }
        conditions = [ready] + [
            {"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "message": msg, "lastHeartbeatTime": now}
            for kind, ok, msg in (
                ("MemoryPressure", "SufficientMemory", "sandboxes stay within their memory limits"),
                ("DiskPressure", "NoDiskPressure", f"{disk.free >> 20} MiB free in the data dir"),
                ("PIDPressure", "SufficientPID", "sandboxes stay within their pids limits"),
            )
        ]
        uname = platform.uname()
        return {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": o.address}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.tunnel_port}},
            "nodeInfo": {
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": _boot_id(),
                "kernelVersion": uname.release,
                "osImage": "sandboxd",
                "containerRuntimeVersion": f"sandboxd://{__version__}",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            },
        }

    def _node_meta(self) -> dict[str, Any]:
        return {
            "labels": {
                "kubernetes.io/hostname": self.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "type": "virtual-kubelet",
                pods.NODE_LABEL: "true",
            },
            "annotations": {pods.TUNNEL_PORT_ANNOTATION: str(self.tunnel_port)},
        }

    async def _register(self) -> None:
        """Create the Node, or take over the one a previous run of this node left."""
        spec = {"taints": [{"key": pods.NODE_TAINT, "value": "true", "effect": "NoSchedule"}]}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, **self._node_meta()}, "spec": spec}
        try:
            node = await self.kube.create(path_of("nodes"), body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            node = await self.kube.patch(path_of("nodes", name=self.name), {"metadata": self._node_meta()}, MERGE)
        self.node_uid = node["metadata"]["uid"]
        await self._post_status()

    async def _post_status(self) -> None:
        await self.kube.patch(path_of("nodes", name=self.name, sub="status"), {"status": self._node_status()})

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            try:
                await self._post_status()
            except Exception as exc:
                log.warning("node status update failed: %r", exc)

    async def _lease_loop(self) -> None:
        path = path_of("leases", "kube-node-lease", self.name)
        while True:
            try:
                try:
                    await self.kube.patch(path, {"spec": {"renewTime": _micro_now()}}, MERGE)
                except KubeError as exc:
                    if exc.status != 404:
                        raise
                    owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}
                    lease = {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "ownerReferences": [owner]},
                        "spec": {
                            "holderIdentity": self.name,
                            "leaseDurationSeconds": LEASE_DURATION_S,
                            "renewTime": _micro_now(),
                        },
                    }
                    await self.kube.create(path_of("leases", "kube-node-lease"), lease)
            except Exception as exc:
                log.warning("node lease renewal failed: %r", exc)
            await asyncio.sleep(LEASE_RENEW_S)

    # --------------------------------------------------------------------------- Pod events

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        key = Informer.key(pod)
        self.latest[key] = None if kind == "DELETED" else pod
        if key not in self.working:
            self.working.add(key)
            self._spawn(self._work(key))

    def _secrets_event(self, kind: str, secret: dict[str, Any]) -> None:
        self.secrets_copy.apply(secret, deleted=kind == "DELETED")

    async def _fresh_secrets(self, network: NetworkConfig) -> None:
        """Read the cluster's secrets now when ``network`` names one this node's copy lacks (created
        a moment ago, through a replica; the watch may not have brought it yet)."""
        if secret_references(network) - self.manager.secrets.names():
            try:
                self.secrets_copy.apply(await self.secrets.current())
            except Exception as exc:
                # The API server failed or timed out (not only a non-2xx answer): go on with the copy
                # as it is. A secret still missing from it fails the create or update with a 400 that
                # names it, where an escaping error left the Pod Pending with no answer at all.
                log.warning("reading the cluster's secrets failed: %r", exc)

    def _sandbox_gone(self, sandbox_id: str) -> None:
        """The manager's callback (kill, pause, or death): look at that Pod again. Also while a
        reconcile of it is under way: that one may have read the sandbox's row before it went, so
        the Pod goes back in its queue (:meth:`_work` reconciles it after), unless a newer version of
        it waits there already. Before, a death during a reconcile was dropped, and the Pod said
        Running until something else changed it."""
        for key, local_id in self.local.items():
            if local_id == sandbox_id and key in self.pods.items:
                if key not in self.latest:
                    self._pod_event("REFRESH", self.pods.items[key])
                return

    async def _work(self, key: str) -> None:
        """One worker per Pod at a time, always on its newest version (a work queue of one)."""
        try:
            while key in self.latest:
                pod = self.latest.pop(key)
                try:
                    await self._reconcile(key, pod)
                except Exception:
                    log.exception("reconciling pod %s failed", key)
        finally:
            self.working.discard(key)

    async def _reconcile(self, key: str, pod: dict[str, Any] | None) -> None:
        local_id = self.local.get(key) or (pods.sandbox_id_of(pod) if pod else None)
        row = self.store.get(local_id) if local_id else None
        live = row is not None and row.state in ("running", "paused")
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            if live and local_id:
                await self._kill(local_id, "its Pod was deleted")
                self._event(pod, "Killing", "Stopped the sandbox: its Pod was deleted")
            self.local.pop(key, None)
            if pod is not None:
                await self._finish_deletion(pod)
            return
        phase = pod.get("status", {}).get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            if live and local_id:
                reason = pod["status"].get("message") or pod["status"].get("reason") or phase
                await self._kill(local_id, f"its Pod is {phase}: {reason}")
            return
        if row is None:
            if phase == "Running":
                await self._fail(
                    pod, "SandboxLost", "this node no longer has the Pod's sandbox (its data dir was reset)"
                )
            else:
                await self._create(key, pod)
            return
        if row.state == "ended":
            await self._ended(pod, row.ended_reason or "it ended")
            return
        await self._follow_state(pod, row.id, row.state)

    async def _kill(self, local_id: str, reason: str) -> None:
        with contextlib.suppress(ApiError):
            await self.manager.kill(local_id, reason)

    async def _finish_deletion(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            await self.kube.delete(path_of("pods", meta["namespace"], meta["name"]), body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    async def _kill_orphans(self) -> None:
        """Sandboxes whose Pod was deleted while this node was down."""
        for key, local_id in list(self.local.items()):
            if key not in self.pods.items:
                row = self.store.get(local_id)
                if row is not None and row.state in ("running", "paused"):
                    log.info("killing sandbox %s: its Pod %s is gone", local_id, key)
                    await self._kill(local_id, "its Pod was deleted while the node was down")
                self.local.pop(key, None)

    # ---------------------------------------------------------------------------------- create

    async def _create(self, key: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        containers = spec.get("containers") or []
        if len(containers) != 1:
            await self._fail(pod, "CreateFailed", f"a sandbox Pod has one container, this one has {len(containers)}")
            return
        container = containers[0]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "valueFrom" in item:
                await self._fail(pod, "CreateFailed", f"env {item.get('name')}: valueFrom is not supported")
                return
            env[item["name"]] = item.get("value", "")
        limits = (container.get("resources") or {}).get("limits") or {}
        try:
            cpus = max(1, math.ceil(pods.quantity_cores(limits["cpu"]))) if "cpu" in limits else None
            memory = max(16, pods.quantity_bytes(limits["memory"]) >> 20) if "memory" in limits else None
        except ValueError as exc:
            await self._fail(pod, "CreateFailed", f"resources.limits: {exc}")
            return
        try:
            network, digest = pods.network_of(pod)
        except ApiError as exc:
            await self._fail(pod, "CreateFailed", f"network settings: {exc.message}")
            return
        await self._fresh_secrets(network)
        annotations = meta.get("annotations") or {}
        name = meta["name"]
        existing = self.store.get(name)
        request = CreateRequest(
            template=str(container.get("image", "")),
            timeout=NODE_SANDBOX_TIMEOUT_S,
            metadata={"k8s.pod": key, "k8s.uid": meta["uid"]},
            env_vars=env,
            pause_memory=annotations.get(pods.PAUSE_MODE_ANNOTATION, "full") != "filesystem",
            sandbox_id=name if _SANDBOX_ID.fullmatch(name) and existing is None else None,
            access_token=pods.access_token(self.token_key, meta["namespace"], name, meta["uid"]),
            cpu_count=cpus,
            memory_mb=memory,
            network=network,
        )
        try:
            row = await self.manager.create(request)
        except ApiError as exc:
            reason = {404: "UnknownTemplate", 403: "OutOfCapacity"}.get(exc.status, "CreateFailed")
            await self._fail(pod, reason, exc.message)
            return
        self.local[key] = row.id
        started = pods.iso(row.started_at)
        status = {
            "phase": "Running",
            "hostIP": self.options.address,
            "hostIPs": [{"ip": self.options.address}],
            "startTime": started,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": started}
                for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
            ]
            + [
                {"type": pods.PAUSED_CONDITION, "status": "False", "lastTransitionTime": started, "reason": "Running"},
                _network_condition(digest, None),
            ],
            "containerStatuses": [
                {
                    "name": container.get("name", pods.CONTAINER),
                    "image": request.template,
                    "imageID": f"sandboxd://template/{row.template_id}",
                    "containerID": f"sandboxd://{row.id}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        }
        ips = self._sandbox_ips(row.id)
        if ips:
            status.update(podIP=ips[0], podIPs=[{"ip": ip} for ip in ips])
        await self._patch_status(pod, status)
        self._event(pod, "Started", f"Started sandbox {row.id} from template {request.template}")
        # A desired state that changed while we were booting is picked up on the next event.
        if (meta.get("labels") or {}).get(pods.STATE_LABEL, "running") == "paused":
            self._pod_event("REFRESH", self.pods.items.get(key, pod))

    # ----------------------------------------------------------------------------- follow state

    async def _follow_state(self, pod: dict[str, Any], local_id: str, state: str) -> None:
        desired = (pod["metadata"].get("labels") or {}).get(pods.STATE_LABEL, "running")
        if desired == "paused" and state == "running":
            mode = (pod["metadata"].get("annotations") or {}).get(pods.PAUSE_MODE_ANNOTATION, "full")
            await self.manager.pause(local_id, "filesystem" if mode == "filesystem" else "full", "its Pod asked")
            self._event(pod, "Paused", f"Paused the sandbox ({mode})")
            state = "paused"
        elif desired == "running" and state == "paused":
            await self.manager.resume(local_id, None)
            self._event(pod, "Resumed", "Resumed the sandbox")
            state = "running"
        paused = "True" if state == "paused" else "False"
        current: dict[str, Any] = next(
            (c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") == pods.PAUSED_CONDITION), {}
        )
        if current.get("status") != paused:
            condition = {
                "type": pods.PAUSED_CONDITION,
                "status": paused,
                "lastTransitionTime": _now(),
                "reason": "Paused" if paused == "True" else "Running",
            }
            ready = {"type": "Ready", "status": "False" if paused == "True" else "True", "lastTransitionTime": _now()}
            if paused == "True":
                ready.update(reason="SandboxPaused", message="the sandbox is paused")
            await self._patch_status(pod, {"conditions": [condition, ready]})
        if state == "running":
            await self._follow_network(pod, local_id)

    async def _follow_network(self, pod: dict[str, Any], local_id: str) -> None:
        """Apply a changed :data:`~.pods.NETWORK_ANNOTATION` to the running sandbox (E2B's
        ``update_network``: its egress replaced whole) and answer in the Network condition. Settings
        the node refuses leave the sandbox's rules as they were."""
        current = _condition_of(pod, pods.NETWORK_CONDITION)
        try:
            config, digest = pods.network_of(pod)
        except ApiError as exc:
            text = (pod["metadata"].get("annotations") or {}).get(pods.NETWORK_ANNOTATION)
            digest = pods.network_digest(text)
            if not str(current.get("message", "")).startswith(digest):
                await self._network_refused(pod, digest, exc.message)
            return
        if str(current.get("message", "")).startswith(digest):
            return
        applied = self.manager.network_config(local_id)
        if applied.with_egress(config) != applied:
            await self._fresh_secrets(config)
            try:
                await self.manager.update_network(local_id, config)
            except ApiError as exc:
                await self._network_refused(pod, digest, exc.message)
                return
            except OSError as exc:  # nftables refused the change: the old rules stay in force
                await self._network_refused(pod, digest, str(exc))
                return
            self._event(pod, "NetworkUpdated", "Applied the sandbox's new network settings")
        await self._patch_status(pod, {"conditions": [_network_condition(digest, None)]})

    async def _network_refused(self, pod: dict[str, Any], digest: str, message: str) -> None:
        log.warning("pod %s: network settings refused: %s", Informer.key(pod), message)
        self._event(pod, "NetworkRefused", f"The sandbox's network settings were not applied: {message}", warning=True)
        await self._patch_status(pod, {"conditions": [_network_condition(digest, message)]})

    def _sandbox_ips(self, local_id: str) -> list[str]:
        """The sandbox's own addresses on its link (the Pod's ``podIPs``), none without networking."""
        networks = self.manager.networks
        row = networks.info(local_id) if networks is not None else None
        if networks is None or networks.pool is None or row is None or row.slot is None:
            return []
        slot = networks.pool.slot(row.slot)
        return [str(slot.sandbox_v4), str(slot.sandbox_v6)]

    # ---------------------------------------------------------------------------------- ended

    async def _ended(self, pod: dict[str, Any], reason: str) -> None:
        match = re.search(r"exit status (\d+)", reason)
        code = int(match.group(1)) if match else 1
        phase = "Succeeded" if code == 0 else "Failed"
        await self._terminal(pod, phase, "SandboxDied", reason, code)
        self._event(pod, "Died", f"The sandbox ended: {reason}", warning=True)

    async def _fail(self, pod: dict[str, Any], reason: str, message: str) -> None:
        log.warning("pod %s failed: %s: %s", Informer.key(pod), reason, message)
        await self._terminal(pod, "Failed", reason, message, 1)
        self._event(pod, reason, message, warning=True)

    async def _terminal(self, pod: dict[str, Any], phase: str, reason: str, message: str, code: int) -> None:
        now = _now()
        containers = pod["spec"].get("containers") or [{}]
        started = next(
            (
                s.get("state", {}).get("running", {}).get("startedAt")
                for s in pod.get("status", {}).get("containerStatuses") or []
            ),
            None,
        )
        status = {
            "phase": phase,
            "reason": reason,
            "message": message,
            "conditions": [
                {"type": t, "status": "False", "reason": reason, "lastTransitionTime": now}
                for t in ("ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": containers[0].get("name", pods.CONTAINER),
                    "image": containers[0].get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": "Completed" if code == 0 else "Error",
                            "message": message,
                            "startedAt": started or now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
        await self._patch_status(pod, status)

    async def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await self.kube.patch(path_of("pods", meta["namespace"], meta["name"], "status"), {"status": status})
        except KubeError as exc:
            if exc.status != 404:
                raise

    def _event(self, pod: dict[str, Any] | None, reason: str, message: str, warning: bool = False) -> None:
        """A Kubernetes Event on the Pod, as the kubelet records them (best effort, off the path)."""
        if pod is None:
            return
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta['name']}.",
                "namespace": meta["namespace"],
                "annotations": {pods.RECORDED_AT_ANNOTATION: f"{time.time():.6f}"},
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": "sandboxd-node", "host": self.name},
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
            "count": 1,
        }

        async def post() -> None:
            try:
                await self.kube.create(path_of("events", meta["namespace"]), body)
            except Exception as exc:
                log.debug("event for %s not recorded: %r", meta["name"], exc)

        self._spawn(post())

    # --------------------------------------------------------------------------------- tunnel

    async def _open_socket(self, sandbox_id: str, port: int) -> socket.socket:
        try:
            await self.manager.ensure_reachable(sandbox_id)
        except ApiError as exc:
            raise ConnectionRefusedError(exc.message) from None
        return await self.manager.open_socket(sandbox_id, port)

    async def manager_metrics(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's newest sample (a running sandbox's is taken now)."""
        samples = await self.manager.metrics(sandbox_id, None, None)
        if not samples:
            raise ApiError(404, f'Sandbox "{sandbox_id}" has no metrics: it is not running')
        return dataclasses.asdict(samples[-1])


def _condition_of(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def _network_condition(digest: str, refused: str | None) -> dict[str, Any]:
    """The :data:`~.pods.NETWORK_CONDITION` answering the annotation of ``digest``."""
    return {
        "type": pods.NETWORK_CONDITION,
        "status": "False" if refused else "True",
        "reason": "Refused" if refused else "Applied",
        "message": f"{digest}: {refused}" if refused else f"{digest}: applied",
        "lastTransitionTime": _now(),
    }


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def run(options: NodeOptions) -> None:
    """Prepare the host as ``sandboxd serve`` does (root, an owner-only data dir with its database
    and built-in template, this process as the sandboxes' subreaper), then run until signalled."""
    import sys

    from sandboxd import _core

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        sys.exit("sandboxd node needs root: sandboxes are built from namespaces, overlayfs and cgroups")
    options.data_dir.mkdir(parents=True, exist_ok=True)
    options.data_dir.chmod(0o700)
    fresh = not (options.data_dir / DATABASE).exists()
    store = Store(options.data_dir / DATABASE)
    key = node_key(store, options.name, fresh)
    templates = Templates(store, options.template_store or default_store_dir(options.data_dir), options.debian_mirror)
    templates.ensure_host()
    host.require_isolation(templates, "sandboxd node")
    # `sandboxd template --data-dir <node's>` finds the store this node uses through its database.
    store.set_setting("template_store", str(templates.store_dir))
    _core.become_subreaper()
    import uvloop

    uvloop.run(_run(options, store, templates, key))


NODE_KEY = "node_key"
"""The store's setting that holds :func:`node_key`'s answer (empty: None)."""


def node_key(store: Store, name: str, fresh: bool) -> str | None:
    """What names this node's cgroup group, nftables table and sandbox links besides its data dir:
    the Node's name it first started with (unique in the cluster, so on the machine), because nodes in
    containers see their own host folders at one path (the DaemonSet's mount point), and names of the
    path alone would be one for all. Kept in the store, so a renamed node still finds its sandboxes.
    None for a data dir a node used before names were keyed (``fresh`` False): its sandboxes,
    re-adopted after a restart, are in the group and on the links of the path alone."""
    key = store.setting(NODE_KEY)
    if key is None:
        key = name if fresh else ""
        store.set_setting(NODE_KEY, key)
    return key or None


async def _run(options: NodeOptions, store: Store, templates: Templates, key: str | None) -> None:
    import signal
    import sys

    from sandboxd.runtime import zygote
    from sandboxd.runtime.zygote_client import ZygoteClient

    # Bound first: the sandbox firewall must name the real port (with --tunnel-port 0, only the bound
    # socket knows it). Connections wait in the backlog until the node has its keys.
    try:
        listeners = bind_listeners(options.address, options.tunnel_port)
    except OSError as exc:
        sys.exit(f"sandboxd node cannot listen on {options.address}:{options.tunnel_port}: {exc.strerror or exc}")
    tunnel_port = int(listeners[0].getsockname()[1])
    # The node shares the machine with other nodes and runtimes: the same host-wide budgets, id
    # registry and per-instance cgroup group as `sandboxd serve` (sandboxd.runtime.host).
    facts = host.prepare(options.data_dir, options.id_registry, key)
    instances, watches = host.inotify_limits(facts)
    limits = Limits(
        cpu_count=options.limits.cpu_count,
        memory_mb=options.limits.memory_mb,
        disk_mb=options.limits.disk_mb,
        pids_max=options.limits.pids_max,
        max_sandboxes=options.max_sandboxes,
        max_timeout_s=NODE_SANDBOX_TIMEOUT_S,
        open_files=host.open_files(facts),
        inotify_instances=instances,
        inotify_watches=watches,
    )
    zygote_client = ZygoteClient(zygote.start)
    await zygote_client.start()
    networks = None
    if options.network is not None:
        # The tunnel stands where serve's API port does: never reachable from a sandbox, even
        # through a range the operator opened (--sandbox-allow).
        networks = SandboxNetworks(
            store, options.data_dir, options.network, limits.max_sandboxes, tunnel_port, node=key
        )
        await networks.start()
    place = await host.open_place(options.data_dir, options.id_registry, limits.disk_mb, key)
    manager = SandboxManager(store, templates, options.data_dir, zygote_client, limits, place, networks=networks)
    await manager.start()
    kube = await Kube.connect(options.kubeconfig)
    node = SandboxNode(options, kube, manager, store, listeners)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        print(f"sandboxd node {options.name}: tunnel on {options.address}:{node.tunnel_port}", flush=True)
        await stop.wait()
    finally:
        await node.stop()
        await manager.stop()
        if networks is not None:
            await networks.stop()
        await zygote_client.stop()
        await host.close_place(place)
        await kube.close()
        templates.close()
        store.close()
