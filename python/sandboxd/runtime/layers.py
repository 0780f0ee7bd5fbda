"""Template layers: read-only directory trees, each stored once under its digest and shared by every
template that lists it. A sandbox's root is an overlayfs whose lower dirs are its template's layers,
topmost first, so templates that share a base share its files on disk and in the page cache.

A template store (``<data dir>/templates``, or a shared one named by ``--template-store``) holds::

    layers/<hex>/        a layer's tree, owned canonically (root 0, user 1000, ...): never chowned,
                         the isolation work mounts it idmapped
    layers/<hex>.json    what the layer is: digest, kind, source, size, when it was added
    cache/<key>.json     build cache: the key of a recipe -> the layers and config it produced
    tmp/<pid>-<n>/       staging: a layer is unpacked here and renamed into layers/ when complete,
                         so a crash never leaves a half layer under a digest
    <name>.lock          flock: one process at a time commits layers or builds a given recipe

Digests. An imported layer (an OCI image layer, a tarball, a directory) is named by the sha256 of its
uncompressed tar stream, which for an OCI layer is the image config's ``diff_id``; it is computed
while unpacking and checked against the ``diff_id`` the image claims, so a registry cannot plant
content under another layer's name. A built layer (``base``) is named by the sha256 of its recipe,
as a build cache keys a step by its inputs.

Why we unpack layers ourselves rather than with umoci: umoci flattens an image into one rootfs, and
we keep each layer as its own overlay lower dir. OCI whiteouts become overlayfs whiteouts here:
``.wh.NAME`` -> a 0:0 character device ``NAME``; ``.wh..wh..opq`` -> the directory's overlay
"opaque" xattr (``trusted.overlay.opaque`` for an overlay mounted by host root, and
``user.overlay.opaque`` for one mounted inside a user namespace with ``userxattr``).

Layer tarballs are hostile input: entries that would land outside the layer (``..``, through a
symlink, hard links to outside) are refused, device nodes are skipped (opening one needs no
capability), and only ``security.capability`` and ``user.*`` xattrs are kept (``trusted.overlay.*``
would steer the overlay). All of this is blocking work for a thread or a CLI process, never an
event loop.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
"""Both names: overlayfs reads ``trusted.*`` when host root mounts it and ``user.*`` with
``userxattr`` (an overlay mounted inside a user namespace)."""

KEPT_XATTR_PREFIXES = ("user.",)
KEPT_XATTRS = ("security.capability",)
"""File capabilities (``ping``'s ``cap_net_raw``) and user xattrs survive; ``trusted.*`` (overlay
control) and ``security.selinux`` never come from a layer."""

READ_CHUNK = 1 << 20
"""Reads of compressed layer streams: 1 MiB keeps syscalls and Python overhead per byte low."""

PROGRESS_EVERY_S = 1.0
"""How often an unpack reports progress (entries and bytes so far)."""

Progress = Callable[[str], None]


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A build cache key: the sha256 of ``recipe`` as canonical JSON (sorted keys)."""
    return "sha256:" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


class Readable(Protocol):
    """What a layer is read from: a file, a pipe, a decompressor."""

    def read(self, size: int = -1, /) -> bytes: ...


class LayerError(Exception):
    """A layer that cannot be stored: bad archive, escaping entry, digest mismatch, missing tool."""


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """``layers/<hex>.json``."""

    digest: str
    """``sha256:<hex>``."""
    kind: str
    """``tar`` (imported: digest of its tar stream) or ``build`` (digest of its recipe)."""
    source: str
    size: int
    """Bytes of file content in the tree."""
    entries: int
    added_at: float


def hex_of(digest: str) -> str:
    """``sha256:<64 hex>`` -> the hex; anything else is refused (it becomes a path)."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise LayerError(f"'{digest}' is not a sha256 digest (sha256:<64 lowercase hex digits>)")
    return value


class _HashingReader(io.RawIOBase):
    """Passes reads through and hashes every byte that went by (the uncompressed tar stream)."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        """Read to the end: the tar's trailing padding is part of the digest."""
        while data := self.inner.read(READ_CHUNK):
            self.sha.update(data)
            self.count += len(data)


class _Peek(io.RawIOBase):
    """A reader that can look at its first bytes (to tell the compression) without losing them."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.head = b""

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.inner.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:n]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def decompressed(raw: Readable) -> Iterator[Readable]:
    """The uncompressed stream of a layer blob or tarball: gzip, zstd, bzip2, xz or plain tar,
    told apart by their magic bytes (OCI media types are not always honest)."""
    peek = _Peek(raw)
    magic = peek.peek(6)
    buffered = io.BufferedReader(peek, READ_CHUNK)
    if magic.startswith(b"\x1f\x8b"):
        with gzip.GzipFile(fileobj=buffered, mode="rb") as stream:
            yield stream
    elif magic.startswith(b"BZh"):
        with bz2.BZ2File(buffered) as stream:
            yield stream
    elif magic.startswith(b"\xfd7zXZ\x00"):
        with lzma.LZMAFile(buffered) as stream:
            yield stream
    elif magic.startswith(b"\x28\xb5\x2f\xfd"):
        # Python 3.11 has no zstd module; Debian's zstd tool streams it.
        zstd = shutil.which("zstd")
        if zstd is None:
            raise LayerError("this layer is zstd-compressed: install zstd on the host (apt-get install zstd)")
        process = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        feeder = _feed_in_thread(buffered, process.stdin)
        try:
            yield process.stdout
        finally:
            process.stdout.close()
            feeder.join()
            if process.wait() != 0:
                raise LayerError(f"zstd could not decompress the layer (exit {process.returncode})")
    else:
        yield buffered


def _feed_in_thread(source: Readable, sink: IO[bytes]) -> Any:
    import threading

    def feed() -> None:
        try:
            while chunk := source.read(READ_CHUNK):
                sink.write(chunk)
        except (BrokenPipeError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.close()

    thread = threading.Thread(target=feed, name="sandboxd-zstd-feed", daemon=True)
    thread.start()
    return thread


@dataclass(slots=True)
class _Unpacked:
    digest: str
    size: int
    entries: int
    skipped_devices: int


def _normalize(name: str) -> str:
    """An archive path relative to the layer root; entries that leave it are refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"layer entry '{name}' leaves the layer's root ('..')")
    return "/".join(parts)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + "/")


def unpack_layer(raw: Readable, dest: Path, progress: Progress | None = None) -> _Unpacked:
    """Unpack one layer (a possibly compressed tar stream) into the empty directory ``dest``,
    converting OCI whiteouts to overlayfs ones; returns the sha256 of the uncompressed stream."""
    root = os.path.realpath(dest)
    whiteouts: list[str] = []
    opaque: list[str] = []
    size = entries = skipped = 0
    last_report = time.monotonic()
    with decompressed(raw) as stream:
        hashing = _HashingReader(stream)
        reader = io.BufferedReader(hashing, READ_CHUNK)
        try:
            with tarfile.open(fileobj=reader, mode="r|", errorlevel=2) as tar:
                for member in tar:
                    name = _normalize(member.name)
                    if not name:
                        continue  # the root itself: its mode is the layer dir's, set on commit
                    parent, _, base = name.rpartition("/")
                    real_parent = os.path.realpath(os.path.join(root, parent))
                    if not _inside(root, real_parent):
                        raise LayerError(f"layer entry '{member.name}' would land outside the layer (via a symlink)")
                    if base == OPAQUE_MARKER:
                        opaque.append(parent)
                        continue
                    if base.startswith(WHITEOUT_PREFIX):
                        whiteouts.append(os.path.join(parent, base[len(WHITEOUT_PREFIX) :]))
                        continue
                    if member.ischr() or member.isblk():
                        skipped += 1  # a device node in a template could open a host device
                        continue
                    if member.islnk():
                        target = _normalize(member.linkname)
                        if not _inside(root, os.path.realpath(os.path.join(root, target))):
                            raise LayerError(f"hard link '{member.name}' points outside the layer")
                        member.linkname = target
                    member.name = name
                    _replace_existing(os.path.join(root, name), member)
                    tar.extract(member, root, set_attrs=True, numeric_owner=True, filter="fully_trusted")
                    _apply_xattrs(os.path.join(root, name), member)
                    entries += 1
                    if member.isfile():
                        size += member.size
                    if progress is not None and time.monotonic() - last_report > PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        progress(f"{entries} entries, {size >> 20} MiB")
            hashing.drain()
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
            raise LayerError(f"the layer is not a readable tar archive: {exc}") from exc
        except OSError as exc:
            raise LayerError(f"unpacking the layer into {dest} failed: {exc}") from exc
    for path in whiteouts:
        target = os.path.join(root, path)
        # A whiteout hides what lower layers have; a file of the same name in this layer stays.
        if not os.path.lexists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    for path in opaque:
        directory = os.path.join(root, path) if path else root
        os.makedirs(directory, exist_ok=True)
        for attr in OPAQUE_XATTRS:
            os.setxattr(directory, attr, b"y", follow_symlinks=False)
    return _Unpacked("sha256:" + hashing.sha.hexdigest(), size, entries, skipped)


def _replace_existing(path: str, member: tarfile.TarInfo) -> None:
    """A later entry of the same name replaces an earlier one (tar semantics), but a directory
    entry over an existing directory only updates it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not member.isdir():
            shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_xattrs(path: str, member: tarfile.TarInfo) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        attr = key[len("SCHILY.xattr.") :]
        if attr in KEPT_XATTRS or attr.startswith(KEPT_XATTR_PREFIXES):
            with contextlib.suppress(OSError):
                os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes of file content, entries) under ``path``."""
    size = entries = 0
    for directory, dirs, files in os.walk(path):
        for name in itertools.chain(dirs, files):
            entries += 1
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(directory, name))
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return size, entries


def canonical_tar(directory: Path) -> list[str]:
    """GNU tar writing ``directory`` to stdout as a canonical stream: sorted names, numeric owners,
    xattrs, and no atime, ctime or pid in the headers, so the same tree always gives the same bytes."""
    return [
        "tar",
        "--create",
        "--file=-",
        "--sort=name",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        f"--directory={directory}",
        ".",
    ]


class LayerStore:
    """Layers, the build cache and the locks of one template store directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers = root / "layers"
        self.cache = root / "cache"
        self.tmp = root / "tmp"
        self.pending = root / "pending"
        for d in (self.layers, self.cache, self.tmp, self.pending):
            d.mkdir(parents=True, exist_ok=True)
        # Only root may enter the store: its layers keep their canonical owners, so a setuid-root file
        # that an image or a hostile build step put in a layer is setuid root on the host too. Sandboxes
        # do not need the way in (their layers are mounted by the runtime; measured: creates and
        # commands work the same with 0700). Drill: test_template_build's setuid test.
        root.chmod(0o700)
        self._counter = itertools.count()
        self._sweep_staging()

    # ---------------------------------------------------------------------------------- layers

    def path(self, digest: str) -> Path:
        return self.layers / hex_of(digest)

    def has(self, digest: str) -> bool:
        return (self.layers / f"{hex_of(digest)}.json").exists()

    def info(self, digest: str) -> LayerInfo | None:
        try:
            data = json.loads((self.layers / f"{hex_of(digest)}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return LayerInfo(**data)

    def digests(self) -> list[str]:
        return sorted(f"sha256:{p.stem}" for p in self.layers.glob("*.json"))

    def staging(self) -> Path:
        """A new empty directory beside ``layers/`` (same filesystem: committing is a rename)."""
        path = self.tmp / f"{os.getpid()}-{next(self._counter)}-{time.monotonic_ns()}"
        path.mkdir(mode=0o755)
        return path

    def _sweep_staging(self) -> None:
        """Remove staging dirs of processes that are gone (a crash mid-import)."""
        for entry in self.tmp.iterdir():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(entry, ignore_errors=True)

    def commit(self, tree: Path, digest: str, kind: str, source: str) -> LayerInfo:
        """Move a complete tree into ``layers/`` under ``digest``. If the layer is already there
        (another template or process stored it first), the tree is discarded: layers are never
        stored twice."""
        target = self.path(digest)
        with self.lock("layers"):
            existing = self.info(digest)
            if existing is not None:
                shutil.rmtree(tree, ignore_errors=True)
                return existing
            size, entries = tree_size(tree)
            tree.chmod(0o755)
            if target.exists():  # a tree without its json: an interrupted commit
                shutil.rmtree(target)
            tree.rename(target)
            info = LayerInfo(digest, kind, source, size, entries, time.time())
            _write_json(self.layers / f"{hex_of(digest)}.json", asdict(info))
            return info

    def import_tar(
        self, raw: Readable, source: str, expected: str | None = None, progress: Progress | None = None
    ) -> LayerInfo:
        """Unpack a (possibly compressed) layer tar stream into the store; returns its info.
        ``expected`` is the digest the stream must have (an OCI ``diff_id``)."""
        staging = self.staging()
        try:
            tree = staging / "tree"
            tree.mkdir()
            unpacked = unpack_layer(raw, tree, progress)
            if expected is not None and unpacked.digest != expected:
                raise LayerError(
                    f"layer from {source} has digest {unpacked.digest}, but the image says {expected}: "
                    "the image is corrupt or was tampered with"
                )
            if unpacked.skipped_devices and progress is not None:
                progress(f"skipped {unpacked.skipped_devices} device nodes (a sandbox's /dev is its own)")
            return self.commit(tree, unpacked.digest, "tar", source)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def import_directory(self, directory: Path, source: str, progress: Progress | None = None) -> LayerInfo:
        """Store a copy of a root filesystem directory: GNU tar serialises it (sorted, numeric
        owners, xattrs) and the same unpacker as for tarballs stores it, so a directory and the
        tarball of it get the same treatment and the layer is a snapshot that later changes to the
        directory do not reach."""
        process = subprocess.Popen(canonical_tar(directory), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        try:
            info = self.import_tar(process.stdout, source, progress=progress)
        finally:
            process.stdout.close()
            error = process.stderr.read().decode(errors="replace")
            process.stderr.close()
            process.wait()
        if process.returncode != 0:
            raise LayerError(f"could not read '{directory}': {error.strip() or f'tar exited {process.returncode}'}")
        return info

    def remove(self, digest: str) -> None:
        with self.lock("layers"):
            (self.layers / f"{hex_of(digest)}.json").unlink(missing_ok=True)
            shutil.rmtree(self.path(digest), ignore_errors=True)

    # ------------------------------------------------------------------------------ build cache

    def cached(self, key: str) -> dict[str, Any] | None:
        """A build's record (``layers``, ``config``, ...) if every layer it lists is still here."""
        try:
            record = json.loads((self.cache / self.cache_record_name(key)).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(record, dict) or not all(self.has(d) for d in record.get("layers", [])):
            return None
        return record

    def cache_put(self, key: str, record: dict[str, Any]) -> None:
        _write_json(self.cache / self.cache_record_name(key), record)

    def uncache(self, key: str) -> None:
        """Forget a build (its layers go at the next garbage collection unless a template lists them)."""
        (self.cache / self.cache_record_name(key)).unlink(missing_ok=True)

    def cached_layers(self) -> list[str]:
        """Every layer some build cache record lists."""
        return [digest for layers in self.cache_records().values() for digest in layers]

    def cache_records(self) -> dict[str, list[str]]:
        """Every build cache record's layers (topmost first), by the record's file name."""
        out: dict[str, list[str]] = {}
        for path in self.cache.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                out[path.name] = [str(d) for d in json.loads(path.read_text()).get("layers", [])]
        return out

    def drop_cache_record(self, file_name: str) -> None:
        """Forget the record :meth:`cache_records` named ``file_name``."""
        (self.cache / Path(file_name).name).unlink(missing_ok=True)

    def cache_record_name(self, key: str) -> str:
        """The file name of ``key``'s record, as :meth:`cache_records` names it."""
        return f"{hex_of(key)}.json"

    # ------------------------------------------------------------------------ pending collections

    def note_collection(self, chains: list[list[str]]) -> Path:
        """Write down a template removal's collection that could not run yet (a build held the
        store): the layer lists of the removed template. Whoever runs it next, in this process or
        after a restart (:meth:`pending_collections`), deletes the note."""
        path = self.pending / f"{uuid.uuid4().hex}.json"
        _write_json(path, {"chains": chains})
        return path

    def pending_collections(self) -> list[tuple[Path, list[list[str]]]]:
        """The notes :meth:`note_collection` wrote, each with its layer lists. A note
        that cannot be read is deleted (it only ever frees space: losing one keeps layers until the
        next ``template prune``)."""
        out: list[tuple[Path, list[list[str]]]] = []
        for path in sorted(self.pending.glob("*.json")):
            try:
                chains = json.loads(path.read_text())["chains"]
                out.append((path, [[str(d) for d in chain] for chain in chains]))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return out

    # ------------------------------------------------------------------------------------ users

    def register_user(self, db_path: Path) -> None:
        """Record that the runtime whose database is ``db_path`` lists layers of this store, so
        garbage collection in a store shared by several runtimes keeps what any of them uses."""
        users = self.root / "users"
        users.mkdir(exist_ok=True)
        name = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:32]
        entry = users / name
        if not entry.exists():
            entry.write_text(str(db_path.resolve()))

    def users(self) -> list[Path]:
        """The databases of the runtimes using this store (entries whose database is gone are dropped)."""
        out: list[Path] = []
        directory = self.root / "users"
        if not directory.is_dir():
            return out
        for entry in directory.iterdir():
            path = Path(entry.read_text().strip())
            if path.exists():
                out.append(path)
            else:
                entry.unlink(missing_ok=True)
        return out

    # ------------------------------------------------------------------------------------ locks

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False, wait: bool = True) -> Iterator[None]:
        """A flock on ``<store>/<name>.lock``, held across processes (runtimes and CLIs sharing one
        store): exclusive, or shared with other shared holders. Without ``wait``, raises
        ``BlockingIOError`` at once if another holder is in the way."""
        with open(self.root / f"{name}.lock", "a") as f:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.rename(path)
