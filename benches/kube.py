"""Scenario ``kube``: ``sandboxd serve --backend kubernetes`` on a real control plane, beside the
single-machine runtime in the same run.

The bench starts the local control plane (``make cluster`` builds it: etcd and kube-apiserver,
-scheduler, -controller-manager v1.34.4 on loopback), three ``sandboxd node``s on this machine
(each its own name, data dir and tunnel) and one ``serve --backend kubernetes`` replica, and a
plain ``sandboxd serve`` beside them. Then, with the official SDK pointed at each in turn:

* create→first command: ``Sandbox.create()`` + ``commands.run("true")``, one at a time, each killed
  afterwards (kill timed apart). Through Kubernetes a create is a Pod written to etcd, bound by the
  scheduler, seen by the node's watch and reported Running, so the difference is the price of the
  cluster;
* a burst of concurrent ``AsyncSandbox.create()`` across the three nodes (100 in the full run):
  wall time, successes, the spread over the nodes, each create's latency. Baseline: the same burst
  on the single-machine runtime.

Needs root and the built control plane; skipped otherwise. Everything it starts is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .common import Context, Result, ScenarioSkipped, die_with_parent, free_port, percentile, wait_for_http
from .runtime import Runtime, sdk_env, sequential

NAMESPACE = "sandboxd"
NODES = 3


@dataclass
class KubeStack:
    """The control plane, three nodes and one replica; quacks like :class:`benches.runtime.Runtime`
    for :func:`benches.runtime.sequential` (``url``, ``api_key``, ``created``)."""

    work: Path
    cluster: Any = None
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    serve: subprocess.Popen[bytes] | None = None
    url: str = ""
    api_key: str = "bench_kube_key"
    created: set[str] = field(default_factory=set)
    node_names: list[str] = field(default_factory=list)

    def start(self, capacity: int) -> None:
        from sandboxd.kube.localcluster import LocalCluster

        self.cluster = LocalCluster(self.work / "cluster").start()
        self.cluster.apply_rbac(NAMESPACE)
        for i in range(NODES):
            name = f"bench-node-{i}"
            self.node_names.append(name)
            args = [
                sys.executable, "-m", "sandboxd", "node", "--name", name, "--data-dir", str(self.work / name),
                "--kubeconfig", str(self.cluster.kubeconfig("sandboxd-node")), "--namespace", NAMESPACE,
                "--tunnel-port", str(free_port()), "--max-sandboxes", str(capacity),
            ]  # fmt: skip
            self.nodes.append(self._spawn(args, self.work / f"{name}.log"))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [
            sys.executable, "-m", "sandboxd", "serve", "--backend", "kubernetes", "--port", str(port),
            "--kubeconfig", str(self.cluster.kubeconfig("sandboxd-serve")), "--namespace", NAMESPACE,
            "--api-key", self.api_key,
        ]  # fmt: skip
        self.serve = self._spawn(args, self.work / "serve.log")
        wait_for_http(f"{self.url}/health", self.serve, self.work / "serve.log", timeout=120)
        self._wait_nodes_ready()

    @staticmethod
    def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

    def _wait_nodes_ready(self) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig("admin")))
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                ready = 0
                for name in self.node_names:
                    with contextlib.suppress(Exception):
                        node = core.read_node(name)
                        ready += any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
                if ready == NODES:
                    return
                for proc in self.nodes:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a sandboxd node exited with {proc.returncode}")
                time.sleep(0.2)
            raise RuntimeError("the sandboxd nodes did not become Ready in 120 s")
        finally:
            api.close()

    def spread(self, ids: set[str]) -> dict[str, int]:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig("admin")))
        try:
            counts: dict[str, int] = {}
            for pod in client.CoreV1Api(api).list_namespaced_pod(NAMESPACE).items:
                if pod.metadata.name in ids:
                    counts[pod.spec.node_name] = counts.get(pod.spec.node_name, 0) + 1
            return counts
        finally:
            api.close()

    def stop(self) -> None:
        try:
            if self.serve is not None and self.serve.poll() is None and self.created:
                with httpx.Client(headers={"X-API-KEY": self.api_key}, timeout=60) as api:
                    for sandbox_id in self.created:
                        with contextlib.suppress(httpx.HTTPError):
                            api.delete(f"{self.url}/sandboxes/{sandbox_id}")
        finally:
            for proc in [*([self.serve] if self.serve else []), *self.nodes]:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            if self.cluster is not None:
                self.cluster.stop()


async def _burst(
    stack: Any, n: int, before_kill: Any = None
) -> tuple[float, list[str], list[float], list[str], dict[str, int]]:
    from e2b import AsyncSandbox

    async def one() -> tuple[str, float]:
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create(timeout=600)
        stack.created.add(sbx.sandbox_id)
        return sbx.sandbox_id, (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    made = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if isinstance(r, BaseException)]
    ids = [sandbox_id for sandbox_id, _ in made]
    spread = await asyncio.to_thread(before_kill, set(ids)) if before_kill and ids else {}
    await asyncio.gather(*(AsyncSandbox.kill(i) for i in ids), return_exceptions=True)
    return wall, ids, [ms for _, ms in made], errors, spread


def run(ctx: Context) -> None:
    if os.geteuid() != 0:
        raise ScenarioSkipped("needs root: sandboxd node builds sandboxes from namespaces, overlayfs and cgroups")
    from sandboxd.kube.localcluster import DEFAULT_BIN_DIR

    if not (DEFAULT_BIN_DIR / "kube-apiserver").exists():
        raise ScenarioSkipped(f"the local control plane is not built ({DEFAULT_BIN_DIR}): run `make cluster`")
    n_seq = 10 if ctx.quick else 30
    n_burst = 30 if ctx.quick else 100

    # sandboxd nodes give each sandbox its network link and rules as serve does (both by default).
    ctx.log("single-machine baseline: sandboxd serve")
    local = Runtime(ctx.tmp, max_sandboxes=n_burst + 16)
    try:
        with sdk_env(local):
            base_seq = sequential(ctx, local, n_seq)
            base_wall, base_ids, base_ms, base_errors, _ = asyncio.run(_burst(local, n_burst))
    finally:
        local.stop()
    ctx.log(f"  burst: {len(base_ids)}/{n_burst} in {base_wall:.2f} s")

    ctx.log(f"starting the control plane, {NODES} sandboxd nodes and a serve --backend kubernetes replica")
    stack = KubeStack(ctx.tmp / "kube")
    stack.work.mkdir()
    try:
        stack.start(capacity=n_burst)
        with sdk_env(stack):
            seq = sequential(ctx, stack, n_seq)
            wall, ids, create_ms, errors, spread = asyncio.run(_burst(stack, n_burst, stack.spread))
    finally:
        stack.stop()
    ctx.log(f"  burst: {len(ids)}/{n_burst} in {wall:.2f} s, spread {sorted(spread.values())}")
    for error in errors[:3]:
        ctx.log(f"  failed create: {error}")

    p50, base_p50 = percentile(seq.total_ms, 50), percentile(base_seq.total_ms, 50)
    ctx.report(
        Result(
            name='kube: create→first command (Sandbox.create + commands.run("true"))',
            unit="ms (p50)",
            ours=p50,
            baseline=base_p50,
            baseline_name="the same through the single-machine runtime (sandboxd serve)",
            better="lower",
            p50=p50,
            p99=percentile(seq.total_ms, 99),
            samples={"ours": seq.total_ms, "baseline": base_seq.total_ms},
            extra={
                "n": n_seq,
                "create_p50_ms": percentile(seq.create_ms, 50),
                "first_command_p50_ms": percentile(seq.first_ms, 50),
                "kill_p50_ms": percentile(seq.kill_ms, 50),
                "baseline_p99_ms": percentile(base_seq.total_ms, 99),
            },
        )
    )
    ctx.report(
        Result(
            name=f"kube: burst of {n_burst} AsyncSandbox.create() across {NODES} nodes",
            unit="s (wall)",
            ours=wall,
            baseline=base_wall,
            baseline_name=f"the same burst on the single-machine runtime ({len(base_ids)}/{n_burst} ok)",
            better="lower",
            p50=percentile(create_ms, 50),
            p99=percentile(create_ms, 99),
            extra={
                "ok": len(ids),
                "errors": errors[:3],
                "spread": spread,
                "baseline_errors": base_errors[:3],
                "create_p50_ms_baseline": percentile(base_ms, 50),
            },
        )
    )
