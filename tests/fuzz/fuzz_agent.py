"""Fuzz the agent's HTTP parsing in process: Connect bodies (JSON and binary, identity and gzip, unary
and enveloped streams, chunked anyhow), REST ``/files``, ``/init``, headers and query strings.

``make fuzz`` runs a short bounded pass (CI); for a long run::

    FUZZ_EXAMPLES=200000 .venv/bin/pytest -q tests/fuzz/fuzz_agent.py -p no:cacheprovider

(hypothesis keeps failing examples in ``.hypothesis/`` and replays them first next time).

Safety, since the agent acts on the real filesystem as the user running the fuzz (often root): every
path that could be written or removed is a single name under a fresh temporary directory (no ``/``,
so no ``..``); only read-only calls (``Stat``, shallow ``ListDir``, downloads of a fixed list of
files) see arbitrary paths; the only command started is ``/bin/true``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import pwd
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from harness import FUZZ, Request, Target, check, drive
from hypothesis import given
from hypothesis import strategies as st
from sandboxd.agent.app import AgentApp
from sandboxd.agent.rpc import Method
from sandboxd.agent.services.filesystem import FilesystemService
from sandboxd.agent.services.process import ProcessService
from sandboxd.agent.services.watch import WatchService
from sandboxd.agent.state import AgentState

ROOT = tempfile.mkdtemp(prefix="sandboxd-fuzz-")
USER = pwd.getpwuid(os.getuid()).pw_name

# ---------------------------------------------------------------------------------------- strategies

names = st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..")
)
safe_paths = st.one_of(st.just(ROOT), names.map(lambda n: f"{ROOT}/{n}"))
"""Paths that may be written or removed: the fuzz directory or a name directly in it."""

read_paths = st.one_of(
    safe_paths,
    st.sampled_from(["/", "/proc/version", "/proc/self/status", "/sys/kernel/mm", "/dev/null", "~", "", "a/b"]),
    st.text(max_size=20).map(lambda t: "/proc/self/" + t.replace("/", "")),
)
"""Paths only read (Stat, ListDir at depth 1, downloads): anything, from a few real places."""

texts = st.text(max_size=30)
latin1 = st.text(st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=40)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)


def _chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(body[last:p])
        last = p
    pieces.append(body[last:])
    return [p for p in pieces if p] or [b""]


@st.composite
def encoded(draw: st.DrawFn, payload: bytes) -> tuple[bytes, str | None]:
    """``payload`` as sent: identity, gzip, a corrupt or truncated gzip, or labelled wrongly."""
    how = draw(st.sampled_from(["identity", "identity", "gzip", "corrupt", "truncated", "odd"]))
    if how == "gzip":
        return gzip.compress(payload), "gzip"
    if how == "corrupt":
        data = bytearray(gzip.compress(payload))
        data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
        return bytes(data), "gzip"
    if how == "truncated":
        return gzip.compress(payload)[: draw(st.integers(0, 30))], "gzip"
    if how == "odd":
        return payload, draw(st.sampled_from(["br", "zstd", "GZIP", "gzip, identity", "", "x" * 100]))
    return payload, None


# Fields a path-taking request may carry, with their safe or read-only values.
WRITE_RPCS = {"MakeDir": ["path"], "Remove": ["path"], "Move": ["source", "destination"]}
READ_RPCS = {"Stat": ["path"], "ListDir": ["path"]}
WATCH_RPCS = {"WatchDir": ["path"], "CreateWatcher": ["path"]}


@st.composite
def rpc_message(draw: st.DrawFn, method: str) -> dict[str, Any]:
    message: dict[str, Any] = draw(st.dictionaries(texts, json_values, max_size=3))
    for fields, paths in ((WRITE_RPCS, safe_paths), (READ_RPCS, read_paths), (WATCH_RPCS, safe_paths)):
        for name in fields.get(method, []):
            message[name] = draw(paths)
    if method == "ListDir":
        message["depth"] = draw(st.sampled_from([0, 1, 2, -1, "1", "x", None]))
        if message["path"] not in (ROOT,) and not str(message["path"]).startswith(ROOT + "/"):
            message["depth"] = 1  # a deep walk of / would be slow, not wrong
    if method in WATCH_RPCS:
        message["recursive"] = draw(st.sampled_from([True, False, 1, "yes", None]))
    if method == "Start":
        message["process"] = {
            "cmd": draw(st.sampled_from(["/bin/true", "/bin/tr\x00ue", "", 5])),
            "args": draw(st.lists(texts, max_size=3)),
            "envs": draw(st.dictionaries(texts, texts, max_size=3)),
            "cwd": draw(st.one_of(st.none(), safe_paths)),
        }
    if method in ("GetWatcherEvents", "RemoveWatcher"):
        message["watcherId"] = draw(texts)
    return message


UNARY = ["Stat", "ListDir", "MakeDir", "Remove", "Move", "CreateWatcher", "GetWatcherEvents", "RemoveWatcher"]
PROCESS_UNARY = ["List", "SendInput", "SendSignal", "CloseStdin", "Update"]
STREAMS = ["WatchDir", "Start", "Connect", "StreamInput"]


def _service(method: str) -> str:
    fs = method in UNARY or method == "WatchDir"
    return "filesystem.Filesystem" if fs else "process.Process"


@st.composite
def connect_requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from([*UNARY, *PROCESS_UNARY, *STREAMS]))
    stream = method in STREAMS
    message = draw(rpc_message(method))
    if method in PROCESS_UNARY or method in ("Connect", "StreamInput"):
        message["process"] = draw(st.sampled_from([{"pid": 1}, {"pid": 99999}, {"tag": "x"}, {}, "x"]))
    raw = json.dumps(message).encode()
    if draw(st.booleans()):
        raw = draw(st.sampled_from([b"", b"{", b"[" * 2000, b"\xff\xfe", b'{"path": 1e999}', raw + b"garbage"]))
    headers: list[tuple[bytes, bytes]] = []
    content_type = draw(
        st.sampled_from(
            ["application/connect+json", "application/connect+proto"]
            if stream
            else ["application/json", "application/proto", "application/json; charset=utf-8"]
        )
        | st.sampled_from(["text/plain", "", "application/connect+json; x=y", "application/grpc"])
    )
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    if "proto" in content_type and draw(st.booleans()):
        raw = draw(st.binary(max_size=64))
    if stream:
        messages = [raw, *draw(st.lists(st.sampled_from([raw, b"{}", b""]), max_size=2))]
        frames = b""
        encoding = None
        for payload in messages:
            flags = draw(st.sampled_from([0, 0, 1, 2, 3, 0x80]))
            if flags & 1:
                payload, encoding = draw(encoded(payload))
            length = draw(st.sampled_from([len(payload), len(payload), len(payload) + 3, 0xFFFFFFFF]))
            frames += struct.pack(">BI", flags, length) + payload
        if draw(st.booleans()):
            frames = frames[: draw(st.integers(0, len(frames)))]
        body = frames
        if encoding is not None:
            headers.append((b"connect-content-encoding", encoding.encode()))
    else:
        body, encoding = draw(encoded(raw))
        if encoding is not None:
            headers.append((b"content-encoding", encoding.encode()))
    for name in draw(
        st.lists(
            st.sampled_from(
                [b"connect-timeout-ms", b"keepalive-ping-interval", b"authorization", b"connect-protocol-version"]
            ),
            max_size=3,
        )
    ):
        value = draw(
            st.sampled_from(
                ["0", "1", "50", "-1", "99999999999", "x", "Basic " + base64.b64encode(b"nobody:").decode()]
            )
            | latin1
        )
        headers.append((name, value.encode("latin-1")))
    cuts = draw(st.lists(st.integers(0, 1 << 16), max_size=4))
    verb = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT"]))
    return Request(verb, f"/{_service(method)}/{method}", b"", headers, _chunked(body, cuts))


def _query(pairs: list[tuple[str, str]]) -> bytes:
    from urllib.parse import quote

    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode()


@st.composite
def files_requests(draw: st.DrawFn) -> Request:
    upload = draw(st.booleans())
    pairs = [("path", draw(safe_paths if upload else read_paths))] if draw(st.integers(0, 4)) else []
    for name in draw(
        st.lists(st.sampled_from(["username", "signature", "signature_expiration", "path", "x"]), max_size=3)
    ):
        value = draw(st.sampled_from([USER, "nobody-such", "v1_x", "-1", "99999999999999999999"]) | texts)
        pairs.append((name, value if name != "path" else draw(safe_paths if upload else read_paths)))
    query = _query(pairs)
    if draw(st.integers(0, 9)) == 0:
        query = draw(st.binary(max_size=40))
    headers: list[tuple[bytes, bytes]] = []
    for name in draw(
        st.lists(
            st.sampled_from([b"range", b"if-none-match", b"if-modified-since", b"accept-encoding", b"x-metadata-k"]),
            max_size=3,
        )
    ):
        value = draw(
            st.sampled_from(["bytes=0-1", "bytes=-5", "bytes=5-1", "bytes=a-b", "*", "gzip", "gzip;q=x"]) | latin1
        )
        headers.append((name, value.encode("latin-1")))
    if not upload:
        return Request(draw(st.sampled_from(["GET", "HEAD"])), "/files", query, headers)
    content = draw(st.binary(max_size=200))
    kind = draw(st.sampled_from(["octet", "multipart", "multipart", "other"]))
    if kind == "octet":
        headers.append((b"content-type", b"application/octet-stream"))
        body = content
    elif kind == "multipart":
        boundary = draw(st.sampled_from(["b", "----x", "", "a" * 80]))
        headers.append((b"content-type", f"multipart/form-data; boundary={boundary}".encode()))
        parts = b""
        for _ in range(draw(st.integers(0, 3))):
            filename = draw(st.one_of(safe_paths, st.just(""), names))
            if not filename.startswith(ROOT):
                filename = f"{ROOT}/{filename.replace('/', '_')}" if filename else ""
            form = draw(st.sampled_from(["file", "file", "other"]))
            disposition = f'form-data; name="{form}"; filename="{filename}"'
            parts += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("utf-8", "surrogatepass")
            parts += content + b"\r\n"
        body = parts + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    else:
        headers.append((b"content-type", draw(latin1).encode("latin-1")))
        body = content
    body, encoding = draw(encoded(body))
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode()))
    cuts = draw(st.lists(st.integers(0, 1 << 12), max_size=4))
    return Request("POST", "/files", query, headers, _chunked(body, cuts))


@st.composite
def rest_requests(draw: st.DrawFn) -> Request:
    path = draw(st.sampled_from(["/init", "/init", "/envs", "/metrics", "/health", "/nope", "/files/compose"]))
    verb = draw(st.sampled_from(["POST", "GET", "OPTIONS", "DELETE"]))
    body = json.dumps(draw(json_values)).encode()
    if draw(st.booleans()):
        init = {
            "envVars": draw(st.dictionaries(texts, texts, max_size=3) | json_values),
            "defaultUser": draw(st.sampled_from([USER, "nobody-such", "", 5])),
            "defaultWorkdir": ROOT,
        }
        body = json.dumps(init).encode()
    if draw(st.booleans()):
        body = draw(st.sampled_from([b"[" * 100_000, b"{" * 5000, b"\xff", b"", b"null"]))
    headers = [(b"content-type", b"application/json")]
    return Request(verb, path, b"", headers, _chunked(body, draw(st.lists(st.integers(0, 1 << 12), max_size=3))))


# ------------------------------------------------------------------------------------------ the target


class AgentTarget:
    """A fresh agent app per example (state from one request cannot leak into the next), whose
    watchers are closed after it."""

    def __init__(self) -> None:
        self.state = AgentState(default_user=USER, default_workdir=ROOT)
        self.watch = WatchService(self.state)
        methods: list[Method] = [
            *FilesystemService(self.state).methods(),
            *self.watch.methods(),
            *ProcessService(self.state).methods(),
        ]
        self.app = AgentApp(self.state, methods)

    def close(self) -> None:
        for watcher_id in list(self.watch.watchers):
            self.watch._close(watcher_id)


LOOP = asyncio.new_event_loop()
HEALTH = Request("GET", "/health")


def run_one(request: Request) -> None:
    target = AgentTarget()

    async def go() -> None:
        response = await drive(target.app, request)
        check(request, response)
        after = await drive(target.app, HEALTH)
        assert after.status == 204, "the agent answers /health after any request"
        target.close()

    LOOP.run_until_complete(go())


AGENT = Target("agent", lambda: AgentTarget().app, HEALTH)


@pytest.fixture(autouse=True, scope="module")
def _cleanup() -> Iterator[None]:
    yield
    import shutil

    shutil.rmtree(ROOT, ignore_errors=True)


@FUZZ
@given(connect_requests())
def test_connect_bodies_and_headers(request: Request) -> None:
    run_one(request)


@FUZZ
@given(files_requests())
def test_files_uploads_downloads_and_queries(request: Request) -> None:
    run_one(request)


@FUZZ
@given(rest_requests())
def test_rest_endpoints(request: Request) -> None:
    run_one(request)
