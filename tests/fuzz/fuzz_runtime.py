"""Fuzz the runtime's HTTP parsing in process: control-plane bodies (JSON of every shape, deep, huge,
not JSON at all), query strings, path ids, the proxy's routing headers and Host names, and signed
``/files`` URLs without a sandbox.

The app is the runtime's own (:class:`sandboxd.runtime.server.RuntimeApp` over a real manager, store
and templates in a temporary data dir). Its zygote is never started, so nothing is ever forked: a
create that passes validation answers 503 "cannot create sandboxes right now", which is the one 5xx
allowed, with the proxy's 502 "…was not found" for sandboxes that do not run. The store holds a
sandbox that ended and one paused to its filesystem, so per-sandbox routes get past their lookup.

``make fuzz`` runs a short bounded pass (CI); for a long run::

    FUZZ_EXAMPLES=200000 .venv/bin/pytest -q tests/fuzz/fuzz_runtime.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from harness import FUZZ, Broken, Request, drive
from hypothesis import example, given
from hypothesis import strategies as st
from sandboxd import _core
from sandboxd.runtime import host, zygote
from sandboxd.runtime.api import ControlPlane
from sandboxd.runtime.backend import LocalBackend
from sandboxd.runtime.disks import DiskPool
from sandboxd.runtime.manager import HostPlace, Limits, SandboxManager
from sandboxd.runtime.observe import Observer
from sandboxd.runtime.observe.endpoints import OperatorEndpoints
from sandboxd.runtime.observe.http import RequestObserver
from sandboxd.runtime.observe.probes import Readiness
from sandboxd.runtime.proxy import SandboxProxy
from sandboxd.runtime.server import RuntimeApp
from sandboxd.runtime.store import SandboxRow, Store
from sandboxd.runtime.template_api import TemplateApi
from sandboxd.runtime.template_builder import TemplateBuilder
from sandboxd.runtime.templates import Templates, default_store_dir
from sandboxd.runtime.zygote_client import ZygoteClient

KEY = "fuzz-key"
DOMAIN = "sandboxes.test"
ENDED, PAUSED = "ended0000000000000000", "paused000000000000000"

# ---------------------------------------------------------------------------------------- strategies

texts = st.text(max_size=30)
latin1 = st.text(st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=40)
numbers = st.sampled_from(["0", "1", "-1", "5", "100", "101", "1e3", "2147483648", "9" * 25, "9" * 5000, "0x10", "²"])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.integers(-(2**70), 2**70), texts)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)
ids = st.sampled_from([ENDED, PAUSED, ENDED, PAUSED, "doesnotexist00000000"]) | st.one_of(
    st.sampled_from(["..", ".", "a" * 65, "%2e%2e", "x-y_z"]),
    st.text(st.characters(blacklist_characters="/?#"), min_size=1, max_size=24),
)
ROUTES = [
    ("POST", "/sandboxes"), ("POST", "/v2/sandboxes"), ("GET", "/sandboxes"), ("GET", "/v2/sandboxes"),
    ("GET", "/sandboxes/{}"), ("DELETE", "/sandboxes/{}"), ("POST", "/sandboxes/{}/timeout"),
    ("POST", "/sandboxes/{}/connect"), ("POST", "/v2/sandboxes/{}/connect"), ("POST", "/sandboxes/{}/pause"),
    ("POST", "/sandboxes/{}/resume"), ("GET", "/sandboxes/{}/metrics"), ("GET", "/sandboxes/{}/logs"),
    ("GET", "/v2/sandboxes/{}/logs"), ("GET", "/sandboxes/{}/events"), ("GET", "/files"), ("POST", "/files"),
    ("GET", "/health"),
    ("POST", "/v3/templates"), ("GET", "/templates"), ("DELETE", "/templates/{}"), ("GET", "/templates/aliases/{}"),
    ("GET", "/templates/{}/files/{}"), ("PUT", "/templates/{}/files/{}/upload"),
    ("POST", "/v2/templates/{}/builds/{}"), ("GET", "/templates/{}/builds/{}/status"),
]  # fmt: skip
"""The runtime's routes: most requests aim at one (the rest of the method/path space is a 404 or 405)."""


@st.composite
def targets(draw: st.DrawFn) -> tuple[str, str]:
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD"]))
        return method, draw(st.sampled_from(["/", "/nope", "/sandboxes/x/nope"]) | texts.map(lambda t: "/" + t))
    method, template = draw(st.sampled_from(ROUTES))
    return method, template.replace("{}", draw(ids))


QUERY_NAMES = [
    "limit", "order", "state", "nextToken", "metadata", "template", "startedAfter", "start", "end",
    "cursor", "direction", "level", "search", "signature", "signature_expiration", "path", "username",
    "logsOffset", "token",
]  # fmt: skip


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=60))
    pairs = []
    for name in draw(st.lists(st.sampled_from(QUERY_NAMES) | texts, max_size=5)):
        value = draw(
            numbers
            | st.sampled_from(["asc", "desc", "running", "paused,running", "dead", "forward", "backward", "error"])
            | st.sampled_from(["k=v", "k%3Dv%26a%3Db", "=", "&&", "2026-01-01T00:00:00Z", "0001-01-01", "v1_x"])
            | texts
        )
        pairs.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    query = "&".join(pairs)
    if draw(st.integers(0, 19)) == 0:
        query += "&x=" + "y" * 20_000
    return query.encode()


BODY_FIELDS = [
    "templateID", "timeout", "metadata", "envVars", "autoPause", "autoPauseMemory", "autoResume", "memory",
    "name", "tags", "fromTemplate", "fromImage", "steps", "force", "startCmd", "readyCmd",
]  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from([b"", b"{", b"[" * 100_000, b"{" * 5000, b"\xff\xfe", b"null", b"[]", b"1e999"]))
    if kind == 1:
        return draw(st.binary(max_size=80))
    fields: dict[str, Any] = draw(st.dictionaries(texts, json_values, max_size=3))
    for name in draw(
        st.lists(
            st.sampled_from(BODY_FIELDS),
            max_size=5,
        )
    ):
        fields[name] = draw(
            json_values
            | st.sampled_from(["host", "nope", 0, -5, 60, 2**31, 1.5, True, None, {}, {"enabled": True}])
            | st.dictionaries(st.sampled_from(["A", "A=B", "", "_x", "é", "\ud800", "x" * 300]), texts, max_size=3)
        )
    raw = json.dumps(fields).encode("utf-8", "surrogatepass")
    if kind == 2 and raw.endswith(b"}"):
        raw = raw[:-1] + b', "timeout": ' + b"9" * 5000 + b"}"
    return raw


@st.composite
def requests(draw: st.DrawFn) -> Request:
    headers: list[tuple[bytes, bytes]] = []
    key = KEY if draw(st.integers(0, 9)) else draw(st.sampled_from(["", "wrong", KEY + "x"]))
    if key:
        headers.append((b"x-api-key", key.encode()))
    routing = draw(st.integers(0, 14))
    if routing == 0:
        headers.append((b"e2b-sandbox-id", draw(ids | latin1).encode("utf-8", "surrogatepass")))
        if draw(st.booleans()):
            headers.append((b"e2b-sandbox-port", draw(numbers | latin1).encode("utf-8", "surrogatepass")))
    elif routing == 1:
        port = draw(numbers | st.just("49983"))
        host = f"{port}-{draw(ids)}.{draw(st.sampled_from([DOMAIN, 'other.test', '']))}"
        headers.append((b"host", host.encode("utf-8", "surrogatepass")))
    else:
        headers.append((b"host", b"127.0.0.1:3000"))
    for name in draw(st.lists(st.sampled_from([b"content-type", b"content-length", b"x-access-token"]), max_size=2)):
        headers.append((name, draw(latin1).encode("latin-1")))
    method, path = draw(targets())
    body = draw(bodies()) if method in ("POST", "PUT") or draw(st.integers(0, 9)) == 0 else b""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return Request(method, path, draw(queries()), headers, [c for c in chunks if c] or [b""])


# ------------------------------------------------------------------------------------------ the target


class RuntimeTarget:
    """The runtime's app over a real manager in a temporary data dir; the zygote never runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="sandboxd-fuzz-runtime-"))
        self.store = Store(self.data / "sandboxd.db")
        now = time.time()
        for sandbox_id, state in ((ENDED, "ended"), (PAUSED, "paused")):
            row = SandboxRow(
                sandbox_id, "base", None, state, now - 60, now + 300, "token-" + sandbox_id, 2, 1024, 10240
            )
            row.pause_mode, row.remaining_s, row.ended_reason = "filesystem", 100.0, "killed before the fuzz run"
            self.store.insert(row)
            self.store.event(sandbox_id, "created", "for the fuzz run")
        # 'host' needs no build; 'base' is never asked for (a create of it would build Debian's base).
        templates = Templates(self.store, default_store_dir(self.data))
        self.zygote = ZygoteClient(zygote.start)
        observer = Observer()
        # Its own id registry and a disk pool that never fills: no create gets that far.
        place = HostPlace(
            host.instance_name(self.data), _core.IdRegistry(str(self.data / "ids")), DiskPool(self.data, 1)
        )
        self.manager = SandboxManager(self.store, templates, self.data, self.zygote, Limits(), place, observer=observer)
        loop.run_until_complete(self.manager.start())
        backend = LocalBackend(self.manager)
        proxy = SandboxProxy(backend, DOMAIN)
        readiness = Readiness(self.zygote, self.data, templates)
        self.operators = OperatorEndpoints(self.manager, self.zygote, readiness, observer.metrics, None, KEY, self.data)
        self.app = RuntimeApp(
            ControlPlane(backend, KEY, DOMAIN),
            proxy,
            self.operators,
            RequestObserver(observer.metrics),
            DOMAIN,
            TemplateApi(TemplateBuilder(self.manager, templates), KEY),
        )

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        self.operators.close()
        loop.run_until_complete(self.manager.stop())
        self.store.close()
        shutil.rmtree(self.data, ignore_errors=True)


LOOP = asyncio.new_event_loop()
HEALTH = Request("GET", "/health")
TARGET: RuntimeTarget | None = None


def _message(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return ""
    return str(answer.get("message", "")) if isinstance(answer, dict) else ""


def check(request: Request, status: int | None, body: bytes) -> None:
    """No 5xx but the two a runtime without a zygote owes: 503 for a create, 502 for a sandbox that
    does not run; never a traceback."""
    if status is None:
        raise Broken(f"no response to {request.method} {request.path}")
    message = _message(body)
    allowed = (status == 503 and "cannot create sandboxes" in message) or (status == 502 and "not found" in message)
    if status >= 500 and not allowed:
        raise Broken(f"{status} for {request.method} {request.path}?{request.query[:200]!r}: {body[:500]!r}")
    if b"Traceback" in body:
        raise Broken(f"a traceback in the answer to {request.method} {request.path}")


def run_one(request: Request) -> None:
    assert TARGET is not None

    async def go() -> None:
        response = await drive(TARGET.app, request)
        check(request, response.status, bytes(response.body))
        after = await drive(TARGET.app, HEALTH)
        assert after.status == 200, "the runtime answers /health after any request"

    LOOP.run_until_complete(go())


@pytest.fixture(autouse=True, scope="module")
def _target() -> Iterator[None]:
    global TARGET
    TARGET = RuntimeTarget(LOOP)
    yield
    TARGET.close(LOOP)


@FUZZ
@given(requests())
# A valid create on a runtime whose zygote is down: a 503 before any disk is taken (CI once drew
# it and got a 500 from a disk pool that was never started).
@example(
    Request(
        method="POST",
        path="/sandboxes",
        query=b"",
        headers=[(b"x-api-key", b"fuzz-key"), (b"host", b"127.0.0.1:3000")],
        body=[b'{"templateID": "host"}'],
    )
)
def test_runtime_requests(request: Request) -> None:
    run_one(request)
