"""Edges of the ``/files`` fast paths (small files read whole, a body opened with its data, small
multipart bodies parsed by ``MultipartReader``) that a review found them getting wrong: a ``HEAD`` and a
``GET`` that disagreed on the encoding, a refused raw upload that asked for its body first, a part
header that python-multipart refuses read as ``Content-Disposition``. Each test failed before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from conftest import Agent
from test_files_raw_body import connection, read_response

MiB = 1 << 20
BOUNDARY = "review46-boundary"


def test_head_and_get_agree_on_the_content_encoding_of_a_small_file(agent: Agent, workdir: Path) -> None:
    """A file whose first 64 KiB do not compress and whose rest does: a ``HEAD`` decides on gzip from
    that sample (``_worth_compressing``), and so must the ``GET`` that reads a file of up to 1 MiB whole
    (``_whole_body``), for the same request headers (RFC 9110 §9.3.2: the same header fields). It had
    decided from the whole file: identity with the file's length for the ``HEAD``, a gzipped body of
    another length for the ``GET``."""
    target = workdir / "mixed.bin"
    target.write_bytes(os.urandom(70_000) + b"a" * 900_000)
    headers = {"Accept-Encoding": "gzip"}
    head = httpx.head(f"{agent.url}/files", params={"path": str(target)}, headers=headers)
    with httpx.Client() as client:
        request = client.build_request("GET", f"{agent.url}/files", params={"path": str(target)}, headers=headers)
        get = client.send(request, stream=True)
        raw = b"".join(get.iter_raw())
    assert head.status_code == get.status_code == 200
    assert head.headers.get("content-encoding") == get.headers.get("content-encoding"), (head.headers, get.headers)
    if "content-length" in head.headers:
        assert head.headers["content-length"] == str(len(raw)), (head.headers, get.headers)


@pytest.mark.parametrize("length", [256 << 10, 8 * MiB], ids=["small", "large"])
def test_a_raw_upload_refused_at_open_is_answered_before_100_continue(agent: Agent, workdir: Path, length: int) -> None:
    """A raw upload with ``Expect: 100-continue`` to a path that cannot be written (a directory): the
    target is opened before the body is asked for, as envd does, so the 400 comes at once, with no
    ``100 Continue``, and the client sends nothing. When the file opened with its first data instead,
    a small body was invited and read whole before the 400, and a large one was invited and then
    left unread under a client still sending (the connection's reset could overtake the answer)."""
    target = workdir / "a-directory"
    target.mkdir()
    with connection(agent) as (s, f):
        s.sendall(
            f"POST /files?path={target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        s.settimeout(5)
        first = f.readline()  # type: ignore[attr-defined]
    assert first.startswith(b"HTTP/1.1 400"), first
    assert os.listdir(workdir) == ["a-directory"]


def test_a_content_disposition_with_a_space_before_its_colon_writes_no_file(agent: Agent, workdir: Path) -> None:
    """``Content-Disposition : form-data; name="file"; filename=…`` (a space before the colon). envd
    (Go's textproto) keeps it as another header, so the part is not a file part and nothing is
    written; python-multipart (the path of chunked bodies) refuses the body, 400. A small body with a
    length goes through ``MultipartReader`` and ``_part_disposition``, which stripped the header's
    name and wrote the file (200); a header name must now be a token there too."""
    target = workdir / "spaced.bin"
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition : form-data; name="file"; filename="{target}"\r\n\r\n'
        f"data\r\n--{BOUNDARY}--\r\n"
    ).encode()
    with connection(agent) as (s, f):
        s.sendall(
            f"POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, _, answer = read_response(f)
    assert status == 400, answer
    assert not target.exists()


@pytest.mark.parametrize("size", [0, 1, 1100, 5000, 60_000])
def test_a_whole_small_files_gzip_is_zlibs_deflate_in_gzips_frame(size: int) -> None:
    """``_whole_body`` decides on gzip for a file of up to 64 KiB from the gzip member it sends
    (``GZIP_OVER_ZLIB`` bytes longer than ``zlib.compress`` of the same bytes at the same level), so
    that the decision is a ``HEAD``'s (``_compresses``, over ``zlib.compress``) without deflating twice."""
    import zlib

    from sandboxd.agent.files import GZIP_LEVEL, GZIP_OVER_ZLIB, _gzip_chunks

    data = (os.urandom(size // 2) + b"abc" * size)[:size]
    packed = b"".join(_gzip_chunks([data]))
    deflated = zlib.compress(data, GZIP_LEVEL)
    assert len(packed) - GZIP_OVER_ZLIB == len(deflated)
    assert packed[10:-8] == deflated[2:-4]
