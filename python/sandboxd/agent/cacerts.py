"""envd's ``caBundle`` (``POST /init``): certificates the orchestrator wants the sandbox to trust.

The runtime passes its egress CA, whose certificates the egress proxy presents for hosts with
header rules. Like envd, the PEM is added to the system bundle that OpenSSL, curl, Python and
most tools read (:data:`BUNDLE`), once: a sandbox resumed from disk already has it. It is also kept
in :data:`EXTRA` when that directory is writable, so ``update-ca-certificates`` keeps it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
EXTRA = "/usr/local/share/ca-certificates/sandboxd-egress.crt"


MAX_BUNDLE = 64 << 20
"""The largest trust store a certificate is added to. Distributions' bundles are ~0.2 MiB; a sandbox
could leave anything at that path before a resume (a sparse file of gigabytes), and adding to it
copies it whole."""

CHUNK = 64 << 10
"""The bundle is searched in pieces of this size: its whole is never in memory."""


def install(pem: str, bundle: str = BUNDLE, extra: str = EXTRA) -> None:
    """Add ``pem`` to ``bundle`` unless it is there already (blocking: call from a thread, or
    before an event loop runs).

    The bundle is replaced whole (a new file beside it, then ``rename``), not appended to: in a
    sandbox it is a file of the template's read-only layer, and the first write to such a file
    makes overlayfs copy it up into the sandbox's disk *and fsync the copy*, which on the
    loop-mounted disk is a flush to the host's disk: 5-40 ms of every create's ``/init`` on a
    busy host (``docs/benchmarks.md``). A new file is not synced. Readers see the old bundle or
    the new one, never half of it. A symlinked bundle has its target replaced, when the link leads
    to a file of the sandbox's own (:func:`_resolve`); the kept copy (``extra``) is replaced the same
    way, never opened (not written through a link, a hard link, nor blocked on a FIFO).

    The old bundle is searched in pieces and copied by the kernel (``copy_file_range``), not read
    into memory: in a new sandbox this runs before its agent starts, and the two 0.2 MiB copies
    were ~170 page faults of it (1.2 → 0.8 ms in a fresh fork). What is not a regular file (a FIFO
    a sandbox left there would block the read for ever) or is larger than :data:`MAX_BUNDLE` is
    refused with a ``ValueError``."""
    data = pem.strip().encode("ascii") + b"\n"  # UnicodeEncodeError is a ValueError: a 400
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError("'caBundle' holds no PEM certificate")
    target = _resolve(bundle)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _replace(target, None, data, 0o644)
    else:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{target} is not a regular file")
            if st.st_size > MAX_BUNDLE:
                raise ValueError(f"{target} is larger than {MAX_BUNDLE >> 20} MiB")
            if not _contains(fd, data.strip()):
                _replace(target, fd, data, stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)
    with contextlib.suppress(OSError, ValueError):  # a read-only /usr (the built-in template) keeps none
        extra = os.path.join(_resolve(os.path.dirname(extra)), os.path.basename(extra))
        os.makedirs(os.path.dirname(extra), exist_ok=True)
        # A new file renamed over whatever the sandbox left there, never opened: a FIFO would block
        # the open for ever (the resume's agent never starting), a hard link be written through.
        _replace(extra, None, data, 0o644)


def _resolve(path: str) -> str:
    """``path`` with its links followed (``realpath``), or a ``ValueError`` when the file that
    following them in the kernel reaches is not the one that path names, or when the path is a link
    to nothing.

    ``realpath`` reads each link's text, while the kernel follows ``/proc``'s magic links
    (``/proc/self/fd/1``, ``/proc/1/cwd``) to the open file itself: a file of the host (the agent's
    log, inherited as fd 1), whose text is a host path that names nothing inside the sandbox, or
    another of its files. Root in a sandbox can plant such a link at the trust store before a
    pause, and the resume's install would create that host path inside, or replace what it names.
    When nothing is at ``path``, its nearest existing parent is checked the same way."""
    target = os.path.realpath(path)
    probe, resolved = path, target
    while True:
        try:
            reached = os.stat(probe)
        except FileNotFoundError:
            if os.path.lexists(probe):
                raise ValueError(f"{path} is a link to nothing") from None
            probe, resolved = os.path.dirname(probe), os.path.dirname(resolved)
            continue
        try:
            named = os.lstat(resolved)
        except OSError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (reached.st_dev, reached.st_ino):
            raise ValueError(f"{path} links outside the sandbox's files")
        return target


def _contains(fd: int, needle: bytes) -> bool:
    """Whether the file at ``fd`` holds ``needle``, read from its start in :data:`CHUNK` pieces
    (each overlapping the last by less than the needle, so none is missed at a boundary).

    Reads at most :data:`MAX_BUNDLE` bytes and a piece, then refuses with a ``ValueError``: its size
    is not proof of its length, as a sandbox can link the bundle to a file of ``/proc`` that says 0
    and reads for ever (``/proc/self/pagemap``: 256 GiB of a 47-bit address space)."""
    keep = len(needle) - 1
    buf = bytearray(CHUNK + keep)
    view = memoryview(buf)
    held, offset = 0, 0
    while True:
        n = os.preadv(fd, [view[held:]], offset)
        if n == 0:
            return False
        offset += n
        end = held + n
        if buf.find(needle, 0, end) >= 0:
            return True
        if offset > MAX_BUNDLE:
            raise ValueError(f"the trust store reads longer than {MAX_BUNDLE >> 20} MiB")
        held = min(keep, end)
        buf[:held] = buf[end - held : end]


def _replace(path: str, old: int | None, tail: bytes, mode: int) -> None:
    """Write a new file beside ``path`` (the file at ``old``, then a newline if it had content,
    then ``tail``) and rename it over ``path``. The new file's name is made here (``mkstemp``:
    ``O_EXCL``), so nothing left in the directory (a link a sandbox planted under a fixed name) is
    written through, and two ``/init`` at once each rename their own."""
    import tempfile  # here: it imports random, which the standalone agent loads only when used (lean.py)

    fd, temp = tempfile.mkstemp(prefix=".sandboxd-ca-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask must not narrow it
            if old is not None and _copy(old, f.fileno()):
                f.write(b"\n")
            f.write(tail)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _copy(src: int, dst: int) -> bool:
    """Copy the file at ``src`` (from its start) to ``dst`` in the kernel, up to :data:`MAX_BUNDLE`
    bytes; whether anything was copied. Falls back to reads and writes where the file systems
    cannot (``copy_file_range`` across some of them)."""
    copied = 0
    try:
        while copied < MAX_BUNDLE:
            n = os.copy_file_range(src, dst, MAX_BUNDLE - copied, copied)
            if n == 0:
                return copied > 0
            copied += n
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or copied:
            raise
    while copied < MAX_BUNDLE:
        chunk = os.pread(src, min(CHUNK, MAX_BUNDLE - copied), copied)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        copied += len(chunk)
    return copied > 0
