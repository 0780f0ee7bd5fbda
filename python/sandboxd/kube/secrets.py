"""The cluster's shared keys, in two Secrets of sandboxd's namespace.

* ``sandboxd-node`` (read by nodes and ``serve``): ``token-key``, from which each sandbox's agent
  access token is derived (:func:`sandboxd.kube.pods.access_token`), and ``tunnel-key``, which a
  ``serve`` replica presents to a node's tunnel.
* ``sandboxd-api`` (read by ``serve`` only): ``api-key``, the ``X-API-KEY`` of E2B clients.

Whoever needs a Secret first creates it with fresh random keys; a concurrent creator gets 409 and
reads the winner's, so every replica and node ends up with the same keys.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import Any

from .client import Kube, KubeError, path_of

NODE_SECRET = "sandboxd-node"
API_SECRET = "sandboxd-api"


def _fresh(name: str) -> dict[str, str]:
    if name == API_SECRET:
        return {"api-key": "e2b_" + secrets.token_hex(20)}
    return {"token-key": secrets.token_hex(32), "tunnel-key": secrets.token_urlsafe(32)}


async def shared_secret(kube: Kube, namespace: str, name: str, given: dict[str, str] | None = None) -> dict[str, str]:
    """The Secret's data (decoded), created with ``given`` or fresh keys if it does not exist."""
    path = path_of("secrets", namespace)
    for _attempt in range(10):
        try:
            found = await kube.get(f"{path}/{name}")
            return {k: base64.b64decode(v).decode() for k, v in found.get("data", {}).items()}
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
