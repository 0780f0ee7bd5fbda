"""The Kubernetes API as plain JSON, over ``kubernetes_asyncio``'s configured client.

Why ``kubernetes_asyncio``: sandboxd's runtime is one asyncio loop, and this is the official
client's generator run for asyncio (same kubeconfig and in-cluster loading, auth plugins, TLS),
with continue tokens and watches exposed as the API has them. ``lightkube`` is typed and pleasant
but follows continue tokens itself, and the E2B list API must hand them to its clients; the
official ``kubernetes`` client is synchronous and would put every call and watch on a thread.

We ask for raw responses (``_preload_content=False``) and use dicts in the API's own camelCase:
deserialising into the generated model classes costs more than the calls for a burst of Pods,
and a dict is exactly what a patch or a watch event carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

log = logging.getLogger("sandboxd.kube")

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"

REQUEST_TIMEOUT_S = 30.0
"""Any single API call (not a watch): the API server answers in milliseconds when healthy."""

WATCH_TIMEOUT_S = 240
"""Server-side watch timeout; the watch is then resumed from the last resourceVersion (the API
server's own default range is 30-60 min; shorter keeps dead connections from lingering)."""


class KubeError(Exception):
    """A non-2xx answer: ``status`` and the API server's ``Status`` object."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.reason = str(body.get("reason", ""))
        super().__init__(f"{status} {self.reason}: {body.get('message', '')}")


def path_of(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """``/api/v1/namespaces/ns/pods/name/status`` and the like, for the few kinds sandboxd uses."""
    prefix = {
        "pods": "/api/v1",
        "nodes": "/api/v1",
        "secrets": "/api/v1",
        "events": "/api/v1",
        "namespaces": "/api/v1",
        "leases": "/apis/coordination.k8s.io/v1",
    }[kind]
    path = prefix + (f"/namespaces/{quote(namespace, safe='')}" if namespace else "") + f"/{kind}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if sub is not None:
        path += f"/{sub}"
    return path


class Kube:
    """One connection pool to one API server; every method answers the decoded JSON."""

    def __init__(self, api: Any) -> None:
        self.api = api

    @classmethod
    async def connect(cls, kubeconfig: Path | None = None) -> Kube:
        """From ``kubeconfig`` (or ``$KUBECONFIG``), else the in-cluster service account."""
        configuration = k8s_client.Configuration()
        path = kubeconfig or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
        if path is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(
                config_file=str(path) if path else None, client_configuration=configuration
            )
        return cls(k8s_client.ApiClient(configuration))

    async def close(self) -> None:
        await self.api.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: Any = REQUEST_TIMEOUT_S,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        return await self.api.call_api(
            path,
            method,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        response = await self._request(method, path, query=query, body=body, content_type=content_type)
        async with response:
            raw = await response.read()
            status = response.status
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw[:200].decode(errors="replace")}
        if not 200 <= status < 300:
            raise KubeError(status, data if isinstance(data, dict) else {"message": str(data)})
        return data if isinstance(data, dict) else {}

    async def get(self, path: str, **query: Any) -> dict[str, Any]:
        return await self.call("GET", path, query=query)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", path, body=body)

    async def patch(self, path: str, body: dict[str, Any], content_type: str = STRATEGIC) -> dict[str, Any]:
        return await self.call("PATCH", path, body=body, content_type=content_type)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("PUT", path, body=body)

    async def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.call("DELETE", path, body=body)

    async def watch(self, path: str, resource_version: str, **query: Any) -> AsyncIterator[dict[str, Any]]:
        """Events (``{"type", "object"}``) from ``resource_version`` until the server ends the
        watch; a ``410 Gone`` (history compacted) is raised as :class:`KubeError` for a re-list."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": WATCH_TIMEOUT_S,
            **query,
        }
        import aiohttp

        response = await self._request(
            "GET", path, query=params, timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=WATCH_TIMEOUT_S + 30)
        )
        async with response:
            if response.status != 200:
                raw = await response.read()
                raise KubeError(response.status, json.loads(raw) if raw.startswith(b"{") else {})
            while True:
                line = await response.content.readline()
                if not line:
                    return
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    obj = event.get("object", {})
                    raise KubeError(int(obj.get("code", 500)), obj)
                yield event


class Informer:
    """A list+watch cache of one collection, kept current by a watch (the client-go informer
    pattern): ``items`` maps ``namespace/name`` to the latest object, and ``changed`` callbacks
    run on every event. A lost watch resumes from the last resourceVersion; a compacted history
    (410) re-lists."""

    def __init__(self, kube: Kube, path: str, **selectors: Any) -> None:
        self.kube = kube
        self.path = path
        self.selectors = selectors
        self.items: dict[str, dict[str, Any]] = {}
        self.handlers: list[Any] = []
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata", {})
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        for handler in self.handlers:
            try:
                handler(kind, obj)
            except Exception:
                log.exception("informer handler failed on %s %s", kind, self.key(obj))

    async def _relist(self) -> str:
        listing = await self.kube.get(self.path, **self.selectors)
        fresh = {self.key(obj): obj for obj in listing.get("items", [])}
        for key in set(self.items) - set(fresh):
            self._emit("DELETED", self.items.pop(key))
        for key, obj in fresh.items():
            self.items[key] = obj
            self._emit("SYNC", obj)
        self.synced.set()
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    async def _run(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._relist()
                async for event in self.kube.watch(self.path, version, **self.selectors):
                    obj = event.get("object", {})
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    kind = event.get("type")
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        self.items.pop(self.key(obj), None)
                    else:
                        self.items[self.key(obj)] = obj
                    self._emit(str(kind), obj)
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status == 410:
                    version = None
                    continue
                log.warning("watch of %s failed: %s; retrying", self.path, exc)
                await asyncio.sleep(1)
            except Exception as exc:
                log.warning("watch of %s broke: %r; resuming", self.path, exc)
                await asyncio.sleep(0.5)
