"""E2B's control-plane REST API (spec §6), as ASGI routes over a sandbox backend (:mod:`.backend`).

JSON field names are exactly the SDK's (``templateID``, ``sandboxID``, ``envdAccessToken``, ...).
Every request needs ``X-API-KEY`` (compared in constant time). Bad input is a 400 that names the
field; nothing permanent is answered with 429 or 5xx, which the SDK would retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from sandboxd import ENVD_VERSION, _core
from sandboxd.agent.asgi import ClientDisconnected, Receive, Scope, Send, header_map, send_empty, send_json

from . import lifecycle, logs, snapshots
from .backend import Backend, ListQuery
from .errors import ApiError
from .inputs import INT32_MAX, INT64_MAX, MAX_QUERY, Body, Query, sandbox_id
from .lifecycle import LifecycleQuery
from .manager import CreateRequest
from .metrics import MetricsSample
from .network import NetworkConfig
from .store import SandboxRow, TemplateRow
from .volumes import MAX_MOUNTS

CLIENT_ID = "6532622b"
"""E2B's fixed legacy ``clientID`` placeholder, which the SDK requires to be present."""

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 100


def iso(ts: float) -> str:
    """RFC 3339 with a Z, as the API answers."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def check_api_key(headers: dict[str, str], api_key: str, bearer: bool = False) -> None:
    """401 unless the request carries the API key (compared in constant time) in ``X-API-KEY``, or,
    where ``bearer`` allows it (for scrapers that can send only that), in ``Authorization: Bearer``."""
    presented = headers.get("x-api-key", "")
    if not presented and bearer:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        presented = credentials.strip() if scheme.lower() == "bearer" else ""
    if not presented or not hmac.compare_digest(presented.encode(), api_key.encode()):
        raise ApiError(401, "Invalid API key: send the key `sandboxd serve` printed in the X-API-KEY header")


@contextlib.asynccontextmanager
async def api_errors(send: Send) -> AsyncIterator[None]:
    """What every control-plane router wraps a request in: an :class:`ApiError` raised inside is
    answered as E2B's JSON error (``{"code", "message"}``), and a client gone midway is let go."""
    try:
        yield
    except ApiError as exc:
        await send_json(send, exc.status, exc.body(), exc.headers)
    except ClientDisconnected:
        return


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int and isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(400, f"'{name}' must be {names.replace('dict', 'an object').replace('str', 'a string')}")
    return value


def _string_list(body: dict[str, Any], name: str, where: str) -> tuple[str, ...] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(400, f"'{where}{name}' must be an array of strings")
    return tuple(value)


def _rules(body: dict[str, Any], where: str) -> dict[str, tuple[dict[str, str], ...]] | None:
    """E2B's ``rules``: host → ``[{"transform": {"headers": {name: value}}}]``."""
    value = body.get("rules")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}rules' must be an object of host → rules")
    rules: dict[str, tuple[dict[str, str], ...]] = {}
    for host, items in value.items():
        if not isinstance(items, list):
            raise ApiError(400, f"'{where}rules.{host}' must be an array of rules")
        parsed = []
        for item in items:
            transform = item.get("transform") if isinstance(item, dict) else None
            headers = transform.get("headers") if isinstance(transform, dict) else None
            if not isinstance(item, dict) or (transform is not None and not isinstance(transform, dict)):
                raise ApiError(400, f'\'{where}rules.{host}\' items must be {{"transform": {{"headers": {{...}}}}}}')
            if headers is not None and (
                not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
            ):
                raise ApiError(400, f"'{where}rules.{host}[].transform.headers' must be an object of strings")
            parsed.append(dict(headers or {}))
        rules[host.lower()] = tuple(parsed)
    return rules


def _egress_proxy_refused(body: dict[str, Any], message: str) -> None:
    """E2B's open-source deployments refuse a BYOP proxy with this 403 (feature flag off)."""
    if body.get("egressProxy") is not None:
        raise ApiError(403, message)


IAM_REFUSED = (
    "workload identity tokens (iam) are not issued by sandboxd: keep the credential with Secret.create and name "
    "it in the rule's header with Secret.fill(name)"
)


def network_from_create(body: dict[str, Any]) -> NetworkConfig:
    """``allow_internet_access`` and ``network`` of a create body (E2B's ``NewSandboxV2``).
    ``iam`` (workload identity tokens the egress proxy would mint) is refused: a rule naming one
    would otherwise go out with its placeholder."""
    iam = body.get("iam")
    if iam is not None and (not isinstance(iam, dict) or iam.get("tokens")):
        raise ApiError(400, IAM_REFUSED)
    allow_internet = _field(body, "allow_internet_access", bool, None)
    network = _field(body, "network", dict, None)
    if network is None:
        return NetworkConfig(allow_internet_access=allow_internet)
    _egress_proxy_refused(network, "Egress proxy (network.egressProxy) is not enabled for this team.")
    ports = network.get("httpsPorts")
    if ports is not None and (
        not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
    ):
        raise ApiError(400, "'network.httpsPorts' must be an array of port numbers")
    return NetworkConfig(
        allow_internet_access=allow_internet,
        allow_out=_string_list(network, "allowOut", "network."),
        deny_out=_string_list(network, "denyOut", "network."),
        dns_servers=_string_list(network, "dnsServers", "network."),
        rules=_rules(network, "network."),
        allow_public_traffic=_field(network, "allowPublicTraffic", bool, None),
        mask_request_host=_field(network, "maskRequestHost", str, None),
        https_ports=None if ports is None else tuple(ports),
    )


def network_from_update(body: dict[str, Any]) -> NetworkConfig:
    """A ``PUT /sandboxes/{id}/network`` body (E2B's ``SandboxNetworkUpdateConfig``)."""
    _egress_proxy_refused(body, "Egress proxy (egressProxy) is not enabled for this team.")
    return NetworkConfig(
        allow_internet_access=_field(body, "allow_internet_access", bool, None),
        allow_out=_string_list(body, "allowOut", ""),
        deny_out=_string_list(body, "denyOut", ""),
        dns_servers=_string_list(body, "dnsServers", ""),
        rules=_rules(body, ""),
    )


def network_to_wire(config: NetworkConfig) -> dict[str, Any] | None:
    """The ``network`` of ``GET /sandboxes/{id}``: what was set, in E2B's names (None: nothing)."""
    out: dict[str, Any] = {}
    if config.allow_public_traffic is not None:
        out["allowPublicTraffic"] = config.allow_public_traffic
    if config.allow_out is not None:
        out["allowOut"] = list(config.allow_out)
    if config.deny_out is not None:
        out["denyOut"] = list(config.deny_out)
    if config.dns_servers is not None:
        out["dnsServers"] = list(config.dns_servers)
    if config.rules is not None:
        out["rules"] = {
            host: [{"transform": {"headers": dict(headers)}} for headers in rules]
            for host, rules in config.rules.items()
        }
    if config.mask_request_host is not None:
        out["maskRequestHost"] = config.mask_request_host
    if config.https_ports is not None:
        out["httpsPorts"] = list(config.https_ports)
    return out or None


Route = tuple[str, re.Pattern[str], Callable[..., Any]]
"""A method, a path pattern (its groups are the handler's arguments) and the handler."""


def find_route(routes: list[Route], scope: Scope) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The handler of a request and its path's groups; 405 naming the allowed methods, or 404."""
    path: str = scope["path"].rstrip("/") or "/"
    allowed = []
    for verb, pattern, handler in routes:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        allowed.append(verb)
        if verb == scope["method"]:
            return handler, match.groups()
    if allowed:
        raise ApiError(405, f"{scope['method']} is not allowed on {path[:200]} (use {', '.join(allowed)})")
    raise ApiError(404, f"no such endpoint: {scope['method']} {path[:200]}")


async def serve_routes(routes: list[Route], api_key: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a request with the route it matches, behind the API key, errors as E2B's JSON (the
    secrets and webhooks APIs: their path groups go to the handler as they are)."""
    async with api_errors(send):
        check_api_key(header_map(scope), api_key)
        handler, groups = find_route(routes, scope)
        await handler(scope, receive, send, *groups)


class ControlPlane:
    """Routes ``/sandboxes…`` and ``/v2/sandboxes…`` to the backend (this machine's manager, or Kubernetes)."""

    def __init__(self, backend: Backend, api_key: str, domain: str | None) -> None:
        self.backend = backend
        self.api_key = api_key
        self.domain = domain
        sandbox = r"/sandboxes/([^/]+)"
        self.routes: list[Route] = [
            ("POST", re.compile(r"/(?:v2/)?sandboxes"), self.create),
            ("GET", re.compile(r"/(?:v2/)?sandboxes"), self.list),
            ("GET", re.compile(sandbox), self.info),
            ("DELETE", re.compile(sandbox), self.kill),
            ("POST", re.compile(sandbox + "/timeout"), self.set_timeout),
            ("POST", re.compile("(?:/v2)?" + sandbox + "/connect"), self.connect),
            ("POST", re.compile(sandbox + "/pause"), self.pause),
            ("POST", re.compile(sandbox + "/resume"), self.resume),
            ("GET", re.compile(sandbox + "/metrics"), self.metrics),
            ("PUT", re.compile(sandbox + "/network"), self.update_network),
            ("GET", re.compile(sandbox + "/logs"), self.logs_v1),
            ("GET", re.compile("/v2" + sandbox + "/logs"), self.logs_v2),
            ("GET", re.compile(sandbox + "/events"), self.events),
            ("POST", re.compile(sandbox + "/snapshots"), self.snapshot),
            ("GET", re.compile(r"/snapshots"), self.snapshots),
            ("POST", re.compile(sandbox + "/fork"), self.fork),
            ("GET", re.compile(r"/events/sandboxes"), self.lifecycle),
            ("GET", re.compile(r"/events/sandboxes/([^/]+)"), self.lifecycle),
        ]

    def matches(self, path: str) -> bool:
        return path.startswith(("/sandboxes", "/v2/sandboxes", "/events/sandboxes")) or path == "/snapshots"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with api_errors(send):
            check_api_key(header_map(scope), self.api_key)
            handler, groups = find_route(self.routes, scope)
            await handler(scope, receive, send, *(sandbox_id(g) for g in groups))

    # ------------------------------------------------------------------------------- answers

    async def _sandbox(self, row: SandboxRow) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "sandboxID": row.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "alias": row.alias,
            "envdAccessToken": row.access_token,
            "trafficAccessToken": await self.backend.traffic_token(row.id),
            "domain": self.domain,
        }

    def _listed(self, row: SandboxRow) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "sandboxID": row.id,
            "clientID": CLIENT_ID,
            "alias": row.alias,
            "startedAt": iso(row.started_at),
            "endAt": iso(self.backend.end_at(row)),
            "cpuCount": row.cpu_count,
            "memoryMB": row.memory_mb,
            "diskSizeMB": row.disk_mb,
            "state": row.state,
            "envdVersion": ENVD_VERSION,
            "metadata": row.metadata,
        }

    def _detail(self, row: SandboxRow) -> dict[str, Any]:
        detail = self._listed(row)
        config = self.backend.network_config(row.id)
        detail.update(
            envdAccessToken=row.access_token,
            domain=self.domain,
            allowInternetAccess=config.allow_internet_access,
            lifecycle={"autoResume": row.auto_resume, "onTimeout": row.on_timeout},
        )
        network = network_to_wire(config)
        if network is not None:
            detail["network"] = network
        if row.volume_mounts:
            detail["volumeMounts"] = [{"name": name, "path": path} for path, name in sorted(row.volume_mounts.items())]
        if row.state == "paused":
            detail["pauseMode"] = row.pause_mode
        return detail

    # ------------------------------------------------------------------------------ handlers

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        template = body.string("templateID", required=True)
        assert template is not None
        auto_pause = body.boolean("autoPause", False)
        request = CreateRequest(
            template=template,
            timeout=body.integer("timeout", 0, INT32_MAX),
            metadata=body.metadata(),
            env_vars=body.env_vars(),
            on_timeout="pause" if auto_pause else "kill",
            pause_memory=body.boolean("autoPauseMemory", True),
            auto_resume=body.object("autoResume").boolean("enabled", False),
            network=network_from_create(body.fields),
            volume_mounts=volume_mounts(body.fields.get("volumeMounts")),
        )
        row = await self.backend.create(request)
        await send_json(send, 201, await self._sandbox(row))

    async def info(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        await send_json(send, 200, self._detail(await self.backend.get(sandbox_id)))

    async def kill(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        await self.backend.kill(sandbox_id, "killed through the API")
        await send_empty(send, 204)

    async def set_timeout(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's ``minimum: 0``: 0 ends the sandbox at once, and negative values count as 0."""
        body = await Body.read(receive)
        timeout = body.integer("timeout", -INT32_MAX - 1, INT32_MAX)
        if timeout is None:
            raise ApiError(400, "'timeout' (seconds) is required")
        await self.backend.set_timeout(sandbox_id, timeout)
        await send_empty(send, 204)

    async def connect(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await Body.read(receive)
        timeout = body.integer("timeout", 0, INT32_MAX)
        row, resumed = await self.backend.connect(sandbox_id, timeout)
        await send_json(send, 201 if resumed else 200, await self._sandbox(row))

    async def pause(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await Body.read(receive)
        memory = body.boolean("memory", True)
        await self.backend.pause(sandbox_id, "full" if memory else "filesystem", "paused through the API")
        await send_empty(send, 204)

    async def resume(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await Body.read(receive)
        timeout = body.integer("timeout", 0, INT32_MAX)
        row = await self.backend.resume(sandbox_id, timeout)
        await send_json(send, 201, await self._sandbox(row))

    async def update_network(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's ``PUT /sandboxes/{id}/network``: replace a running sandbox's egress settings."""
        body = await Body.read(receive)
        await self.backend.update_network(sandbox_id, network_from_update(body.fields))
        await send_empty(send, 204)

    async def metrics(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's history: the 5-second samples inside ``[start, end]`` (unix seconds; the sandbox's
        whole life by default), coarser buckets for long ranges, ``[]`` for a range with none."""
        query = Query(scope.get("query_string", b""))
        start = query.integer("start", 0, INT64_MAX)
        end = query.integer("end", 0, INT64_MAX)
        samples = await self.backend.metrics(sandbox_id, start, end)
        await send_json(send, 200, [_metrics(s) for s in samples])

    async def logs_v1(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's v1 logs: ``start`` (unix ms) and ``limit``, oldest first; each entry twice, as a JSON
        ``line`` (what the ``e2b`` CLI prints) and as a structured ``logEntries`` item."""
        query = Query(scope.get("query_string", b""))
        now_ms = int(time.time() * 1000)
        start = query.integer("start", 0, INT64_MAX, now_ms - logs.WINDOW_MS)
        limit = query.integer("limit", 0, INT32_MAX, logs.DEFAULT_LIMIT)
        assert start is not None and limit is not None
        entries = logs.select(await self.backend.log_entries(sandbox_id), start, now_ms, limit, backward=False)
        await send_json(
            send,
            200,
            {
                "logs": [{"timestamp": _iso_ms(e.timestamp_ms), "line": _line(e)} for e in entries],
                "logEntries": [_log_entry(e) for e in entries],
            },
        )

    async def logs_v2(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's v2 logs: ``cursor`` (unix ms), ``limit`` (≤ 1000), ``direction`` (``backward``, newest
        first, by default), ``level`` (the lowest shown) and ``search`` (a substring of the message)."""
        query = Query(scope.get("query_string", b""))
        cursor = query.integer("cursor", 0, INT64_MAX)
        limit = query.integer("limit", 0, logs.MAX_LIMIT, logs.DEFAULT_LIMIT)
        backward = query.choice("direction", ("forward", "backward"), "backward") == "backward"
        level = query.choice("level", logs.LEVELS)
        search = query.get("search", 256)
        assert limit is not None
        start, end = logs.window(cursor, backward, int(time.time() * 1000))
        entries = logs.select(await self.backend.log_entries(sandbox_id), start, end, limit, backward, level, search)
        await send_json(send, 200, {"logs": [_log_entry(e) for e in entries]})

    async def events(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """sandboxd's own: a sandbox's lifecycle with reasons (created, paused, killed, died...)."""
        events = await self.backend.events(sandbox_id)
        await send_json(send, 200, [{"at": iso(at), "kind": kind, "reason": reason} for at, kind, reason in events])

    async def lifecycle(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str | None = None) -> None:
        """E2B's lifecycle events API (:mod:`.lifecycle`): one sandbox's events, or every sandbox's."""
        query = LifecycleQuery.parse(scope.get("query_string", b""), sandbox_id)
        events = await self.backend.lifecycle(query)
        await send_json(send, 200, [lifecycle.answer(event, iso) for event in events])

    async def snapshot(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's ``create_snapshot``: 201 ``{snapshotID, names}``. ``memory`` is accepted and both modes
        keep the file system only (:mod:`.snapshots`)."""
        body = await Body.read(receive)
        name = body.string("name")
        body.boolean("memory", True)
        row = await self.backend.snapshot(sandbox_id, name or None)
        await send_json(send, 201, _snapshot_info(row))

    async def snapshots(self, scope: Scope, receive: Receive, send: Send) -> None:
        """E2B's ``list_snapshots``: newest first, of one sandbox (``sandboxID``) or all, ``name`` matching
        the snapshot's id or name (a ``:tag`` is ignored), at most ``limit``; one page."""
        query = Query(scope.get("query_string", b""))
        limit = query.integer("limit", 1, MAX_LIST_LIMIT, DEFAULT_LIST_LIMIT)
        name = (query.get("name") or "").split(":", 1)[0].rsplit("/", 1)[-1]
        assert limit is not None
        rows = await self.backend.snapshots(query.get("sandboxID"))
        if name:
            rows = [row for row in rows if row.name == name]
        await send_json(send, 200, [_snapshot_info(row) for row in rows[:limit]])

    async def fork(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """E2B's ``fork``: one snapshot of the sandbox (which keeps running), then ``count`` sandboxes
        from it, made concurrently; 201 with one ``{sandbox}`` or ``{error}`` per fork. A fork has the
        source's metadata, environment variables and network settings; its own ``timeout``."""
        body = await Body.read(receive)
        timeout = body.integer("timeout", 0, INT32_MAX)
        count = body.integer("count", 1, snapshots.MAX_FORKS, 1)
        source = await self.backend.get(sandbox_id)
        snapshot = await self.backend.snapshot(sandbox_id, None)
        request = CreateRequest(
            template=snapshot.name,
            timeout=timeout,
            metadata=dict(source.metadata),
            env_vars=dict(source.env_vars),
            network=self.backend.network_config(sandbox_id),
            volume_mounts=dict(source.volume_mounts),
        )

        async def one() -> dict[str, Any]:
            try:
                return {"sandbox": await self._sandbox(await self.backend.create(request))}
            except ApiError as exc:
                return {"error": exc.body()}

        assert count is not None
        results = await asyncio.gather(*(one() for _ in range(count)))
        await send_json(send, 201, list(results))

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        """E2B's v2 list: newest first unless ``order=asc``, running and paused unless ``state`` says."""
        query = Query(scope.get("query_string", b""))
        states = ["running", "paused"]
        if "state" in query:
            states = [s.strip() for s in (query.get("state") or "").split(",") if s.strip()]
            for state in states:
                if state not in ("running", "paused"):
                    raise ApiError(400, f"'state' must be running and/or paused, got {json.dumps(state[:32])}")
        order = query.choice("order", ("asc", "desc"), "desc")
        limit = query.integer("limit", 1, MAX_LIST_LIMIT, DEFAULT_LIST_LIMIT)
        assert limit is not None
        token = query.get("nextToken")
        started = query.get("startedAfter")
        page = ListQuery(
            states=states,
            metadata=_decode_metadata(query.get("metadata", MAX_QUERY) or ""),
            template=query.get("template"),
            started_after=_parse_time(started, "startedAfter") if started else None,
            descending=order == "desc",
            limit=limit,
            cursor=_decode_token(token) if token else None,
        )
        rows, next_cursor = await self.backend.list_page(page)
        headers = [("x-next-token", _encode_token(next_cursor))] if next_cursor is not None else []
        await send_json(send, 200, [self._listed(r) for r in rows], headers)


def volume_mounts(raw: object) -> dict[str, str]:
    """E2B's ``volumeMounts`` (``[{"name", "path"}]``) as {path: name}: paths the jail accepts
    (``_core.validate_volume_target``: absolute, normalised, not ``/``, not under ``/proc``, ``/sys``
    or ``/dev``), none at or under another; 400 otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > MAX_MOUNTS:
        raise ApiError(400, f"'volumeMounts' must be a list of at most {MAX_MOUNTS} {{name, path}} objects")
    mounts: dict[str, str] = {}
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(path, str) or not name or len(path) > 1024:
            raise ApiError(400, "each of 'volumeMounts' needs a 'name' (a volume's) and a 'path' (where it is mounted)")
        if "\0" in path:
            raise ApiError(400, "volumeMounts: a 'path' contains a NUL byte")
        normal = path.rstrip("/") or "/"  # "/mnt/data/" is "/mnt/data"
        try:
            _core.validate_volume_target(normal)  # the jail's own rule, so the two never disagree
        except ValueError as exc:
            raise ApiError(400, f"volumeMounts: {json.dumps(path[:100])}: {exc}") from None
        for other in mounts:
            if normal == other or normal.startswith(other + "/") or other.startswith(normal + "/"):
                raise ApiError(400, f"volumeMounts: {normal} and {other} overlap: mount volumes side by side")
        mounts[normal] = name
    return mounts


def _snapshot_info(row: TemplateRow) -> dict[str, Any]:
    return {"snapshotID": row.name, "names": [row.name]}


def _metrics(sample: MetricsSample) -> dict[str, Any]:
    return {
        "timestamp": iso(sample.timestamp),
        "timestampUnix": int(sample.timestamp),
        "cpuCount": sample.cpu_count,
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.mem_used,
        "memTotal": sample.mem_total,
        "memCache": 0,
        "diskUsed": sample.disk_used,
        "diskTotal": sample.disk_total,
        # sandboxd's own (E2B's metrics have no network figures): bytes over the sandbox's link.
        "netInBytes": sample.net_in_bytes,
        "netOutBytes": sample.net_out_bytes,
    }


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _log_entry(entry: logs.LogEntry) -> dict[str, Any]:
    return {
        "timestamp": _iso_ms(entry.timestamp_ms),
        "level": entry.level,
        "message": entry.message,
        "fields": entry.fields,
    }


def _line(entry: logs.LogEntry) -> str:
    """E2B's v1 ``line``: the entry as the JSON object envd logs (the CLI parses it and reads
    ``level`` and ``logger``)."""
    return json.dumps({**entry.fields, "level": entry.level, "message": entry.message}, separators=(",", ":"))


def _encode_token(cursor: str) -> str:
    return base64.urlsafe_b64encode(cursor.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        cursor = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeError):
        cursor = ""
    if not cursor:
        raise ApiError(400, "'nextToken' is not a token this API gave out")
    return cursor


def _decode_metadata(raw: str) -> dict[str, str]:
    """E2B's double-encoded metadata filter (spec §6.2): ``k=v&k2=v2``, each part escaped again."""
    if not raw:
        return {}
    pairs: dict[str, str] = {}
    for part in unquote(raw).split("&"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ApiError(400, f"'metadata' filter part {json.dumps(part[:64])} is not key=value")
        pairs[unquote(key)] = unquote(value)
    return pairs


def _parse_time(value: str, name: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        raise ApiError(400, f"'{name}' must be an ISO-8601 time, got {json.dumps(value[:64])}") from None
