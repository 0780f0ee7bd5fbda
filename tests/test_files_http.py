"""``/files``, ``/health``, ``/init``, ``/envs`` and ``/metrics`` over raw HTTP: what the SDK does not
exercise directly (tokens, signed URLs, ranges, bad input, disconnects)."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Agent
from e2b.sandbox.signature import get_signature


def test_health_is_204(agent: Agent) -> None:
    r = httpx.get(f"{agent.url}/health")
    assert r.status_code == 204
    assert r.headers["cache-control"] == "no-store"
    assert r.content == b""


def test_download_range_and_conditional_requests(agent: Agent, workdir: Path) -> None:
    target = workdir / "range.bin"
    target.write_bytes(bytes(range(256)) * 16)
    url = f"{agent.url}/files"
    r = httpx.get(url, params={"path": str(target)}, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.content == bytes(range(10, 20))
    assert r.headers["content-range"] == "bytes 10-19/4096"
    r = httpx.get(url, params={"path": str(target)}, headers={"Range": "bytes=-5"})
    assert r.status_code == 206
    assert r.content == bytes(range(251, 256))
    r = httpx.get(url, params={"path": str(target)}, headers={"Range": "bytes=5000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */4096"
    full = httpx.get(url, params={"path": str(target)}, headers={"Accept-Encoding": "identity"})
    assert full.status_code == 200
    assert full.headers["content-length"] == "4096"
    r = httpx.get(url, params={"path": str(target)}, headers={"If-None-Match": full.headers["etag"]})
    assert r.status_code == 304
    mtime = int(target.stat().st_mtime)
    assert full.headers["last-modified"] == email.utils.formatdate(mtime, usegmt=True)
    for since, status in (
        (full.headers["last-modified"], 304),
        (email.utils.formatdate(mtime - 1, usegmt=True), 200),
        (time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(mtime)), 304),  # RFC 850
        (time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(mtime)), 304),  # asctime
        ("not a date", 200),
    ):
        r = httpx.get(url, params={"path": str(target)}, headers={"If-Modified-Since": since})
        assert r.status_code == status, since


def test_download_gzip_only_when_accepted(agent: Agent, workdir: Path) -> None:
    target = workdir / "text.txt"
    target.write_text("compress me " * 1000)
    raw = httpx.get(f"{agent.url}/files", params={"path": str(target)}, headers={"Accept-Encoding": "gzip"})
    assert raw.headers.get("content-encoding") == "gzip"
    assert raw.text == "compress me " * 1000
    plain = httpx.get(f"{agent.url}/files", params={"path": str(target)}, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.text == "compress me " * 1000


def test_download_errors_are_envd_shaped(agent: Agent, workdir: Path) -> None:
    r = httpx.get(f"{agent.url}/files", params={"path": str(workdir)})
    assert r.status_code == 400
    assert r.json() == {"code": 400, "message": f"path '{workdir}' is a directory"}
    r = httpx.get(f"{agent.url}/files", params={"path": str(workdir / "nope")})
    assert r.status_code == 404
    assert r.json()["message"] == f"path '{workdir / 'nope'}' does not exist"
    r = httpx.get(f"{agent.url}/files", params={"path": "/x", "username": "no-such-user"})
    assert r.status_code == 401
    assert "no-such-user" in r.json()["message"]
    r = httpx.get(f"{agent.url}/files", params={"path": "~someone/x"})
    assert r.status_code == 400


def test_upload_bad_input_gets_clear_errors(agent: Agent, workdir: Path) -> None:
    url = f"{agent.url}/files"
    r = httpx.post(url, content=b"x", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    assert "path query parameter is required" in r.json()["message"]
    r = httpx.post(url, params={"path": str(workdir / "a")}, content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    assert "unsupported content type" in r.json()["message"]
    r = httpx.post(url, params={"path": str(workdir)}, files={"file": ("x", b"data")})
    assert r.status_code == 400
    assert "is a directory" in r.json()["message"]
    r = httpx.post(
        url,
        params={"path": str(workdir / "two")},
        files=[("file", ("a", b"1")), ("file", ("b", b"2"))],
    )
    assert r.status_code == 400
    assert "multiple files to the same path" in r.json()["message"]
    assert not (workdir / "two").exists()
    r = httpx.post(
        url,
        params={"path": str(workdir / "bad.gz")},
        content=b"not gzip at all",
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 400
    assert not (workdir / "bad.gz").exists()
    body = (
        b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="' + str(workdir).encode() + b'/t"\r\n\r\nabc'
    )
    r = httpx.post(url, content=body, headers={"Content-Type": "multipart/form-data; boundary=XYZ"})
    assert r.status_code == 400
    assert "closing boundary" in r.json()["message"]
    assert not (workdir / "t").exists()
    assert os.listdir(workdir) == []
    r = httpx.post(
        url,
        params={"path": str(workdir / "m")},
        files={"file": ("m", b"1")},
        headers={"X-Metadata-Bad": "caf\u00e9".encode()},
    )
    assert r.status_code == 400


def test_upload_as_another_user_is_chowned(agent: Agent, workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    target = workdir / "owned" / "by-nobody.txt"
    r = httpx.post(
        f"{agent.url}/files", params={"path": str(target), "username": "nobody"}, files={"file": ("f", b"x")}
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"path": str(target), "name": "by-nobody.txt", "type": "file"}]
    assert target.stat().st_uid == 65534
    assert target.parent.stat().st_uid == 65534


def _raw_request(port: int, head: bytes, body_part: bytes) -> None:
    """Send a request head and part of its body, then vanish (as a crashed client would)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body_part)
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("kind", ["octet", "multipart"])
def test_client_killed_midway_leaves_old_file_and_no_temp(agent: Agent, workdir: Path, kind: str) -> None:
    target = workdir / "precious.txt"
    target.write_text("old content")
    if kind == "octet":
        head = (
            f"POST /files?path={target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {10 << 20}\r\n\r\n"
        ).encode()
        part = b"n" * (1 << 20)
    else:
        head = (
            f"POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Content-Length: {10 << 20}\r\n\r\n"
        ).encode()
        part = f'--B\r\nContent-Disposition: form-data; name="file"; filename="{target}"\r\n\r\n'.encode()
        part += b"n" * (1 << 20)
    _raw_request(agent.port, head, part)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(os.listdir(workdir)) > 1:
        time.sleep(0.05)
    assert target.read_text() == "old content"
    assert os.listdir(workdir) == ["precious.txt"]
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_over_long_headers_are_refused(agent: Agent) -> None:
    r = httpx.get(f"{agent.url}/health", headers={"X-Big": "a" * (70 << 10)})
    assert r.status_code == 431


def test_non_utf8_names_are_listed_and_rejected_cleanly(agent: Agent, workdir: Path) -> None:
    bad = os.fsencode(str(workdir)) + b"/bad-\xff-name"
    with open(bad, "wb") as f:
        f.write(b"x")
    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/ListDir",
        json={"path": str(workdir)},
        headers={"Connect-Protocol-Version": "1"},
    )
    assert r.status_code == 200
    assert [e["name"] for e in r.json()["entries"]] == ["bad-\ufffd-name"]
    body = b'--B\r\nContent-Disposition: form-data; name="file"; filename="/tmp/\xff"\r\n\r\nx\r\n--B--\r\n'
    r = httpx.post(f"{agent.url}/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400
    assert "UTF-8" in r.json()["message"]


# ---------------------------------------------------------------------------------------- tokens, signing


@pytest.fixture(scope="module")
def secured(start_agent: Callable[..., Agent]) -> Agent:
    return start_agent(token="s3cret-token")


def test_token_is_required_except_health_and_signed_files(secured: Agent, workdir: Path) -> None:
    rpc = f"{secured.url}/filesystem.Filesystem/Stat"
    assert httpx.get(f"{secured.url}/health").status_code == 204
    r = httpx.post(rpc, json={"path": "/"})
    assert r.status_code == 401
    assert r.json()["code"] == 401
    assert httpx.post(rpc, json={"path": "/"}, headers={"X-Access-Token": "wrong"}).status_code == 401
    assert httpx.post(rpc, json={"path": "/"}, headers=secured.headers()).status_code == 200
    assert httpx.get(f"{secured.url}/envs").status_code == 401
    assert httpx.get(f"{secured.url}/envs", headers=secured.headers()).status_code == 200


def test_files_accept_header_token_or_sdk_signature(secured: Agent, workdir: Path) -> None:
    target = workdir / "signed.txt"
    target.write_text("signed")
    url = f"{secured.url}/files"
    r = httpx.get(url, params={"path": str(target)})
    assert r.status_code == 401
    assert "missing signature" in r.json()["message"]
    r = httpx.get(url, params={"path": str(target)}, headers={"X-Access-Token": "nope"})
    assert r.status_code == 401
    assert "does not match" in r.json()["message"]
    assert httpx.get(url, params={"path": str(target)}, headers=secured.headers()).text == "signed"

    sig = get_signature(str(target), "read", None, secured.token)
    assert httpx.get(url, params={"path": str(target), "signature": sig["signature"]}).text == "signed"
    sig = get_signature(str(target), "read", None, secured.token, expiration_in_seconds=60)
    params = {"path": str(target), "signature": sig["signature"], "signature_expiration": str(sig["expiration"])}
    assert httpx.get(url, params=params).text == "signed"
    sig = get_signature(str(target), "read", None, secured.token, expiration_in_seconds=-10)
    params = {"path": str(target), "signature": sig["signature"], "signature_expiration": str(sig["expiration"])}
    r = httpx.get(url, params=params)
    assert r.status_code == 401
    assert "expired" in r.json()["message"]
    # A read signature does not authorise a write.
    r = httpx.post(url, params={"path": str(target), "signature": sig["signature"]}, files={"file": ("f", b"x")})
    assert r.status_code == 401
    write_sig = get_signature(str(target), "write", None, secured.token)
    r = httpx.post(url, params={"path": str(target), "signature": write_sig["signature"]}, files={"file": ("f", b"w")})
    assert r.status_code == 200
    assert target.read_text() == "w"


def test_init_sets_token_envs_and_default_user(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    r = httpx.post(f"{agent.url}/init", json={"accessToken": "tok", "envVars": {"A": "1"}, "defaultUser": "nobody"})
    assert r.status_code == 204
    assert r.headers["x-envd-version"]
    assert httpx.get(f"{agent.url}/envs").status_code == 401
    assert httpx.get(f"{agent.url}/envs", headers={"X-Access-Token": "tok"}).json() == {"A": "1"}
    r = httpx.post(f"{agent.url}/init", json={"accessToken": "other"})
    assert r.status_code == 401
    # An account the sandbox does not have is taken as given, as envd takes it (the sandbox's own
    # code may have removed it before a pause: refusing it made the resume fail); using it fails.
    r = httpx.post(f"{agent.url}/init", json={"defaultUser": "ghost"}, headers={"X-Access-Token": "tok"})
    assert r.status_code == 204
    r = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": "~"}, headers={"X-Access-Token": "tok"})
    assert r.status_code == 401 and r.json()["message"] == "invalid username: 'ghost'", r.text
    r = httpx.post(f"{agent.url}/init", json={"defaultUser": "nobody"}, headers={"X-Access-Token": "tok"})
    assert r.status_code == 204
    r = httpx.post(f"{agent.url}/init", content=b"{not json", headers={"X-Access-Token": "tok"})
    assert r.status_code == 400
    r = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": "~"}, headers={"X-Access-Token": "tok"})
    assert r.status_code == 404  # the new default user is nobody, whose home does not exist
    assert "/nonexistent" in r.json()["message"]
    metrics = httpx.get(f"{agent.url}/metrics", headers={"X-Access-Token": "tok"}).json()
    assert metrics["mem_total"] > 0 and metrics["cpu_count"] >= 1


def test_gzip_reply_is_valid_gzip(agent: Agent, workdir: Path) -> None:
    target = workdir / "g.json"
    target.write_text('{"k": 1}' * 500)
    with httpx.Client() as client:
        request = client.build_request("GET", f"{agent.url}/files", params={"path": str(target)})
        request.headers["Accept-Encoding"] = "gzip"
        r = client.send(request, stream=True)
        raw = b"".join(r.iter_raw())
    assert gzip.decompress(raw) == target.read_bytes()


@pytest.mark.parametrize("accept", ["gzip", "identity"])
def test_a_small_file_comes_whole_with_its_length_and_a_large_one_streams(
    agent: Agent, workdir: Path, accept: str
) -> None:
    """A file of up to 1 MiB is read (and gzipped) whole before the head goes out, so every small
    download has a ``Content-Length``, its gzipped form's included (before, a gzipped download was
    always chunked); past 1 MiB a gzipped one streams in chunks, as before. The bytes are the file's
    either way, and a HEAD answers the same headers without reading it."""
    small, large = workdir / "small.json", workdir / "large.json"
    small.write_text('{"k": 1}\n' * 1000)
    large.write_text('{"k": 2}\n' * 150_000)
    for target, whole in ((small, True), (large, accept == "identity")):
        with httpx.Client() as client:
            request = client.build_request("GET", f"{agent.url}/files", params={"path": str(target)})
            request.headers["Accept-Encoding"] = accept
            r = client.send(request, stream=True)
            raw = b"".join(r.iter_raw())
        assert r.status_code == 200
        gzipped = r.headers.get("content-encoding") == "gzip"
        assert gzipped == (accept == "gzip"), r.headers
        assert (gzip.decompress(raw) if gzipped else raw) == target.read_bytes()
        if whole:
            assert r.headers["content-length"] == str(len(raw)) and "transfer-encoding" not in r.headers, r.headers
        else:
            assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers, r.headers
    head = httpx.head(f"{agent.url}/files", params={"path": str(small)}, headers={"Accept-Encoding": "identity"})
    assert head.status_code == 200 and head.headers["content-length"] == str(small.stat().st_size)


def test_incompressible_files_are_sent_raw_even_when_gzip_is_accepted(agent: Agent, workdir: Path) -> None:
    target = workdir / "random.bin"
    target.write_bytes(os.urandom(200_000))
    r = httpx.get(f"{agent.url}/files", params={"path": str(target)}, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in r.headers
    assert r.content == target.read_bytes()


def test_a_worker_threads_read_is_waited_for_through_repeated_cancels() -> None:
    """A download or upload that is cancelled closes its file's reader or writer right after
    ``_settled`` returns, so it must not return while the worker thread still uses it: not after a
    cancel, nor after a second one (a request unwinding from a disconnect, then the server's shutdown).
    The cancel is raised once the thread is done."""
    from sandboxd.agent.files import _settled

    release = threading.Event()

    async def main() -> None:
        job = asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        waiter = asyncio.ensure_future(_settled(job))
        for _ in range(2):
            await asyncio.sleep(0.05)
            waiter.cancel()
        await asyncio.sleep(0.05)
        assert not waiter.done(), "returned while the worker thread was still running"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert job.done()

    asyncio.run(main())
