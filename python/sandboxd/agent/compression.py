"""gzip request bodies, inflated in bounded pieces so every limit applies to the decompressed bytes.

A deflate stream can expand about 1000-fold: a 4.6 MB body inflates to 1 GiB. Inflating a body
whole, or a network chunk without an output bound, lets a client choose the agent's memory use. Here
every call to zlib asks for at most :data:`PIECE` bytes of output, and the caller's limit is checked
against the running total of decompressed bytes, so memory stays at one piece per request whatever the
ratio, and a body past its limit is refused after at most ``limit + PIECE`` bytes were produced.

Concatenated gzip members (what ``cat a.gz b.gz`` makes) decode as one stream, as Go's
``compress/gzip`` reader does for envd. Anything that is not gzip is the client's error
(``invalid_argument`` / 400), never ``internal``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from .errors import Code, RpcError

PIECE = 1 << 20
"""Largest piece of output one zlib call may produce (1 MiB): the bound on the memory one inflating
request holds, and the size that the upload writer batches anyway."""

GZIP_WBITS = 16 + 15  # 16 + zlib.MAX_WBITS, written out so that importing this module does not load zlib
"""zlib's window bits for the gzip wrapper (header and CRC), not raw deflate or zlib."""


def accepted_codings(accept_encoding: str) -> list[tuple[str, float]]:
    """The content codings an ``Accept-Encoding`` value lists, in its order: each name lower-case,
    with its ``q`` (1 when there is none, 0 when it cannot be read). The one reading of the header,
    for the agent's downloads and the runtime's proxy."""
    codings = []
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        codings.append((name, q))
    return codings


class BodyTooLarge(RpcError):
    """A body (or one message) is larger than a limit once decompressed."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(
            Code.RESOURCE_EXHAUSTED,
            f"{what} exceeds the limit of {limit} bytes after decompression",
            http_status=413,
        )


def _not_gzip(what: str, exc: zlib.error) -> RpcError:
    return RpcError(Code.INVALID_ARGUMENT, f"{what} is labelled gzip but is not valid gzip data: {exc}")


class GzipInflater:
    """Decodes one gzip body fed in arbitrary chunks, yielding pieces of at most :data:`PIECE` bytes.

    ``limit`` (or None for no limit) bounds the total decompressed size; ``what`` names the body in
    error messages (``"request body"``, ``"message"``)."""

    def __init__(self, what: str, limit: int | None) -> None:
        self.what = what
        self.limit = limit
        self.total = 0
        self._inflate = zlib.decompressobj(GZIP_WBITS)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decompressed bytes of ``data``, in bounded pieces."""
        pending = data
        while pending:
            if self._inflate.eof:
                # A complete member is followed by more bytes: the next member of a multi-member body.
                pending = self._inflate.unused_data + pending
                self._inflate = zlib.decompressobj(GZIP_WBITS)
            self._started = True
            try:
                piece = self._inflate.decompress(pending, PIECE)
            except zlib.error as exc:
                raise _not_gzip(self.what, exc) from None
            pending = self._inflate.unconsumed_tail
            if self._inflate.eof and self._inflate.unused_data:
                pending = self._inflate.unused_data + pending
                self._inflate = zlib.decompressobj(GZIP_WBITS)
            if piece:
                self.total += len(piece)
                if self.limit is not None and self.total > self.limit:
                    raise BodyTooLarge(self.what, self.limit)
                yield piece

    def finish(self) -> None:
        """Checks that the body ended at the end of a gzip member (a truncated body is an error). An
        empty body is an empty body, as connect-go reads one."""
        if self._started and not self._inflate.eof:
            raise RpcError(Code.INVALID_ARGUMENT, f"{self.what} ends inside its gzip stream (truncated)")


def gunzip(data: bytes, what: str, limit: int) -> bytes:
    """A whole gzip body, decompressed, at most ``limit`` bytes (else :class:`BodyTooLarge`)."""
    inflater = GzipInflater(what, limit)
    out = b"".join(inflater.feed(data))
    inflater.finish()
    return out
