"""``GET /files`` (streaming download) and ``POST /files`` (atomic upload), envd-compatible (spec §3.4-3.5).

Downloads stream from the Rust ``FileReader`` in fixed chunks, with Range (206/416) and conditional
(304) support, and gzip when the client accepts it and the file is worth compressing. Files whose size
says nothing (``/proc``, ``/sys``, devices) are read to EOF and sent chunked.

Uploads never tear a file: every part streams into a temporary file beside its target (Rust
``AtomicWriter``), and all targets are renamed into place only after the whole body arrived. A client
that disconnects midway leaves every old file intact and no temporary file behind. gzip bodies
(raw or multipart) are inflated in bounded pieces. A large identity body skips the event loop: the
server's ``RawBody`` (``scope["extensions"]``) lets a worker thread move it socket → file, a raw one
with ``splice(2)`` (``AtomicWriter.receive_from``), a multipart one through ``MultipartReader``,
which finds the boundaries and writes each part's data without Python touching it. Before the
renames, the directory watchers are brought up to date and told what each rename stands for
(``watch_hub``).

Nothing here reads or writes a file on the event loop: opening, reading, writing and renaming run in
worker threads, one chunk or batch at a time, while the loop moves the previous one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import stat
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

from sandboxd import _core

from .asgi import (
    BODY_PARTS,
    RAW_BODY,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    body_chunks,
    header_map,
    is_token,
    raw_headers,
    send_http_error,
)
from .auth import check_files_access
from .compression import GzipInflater, accepted_codings
from .contenttype import content_type as download_type
from .errors import Code, RpcError, from_os_error
from .httpdate import format_http_date, parse_http_date
from .paths import expand_and_resolve
from .state import AgentState
from .users import User, lookup
from .watch_hub import Commit

GZIP_MIN_SIZE = 1 << 10
"""Below 1 KiB the gzip header and a chunked reply cost more than they save."""

GZIP_MAX_SIZE = 8 << 20
"""Above 8 MiB the agent answers identity even when gzip is accepted. Measured here (zlib level 1,
one core): 1 GB/s on very repetitive text, 52 MB/s on incompressible bytes, while identity streams
at several GB/s (``benches/files``); past a few MiB, compression is the bottleneck on any link
faster than ~100 MB/s, and the agent's clients are local or in the same data centre."""

GZIP_SAMPLE = 64 << 10
GZIP_MIN_SAVING = 0.9
"""gzip only when the first 64 KiB shrink to at most 90%: already-compressed or random content would
cost ~20 ms of CPU per MiB to send slightly larger."""

GZIP_LEVEL = 1
"""Fastest level: most of the size win on text at a fraction of level 6's CPU."""


METADATA_PREFIX = "x-metadata-"
METADATA_MAX_KEY = 246
METADATA_MAX_TOTAL = 4096


T = TypeVar("T")

IO_THREADS_MAX = 32
"""Worker threads for file transfers, apart from asyncio's default pool (``cpu_count + 4``, 6 on two
cores) that stdin writes and directory walks use: a transfer's thread mostly waits on the disk (or on a
FIFO that never ends), so 32 transfers move at once before they queue, and a slow one never holds up
the other services. Idle threads cost no resident memory and exit after a while."""

IO_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS_MAX, thread_name_prefix="sandboxd-files")


async def _in_io_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(IO_THREADS, function, *args)


def _query(scope: Scope) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}


def _user_for(state: AgentState, username: str | None) -> User:
    name = username or state.default_user
    try:
        return lookup(name)
    except KeyError:
        raise RpcError(
            Code.UNAUTHENTICATED, f"error looking up user '{name}': user: unknown user {name}", http_status=401
        ) from None


@dataclass(slots=True)
class _Request:
    """A ``/files`` request, authorised (:func:`_authorize`): who it runs as, and where."""

    user: User
    path: str
    """The resolved path ('' when a multipart upload takes paths from its parts)."""
    query: dict[str, str]
    headers: dict[str, str]


def _authorize(state: AgentState, scope: Scope, operation: str) -> _Request:
    query = _query(scope)
    headers = header_map(scope)
    raw_path = query.get("path", "")
    check_files_access(
        state,
        header_token=headers.get("x-access-token"),
        path=raw_path,
        operation=operation,
        username=query.get("username"),
        signature=query.get("signature"),
        expiration=query.get("signature_expiration"),
    )
    user = _user_for(state, query.get("username"))
    resolved = expand_and_resolve(raw_path, user, state.default_workdir) if raw_path or operation == "read" else ""
    return _Request(user, resolved, query, headers)


# ---------------------------------------------------------------------------------------------- download


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """A single ``bytes=a-b`` range as (offset, length); None to ignore it; "unsatisfiable" for 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multi-range or another unit: answer the whole file, as RFC 9110 allows
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            start = max(0, size - suffix)
            return (start, size - start)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    end = min(end, size - 1)
    return (start, end - start + 1)


def _accepts_gzip(accept_encoding: str) -> bool:
    for name, q in accepted_codings(accept_encoding):
        if name in ("gzip", "*"):
            return q > 0
    return False


GZIP_OVER_ZLIB = 12
"""How much longer a gzip member is than ``zlib.compress`` of the same bytes at the same level: the same
deflate stream, framed in 18 bytes (header, CRC-32, size) instead of 6 (header, Adler-32). A test holds
it to :func:`_gzip_chunks`."""


def _compresses(sample: bytes) -> bool:
    return len(zlib.compress(sample, GZIP_LEVEL)) <= len(sample) * GZIP_MIN_SAVING


def _worth_compressing(path: str) -> bool:
    with _core.FileReader(path, 0, GZIP_SAMPLE) as reader:
        sample = reader.read()
    return _compresses(sample)


def _gzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for chunk in chunks:
        out = deflate.compress(chunk)
        if out:
            yield out
    yield deflate.flush()


def _chunks(first: bytes | None, reader: _core.FileReader) -> Iterator[bytes]:
    if first:
        yield first
    yield from reader


@dataclass(slots=True)
class _Reply:
    """What a download answers, decided in a worker thread: an error or a 304 (no ``reader``), or the
    headers and the chunks to stream."""

    status: int
    headers: list[tuple[str, str]]
    error: str | None = None
    reader: _core.FileReader | None = None
    chunks: Iterator[bytes] | None = None
    sendable: bool = False
    """The body is the reader's bytes as they are, with a ``Content-Length``: :func:`_send_file` may
    send them with ``sendfile(2)``."""
    body: bytes | None = None
    """The whole body, read (and compressed) already: a small file's (:data:`WHOLE_BODY_MAX`)."""


WHOLE_BODY_MAX = _core.READ_CHUNK
"""A sized body this small (one read chunk) is read, and gzipped when that pays, by the thread that
plans the download, so that the loop sends head and body in one write with no more thread hops:
before, a 5-byte file took three hops (the plan, its chunk, the end), ~0.1 ms of the agent's CPU
each. Its memory is one chunk, as a streamed download's."""


def _plan_download(req: _Request, whole: bool = False) -> _Reply:
    """Everything a download does before its first byte: ``stat``, conditional and range headers,
    opening the file, sampling it for gzip; with ``whole`` (a GET), a small sized body read whole.
    Blocking (a slow disk, a FIFO), so it runs in a thread."""
    path = req.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _Reply(404, [], f"path '{path}' does not exist")
    if stat.S_ISDIR(st.st_mode):
        return _Reply(400, [], f"path '{path}' is a directory")
    last_modified = format_http_date(st.st_mtime)
    etag = f'W/"{st.st_size:x}-{st.st_mtime_ns:x}"'
    base = [
        ("content-disposition", _disposition(os.path.basename(path))),
        ("vary", "Accept-Encoding"),
        ("last-modified", last_modified),
        ("etag", etag),
        ("cache-control", "no-store"),
    ]
    if _not_modified(req.headers, etag, st.st_mtime):
        return _Reply(304, base)
    accepts_gzip = _accepts_gzip(req.headers.get("accept-encoding", ""))
    reader = _core.FileReader(path)
    try:
        headers = [*base, ("content-type", download_type(path))]
        if not reader.sized:
            # /proc, /sys, devices, FIFOs: st_size says nothing, so read to EOF, without a
            # Content-Length or ranges. The first chunk decides on gzip; most such files fit in it.
            first = reader.read()
            if accepts_gzip and len(first) >= GZIP_MIN_SIZE and _compresses(first[:GZIP_SAMPLE]):
                headers.append(("content-encoding", "gzip"))
                return _Reply(200, headers, reader=reader, chunks=_gzip_chunks(_chunks(first, reader)))
            return _Reply(200, headers, reader=reader, chunks=_chunks(first, reader))
        size = reader.size
        headers.append(("accept-ranges", "bytes"))
        status, offset, length = 200, 0, size
        range_header = req.headers.get("range")
        if range_header is not None and req.headers.get("if-range") in (None, etag, last_modified):
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                reader.close()
                message = f"range '{range_header}' is outside the file's {size} bytes"
                return _Reply(416, [("content-range", f"bytes */{size}")], message)
            if isinstance(parsed, tuple):
                status, (offset, length) = 206, parsed
                headers.append(("content-range", f"bytes {offset}-{offset + length - 1}/{size}"))
                reader.close()
                reader = _core.FileReader(path, offset, length)
        gzip_allowed = status == 200 and GZIP_MIN_SIZE <= size <= GZIP_MAX_SIZE and accepts_gzip
        if whole and length <= WHOLE_BODY_MAX:
            return _whole_body(reader, status, headers, length, gzip_allowed)
        if gzip_allowed and _worth_compressing(path):
            headers.append(("content-encoding", "gzip"))
            return _Reply(status, headers, reader=reader, chunks=_gzip_chunks(reader))
        headers.append(("content-length", str(length)))
        return _Reply(status, headers, reader=reader, chunks=iter(reader), sendable=True)
    except BaseException:
        reader.close()
        raise


def _whole_body(
    reader: _core.FileReader, status: int, headers: list[tuple[str, str]], length: int, gzip_allowed: bool
) -> _Reply:
    """A small sized body read whole (:data:`WHOLE_BODY_MAX`), with its ``Content-Length``: gzipped
    when its first :data:`GZIP_SAMPLE` bytes shrink to :data:`GZIP_MIN_SAVING`, the rule a ``HEAD``
    (:func:`_worth_compressing`) and a large file follow, so that a ``HEAD`` and a ``GET`` of the same
    file answer the same encoding. A file that shrank since it was opened is streamed as it is, as a
    large one would be."""
    data = reader.read()
    if len(data) != length:
        headers.append(("content-length", str(length)))
        return _Reply(status, headers, reader=reader, chunks=_chunks(data, reader))
    reader.close()
    if gzip_allowed:
        if len(data) <= GZIP_SAMPLE:  # the file is its own sample: one deflate decides and is sent
            packed = b"".join(_gzip_chunks([data]))
            worth = len(packed) - GZIP_OVER_ZLIB <= len(data) * GZIP_MIN_SAVING
        else:
            worth = _compresses(data[:GZIP_SAMPLE])
            packed = b"".join(_gzip_chunks([data])) if worth else b""
        if worth:
            headers += [("content-encoding", "gzip"), ("content-length", str(len(packed)))]
            return _Reply(status, headers, body=packed)
    headers.append(("content-length", str(length)))
    return _Reply(status, headers, body=data)


async def download(state: AgentState, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /files?path=…``: stream a file. Every read runs in a worker thread; the event loop only
    moves ready chunks."""
    try:
        req = _authorize(state, scope, "read")
        reply = await _in_io_thread(_plan_download, req, scope["method"] == "GET")
    except RpcError as exc:
        await send_http_error(send, exc.http_status, exc.message)
        return
    except OSError as exc:
        err = from_os_error(exc, "error opening file")
        await send_http_error(send, err.http_status, err.message)
        return
    if reply.error is not None:
        await send_http_error(send, reply.status, reply.error, reply.headers)
        return
    if reply.body is not None:
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers(reply.headers)})
        await send({"type": "http.response.body", "body": reply.body})
        return
    if reply.reader is None or reply.chunks is None:
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers(reply.headers)})
        await send({"type": "http.response.body", "body": b""})
        return
    with reply.reader:
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers(reply.headers)})
        if scope["method"] != "HEAD":
            try:
                if not await _send_file(reply, scope, send):
                    await _stream_chunks(reply.chunks, receive, send)
            except ClientDisconnected:
                return
        await send({"type": "http.response.body", "body": b""})


SEND_FILE_MIN = 1 << 20
"""A download with at least this much left after its first chunk is sent by a thread with
``sendfile(2)``: below it, starting the thread costs about what the loop's chunks do."""


async def _send_file(reply: _Reply, scope: Scope, send: Send) -> bool:
    """Sends the body: its first chunk through the loop (it goes out with the head, in one write),
    the rest by a worker thread with ``sendfile(2)`` (``FileReader.send_to``: the page cache's
    pages go to the socket with no copy into Python and no event-loop work per chunk), through the
    server's ``ResponseWriter.hand_off``. False, having sent nothing or only the first chunk, when
    it cannot (not a plain sized body, too little left, the hand-off refused: TLS, the cap of
    threads): the caller streams the rest of ``reply.chunks`` through the loop. Raises
    :class:`ClientDisconnected` when the client leaves, stops reading for the connection's idle
    timeout (else it would hold the thread, one of ``MAX_HANDED_OFF``, and the file for as long as
    it kept the connection open), or the file ends early (the promised length cannot be kept): the
    connection is closed."""
    writer = scope.get("extensions", {}).get(BODY_PARTS)
    reader, chunks = reply.reader, reply.chunks
    if not reply.sendable or writer is None or reader is None or chunks is None:
        return False
    left = reader.remaining
    if left is None or left < SEND_FILE_MIN + _core.READ_CHUNK:
        return False
    first = await _in_io_thread(next, chunks, b"")
    await send({"type": "http.response.body", "body": first, "more_body": True})
    left = reader.remaining
    if not first or left is None:
        return False

    idle = writer.idle_timeout

    def move(sock: int, stop: int) -> tuple[str, int, bytes]:
        outcome, sent = reader.send_to(sock, stop, idle)
        # hand_off closes the connection on "closed": for a file that ended early too, since the
        # response cannot have the length it promised, and for a client that stopped reading.
        return ("closed" if outcome in ("short", "stalled") else outcome), sent, b""

    handed = await writer.hand_off(move, raw=left)
    if handed is None or handed[0] == "unsupported":  # nothing sent: the loop goes on from here
        return False
    if handed[0] != "done":  # "stopped": the server is closing the connection
        raise ClientDisconnected
    return True


async def _stream_chunks(chunks: Iterator[bytes], receive: Receive, send: Send) -> None:
    """Sends ``chunks``, each produced in a worker thread while the previous one is being sent. Stops
    when the client disconnects. Returns only once no thread is using the iterator any more."""
    loop = asyncio.get_running_loop()
    gone = asyncio.ensure_future(_disconnected(receive))
    job = loop.run_in_executor(IO_THREADS, next, chunks, None)
    try:
        while not gone.done():
            # Shielded: a cancelled request must not abandon a thread that still reads the file.
            chunk = await asyncio.shield(job)
            if chunk is None:
                return
            job = loop.run_in_executor(IO_THREADS, next, chunks, None)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        gone.cancel()
        await _settled(job)


async def _settled(job: asyncio.Future[Any]) -> None:
    """Waits until a worker thread's ``job`` has finished, whatever happens to the waiting task: the
    caller closes what the thread uses (the file's reader, the upload's writer) right after. A cancel
    while waiting, even a second one (a request already unwinding from one, then the server's
    shutdown), is held until the thread is done and raised then."""
    cancelled: asyncio.CancelledError | None = None
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not job.cancelled():
        job.exception()  # retrieved: its error, if any, was or will be reported by the caller
    if cancelled is not None:
        raise cancelled


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _disposition(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    try:
        escaped.encode("latin-1")
    except UnicodeEncodeError:
        from urllib.parse import quote

        return f"inline; filename*=UTF-8''{quote(name)}"
    return f'inline; filename="{escaped}"'


def _not_modified(headers: dict[str, str], etag: str, mtime: float) -> bool:
    inm = headers.get("if-none-match")
    if inm is not None:
        return any(tag.strip() in (etag, "*") for tag in inm.split(","))
    ims = headers.get("if-modified-since")
    if ims:
        since = parse_http_date(ims)
        return since is not None and int(mtime) <= since
    return False


# ------------------------------------------------------------------------------------------------ upload


def _metadata(headers: dict[str, str]) -> dict[str, str]:
    """``X-Metadata-<key>`` headers as ``user.e2b.<key>`` metadata, validated as envd does."""
    metadata: dict[str, str] = {}
    total = 0
    for name, value in headers.items():
        if not name.startswith(METADATA_PREFIX):
            continue
        key = name[len(METADATA_PREFIX) :]
        for what, text in (("key", key), ("value", value)):
            if not text.isascii() or not text.isprintable():
                raise RpcError(Code.INVALID_ARGUMENT, f"metadata {what} '{text}' must be printable ASCII (0x20-0x7E)")
        if not key or len(key) > METADATA_MAX_KEY:
            raise RpcError(Code.INVALID_ARGUMENT, f"metadata key '{key}' must be 1 to {METADATA_MAX_KEY} bytes")
        total += len(key) + len(value)
        metadata[key] = value
    if total > METADATA_MAX_TOTAL:
        raise RpcError(Code.INVALID_ARGUMENT, f"metadata is {total} bytes, more than the {METADATA_MAX_TOTAL} allowed")
    return metadata


WRITE_BATCH = 1 << 20
"""Bytes an upload gathers before handing them to a worker thread to write: the network delivers
64 KiB pieces, and a thread hop per piece would cost more than the write; 1 MiB per hop keeps the
hops to ~1000 per GiB, and memory to two batches per upload (one being written, one filling)."""

OPEN_BATCH = 64
"""Parts an upload gathers at most before a worker thread opens them (and writes what they hold):
the files of ``write_files`` open in one hop per 64 rather than one or two hops each, while what a
body of empty parts keeps waiting on the event loop stays small."""

UPLOAD_MAX_FILES = 100_000
"""Files one upload may hold. Each costs the agent ~1 KiB until the commit (its writer, its paths, its
entry in the answer): 100,000 small parts, 13 MiB of body, peaked at 128 MiB of the agent's RSS, and
nothing else bounded it. envd has no limit; it writes each part in place as it comes, where this agent
renames them all at the end. More files go in more requests."""

UPLOAD_MAX_PATH_BYTES = 16 << 20
"""The bytes of one upload's resolved paths, together: a path is kept two or three times per file
(the writer's, its temporary file's, the upload's record of what it places), so with paths near
``PATH_MAX`` the count alone would let a body of 16 KiB headers hold gigabytes."""


class _Sink:
    """One uploaded file: where it goes, then its ``AtomicWriter`` once a worker thread has opened it
    (:meth:`_Upload._apply`), and the data gathered for it on the event loop and not yet handed over."""

    __slots__ = ("batch", "target", "writer")

    def __init__(self, target: str) -> None:
        self.target = target
        """The part's filename as sent (resolved when it opens), or '' for the path query's file."""
        self.writer: _core.AtomicWriter | None = None
        self.batch: list[bytes] = []


class _Upload:
    """The files of one upload request: writers committed together at the end. Opening, writing,
    sealing, committing and aborting run in worker threads, one job at a time (the upload's
    backpressure), each job doing all that has gathered since the one before: parts to open and data
    to write. A small file's whole upload (open, write, the watchers' settle, the rename) is one
    thread hop, and ``write_files`` of many small files one hop per :data:`OPEN_BATCH` of them:
    before, each part took two hops and the commit three, ~0.1 ms of the agent's CPU each. Each file
    is sealed (its metadata and owner set, its descriptor closed) when the next one opens, so that an
    upload holds one descriptor however many parts it has: a body of tiny parts cannot use up the
    agent's."""

    def __init__(self, req: _Request, state: AgentState, metadata: dict[str, str]) -> None:
        self.req = req
        self.state = state
        self.metadata = metadata
        self.sinks: list[_Sink] = []
        self.job: asyncio.Future[Any] | None = None
        self._unsent = 0  # sinks[_unsent:] may have an open or data not yet handed to a job
        self._unsent_bytes = 0
        self._placed: set[str] = set()  # the paths of the parts before, as the kernel resolves them
        self._placed_parts = 0  # how many parts' paths are in _placed
        self._real_dirs: dict[str, str] = {}
        self._clear: set[str] = set()  # real directories whose every ancestor was found not placed
        self._path_bytes = 0  # of the parts' resolved paths, against UPLOAD_MAX_PATH_BYTES
        self._targets: set[str] = set()  # the parts' resolved paths, as text: one file each
        self.finished = False
        """Committed by a job already (:meth:`finish`): :meth:`commit` has only the answer to make."""

    def _refuse_file_under_file(self, target: str, index: int) -> None:
        """A part inside a file an earlier part of this upload writes: its parent directories would
        be made where that file is renamed to, so that rename would fail at the commit, after the
        parts before it were renamed into place (a torn upload). Refused before anything is written;
        the other way round (a file where an earlier part made directories) is refused as a
        directory when it opens. envd writes the earlier file and fails on this one. On the paths
        as the kernel resolves them (symlinks, then ``..``), not as text: ``link/../x/y`` is not
        inside ``x`` when ``link`` is a directory elsewhere, ``alias/x/y`` is when ``alias`` is
        ``x``'s directory. Looked at from the second part on: a one-file upload walks no path."""
        if not index:
            return
        for sink in self.sinks[self._placed_parts : index]:
            writer = _opened(sink)
            # Where its rename lands: the link replaced (a dangling one) or the file a link led to
            # as it opened (AtomicWriter's target, resolved then: no second look here).
            for path in {writer.path, writer.target}:
                self._placed.add(os.path.join(self._real_dir(os.path.dirname(path)), os.path.basename(path)))
        self._placed_parts = index
        parent = self._real_dir(os.path.dirname(target))
        if parent in self._clear:
            return
        clear = parent
        while parent != "/":  # realpath: absolute and clean
            if parent in self._placed:
                raise RpcError(
                    Code.INVALID_ARGUMENT,
                    f"path '{target}' is inside '{parent}', which this upload writes as a file: nothing was written",
                )
            parent = os.path.dirname(parent)
        # No later part can place a file at this directory or above it: the part that opens here
        # makes it a directory, and a file where a directory is fails as it opens. So the walk is
        # not made again for the next part in it (write_files' files share a few directories).
        self._clear.add(clear)

    def _real_dir(self, path: str) -> str:
        """``os.path.realpath`` of a directory, once per directory an upload names: ``write_files``
        puts its files in a few directories, and each realpath is an ``lstat`` of every component
        in Python (a fifth of the agent's CPU for 100 files in one directory, before)."""
        real = self._real_dirs.get(path)
        if real is None:
            real = self._real_dirs[path] = os.path.realpath(path)
        return real

    async def open(self, raw_target: str) -> _Sink:
        """The next part's sink; it opens with the next job (the data gathered before it first)."""
        sink = _Sink(raw_target)
        self.sinks.append(sink)
        if len(self.sinks) - self._unsent >= OPEN_BATCH:
            await self.flush()
        return sink

    async def write(self, sink: _Sink, data: bytes) -> None:
        """Gathers ``data`` for ``sink`` (the part being received); hands a batch over when it is full."""
        if not data:
            return
        sink.batch.append(data)
        self._unsent_bytes += len(data)
        if self._unsent_bytes >= WRITE_BATCH:
            await self.flush()

    async def flush(self) -> None:
        """Waits for the job in flight (errors surface here), then hands what has gathered to the next."""
        await self.wait()
        work = self._take()
        if work:
            self.job = asyncio.get_running_loop().run_in_executor(IO_THREADS, self._apply, work)

    async def wait(self) -> None:
        """Waits until the job in flight is done (its errors surface here). The job stays the
        upload's until it has ended well: a cancelled wait or a failed job leaves it for
        :meth:`abort` to wait for, so that no abort runs beside a job still using the writers."""
        if self.job is not None:
            await asyncio.shield(self.job)
            self.job = None

    async def drain(self) -> None:
        """Every part so far opened and every byte so far written (errors surface here)."""
        await self.flush()
        await self.wait()

    def _take(self) -> list[tuple[int, list[bytes]]]:
        """What has gathered, taken: each part from the first not yet handed over, with its data. The
        last part stays open to more data, so the next job starts from it again."""
        work: list[tuple[int, list[bytes]]] = []
        for index in range(self._unsent, len(self.sinks)):
            sink = self.sinks[index]
            if sink.writer is None or sink.batch:
                work.append((index, sink.batch))
                sink.batch = []
        self._unsent = max(len(self.sinks) - 1, 0)
        self._unsent_bytes = 0
        return work

    def _apply(self, work: list[tuple[int, list[bytes]]]) -> None:
        """A job, in a worker thread: the parts opened in order, their data written piece by piece."""
        for index, batch in work:
            sink = self.sinks[index]
            if sink.writer is None:
                self._open(index)
            _write_batch(_opened(sink), batch)

    def open_now(self, raw_target: str) -> _core.AtomicWriter:
        """The next part opened at once, for a worker thread that moves a body itself (no job is in
        flight then, and nothing has gathered): the writer, blocking."""
        self.sinks.append(_Sink(raw_target))
        self._open(len(self.sinks) - 1)
        self._unsent = len(self.sinks) - 1
        return _opened(self.sinks[-1])

    def _open(self, index: int) -> None:
        if index >= UPLOAD_MAX_FILES:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"an upload holds at most {UPLOAD_MAX_FILES} files: nothing was written; "
                "send the rest in another request",
                http_status=413,
            )
        raw_target = self.sinks[index].target
        if self.req.path:
            if index:
                raise RpcError(
                    Code.INVALID_ARGUMENT,
                    "you cannot upload multiple files to the same path: "
                    f"'{self.req.path}' (omit the path query to take each part's filename)",
                )
            target = self.req.path
        else:
            if not raw_target:
                raise RpcError(Code.INVALID_ARGUMENT, "a file part has no filename and the path query is missing")
            target = expand_and_resolve(raw_target, self.req.user, self.state.default_workdir)
            if target in self._targets:
                # envd's rule and words (it compares the resolved paths as text, as here); it has
                # written the first file by then, this agent nothing.
                raise RpcError(
                    Code.INVALID_ARGUMENT,
                    f"you cannot upload multiple files to the same path '{target}' in one upload request: "
                    "nothing was written",
                )
            self._targets.add(target)
            self._refuse_file_under_file(target, index)
        self._path_bytes += len(target)
        if self._path_bytes > UPLOAD_MAX_PATH_BYTES:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"an upload's paths come to at most {UPLOAD_MAX_PATH_BYTES} bytes together: nothing was written; "
                "send the rest in another request",
                http_status=413,
            )
        if os.path.basename(target) in ("", ".", ".."):
            # ``/x/`` or ``/x/.`` (an absolute path is not cleaned): the temporary file goes beside
            # ``x`` and the rename onto the name fails (ENOTDIR) at the commit, after the parts before
            # it were renamed into place. envd makes ``x`` a directory and answers that it is one.
            raise RpcError(Code.INVALID_ARGUMENT, f"path '{target}' is a directory")
        if index:
            _opened(self.sinks[index - 1]).seal(self.metadata)  # complete: the part before this one
        try:
            writer = _core.AtomicWriter(target, self.req.user.uid, self.req.user.gid)
        except IsADirectoryError:
            raise RpcError(Code.INVALID_ARGUMENT, f"path '{target}' is a directory") from None
        except OSError as exc:
            raise from_os_error(exc, f"error opening '{target}' for writing") from None
        self.sinks[index].writer = writer

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` as the upload's job, in a worker thread: its result (its errors
        surface here)."""
        await self.wait()
        job: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(IO_THREADS, function, *args)
        self.job = job
        await self.wait()
        return job.result()

    async def commit(self) -> list[dict[str, object]]:
        if not self.finished:
            await self.run(self.finish)
        result: list[dict[str, object]] = []
        for sink in self.sinks:
            path = _opened(sink).path
            entry: dict[str, object] = {"path": path, "name": os.path.basename(path), "type": "file"}
            if self.metadata:
                entry["metadata"] = self.metadata
            result.append(entry)
        return result

    def finish(self) -> None:
        """The commit, in a worker thread (the upload's job, or the end of the one that moved the
        body itself: :func:`_move_multipart`): what has gathered opened and written; every watcher made to
        read its queue, so that a directory this upload created is watched before the rename lands in
        it (see watch_hub; here, not on the event loop: a watcher's drain thread may hold its lock for
        a walk of a tree just moved in, which grows with the sandbox's files); each rename noted for
        the watchers; then the renames."""
        self._apply(self._take())  # no job in flight: this is the upload's job
        writers = [_opened(sink) for sink in self.sinks]
        hub = self.state.watch_hub
        hub.settle()
        for writer, existed in zip(writers, _renamable(writers), strict=True):
            hub.note_commit(os.path.basename(writer.temp_path), Commit(existed=existed, wrote=writer.written > 0))
        _commit_all(writers, self.metadata)
        self.finished = True

    async def abort(self) -> None:
        """Waits for the job in flight without raising (the writers are its), then takes back what
        was opened."""
        if self.job is not None:
            job, self.job = self.job, None
            await _settled(job)
        await _in_io_thread(_abort_all, [sink.writer for sink in self.sinks if sink.writer is not None])


def _opened(sink: _Sink) -> _core.AtomicWriter:
    """The writer of a part that a job has opened (every part before the one a job is opening)."""
    assert sink.writer is not None, "a part's writer is used before its job opened it"
    return sink.writer


def _write_batch(writer: _core.AtomicWriter, batch: list[bytes]) -> None:
    # Piece by piece rather than b"".join(batch): the join copied each MiB once more while holding the
    # GIL, against the event loop that is receiving the next batch; each write releases it. Measured
    # with curl, 10 alternating 512 MiB raw uploads on a loaded 2-core VM: agent CPU per GiB, median,
    # 2.3 s joined, 1.7 s piece by piece.
    for piece in batch:
        writer.write(piece)


def _renamable(writers: list[_core.AtomicWriter]) -> list[bool]:
    """Whether each target exists, once each rename is seen to be possible: the renames run one after
    another, and one that failed after others had landed would tear the upload across its files.
    What the sandbox changed while the body arrived (a directory made where a file goes, a temporary
    file removed) is refused here, before anything is renamed; only a change in the moment between
    this look and the renames is not."""
    found: list[bool] = []
    for writer in writers:
        existed = os.path.lexists(writer.path)  # a new file's target: one look, not two
        if existed and os.path.isdir(writer.path):
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"path '{writer.path}' is a directory (made while the upload arrived): nothing was written",
            )
        if not os.path.lexists(writer.temp_path):
            raise RpcError(
                Code.ABORTED,
                f"the temporary file for '{writer.path}' was removed while the upload arrived: nothing was written",
            )
        found.append(existed)
    return found


def _commit_all(writers: list[_core.AtomicWriter], metadata: dict[str, str]) -> None:
    for writer in writers:
        writer.commit(metadata)


def _abort_all(writers: list[_core.AtomicWriter]) -> None:
    """Each writer's temporary file removed, and the directories it made for it: last first, so that
    a directory an earlier part made is empty by the time its own writer takes it back."""
    for writer in reversed(writers):
        with contextlib.suppress(OSError):
            writer.abort()


def _content_type(value: str) -> tuple[bytes, dict[bytes, bytes]]:
    """An upload's ``Content-Type``: its lowered media type and its parameters, as python-multipart's
    ``parse_options_header`` reads them. A bare ``application/octet-stream`` (a raw upload, as the
    bench and ``curl --data-binary`` send it) is answered here: python-multipart, imported by the first
    upload that needs it rather than at start, brings ``numbers`` and its own code (0.23 MiB of idle RSS
    after raw uploads, docs/benchmarks.md ``rss8``), which a raw upload does not need."""
    if ";" not in value and value.lower().strip(" \t") == "application/octet-stream":
        return b"application/octet-stream", {}
    from python_multipart.multipart import parse_options_header

    return parse_options_header(value)


async def upload(state: AgentState, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /files``: multipart (one or many ``file`` parts) or a raw octet-stream body, either
    optionally gzip-encoded (``Content-Encoding: gzip``, as envd)."""
    upload: _Upload | None = None
    try:
        req = _authorize(state, scope, "write")
        metadata = _metadata(req.headers)
        content_type, options = _content_type(req.headers.get("content-type", ""))
        encoding = req.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            raise RpcError(
                Code.INVALID_ARGUMENT, f"unsupported content-encoding '{encoding}' (supported: identity, gzip)"
            )
        upload = _Upload(req, state, metadata)
        body = _decoded(body_chunks(receive), encoding == "gzip")
        if content_type == b"application/octet-stream":
            socket_body = scope.get("extensions", {}).get(RAW_BODY) if encoding != "gzip" else None
            await _receive_raw(upload, req, body, socket_body)
        elif content_type.startswith(b"multipart/"):
            boundary = options.get(b"boundary")
            if not boundary:
                raise RpcError(Code.INVALID_ARGUMENT, "multipart content-type has no boundary")
            socket_body = scope.get("extensions", {}).get(RAW_BODY) if encoding != "gzip" else None
            length = _body_length(req.headers) if encoding != "gzip" else None
            await _receive_multipart(upload, boundary, body, socket_body, length)
        else:
            shown = content_type.decode("latin-1") or "(none)"
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"unsupported content type '{shown}': use multipart/form-data or application/octet-stream",
            )
        written = await upload.commit()
    except ClientDisconnected:
        if upload is not None:
            await upload.abort()
        return
    except RpcError as exc:
        if upload is not None:
            await upload.abort()
        await send_http_error(send, exc.http_status, exc.message)
        return
    except OSError as exc:
        if upload is not None:
            await upload.abort()
        err = from_os_error(exc, "error writing file")
        await send_http_error(send, err.http_status, err.message)
        return
    except BaseException:
        if upload is not None:
            await asyncio.shield(upload.abort())
        raise
    body_bytes = json.dumps(written, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": raw_headers([("content-type", "application/json"), ("content-length", str(len(body_bytes)))]),
        }
    )
    await send({"type": "http.response.body", "body": body_bytes})


async def _decoded(chunks: AsyncIterator[bytes], gzip: bool) -> AsyncIterator[bytes]:
    """The body as sent, or gzip-decoded in bounded pieces (memory stays bounded whatever the ratio;
    the upload's size is bounded by the sandbox's disk, as envd's)."""
    if not gzip:
        async for chunk in chunks:
            yield chunk
        return
    inflater = GzipInflater("request body", None)
    async for chunk in chunks:
        for piece in inflater.feed(chunk):
            yield piece
    inflater.finish()


SOCKET_BODY_MIN = 1 << 20
"""A raw body with at least this many bytes still unread is moved socket → file by a worker thread
(the server's ``RawBody``, ``AtomicWriter.receive_from``) rather than through ``receive()``: below it,
a thread hop and a pipe cost about what the event loop's path does."""


async def _receive_raw(upload: _Upload, req: _Request, body: AsyncIterator[bytes], socket_body: Any) -> None:
    """A raw body into the target. ``socket_body``: the server's ``RawBody`` (``scope["extensions"]``),
    used for a large identity body: uvicorn's buffered bytes go through the sink, the rest straight
    from the socket into the file in a worker thread, without Python touching it."""
    if not req.path:
        raise RpcError(Code.INVALID_ARGUMENT, "path query parameter is required for raw body upload")
    sink = await upload.open("")
    remaining = socket_body.remaining() if socket_body is not None else None
    large = remaining is not None and remaining >= SOCKET_BODY_MIN
    if large or "100-continue" in req.headers.get("expect", "").lower():
        # The file opened before the body is asked for (the server answers ``100 Continue`` at the
        # first read): a target that cannot be written is refused at once, as envd does, and the
        # client sends nothing. A small body without ``Expect`` opens with its data, one job.
        await upload.drain()
    if large:
        try:
            await upload.write(sink, socket_body.take())
            await upload.drain()
            await socket_body.receive_into(_opened(sink).receive_from, IO_THREADS)
        finally:
            socket_body.release()  # the slot take() counted, should a write fail before the move
        return
    async for chunk in body:
        await upload.write(sink, chunk)


def _body_length(headers: dict[str, str]) -> int | None:
    """The request body's ``Content-Length`` when it has one and is not chunked; else None."""
    value = headers.get("content-length")
    if value is None or "transfer-encoding" in headers or not value.isdigit():
        return None
    return int(value)


async def _receive_multipart(
    upload: _Upload, boundary: bytes, body: AsyncIterator[bytes], socket_body: Any, length: int | None
) -> None:
    """A multipart body's ``file`` parts into their targets: an identity body still arriving, straight
    from the socket by a worker thread that also commits (``socket_body``, as for a raw body:
    :func:`_move_multipart`); one that has arrived whole (``length`` known, under
    :data:`SOCKET_BODY_MIN`: the server holds it) parsed, written and committed by one worker-thread
    job (the same :func:`_move_multipart`, over memory); any other (chunked, gzip, more bodies moving than the
    server allows at once) through ``receive()`` and python-multipart's parser."""
    short_boundary = len(boundary) <= _core.MULTIPART_MAX_BOUNDARY
    remaining = None
    if socket_body is not None and short_boundary:
        remaining = socket_body.remaining()
    if remaining is not None:
        # Whatever its size: each piece of a body through receive() is a turn of the event loop (the
        # SDK sends a write_files body a part at a time), and from the socket it is a read(2) in
        # the worker thread the body needs anyway.
        try:
            prefix = socket_body.take()
            await socket_body.receive_into(functools.partial(_move_multipart, upload, boundary, prefix), IO_THREADS)
        finally:
            socket_body.release()  # the slot take() counted, should receive_into never run
    elif length is not None and length < SOCKET_BODY_MIN and short_boundary:
        pieces = [chunk async for chunk in body]  # at most ``length`` bytes: the server stops there
        # The socket path's move over the body in memory: no byte is left in any socket (length 0),
        # so the reader never reads and is given no descriptor.
        if await upload.run(_move_multipart, upload, boundary, b"".join(pieces), -1, 0, 1.0, None) != "complete":
            raise RpcError(Code.INVALID_ARGUMENT, "malformed multipart body: it ended before its closing boundary")
    else:
        await _parse_multipart(upload, boundary, body)
    if not upload.sinks:
        raise RpcError(Code.INVALID_ARGUMENT, "the multipart body has no part named 'file'")


def _move_multipart(
    upload: _Upload, boundary: bytes, prefix: bytes, fd: int, length: int, idle: float, stop: int | None
) -> str:
    """``RawBody.receive_into``'s move for a multipart body, in a worker thread: each part's headers
    say where its data goes (:meth:`_Upload.open_now`), and ``MultipartReader`` (Rust, without the
    GIL) reads the data from the socket and writes it there. Measured against the parser's path
    (python-multipart through ``receive()``): see docs/benchmarks.md, "Multipart uploads and
    downloads without the event loop"."""
    reader = _core.MultipartReader(boundary, prefix, length, idle, stop)
    try:
        while True:
            step, headers = reader.next_part(fd)
            if step == "complete" and upload.sinks:
                upload.finish()  # the commit in this job too: no thread hop after it
            if step != "part":
                return step
            part = _part_start(_part_disposition(headers or b""))
            copied = reader.copy_part(fd, upload.open_now(part.filename) if part.is_file else None)
            if copied != "part done":
                return copied
    except ValueError as exc:
        reader.discard_rest(fd)  # the 400 then reaches a client still sending (see discard_rest)
        raise RpcError(Code.INVALID_ARGUMENT, f"malformed multipart body: {exc}") from None
    except (RpcError, OSError):
        reader.discard_rest(fd)
        raise


def _part_disposition(headers: bytes) -> bytes:
    """The ``Content-Disposition`` value of a part's header block (CRLF-ended lines). A header name
    must be a token, as python-multipart (the path of chunked bodies) requires: a space before the
    colon, an empty name or an 8-bit one is a malformed body, never read as another header's."""
    disposition = b""
    for line in headers.split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise RpcError(Code.INVALID_ARGUMENT, "malformed multipart body: a part's header line has no ':'")
        if not is_token(name):
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"malformed multipart body: a part's header name {name[:64]!r} is not a token",
            )
        if name.lower() == b"content-disposition":
            disposition = value.strip()
    return disposition


async def _parse_multipart(upload: _Upload, boundary: bytes, body: AsyncIterator[bytes]) -> None:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    state = _MultipartState()
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": state.on_part_begin,
            "on_header_field": state.on_header_field,
            "on_header_value": state.on_header_value,
            "on_header_end": state.on_header_end,
            "on_headers_finished": state.on_headers_finished,
            "on_part_data": state.on_part_data,
            "on_end": state.on_end,
        },
        max_header_size=MULTIPART_MAX_HEADER,
    )
    sink: _Sink | None = None
    async for chunk in body:
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"malformed multipart body: {exc}") from None
        # The parser's callbacks only record what it found; the files are opened and written here,
        # where the writes can wait for the worker thread.
        for op in state.take():
            if isinstance(op, _PartStart):
                sink = await upload.open(op.filename) if op.is_file else None
            elif sink is not None:
                await upload.write(sink, op)
    if not state.ended:
        raise RpcError(Code.INVALID_ARGUMENT, "multipart body ended before its closing boundary")


MULTIPART_MAX_HEADER = 16 << 10
"""Largest header line of a multipart part (16 KiB): a filename and a content type need far less."""


@dataclass(slots=True)
class _PartStart:
    """A part's headers ended: whether it is a ``file`` part, and its filename."""

    is_file: bool
    filename: str


_PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')
"""``Content-Disposition`` as the SDKs (httpx, undici) and curl write it: quoted values without an
escape. Read by this one match, it gives what python-multipart's ``parse_options_header`` gives for
it (a latin-1 decode, the split at ``;`` outside quotes, the quotes removed), at a fraction of its
cost per part (~10 µs, a sixth of the agent's Python for each of ``write_files``' files); anything
else (other spacing, escapes, case, more parameters) goes through ``parse_options_header``."""


def _part_start(disposition: bytes) -> _PartStart:
    """What a part's ``Content-Disposition`` says: a ``file`` part and its filename, or another
    form field (envd ignores those)."""
    plain = _PLAIN_DISPOSITION.fullmatch(disposition)
    if plain is not None:
        name, raw_filename = plain.group(1), plain.group(2) or b""
    else:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(disposition.decode("latin-1"))
        name, raw_filename = options.get(b"name"), options.get(b"filename", b"")
    if name != b"file":
        return _PartStart(False, "")
    try:
        filename = raw_filename.decode("utf-8")
    except UnicodeDecodeError:
        raise RpcError(Code.INVALID_ARGUMENT, "the part's filename is not valid UTF-8") from None
    return _PartStart(True, filename)


class _MultipartState:
    """Callbacks of python-multipart's streaming parser: parts' headers, then their data, recorded in
    order for the upload to act on after each ``write``."""

    def __init__(self) -> None:
        self.field = bytearray()
        self.value = bytearray()
        self.disposition = b""
        self.ops: list[_PartStart | bytes] = []
        self.ended = False

    def take(self) -> list[_PartStart | bytes]:
        ops, self.ops = self.ops, []
        return ops

    def on_part_begin(self) -> None:
        self.disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self.field).lower() == b"content-disposition":
            self.disposition = bytes(self.value)
        self.field.clear()
        self.value.clear()

    def on_headers_finished(self) -> None:
        self.ops.append(_part_start(self.disposition))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self.ops.append(data[start:end])

    def on_end(self) -> None:
        self.ended = True
