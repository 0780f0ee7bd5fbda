"""``GET /files`` (streaming download) and ``POST /files`` (atomic upload), envd-compatible (spec §3.4-3.5).

Downloads stream from the Rust ``FileReader`` in fixed chunks, with Range (206/416) and conditional
(304) support, and gzip when the client accepts it and the file is worth compressing.

Uploads never tear a file: every part streams into a temporary file beside its target (Rust
``AtomicWriter``), and all targets are renamed into place only after the whole body arrived. A client
that disconnects midway leaves every old file intact and no temporary file behind.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from sandboxd import _core

from .asgi import ClientDisconnected, Receive, Scope, Send, body_chunks, header_map, raw_headers, send_http_error
from .auth import check_files_access
from .errors import Code, RpcError, from_os_error
from .paths import expand_and_resolve
from .state import AgentState
from .users import User, lookup

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
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def _content_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def _worth_compressing(path: str) -> bool:
    with _core.FileReader(path, 0, GZIP_SAMPLE) as reader:
        sample = reader.read()
    return len(zlib.compress(sample, GZIP_LEVEL)) <= len(sample) * GZIP_MIN_SAVING


def _gzip_chunks(reader: _core.FileReader) -> Iterator[bytes]:
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for chunk in reader:
        out = deflate.compress(chunk)
        if out:
            yield out
    yield deflate.flush()


async def download(state: AgentState, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /files?path=…``: stream a file."""
    try:
        req = _authorize(state, scope, "read")
        path = req.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            await send_http_error(send, 404, f"path '{path}' does not exist")
            return
        if stat.S_ISDIR(st.st_mode):
            await send_http_error(send, 400, f"path '{path}' is a directory")
            return
        size = st.st_size
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        etag = f'W/"{size:x}-{st.st_mtime_ns:x}"'
        base = [
            ("content-disposition", _disposition(os.path.basename(path))),
            ("vary", "Accept-Encoding"),
            ("last-modified", last_modified),
            ("etag", etag),
            ("accept-ranges", "bytes"),
            ("cache-control", "no-store"),
        ]
        if _not_modified(req.headers, etag, st.st_mtime):
            await send({"type": "http.response.start", "status": 304, "headers": raw_headers(base)})
            await send({"type": "http.response.body", "body": b""})
            return
        content_type = _content_type(path)
        status, offset, length = 200, 0, size
        range_header = req.headers.get("range")
        if range_header is not None and req.headers.get("if-range") in (None, etag, last_modified):
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                await send_http_error(
                    send,
                    416,
                    f"range '{range_header}' is outside the file's {size} bytes",
                    [("content-range", f"bytes */{size}")],
                )
                return
            if isinstance(parsed, tuple):
                status, (offset, length) = 206, parsed
                base.append(("content-range", f"bytes {offset}-{offset + length - 1}/{size}"))
        use_gzip = (
            status == 200
            and GZIP_MIN_SIZE <= size <= GZIP_MAX_SIZE
            and _accepts_gzip(req.headers.get("accept-encoding", ""))
            and _worth_compressing(path)
        )
        reader = _core.FileReader(path, offset, length)
    except RpcError as exc:
        await send_http_error(send, exc.http_status, exc.message)
        return
    except OSError as exc:
        err = from_os_error(exc, "error opening file")
        await send_http_error(send, err.http_status, err.message)
        return
    with reader:
        headers = [*base, ("content-type", content_type)]
        chunks: Iterator[bytes]
        if use_gzip:
            headers.append(("content-encoding", "gzip"))
            chunks = _gzip_chunks(reader)
        else:
            headers.append(("content-length", str(length)))
            chunks = iter(reader)
        await send({"type": "http.response.start", "status": status, "headers": raw_headers(headers)})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


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
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
        return int(mtime) <= since
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


class _Upload:
    """The files of one upload request: open writers, committed together at the end."""

    def __init__(self, req: _Request, state: AgentState) -> None:
        self.req = req
        self.state = state
        self.writers: list[_core.AtomicWriter] = []

    def open(self, raw_target: str) -> _core.AtomicWriter:
        if self.req.path:
            if self.writers:
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
        try:
            writer = _core.AtomicWriter(target, self.req.user.uid, self.req.user.gid)
        except IsADirectoryError:
            raise RpcError(Code.INVALID_ARGUMENT, f"path '{target}' is a directory") from None
        except OSError as exc:
            raise from_os_error(exc, f"error opening '{target}' for writing") from None
        self.writers.append(writer)
        return writer

    def commit(self, metadata: dict[str, str]) -> list[dict[str, object]]:
        result: list[dict[str, object]] = []
        for writer in self.writers:
            writer.commit(metadata)
            entry: dict[str, object] = {"path": writer.path, "name": os.path.basename(writer.path), "type": "file"}
            if metadata:
                entry["metadata"] = metadata
            result.append(entry)
        return result

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


async def upload(state: AgentState, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /files``: multipart (one or many ``file`` parts) or a raw octet-stream body."""
    upload: _Upload | None = None
    try:
        req = _authorize(state, scope, "write")
        metadata = _metadata(req.headers)
        content_type, options = parse_options_header(req.headers.get("content-type", ""))
        upload = _Upload(req, state)
        if content_type == b"application/octet-stream":
            await _receive_raw(upload, req, receive)
        elif content_type.startswith(b"multipart/"):
            boundary = options.get(b"boundary")
            if not boundary:
                raise RpcError(Code.INVALID_ARGUMENT, "multipart content-type has no boundary")
            await _receive_multipart(upload, boundary, receive)
        else:
            shown = content_type.decode("latin-1") or "(none)"
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"unsupported content type '{shown}': use multipart/form-data or application/octet-stream",
            )
        written = upload.commit(metadata)
    except ClientDisconnected:
        if upload is not None:
            upload.abort()
        return
    except RpcError as exc:
        if upload is not None:
            upload.abort()
        await send_http_error(send, exc.http_status, exc.message)
        return
    except OSError as exc:
        if upload is not None:
            upload.abort()
        err = from_os_error(exc, "error writing file")
        await send_http_error(send, err.http_status, err.message)
        return
    except BaseException:
        if upload is not None:
            upload.abort()
        raise
    body = json.dumps(written, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": raw_headers([("content-type", "application/json"), ("content-length", str(len(body)))]),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _receive_raw(upload: _Upload, req: _Request, receive: Receive) -> None:
    if not req.path:
        raise RpcError(Code.INVALID_ARGUMENT, "path query parameter is required for raw body upload")
    encoding = req.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise RpcError(Code.INVALID_ARGUMENT, f"unsupported content-encoding '{encoding}' (supported: identity, gzip)")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    writer = upload.open("")
    async for chunk in body_chunks(receive):
        if inflate is None:
            writer.write(chunk)
            continue
        try:
            writer.write(inflate.decompress(chunk))
        except zlib.error as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"body is not valid gzip: {exc}") from None
    if inflate is not None:
        if not inflate.eof:
            raise RpcError(Code.INVALID_ARGUMENT, "gzip body ended before the end of its compressed stream")
        writer.write(inflate.flush())


async def _receive_multipart(upload: _Upload, boundary: bytes, receive: Receive) -> None:
    state = _MultipartState(upload)
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
        max_header_size=16 << 10,
    )
    try:
        async for chunk in body_chunks(receive):
            parser.write(chunk)
    except MultipartParseError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"malformed multipart body: {exc}") from None
    if not state.ended:
        raise RpcError(Code.INVALID_ARGUMENT, "multipart body ended before its closing boundary")
    if not upload.writers:
        raise RpcError(Code.INVALID_ARGUMENT, "the multipart body has no part named 'file'")


class _MultipartState:
    """Callbacks of python-multipart's streaming parser: headers per part, data to the part's writer."""

    def __init__(self, upload: _Upload) -> None:
        self.upload = upload
        self.field = bytearray()
        self.value = bytearray()
        self.disposition = b""
        self.writer: _core.AtomicWriter | None = None
        self.ended = False

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.writer = None

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
        _, options = parse_options_header(self.disposition.decode("latin-1"))
        if options.get(b"name") != b"file":
            return  # envd ignores other form fields
        try:
            filename = options.get(b"filename", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise RpcError(Code.INVALID_ARGUMENT, "the part's filename is not valid UTF-8") from None
        self.writer = self.upload.open(filename)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.writer is not None:
            self.writer.write(data[start:end])

    def on_end(self) -> None:
        self.ended = True
