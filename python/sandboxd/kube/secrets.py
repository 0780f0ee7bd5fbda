"""The cluster's shared keys, in two Secrets of sandboxd's namespace.

* ``sandboxd-node`` (read by nodes and ``serve``): ``token-key``, from which each sandbox's agent
  access token is derived (:func:`sandboxd.kube.pods.access_token`), and ``tunnel-key``, which a
  ``serve`` replica presents to a node's tunnel.
* ``sandboxd-api`` (read by ``serve`` only): ``api-key``, the ``X-API-KEY`` of E2B clients.

Only ``serve`` replicas create them (:func:`shared_secret`, at start), with fresh random keys; a
concurrent creator gets 409 and reads the winner's, so every replica ends up with the same keys.
Nodes never create a Secret (RBAC gives them none to create): a node that could would pre-create one
a replica later trusts, such as ``sandboxd-node`` with keys of its choosing, or any Secret not made
yet as a ServiceAccount token Secret of ``sandboxd-serve`` whose token it then reads. A node started
before any replica waits for ``sandboxd-node`` (:func:`await_secret`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from typing import Any

from .client import Kube, KubeError, path_of

NODE_SECRET = "sandboxd-node"
API_SECRET = "sandboxd-api"

WAIT_POLL_S = 1.0
"""How often a node waiting for its Secret asks again: one GET a second is nothing to an API server,
and the node comes up within a second of the first replica."""

WAIT_LOG_EVERY_S = 30.0
"""How often the wait is logged again, so that a node stuck on it says why in its latest lines."""

log = logging.getLogger(__name__)


def _decoded(found: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in found.get("data", {}).items()}


def _fresh(name: str) -> dict[str, str]:
    if name == API_SECRET:
        return {"api-key": "e2b_" + secrets.token_hex(20)}
    return {"token-key": secrets.token_hex(32), "tunnel-key": secrets.token_urlsafe(32)}


async def shared_secret(kube: Kube, namespace: str, name: str, given: dict[str, str] | None = None) -> dict[str, str]:
    """The Secret's data (decoded), created with ``given`` or fresh keys if it does not exist
    (``serve`` replicas only)."""
    path = path_of("secrets", namespace)
    for _attempt in range(10):
        try:
            return _decoded(await kube.get(f"{path}/{name}"))
        except KubeError as exc:
            if exc.status != 404:
                raise
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "sandboxd"}},
            "type": "Opaque",
            "stringData": given or _fresh(name),
        }
        try:
            await kube.create(path, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
        await asyncio.sleep(0.05)
    raise RuntimeError(f"could not read or create Secret {namespace}/{name}")


async def await_secret(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    """The Secret's data (decoded), waiting until it exists (nodes: a replica creates it)."""
    logged = -WAIT_LOG_EVERY_S
    while True:
        try:
            return _decoded(await kube.get(path_of("secrets", namespace, name)))
        except KubeError as exc:
            if exc.status != 404:
                raise
        if time.monotonic() - logged >= WAIT_LOG_EVERY_S:
            logged = time.monotonic()
            log.warning(
                "waiting for Secret %s/%s: a `sandboxd serve --backend kubernetes` replica creates it when it "
                "starts (nodes never create Secrets); start one, or check that it runs in namespace %s",
                namespace,
                name,
                namespace,
            )
        await asyncio.sleep(WAIT_POLL_S)
