"""Hostile input against a real agent over real sockets (issue 11, items 1, 7 and 9; issue 12 item 3):
gzip bombs and bodies that lie about their encoding, deeply nested JSON, invalid environment
variables, and pseudo files whose size lies. Each answers a 4xx a person can act on, never a 5xx or a
traceback, and the agent's memory stays bounded."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import httpx
import pytest
from conftest import Agent, peak_rss

GIB = 1 << 30
RSS_GROWTH_LIMIT = 96 << 20
"""How much the agent's RSS may grow while it refuses or writes a 1 GiB bomb: a few MiB of pieces and
buffers, far below the bomb's size (inflated whole it would be 1 GiB)."""


@cache
def bomb(size: int = GIB) -> bytes:
    """``size`` zero bytes, gzip-compressed (about 1/1000 of ``size``)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [deflate.compress(block) for _ in range(size >> 20)]
    parts.append(deflate.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def lone_agent(start_agent: Callable[..., Agent]) -> Agent:
    """An agent of this module's own, so its RSS is this module's doing."""
    return start_agent()


def envelope(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def end_stream_error(body: bytes) -> dict[str, str]:
    """The error of a Connect stream reply's end-stream frame."""
    offset = 0
    while offset < len(body):
        flags, length = struct.unpack_from(">BI", body, offset)
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flags & 0x02:
            return json.loads(payload)["error"]  # type: ignore[no-any-return]
    raise AssertionError(f"no end-stream frame in {body[:200]!r}")


# ------------------------------------------------------------------------------------------ gzip bombs


def test_unary_gzip_bomb_is_refused_with_bounded_memory(lone_agent: Agent) -> None:
    with peak_rss(lone_agent) as rss:
        r = httpx.post(
            f"{lone_agent.url}/filesystem.Filesystem/Stat",
            content=bomb(),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
            timeout=60,
        )
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "resource_exhausted"
    assert "exceeds the limit of 16777216 bytes after decompression" in r.json()["message"]
    assert rss[1] - rss[0] < RSS_GROWTH_LIMIT, f"RSS grew {(rss[1] - rss[0]) >> 20} MiB"
    assert httpx.get(f"{lone_agent.url}/health").status_code == 204


def test_stream_envelope_gzip_bomb_is_refused_with_bounded_memory(lone_agent: Agent) -> None:
    with peak_rss(lone_agent) as rss:
        r = httpx.post(
            f"{lone_agent.url}/filesystem.Filesystem/WatchDir",
            content=envelope(0x01, bomb()),
            headers={"content-type": "application/connect+json", "connect-content-encoding": "gzip"},
            timeout=60,
        )
    assert r.status_code == 200
    error = end_stream_error(r.content)
    assert error["code"] == "resource_exhausted"
    assert "message exceeds the limit of 16777216 bytes after decompression" in error["message"]
    assert rss[1] - rss[0] < RSS_GROWTH_LIMIT, f"RSS grew {(rss[1] - rss[0]) >> 20} MiB"


def test_files_gzip_bomb_upload_streams_to_disk_with_bounded_memory(lone_agent: Agent, tmp_path: Path) -> None:
    size = 256 << 20
    target = tmp_path / "bomb.bin"
    with peak_rss(lone_agent) as rss:
        r = httpx.post(
            f"{lone_agent.url}/files",
            params={"path": str(target)},
            content=bomb(size),
            headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
            timeout=120,
        )
    assert r.status_code == 200, r.text
    assert target.stat().st_size == size
    assert rss[1] - rss[0] < RSS_GROWTH_LIMIT, f"RSS grew {(rss[1] - rss[0]) >> 20} MiB"


def test_bodies_labelled_gzip_that_are_not_gzip_are_invalid_argument(agent: Agent, tmp_path: Path) -> None:
    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/Stat",
        content=b'{"path":"/"}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument", r.text
    assert "not valid gzip" in r.json()["message"]

    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/WatchDir",
        content=envelope(0x01, b'{"path":"/"}'),
        headers={"content-type": "application/connect+json", "connect-content-encoding": "gzip"},
    )
    assert r.status_code == 200 and end_stream_error(r.content)["code"] == "invalid_argument"

    truncated = gzip.compress(b"x" * 10_000)[:-12]
    for body in (b"plain text", truncated):
        for content_type in ("application/octet-stream", "multipart/form-data; boundary=b"):
            r = httpx.post(
                f"{agent.url}/files",
                params={"path": str(tmp_path / "f")},
                content=body,
                headers={"content-type": content_type, "content-encoding": "gzip"},
            )
            assert r.status_code == 400, r.text
            assert r.json()["code"] == 400
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_multipart_upload_can_be_gzip_encoded(agent: Agent, tmp_path: Path) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nzipped content\r\n--b--\r\n'
    r = httpx.post(
        f"{agent.url}/files",
        params={"path": str(tmp_path / "z.txt")},
        content=gzip.compress(body),
        headers={"content-type": "multipart/form-data; boundary=b", "content-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert (tmp_path / "z.txt").read_bytes() == b"zipped content"


# ------------------------------------------------------------------------------------ bad input, 4xx only


def test_init_with_deeply_nested_json_is_400(agent: Agent) -> None:
    r = httpx.post(f"{agent.url}/init", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["message"]
    assert httpx.get(f"{agent.url}/health").status_code == 204


@pytest.mark.parametrize(
    ("env_vars", "named"),
    [({"A=B": "x"}, "'A=B'"), ({"": "x"}, "''"), ({"1X": "x"}, "'1X'"), ({"OK": "a\u0000b"}, "OK")],
)
def test_init_refuses_invalid_env_vars(start_agent: Callable[..., Agent], env_vars: dict[str, str], named: str) -> None:
    agent = start_agent()
    r = httpx.post(f"{agent.url}/init", json={"envVars": env_vars})
    assert r.status_code == 400, r.text
    assert "envVars" in r.json()["message"] and named in r.json()["message"]
    # Nothing was applied: commands still run.
    r = httpx.get(f"{agent.url}/envs")
    assert r.json() == {}


def unary(agent: Agent, method: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{agent.url}/{method}", json=body, headers={"content-type": "application/json"})


def start(agent: Agent, process: dict[str, object]) -> dict[str, str]:
    r = httpx.post(
        f"{agent.url}/process.Process/Start",
        content=envelope(0, json.dumps({"process": process}).encode()),
        headers={"content-type": "application/connect+json"},
    )
    assert r.status_code == 200
    return end_stream_error(r.content)


@pytest.mark.parametrize(
    ("process", "field"),
    [
        ({"cmd": "/bin/true", "envs": {"A=B": "1"}}, "process.envs"),
        ({"cmd": "/bin/true", "envs": {"": "1"}}, "process.envs"),
        ({"cmd": "/bin/true", "envs": {"A": "x\u0000y"}}, "process.envs"),
        ({"cmd": "/bin/tr\u0000ue"}, "process.cmd"),
        ({"cmd": "/bin/true", "args": ["a\u0000"]}, "process.args"),
    ],
)
def test_start_refuses_invalid_env_and_nul_bytes(agent: Agent, process: dict[str, object], field: str) -> None:
    error = start(agent, process)
    assert error["code"] == "invalid_argument", error
    assert field in error["message"]


# ------------------------------------------------------------------------------------ pseudo files


@pytest.mark.parametrize("path", ["/proc/version", "/proc/self/status", "/proc/sys/kernel/random/boot_id"])
@pytest.mark.parametrize("accept_encoding", ["identity", "gzip"])
def test_proc_files_download_their_content(agent: Agent, path: str, accept_encoding: str) -> None:
    r = httpx.get(f"{agent.url}/files", params={"path": path}, headers={"accept-encoding": accept_encoding})
    assert r.status_code == 200, r.text
    assert r.content, f"{path} downloaded empty"
    if path == "/proc/version":
        assert r.content == Path(path).read_bytes()
    if path == "/proc/self/status":
        assert r.content.startswith(b"Name:")


def test_sys_file_that_claims_a_page_downloads_exactly_its_content(agent: Agent) -> None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        pytest.skip("no transparent_hugepage in this kernel")
    assert path.stat().st_size == 4096
    for encoding in ("identity", "gzip"):
        r = httpx.get(f"{agent.url}/files", params={"path": str(path)}, headers={"accept-encoding": encoding})
        assert r.status_code == 200
        assert r.content == path.read_bytes()


def test_proc_file_through_the_sdk(sandbox: object) -> None:
    content = sandbox.files.read("/proc/sys/kernel/random/boot_id")  # type: ignore[attr-defined]
    assert len(content.strip()) == 36, content


def test_error_bodies_are_json_without_tracebacks(agent: Agent) -> None:
    for r in (
        httpx.get(f"{agent.url}/files", params={"username": "\u0000"}),  # found by the fuzz run
        unary(agent, "filesystem.Filesystem/Stat", {"path": "\u0000"}),
        httpx.post(
            f"{agent.url}/filesystem.Filesystem/Stat", content=b"\xff\xfe", headers={"content-type": "application/json"}
        ),
        httpx.post(
            f"{agent.url}/filesystem.Filesystem/Stat", content=b"x", headers={"content-type": "application/proto"}
        ),
    ):
        assert 400 <= r.status_code < 500, r.text
        assert "Traceback" not in r.text
        base64.b64encode(r.content)  # a body, not a dropped connection
