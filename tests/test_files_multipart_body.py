"""Multipart uploads (the SDKs' ``files.write``) read socket → file by a worker thread: the server's
``RawBody`` and ``MultipartReader`` (Rust), over real sockets to the real agent. Byte-exact parts
with the boundary's first bytes in their data, the connection's next request after a body with an
epilogue, clients that leave or stall midway, malformed bodies (400, no file), a full disk (507),
and the rules the parser's path keeps (no ``file`` part, one path for two files)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Agent
from test_files_raw_body import IDLE_TIMEOUT, MiB, connection, launched, pattern, read_response, settled_listing

BOUNDARY = "sandboxd-test-boundary"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with launched(request.param, tmp_path_factory, "--idle-timeout", str(IDLE_TIMEOUT)) as started:
        yield started


def part(data: bytes, filename: str | None = "f.bin", name: str = "file") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )


def multipart(*parts: bytes, epilogue: bytes = b"") -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode() + epilogue


def head(query: str, length: int) -> bytes:
    return (
        f"POST /files?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def posted(agent: Agent, body: bytes, chunked: bool = False) -> tuple[int, bytes]:
    """``POST /files`` of a multipart ``body`` on a connection of its own: the answer's status and
    body. A refusal may come, and the connection close, before the body is all sent. ``chunked``:
    sent with ``Transfer-Encoding: chunked`` (no length known ahead: the parser's streaming path),
    in pieces of 4 KiB."""
    if chunked:
        start = head("", 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        data = start + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    else:
        data = head("", len(body)) + body
    with connection(agent) as (s, f):
        with contextlib.suppress(OSError):
            s.sendall(data)
        status, _, answer = read_response(f)
    return status, answer


def test_several_files_in_one_body_arrive_byte_exact(agent: Agent, workdir: Path) -> None:
    first = pattern(5 * MiB + 7)
    # Data holding the delimiter's first bytes, cut short and whole but for its last byte.
    tricky = pattern(MiB) + f"\r\n--{BOUNDARY[:-1]}".encode() + b"\r\n--" + pattern(1000)
    body = multipart(
        b"preamble the parser skips\r\n" + part(first, str(workdir / "a.bin")),
        part(b"not a file", None, name="comment"),
        part(tricky, str(workdir / "nested" / "b.bin")),
        part(b"", str(workdir / "empty.bin")),
    )
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body)
        status, _, answer = read_response(f)
    assert status == 200, answer
    assert [e["name"] for e in httpx.Response(200, content=answer).json()] == ["a.bin", "b.bin", "empty.bin"]
    assert (workdir / "a.bin").read_bytes() == first
    assert (workdir / "nested" / "b.bin").read_bytes() == tricky
    assert (workdir / "empty.bin").read_bytes() == b""
    assert sorted(os.listdir(workdir)) == ["a.bin", "empty.bin", "nested"]


@pytest.mark.parametrize("size", [1000, 2 * MiB], ids=["parser", "socket"])
def test_data_that_holds_the_boundary_and_one_more_byte_is_data(agent: Agent, workdir: Path, size: int) -> None:
    """``CRLF--boundary`` followed by a byte other than padding, CR, LF or ``--`` is not a delimiter
    (Go's ``mime/multipart``, envd's parser, reads it so): both paths keep it in the file."""
    data = pattern(size) + f"\r\n--{BOUNDARY}X\r\n--{BOUNDARY}-x\r\n--{BOUNDARY}_".encode()
    body = multipart(part(data, str(workdir / "held.bin")))
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body)
        status, _, answer = read_response(f)
    assert status == 200, answer
    assert (workdir / "held.bin").read_bytes() == data


def test_httpx_files_and_the_path_query(agent: Agent, workdir: Path) -> None:
    """httpx's own multipart encoding (the SDK's) with the target in the path query."""
    data = pattern(3 * MiB)
    target = workdir / "q.bin"
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, files={"file": ("x", data)}, timeout=30)
    assert r.status_code == 200, r.text
    assert target.read_bytes() == data


def test_the_connection_goes_on_after_a_body_with_an_epilogue(agent: Agent, workdir: Path) -> None:
    body = multipart(part(pattern(2 * MiB), str(workdir / "a.bin")), epilogue=b"an epilogue nobody reads\r\n")
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        statuses = [read_response(f)[0] for _ in range(2)]
        s.sendall(head("", len(body)) + body)  # kept alive: one more on the same connection
        statuses.append(read_response(f)[0])
    assert statuses == [200, 204, 200]
    assert (workdir / "a.bin").read_bytes() == pattern(2 * MiB)


def test_a_client_that_closes_halfway_leaves_the_old_files(agent: Agent, workdir: Path) -> None:
    (workdir / "a.bin").write_bytes(b"old")
    body = multipart(part(pattern(2 * MiB), str(workdir / "b.bin")), part(pattern(4 * MiB), str(workdir / "a.bin")))
    with connection(agent) as (s, _):
        s.sendall(head("", len(body)) + body[: 3 * MiB])
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(100) == b""
    assert settled_listing(workdir, ["a.bin"]) == ["a.bin"]
    assert (workdir / "a.bin").read_bytes() == b"old"


def test_a_client_that_stalls_midway_is_cut_off_at_the_idle_timeout(agent: Agent, workdir: Path) -> None:
    body = multipart(part(pattern(4 * MiB), str(workdir / "a.bin")))
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body[: 2 * MiB])
        status, headers, answer = read_response(f)
    assert status == 408, answer
    assert headers.get("connection") == "close"
    assert settled_listing(workdir, []) == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (part(pattern(2 * MiB), "/tmp/never.bin"), b"ended before its closing boundary"),
        (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file; filename={'x' * 17000}\r\n\r\n".encode()
            + pattern(2 * MiB),
            b"headers are larger than 16 KiB",
        ),
        (f"--{BOUNDARY} junk\r\n\r\n".encode() + pattern(2 * MiB), b"not followed by CRLF"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\n".encode() + pattern(2 * MiB), b"header line has no ':'"),
    ],
    ids=["no-closing-boundary", "huge-headers", "no-crlf", "bad-header"],
)
def test_a_malformed_body_is_400_and_leaves_no_file(agent: Agent, workdir: Path, body: bytes, why: bytes) -> None:
    (workdir / "keep.bin").write_bytes(b"old")
    body = part(pattern(MiB), str(workdir / "keep.bin")) + body
    with connection(agent) as (s, f):
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            s.sendall(head("", len(body)) + body)
        status, _, answer = read_response(f)
    assert status == 400, answer
    assert b"malformed multipart body" in answer and why in answer, answer
    assert settled_listing(workdir, ["keep.bin"]) == ["keep.bin"]
    assert (workdir / "keep.bin").read_bytes() == b"old"
    assert httpx.get(f"{agent.url}/health").status_code == 204


@pytest.mark.parametrize("split", [False, True], ids=["whole", "arriving"])
@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (part(b"data", "/tmp/never.bin"), b"ended before its closing boundary"),
        (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file; filename={'x' * 17000}\r\n\r\n".encode(),
            b"headers are larger than 16 KiB",
        ),
        (f"--{BOUNDARY} junk\r\n\r\ndata".encode(), b"not followed by CRLF"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\ndata".encode(), b"header line has no ':'"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file\r\n\r\nx\r\n--{BOUNDARY}--".encode(), b""),
    ],
    ids=["no-closing-boundary", "huge-headers", "no-crlf", "bad-header", "no-filename"],
)
def test_a_small_malformed_body_is_400_and_leaves_no_file(
    agent: Agent, workdir: Path, tail: bytes, why: bytes, split: bool
) -> None:
    """The small bodies' paths (whole in memory, or read from the socket while arriving) refuse what
    the large one refuses, with its reasons, and leave every file as it was; the agent goes on."""
    (workdir / "keep.bin").write_bytes(b"old")
    body = part(b"new", str(workdir / "keep.bin")) + tail
    with connection(agent) as (s, f):
        with contextlib.suppress(OSError):
            s.sendall(head("", len(body)) + body[: len(body) // 2 if split else len(body)])
            if split:
                time.sleep(0.05)
                s.sendall(body[len(body) // 2 :])
        status, _, answer = read_response(f)
    assert status == 400, answer
    assert (b"malformed multipart body" in answer and why in answer) if why else b"no filename" in answer, answer
    assert settled_listing(workdir, ["keep.bin"]) == ["keep.bin"]
    assert (workdir / "keep.bin").read_bytes() == b"old"
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_the_parsers_rules_hold(agent: Agent, workdir: Path) -> None:
    no_file = multipart(part(pattern(2 * MiB), "x", name="other"))
    two_files_one_path = multipart(part(pattern(MiB), "a"), part(pattern(MiB), "b"))
    bad_name = multipart(part(pattern(2 * MiB), None).replace(b'name="file"', b'name="file"; filename="\xff"'))
    cases = [
        ("", no_file, b"no part named 'file'"),
        (f"path={workdir / 'one.bin'}", two_files_one_path, b"cannot upload multiple files to the same path"),
        ("", bad_name, b"not valid UTF-8"),
    ]
    for query, body, why in cases:
        with connection(agent) as (s, f):
            with contextlib.suppress(OSError):
                s.sendall(head(query, len(body)) + body)
            status, _, answer = read_response(f)
        assert status == 400 and why in answer, answer
    assert settled_listing(workdir, []) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["small", "socket"])
def test_two_parts_for_one_path_are_refused_and_write_nothing(
    agent: Agent, workdir: Path, padding: int, chunked: bool
) -> None:
    """Two ``file`` parts for one path: envd refuses the second with 400 ("you cannot upload multiple
    files to the same path"), having written the first; this agent refuses the upload and writes
    neither, the old file and the other part's included. It had renamed both into place, the last
    one winning. Through every parsing path. (An absolute path is compared as sent, as envd compares
    it: ``sub/../dup.bin`` is another path, whose file the later rename replaces, as envd's.)"""
    (workdir / "dup.bin").write_bytes(b"old")
    body = multipart(
        part(pattern(padding), str(workdir / "other.bin")),
        part(b"first", str(workdir / "dup.bin")),
        part(b"second", str(workdir / "dup.bin")),
    )
    status, answer = posted(agent, body, chunked)
    assert status == 400, answer
    assert f"you cannot upload multiple files to the same path '{workdir / 'dup.bin'}'".encode() in answer, answer
    assert b"nothing was written" in answer
    assert settled_listing(workdir, ["dup.bin"]) == ["dup.bin"]
    assert (workdir / "dup.bin").read_bytes() == b"old"


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
def test_a_refused_upload_takes_back_the_directories_it_made(agent: Agent, workdir: Path, padding: int) -> None:
    """``x/y/z`` then ``x``: the first part made ``x`` and ``x/y`` for its file, and the second is
    refused as a directory. Nothing of the upload is left, those directories included (envd makes
    them, writes ``x/y/z`` and then fails); a directory that was there before stays."""
    (workdir / "kept").mkdir()
    body = multipart(
        part(pattern(padding + 10), str(workdir / "kept" / "new" / "f")),
        part(pattern(padding + 20), str(workdir / "x" / "y" / "z")),
        part(pattern(padding + 30), str(workdir / "x")),
    )
    status, answer = posted(agent, body)
    assert status == 400 and b"is a directory" in answer, answer
    assert settled_listing(workdir, ["kept"]) == ["kept"]
    assert settled_listing(workdir / "kept", []) == []


def test_a_client_that_closes_halfway_leaves_no_directory_made_for_its_file(agent: Agent, workdir: Path) -> None:
    body = multipart(part(pattern(4 * MiB), str(workdir / "a" / "b" / "c.bin")))
    with connection(agent) as (s, _):
        s.sendall(head("", len(body)) + body[: 2 * MiB])
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(100) == b""
    assert settled_listing(workdir, []) == []


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
def test_a_part_inside_an_earlier_parts_file_is_refused_before_anything_is_written(
    agent: Agent, workdir: Path, padding: int
) -> None:
    """``x`` then ``x/y`` in one body: ``x/y``'s directories would be made where ``x`` is to be
    renamed, so ``x``'s rename would fail at the commit, after ``a.bin``'s (an upload torn across its
    files, answered with an error). The part is refused as it opens: 400, every old file as it was,
    nothing new. (``x/y`` then ``x`` is refused as a directory, as before.)"""
    (workdir / "a.bin").write_bytes(b"old")
    body = multipart(
        part(pattern(padding + 10), str(workdir / "a.bin")),
        part(pattern(padding + 20), str(workdir / "x")),
        part(pattern(padding + 30), str(workdir / "x" / ".." / "x" / "y")),
    )
    status, answer = posted(agent, body)
    assert (workdir / "a.bin").read_bytes() == b"old", answer
    assert status == 400 and b"which this upload writes as a file: nothing was written" in answer, answer
    assert settled_listing(workdir, ["a.bin"]) == ["a.bin"]


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
def test_a_part_is_inside_an_earlier_parts_file_as_the_kernel_resolves_its_path(
    agent: Agent, workdir: Path, padding: int
) -> None:
    """Whether a part is inside an earlier part's file is decided on the paths as the kernel
    resolves them, not as text: ``link/../x/y``, ``link`` a directory elsewhere, is not inside ``x``
    (envd writes both; before, it was refused), and ``alias/x/y``, ``alias`` this directory, is
    (before, its directories were made where ``x`` goes, and left there)."""
    (workdir / "deep" / "down").mkdir(parents=True)
    (workdir / "link").symlink_to(workdir / "deep" / "down")
    (workdir / "alias").symlink_to(workdir)
    body = multipart(
        part(pattern(padding + 10), str(workdir / "x")),
        part(pattern(padding + 20), str(workdir / "link" / ".." / "x" / "y")),
    )
    status, answer = posted(agent, body)
    assert status == 200, answer
    assert (workdir / "x").read_bytes() == pattern(padding + 10)
    assert (workdir / "deep" / "x" / "y").read_bytes() == pattern(padding + 20)

    body = multipart(
        part(pattern(padding + 10), str(workdir / "z")),
        part(pattern(padding + 20), str(workdir / "alias" / "z" / "y")),
    )
    status, answer = posted(agent, body)
    assert status == 400 and b"which this upload writes as a file: nothing was written" in answer, answer
    assert settled_listing(workdir, ["alias", "deep", "link", "x"]) == ["alias", "deep", "link", "x"]


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
@pytest.mark.parametrize("suffix", ["/", "/.", "//"], ids=["slash", "dot", "slashes"])
def test_a_part_whose_path_ends_in_a_slash_is_refused_before_anything_is_written(
    agent: Agent, workdir: Path, padding: int, suffix: str
) -> None:
    """``x/`` (an absolute path is used as given, not cleaned): its temporary file went beside ``x``,
    and only the commit's rename onto ``x/`` failed (ENOTDIR), after ``a.bin``'s had landed (an
    upload torn across its files). Refused as it opens, as a directory (envd: 400, ``x`` made a
    directory): ``a.bin`` as it was, nothing new."""
    (workdir / "a.bin").write_bytes(b"old")
    body = multipart(
        part(pattern(padding + 10), str(workdir / "a.bin")),
        part(pattern(padding + 20), str(workdir / "x") + suffix),
    )
    status, answer = posted(agent, body)
    assert (workdir / "a.bin").read_bytes() == b"old", answer
    assert status == 400 and b"is a directory" in answer, answer
    assert settled_listing(workdir, ["a.bin"]) == ["a.bin"]


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
def test_a_directory_made_at_a_target_while_the_body_arrives_fails_the_upload_before_any_rename(
    agent: Agent, workdir: Path, padding: int
) -> None:
    """Something in the sandbox makes a directory where the second file goes while the body is on
    its way. The renames run one after another: before, the first file was renamed into place and
    the second's rename failed (an upload torn across its files, answered 400). Now every rename is
    looked at first: 400, the first file as it was. Through the socket path the second part has
    opened by then (its temporary file is there); through the parser's, a small part opens with the
    commit (the whole upload one thread hop), so there its open finds the directory: 400 as well."""
    (workdir / "a.bin").write_bytes(b"old")
    body = multipart(
        part(pattern(padding + 10), str(workdir / "a.bin")), part(pattern(padding + 4096), str(workdir / "b.bin"))
    )
    cut = len(body) - 1000  # inside the second part's data
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body[:cut])
        deadline = time.monotonic() + 10
        while padding and not any(n.startswith(".b.bin.sandboxd-") for n in os.listdir(workdir)):
            assert time.monotonic() < deadline, "the second part never opened"
            time.sleep(0.01)
        (workdir / "b.bin").mkdir()
        s.sendall(body[cut:])
        status, _, answer = read_response(f)
    assert (workdir / "a.bin").read_bytes() == b"old", answer
    made_while = b"is a directory (made while the upload arrived): nothing was written"
    assert status == 400 and (made_while if padding else b"b.bin' is a directory") in answer, answer
    assert settled_listing(workdir, ["a.bin", "b.bin"]) == ["a.bin", "b.bin"]
    assert list((workdir / "b.bin").iterdir()) == []


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["parser", "socket"])
def test_an_upload_of_many_files_holds_one_descriptor_at_a_time(agent: Agent, workdir: Path, padding: int) -> None:
    """300 files in one body, with the agent allowed 128 descriptors: each file is sealed (closed)
    when the next part opens, so the upload never holds more than one. Holding one per part until
    the commit, the agent ran out (a 503) and a body of ~65,000 tiny parts could use up its limit.
    Under 1 MiB the body goes through the parser on the event loop, past it through the socket path."""
    import resource

    count = 300
    parts = [part(pattern(padding), str(workdir / "padding.bin"))] if padding else []
    parts += [part(f"file {i}".encode(), str(workdir / "many" / f"{i}.txt")) for i in range(count)]
    body = multipart(*parts)
    pid = agent.process.pid
    saved = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (128, saved[1]))
    try:
        with connection(agent) as (s, f):
            s.sendall(head("", len(body)) + body)
            status, _, answer = read_response(f)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, saved)
    assert status == 200, answer
    assert len(httpx.Response(200, content=answer).json()) == count + bool(padding)
    assert sorted(os.listdir(workdir / "many")) == sorted(f"{i}.txt" for i in range(count))
    assert all((workdir / "many" / f"{i}.txt").read_bytes() == f"file {i}".encode() for i in range(count))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_many_small_parts_keep_their_order_and_their_checks(agent: Agent, workdir: Path, chunked: bool) -> None:
    """A small body with a length is parsed whole by one worker-thread job; a chunked one through
    the parser on the event loop, where small parts open in groups, each group one job with the data
    gathered for them (the upload's ``OPEN_BATCH``, 64). Either way, across groups: 150 files of every
    size from 0 bytes arrive byte exact, in order; and a part inside a file of the first group, sent
    in the third, is refused with every file of the upload taken back, the ones already opened
    included."""
    sizes = [(i * 37) % 3000 for i in range(150)]
    parts = [part(pattern(size), str(workdir / "tree" / f"d{i % 7}" / f"{i}.bin")) for i, size in enumerate(sizes)]
    status, answer = posted(agent, multipart(*parts), chunked)
    assert status == 200, answer
    assert [entry["path"] for entry in httpx.Response(200, content=answer).json()] == [
        str(workdir / "tree" / f"d{i % 7}" / f"{i}.bin") for i in range(150)
    ]
    for i, size in enumerate(sizes):
        assert (workdir / "tree" / f"d{i % 7}" / f"{i}.bin").read_bytes() == pattern(size), i

    parts = [part(pattern(10), str(workdir / "x"))]
    parts += [part(pattern(i), str(workdir / "more" / f"{i}.bin")) for i in range(140)]
    parts.append(part(pattern(10), str(workdir / "x" / "y")))
    status, answer = posted(agent, multipart(*parts), chunked)
    assert status == 400 and b"which this upload writes as a file: nothing was written" in answer, answer
    assert settled_listing(workdir, ["tree"]) == ["tree"]


def test_an_upload_of_more_files_than_its_limit_is_413_and_writes_none(
    agent: Agent, workdir: Path, request: pytest.FixtureRequest
) -> None:
    """One file over ``UPLOAD_MAX_FILES`` (100,000 one-byte parts, 12 MiB of body, through the
    socket path): refused with a 413 that says what to do, and nothing of it stays, neither the
    100,000 files opened before it nor their directories. Without the limit all were written and
    the agent's RSS grew ~1 KiB a file until the commit. One event loop only: ~10 s a run."""
    from sandboxd.agent.files import UPLOAD_MAX_FILES

    if request.node.callspec.params.get("agent") != "uvloop":
        pytest.skip("the limit is the worker thread's, not the loop's: one loop is enough")
    parts = [part(b"x", str(workdir / "up" / f"d{i % 100}" / f"{i}")) for i in range(UPLOAD_MAX_FILES + 1)]
    status, answer = posted(agent, multipart(*parts))
    assert status == 413, answer
    assert f"an upload holds at most {UPLOAD_MAX_FILES} files: nothing was written".encode() in answer, answer
    assert settled_listing(workdir, []) == []


def test_an_upload_whose_paths_come_to_more_than_their_limit_is_413_and_writes_none(
    agent: Agent, workdir: Path
) -> None:
    """Paths near ``PATH_MAX`` (~3.8 KiB each, 250-byte directory names) over
    ``UPLOAD_MAX_PATH_BYTES`` (16 MiB) together, in ~4,500 parts, far under the count's limit: refused
    before the commit, nothing written. The agent keeps each path two or three times until then."""
    from sandboxd.agent.files import UPLOAD_MAX_PATH_BYTES

    deep = workdir.joinpath(*(f"{i:02d}" + "d" * 248 for i in range(15)))
    count = UPLOAD_MAX_PATH_BYTES // len(str(deep / "00000")) + 2
    status, answer = posted(agent, multipart(*(part(b"x", str(deep / f"{i:05d}")) for i in range(count))))
    assert status == 413, answer
    assert b"paths come to at most" in answer and b"nothing was written" in answer, answer
    assert settled_listing(workdir, []) == []


def test_a_full_disk_is_507_and_leaves_no_file(agent: Agent, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / f"full-{uuid.uuid4().hex[:8]}"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=False).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        os.chmod(small, 0o777)
        body = multipart(part(pattern(6 * MiB), str(small / "big.bin")))
        with connection(agent) as (s, f):
            with contextlib.suppress(OSError):
                s.sendall(head("", len(body)) + body)
            status, headers, answer = read_response(f)
        assert status == 507, answer
        assert headers.get("connection") == "close"
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_body_dripped_a_byte_at_a_time_is_cut_off_and_leaves_no_file(agent: Agent, workdir: Path) -> None:
    """The slow drip against the worker thread that reads a multipart body: a byte per half idle
    timeout keeps every wait short of it. Past the first idle timeout the body must average 4 KiB/s:
    408, the old file as it was."""
    target = workdir / "drip.bin"
    target.write_bytes(b"old")
    body = multipart(part(pattern(4 * MiB), str(target)))
    with connection(agent) as (s, f):
        s.sendall(head("", len(body)) + body[:100])
        started = time.monotonic()
        sent = 100
        while not select.select([s], [], [], IDLE_TIMEOUT / 2)[0]:
            assert time.monotonic() - started < IDLE_TIMEOUT + 10, "the drip still holds the thread"
            with contextlib.suppress(OSError):
                s.send(body[sent : sent + 1])
                sent += 1
        status, headers, answer = read_response(f)
    assert status == 408, answer
    assert b"on average" in answer and headers.get("connection") == "close"
    assert settled_listing(workdir, ["drip.bin"]) == ["drip.bin"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_many_stalled_bodies_at_once_leave_the_files_threads_free(
    loop: str, tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    """40 multipart uploads that all stall midway hold at most MAX_RAW_BODIES (16) of the files
    pool's threads, as raw ones do: a download still gets one at once."""
    small = workdir / "small.txt"
    small.write_bytes(b"still served")
    body = multipart(part(pattern(8 * MiB), "stalled.bin"))
    with launched(loop, tmp_path_factory, "--idle-timeout", "60") as started, contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.create_connection(("127.0.0.1", started.port), timeout=10)) for _ in range(40)
        ]
        time.sleep(0.5)
        for s in sockets:
            s.sendall(head("", len(body)) + body[: 64 << 10])
        time.sleep(2)
        r = httpx.get(f"http://127.0.0.1:{started.port}/files", params={"path": str(small)}, timeout=10)
        assert r.status_code == 200 and r.content == b"still served"


def test_the_plain_disposition_reads_as_python_multipart_reads_it() -> None:
    """A part's ``Content-Disposition`` in the form the SDKs and curl write is read by one regular
    expression (``_PLAIN_DISPOSITION``), anything else by python-multipart: both give the same part
    for every form, including the ones the expression must leave to the parser (escapes, other
    spacing or case, more parameters, RFC 2231's ``filename*``, which RFC 7578 forbids)."""
    from python_multipart.multipart import parse_options_header
    from sandboxd.agent.files import _PLAIN_DISPOSITION, _part_start

    names = ['"file"', '"other"', "file", '""', '"fi;le"']
    filenames = [None, '""', '"/a/b.py"', '"a;b=c"', '"/h/\u00e9 x.txt"', '"a\\"b"', '"C:\\\\x\\\\y"', "x", '"~/x"']
    extras = ["", '; foo="y"', "; filename*=UTF-8''z"]
    plain = 0
    for name in names:
        for filename in filenames:
            for extra in extras:
                for head, sep in (("form-data", "; "), ("Form-Data", ";"), ("form-data", ";  ")):
                    value = f"{head}{sep}name={name}" + (f"{sep}filename={filename}" if filename is not None else "")
                    raw = (value + extra).encode()
                    _, options = parse_options_header(raw.decode("latin-1"))
                    is_file = options.get(b"name") == b"file"
                    expected = (is_file, options.get(b"filename", b"").decode() if is_file else "")
                    got = _part_start(raw)
                    assert (got.is_file, got.filename) == expected, raw
                    plain += _PLAIN_DISPOSITION.fullmatch(raw) is not None
    assert plain >= 20  # the common forms do take the expression's path
