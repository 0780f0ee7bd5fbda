"""E2B's control-plane REST API (spec §6), as ASGI routes over the sandbox manager.

JSON field names are exactly the SDK's (``templateID``, ``sandboxID``, ``envdAccessToken``, ...).
Every request needs ``X-API-KEY`` (compared in constant time). Bad input is a 400 that names the
field; nothing permanent is answered with 429 or 5xx, which the SDK would retry.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from sandboxd import ENVD_VERSION
from sandboxd.agent.asgi import ClientDisconnected, Receive, Scope, Send, header_map, read_body, send_empty, send_json

from .errors import ApiError
from .manager import CreateRequest, MetricsSample, SandboxManager
from .store import SandboxRow

CLIENT_ID = "6532622b"
"""E2B's fixed legacy ``clientID`` placeholder, which the SDK requires to be present."""

MAX_BODY = 1 << 20
"""Create bodies carry metadata and env vars; 1 MiB is far beyond any real one."""

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


def _string_map(body: dict[str, Any], name: str) -> dict[str, str]:
    value = _field(body, name, dict, {})
    for key, item in value.items():
        if not isinstance(item, str):
            raise ApiError(400, f"'{name}.{key}' must be a string")
    return dict(value)


class ControlPlane:
    """Routes ``/sandboxes…`` and ``/v2/sandboxes…`` to the manager."""

    def __init__(self, manager: SandboxManager, api_key: str, domain: str | None) -> None:
        self.manager = manager
        self.api_key = api_key
        self.domain = domain
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("POST", re.compile(r"/(?:v2/)?sandboxes"), self.create),
            ("GET", re.compile(r"/(?:v2/)?sandboxes"), self.list),
            ("GET", re.compile(r"/sandboxes/([^/]+)"), self.info),
            ("DELETE", re.compile(r"/sandboxes/([^/]+)"), self.kill),
            ("POST", re.compile(r"/sandboxes/([^/]+)/timeout"), self.set_timeout),
            ("POST", re.compile(r"/(?:v2/)?sandboxes/([^/]+)/connect"), self.connect),
            ("POST", re.compile(r"/sandboxes/([^/]+)/pause"), self.pause),
            ("POST", re.compile(r"/sandboxes/([^/]+)/resume"), self.resume),
            ("GET", re.compile(r"/sandboxes/([^/]+)/metrics"), self.metrics),
            ("GET", re.compile(r"/sandboxes/([^/]+)/events"), self.events),
        ]

    def matches(self, path: str) -> bool:
        return path.startswith(("/sandboxes", "/v2/sandboxes"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        try:
            check_api_key(headers, self.api_key)
            path: str = scope["path"].rstrip("/") or "/"
            allowed = []
            for verb, pattern, handler in self.routes:
                match = pattern.fullmatch(path)
                if match is None:
                    continue
                allowed.append(verb)
                if verb == scope["method"]:
                    await handler(scope, receive, send, *match.groups())
                    return
            if allowed:
                raise ApiError(405, f"{scope['method']} is not allowed on {path} (use {', '.join(allowed)})")
            raise ApiError(404, f"no such endpoint: {scope['method']} {path}")
        except ApiError as exc:
            await send_json(send, exc.status, {"code": exc.status, "message": exc.message})
        except ClientDisconnected:
            return

    async def _body(self, receive: Receive) -> dict[str, Any]:
        raw = await read_body(receive, MAX_BODY)
        if raw is None:
            raise ApiError(413, f"request body exceeds {MAX_BODY} bytes")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    # ------------------------------------------------------------------------------- answers

    def _sandbox(self, row: SandboxRow) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "sandboxID": row.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "alias": row.alias,
            "envdAccessToken": row.access_token,
            "trafficAccessToken": None,
            "domain": self.domain,
        }

    def _listed(self, row: SandboxRow) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "sandboxID": row.id,
            "clientID": CLIENT_ID,
            "alias": row.alias,
            "startedAt": iso(row.started_at),
            "endAt": iso(self.manager.end_at(row)),
            "cpuCount": row.cpu_count,
            "memoryMB": row.memory_mb,
            "diskSizeMB": row.disk_mb,
            "state": row.state,
            "envdVersion": ENVD_VERSION,
            "metadata": row.metadata,
        }

    def _detail(self, row: SandboxRow) -> dict[str, Any]:
        detail = self._listed(row)
        detail.update(
            envdAccessToken=row.access_token,
            domain=self.domain,
            allowInternetAccess=False,
            lifecycle={"autoResume": row.auto_resume, "onTimeout": row.on_timeout},
        )
        if row.state == "paused":
            detail["pauseMode"] = row.pause_mode
        return detail

    # ------------------------------------------------------------------------------ handlers

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._body(receive)
        template = body.get("templateID")
        if not isinstance(template, str) or not template:
            raise ApiError(400, "'templateID' is required and must be a non-empty string")
        auto_pause = _field(body, "autoPause", bool, False)
        auto_resume = _field(body, "autoResume", dict, {})
        request = CreateRequest(
            template=template,
            timeout=_field(body, "timeout", int, None),
            metadata=_string_map(body, "metadata"),
            env_vars=_string_map(body, "envVars"),
            on_timeout="pause" if auto_pause else "kill",
            pause_memory=_field(body, "autoPauseMemory", bool, True),
            auto_resume=bool(auto_resume.get("enabled", False)),
        )
        row = await self.manager.create(request)
        await send_json(send, 201, self._sandbox(row))

    async def info(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        await send_json(send, 200, self._detail(self.manager.get(sandbox_id)))

    async def kill(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        await self.manager.kill(sandbox_id, "killed through the API")
        await send_empty(send, 204)

    async def set_timeout(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await self._body(receive)
        timeout = _field(body, "timeout", int, None)
        if timeout is None:
            raise ApiError(400, "'timeout' (seconds) is required")
        self.manager.set_timeout(sandbox_id, timeout)
        await send_empty(send, 204)

    async def connect(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await self._body(receive)
        timeout = _field(body, "timeout", int, None)
        row, resumed = await self.manager.connect(sandbox_id, timeout)
        await send_json(send, 201 if resumed else 200, self._sandbox(row))

    async def pause(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await self._body(receive)
        memory = _field(body, "memory", bool, True)
        await self.manager.pause(sandbox_id, "full" if memory else "filesystem", "paused through the API")
        await send_empty(send, 204)

    async def resume(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        body = await self._body(receive)
        timeout = _field(body, "timeout", int, None)
        row = await self.manager.resume(sandbox_id, timeout)
        await send_json(send, 201, self._sandbox(row))

    async def metrics(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        await send_json(send, 200, [_metrics(await self.manager.metrics(sandbox_id))])

    async def events(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        """sandboxd's own: a sandbox's lifecycle with reasons (created, paused, killed, died...)."""
        events = self.manager.events(sandbox_id)
        await send_json(send, 200, [{"at": iso(at), "kind": kind, "reason": reason} for at, kind, reason in events])

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        states = ["running", "paused"]
        if query.get("state"):
            states = [s.strip() for s in query["state"].split(",") if s.strip()]
            for state in states:
                if state not in ("running", "paused"):
                    raise ApiError(400, f"'state' must be running and/or paused, got '{state}'")
        order = query.get("order", "asc").lower()
        if order not in ("asc", "desc"):
            raise ApiError(400, f"'order' must be asc or desc, got '{order}'")
        limit = DEFAULT_LIST_LIMIT
        if "limit" in query:
            if not query["limit"].isdigit() or not 1 <= int(query["limit"]) <= MAX_LIST_LIMIT:
                raise ApiError(400, f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}")
            limit = int(query["limit"])
        after = _decode_token(query["nextToken"]) if query.get("nextToken") else None
        wanted = _decode_metadata(query.get("metadata", ""))
        template = query.get("template")
        started_after = _parse_time(query["startedAfter"], "startedAfter") if query.get("startedAfter") else None

        def keep(row: SandboxRow) -> bool:
            if any(row.metadata.get(k) != v for k, v in wanted.items()):
                return False
            if template and template not in (row.template_id, row.alias):
                return False
            return started_after is None or row.started_at >= started_after

        rows, next_after = self.manager.list_page(states, after, order == "desc", limit, keep)
        headers = [("x-next-token", _encode_token(next_after))] if next_after is not None else []
        await send_json(send, 200, [self._listed(r) for r in rows], headers)


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
    }


def _encode_token(after: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(f"{after[0]!r}__{after[1]}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        started, _, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("__")
        return float(started), sandbox_id
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "'nextToken' is not a token this API gave out") from None


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
            raise ApiError(400, f"'metadata' filter part '{part}' is not key=value")
        pairs[unquote(key)] = unquote(value)
    return pairs


def _parse_time(value: str, name: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ApiError(400, f"'{name}' must be an ISO-8601 time, got '{value}'") from None
