"""Run ``sandboxd serve --backend kubernetes``: the runtime's API and proxy over :mod:`.backend`.

The same ASGI application as the single-machine runtime (:class:`~sandboxd.runtime.server.RuntimeApp`
with its :class:`~sandboxd.runtime.api.ControlPlane` and :class:`~sandboxd.runtime.proxy.SandboxProxy`),
given the Kubernetes backend instead of the local one. No root, no data dir: the state is the
cluster's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd import __version__
from sandboxd.agent.asgi import Receive, Scope, Send, send_json
from sandboxd.agent.http_server import bind_listeners, serve_until_signalled, server_config
from sandboxd.runtime.api import ControlPlane
from sandboxd.runtime.connection import protocol_class
from sandboxd.runtime.manager import Limits
from sandboxd.runtime.observe.http import RequestObserver
from sandboxd.runtime.observe.metrics import RuntimeMetrics
from sandboxd.runtime.proxy import SandboxProxy
from sandboxd.runtime.secret_api import SecretApi
from sandboxd.runtime.server import RuntimeApp

from .backend import KubernetesBackend
from .client import Kube


@dataclass
class KubeServeOptions:
    """``sandboxd serve --backend kubernetes`` flags."""

    host: str = "127.0.0.1"
    port: int = 3000
    namespace: str = "sandboxd"
    kubeconfig: Path | None = None
    api_key: str | None = None
    domain: str | None = None
    limits: Limits = field(default_factory=Limits)


class KubeOperators:
    """``/health`` (alive), ``/ready`` (the Pod and Node caches are synced and the Lease election
    runs); ``/metrics`` and ``/status`` describe one machine's runtime, so here they point to the
    cluster's own views instead."""

    def __init__(self, backend: KubernetesBackend) -> None:
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/health":
            await send_json(send, 200, {"status": "ok", "backend": "kubernetes", "version": __version__})
        elif path == "/ready":
            synced = self.backend.pods.synced.is_set() and self.backend.nodes.synced.is_set()
            body = {"status": "ready" if synced else "not ready", "leader": self.backend.leading}
            await send_json(send, 200 if synced else 503, body)
        else:
            message = (
                f"{path} describes a single machine's runtime; with --backend kubernetes, read the cluster: "
                "kubectl get pods -l sandboxd.io/sandbox=true, kubectl get nodes -l sandboxd.io/node=true"
            )
            await send_json(send, 404, {"code": 404, "message": message})


def run(options: KubeServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvloop

    uvloop.run(_serve(options))


async def _serve(options: KubeServeOptions) -> None:
    listeners = bind_listeners(options.host, options.port)  # with --port 0, the URL printed names the real one
    kube = await Kube.connect(options.kubeconfig)
    backend = KubernetesBackend(kube, options.namespace, options.limits)
    try:
        api_key = await backend.start(options.api_key)
        proxy = SandboxProxy(backend, options.domain)
        backend.on_gone.append(proxy.forget)
        app = RuntimeApp(
            ControlPlane(backend, api_key, options.domain),
            proxy,
            KubeOperators(backend),
            RequestObserver(RuntimeMetrics()),
            options.domain,
            secret_api=SecretApi(backend.secrets, api_key),
        )
        url = f"http://{options.host}:{listeners[0].getsockname()[1]}"
        print(
            f"sandboxd {__version__}: E2B-compatible API and sandbox proxy on {url}\n"
            f"backend: kubernetes, namespace {options.namespace}\n\n"
            "Point the E2B SDKs at it:\n"
            f"  export E2B_API_KEY={api_key}\n"
            f"  export E2B_API_URL={url}\n"
            f"  export E2B_SANDBOX_URL={url}\n",
            flush=True,
        )
        config = server_config(app, options.host, options.port)
        config.http = protocol_class(proxy, config.http)  # resets and upgrades, as on one machine
        await serve_until_signalled(config, listeners)
    finally:
        await backend.stop()
        await kube.close()
