"""The egress CA in the sandbox's trust store, made once on the host as a lower layer.

A sandbox trusts the runtime's egress CA (:mod:`.network.tls`): the certificates the egress proxy
presents for hosts with header rules. Adding it to the trust store in each new sandbox
(:func:`sandboxd.agent.cacerts.install`, run by the agent-to-be before it starts) was ~155 page
faults and 1.5-2.6 ms of every cold create on a loaded host (``docs/benchmarks.md``). Yet the PEM
is the same for every sandbox of a runtime, and the bundle it is added to is the template's, the
same for every sandbox of a template. So the runtime makes the merged files once per (template
layers, CA), in a small directory under its data dir, and gives it to each sandbox as the topmost
read-only lower layer of its overlay::

    <data dir>/trust/<key>/etc/ssl/certs/ca-certificates.crt     the template's bundle + "\\n" + the PEM
    <data dir>/trust/<key>/usr/local/share/ca-certificates/sandboxd-egress.crt     the PEM (cacerts.EXTRA)

exactly what ``cacerts.install`` writes into a sandbox of that template. ``<key>`` is a digest of
everything in the layer (contents, modes, owners, times), so another bundle or another CA gets
another directory. Nothing is ever written into a layer once it is in place (a running sandbox has
it mounted): it is made in a staging directory beside, and renamed into place whole; a create that
finds it there (another create made it first, or a runtime before this one) uses it.

overlayfs takes a directory's attributes (mode, owner, times, xattrs) from the topmost layer that
has it, so the layer's ``etc``, ``etc/ssl``, ``etc/ssl/certs``, ``usr``, ... carry the template's
own: a sandbox's ``stat /etc`` is the same with the layer as without. They never carry overlayfs'
own xattrs (an opaque directory would hide the template's ``/etc`` beneath).

The template's layers come from builds that ran hostile code, so they are read as hostile: each
path component opened ``O_NOFOLLOW`` from the layer's root (no link followed, no ``..``), only
regular files opened (never a FIFO, which would block, nor a device), at most
:data:`~sandboxd.agent.cacerts.MAX_BUNDLE` bytes read. Anything unusual on the way (a link, a
whiteout, an opaque directory or any other overlayfs xattr, a file where a directory should be, no
bundle at all) is :class:`Untrusted`: no layer, and the create falls back to the install inside the
sandbox, which knows how to refuse what a sandbox planted. The ``host`` template (the host's
read-only ``/usr``, its ``/etc`` a copy of the host's) gets no layer either, nor does any template
when the data dir is on a filesystem the jail cannot mount idmapped (:func:`mountable`).

Blocking work (:func:`make_layer`) is for a worker thread; :class:`TrustLayers` runs it there once
per template and remembers the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandboxd import _core
from sandboxd.agent import cacerts

from .templates import OVERLAY_LOWER_BYTES, Template

log = logging.getLogger("sandboxd.runtime.trust")

BUNDLE = cacerts.BUNDLE.lstrip("/")
EXTRA = cacerts.EXTRA.lstrip("/")

STAGING_PREFIX = ".staging-"
"""A layer being made: ``.staging-<pid>-<random>``, renamed to its key when complete; one whose
process is gone is removed when the next runtime starts."""

SWITCH = "SANDBOXD_TRUST_LAYER"
"""``off`` in the runtime's own environment (``sandboxd serve``'s): no trust layers, the CA installed
in each sandbox as before. The way back if a kernel's overlayfs minded the extra layer, and the
tests' way to make a sandbox the way runtimes before the layer did (and resume it after)."""

OVERLAY_XATTR = "overlay."
"""What names overlayfs' own xattrs (``trusted.overlay.*``, ``user.overlay.*``: opaque, redirect,
metacopy, whiteout markers): a layer that has one on the way does what the scan cannot follow."""


class Untrusted(ValueError):
    """The template's layers are not plainly readable for this (a link, a whiteout, an opaque
    directory, no bundle...): no trust layer, the CA is installed inside the sandbox as before."""


@dataclass(frozen=True, slots=True)
class _Dir:
    """A directory's attributes, as the topmost layer that has it gives them to the overlay."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]

    def describe(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns,
            "xattrs": [[k, v.hex()] for k, v in self.xattrs],
        }


NEW_DIR = _Dir(0o755, 0, 0, 0, 0, ())
"""A directory the template does not have (its ``/usr/local/share/ca-certificates``): as the install
inside the sandbox makes it, root's with ``0755``. Its times are the layer's making."""


@dataclass(frozen=True, slots=True)
class _File:
    data: bytes
    mode: int
    uid: int
    gid: int


def _parents(path: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "a whiteout"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a special file"


def _overlay_xattrs(fd: int, where: str) -> tuple[tuple[str, bytes], ...]:
    """The xattrs of the open file ``fd``; :class:`Untrusted` if overlayfs has one of its own there."""
    names = sorted(os.listxattr(fd))
    steering = [name for name in names if name.partition(".")[2].startswith(OVERLAY_XATTR)]
    if steering:
        raise Untrusted(f"{where} carries overlayfs' own xattrs ({', '.join(steering)})")
    # A directory's other xattrs (user.*, from the image) are the template's: the layer's copy keeps them.
    return tuple((name, os.getxattr(fd, name)) for name in names if name.startswith("user."))


@contextlib.contextmanager
def _opened(dir_fd: int, name: str, where: str, directory: bool) -> Iterator[tuple[int, os.stat_result] | None]:
    """``name`` in the directory ``dir_fd``, opened read-only without following a link, if it is
    there (None if not) and is what is wanted: a directory, or a regular file. Anything else there is
    :class:`Untrusted` before it is opened (a FIFO's open would block; a device's is never made)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        yield None
        return
    wanted = stat.S_ISDIR if directory else stat.S_ISREG
    if not wanted(st.st_mode):
        raise Untrusted(f"{where} is {_kind(st)}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags | (os.O_DIRECTORY if directory else 0), dir_fd=dir_fd)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not wanted(opened.st_mode):
            raise Untrusted(f"{where} changed while it was read")
        yield fd, opened
    finally:
        os.close(fd)


def _read_bundle(fd: int, st: os.stat_result, where: str) -> bytes:
    if st.st_size > cacerts.MAX_BUNDLE:
        raise Untrusted(f"{where} is larger than {cacerts.MAX_BUNDLE >> 20} MiB")
    chunks: list[bytes] = []
    total = 0
    while chunk := os.pread(fd, cacerts.CHUNK, total):
        total += len(chunk)
        if total > cacerts.MAX_BUNDLE:  # its size is not proof of its length
            raise Untrusted(f"{where} reads longer than {cacerts.MAX_BUNDLE >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _scan(layers: Sequence[Path], own_usr: bool) -> tuple[dict[str, _Dir], _File]:
    """The template's effective attributes of the layer's directories, and its effective bundle,
    from its layers (topmost first), read as hostile (see the module's docstring)."""
    wanted = _parents(BUNDLE) + (_parents(EXTRA) if own_usr else [])
    found: dict[str, _Dir] = {}
    bundle: _File | None = None
    for layer in layers:
        if bundle is not None and all(d in found for d in wanted):
            break
        root = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for chain in [BUNDLE, EXTRA] if own_usr else [BUNDLE]:
                if (bundle is not None or chain != BUNDLE) and all(d in found for d in _parents(chain)):
                    continue  # what lower layers have there is beneath what was found: hidden
                with contextlib.ExitStack() as stack:
                    fd = root
                    for path in _parents(chain):
                        where = f"{layer}/{path}"
                        entry = stack.enter_context(_opened(fd, os.path.basename(path), where, directory=True))
                        if entry is None:
                            break  # nothing deeper in this layer
                        fd, st = entry
                        attrs = _Dir(
                            stat.S_IMODE(st.st_mode),
                            st.st_uid,
                            st.st_gid,
                            st.st_atime_ns,
                            st.st_mtime_ns,
                            _overlay_xattrs(fd, where),
                        )
                        found.setdefault(path, attrs)
                    else:
                        if chain == BUNDLE and bundle is None:
                            where = f"{layer}/{BUNDLE}"
                            with _opened(fd, os.path.basename(BUNDLE), where, directory=False) as entry:
                                if entry is not None:
                                    file_fd, st = entry
                                    _overlay_xattrs(file_fd, where)
                                    data = _read_bundle(file_fd, st, where)
                                    bundle = _File(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        finally:
            os.close(root)
    if bundle is None:
        raise Untrusted(f"the template has no {cacerts.BUNDLE}")
    return found, bundle


def _merged(bundle: _File, pem: str) -> _File:
    """What ``cacerts.install`` makes of ``bundle``: the old content, a newline, the PEM, in a new
    file of the old one's mode owned by root; or the old file as it is when it has the PEM already
    (a template built in a sandbox of this runtime)."""
    data = pem.strip().encode("ascii") + b"\n"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise Untrusted("the egress CA holds no PEM certificate")
    if data.strip() in bundle.data:
        return bundle
    return _File(bundle.data + (b"\n" if bundle.data else b"") + data, bundle.mode, 0, 0)


def _plan(layers: Sequence[Path], pem: str, own_usr: bool) -> tuple[dict[str, _Dir], dict[str, _File]]:
    found, bundle = _scan(layers, own_usr)
    dirs = {path: found.get(path, NEW_DIR) for path in _parents(BUNDLE)}
    files = {BUNDLE: _merged(bundle, pem)}
    if own_usr:
        dirs.update({path: found.get(path, NEW_DIR) for path in _parents(EXTRA)})
        files[EXTRA] = _File(pem.strip().encode("ascii") + b"\n", 0o644, 0, 0)
    return dirs, files


def _key(dirs: dict[str, _Dir], files: dict[str, _File]) -> str:
    """Names everything the layer holds: two plans with one key make the same tree."""
    manifest = {
        "dirs": {path: attrs.describe() for path, attrs in dirs.items()},
        "files": {
            path: {"sha256": hashlib.sha256(f.data).hexdigest(), "mode": f.mode, "uid": f.uid, "gid": f.gid}
            for path, f in files.items()
        },
    }
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def _write(tree: Path, dirs: dict[str, _Dir], files: dict[str, _File]) -> None:
    """The layer's tree in the empty directory ``tree``: files synced, so a layer renamed into place
    is whole after a crash of the host too (it is used as it is found)."""
    for path in dirs:
        (tree / path).mkdir(mode=0o700)
    for path, f in files.items():
        fd = os.open(tree / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, f.uid, f.gid)
            os.fchmod(fd, f.mode)  # after the chown, which clears setuid bits
            os.fsync(fd)
        finally:
            os.close(fd)
    for path in sorted(dirs, key=lambda p: p.count("/"), reverse=True):  # children first: times last
        attrs = dirs[path]
        fd = os.open(tree / path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, attrs.uid, attrs.gid)
            os.fchmod(fd, attrs.mode)
            for name, value in attrs.xattrs:
                os.setxattr(fd, name, value)
            if attrs is not NEW_DIR:
                os.utime(fd, ns=(attrs.atime_ns, attrs.mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
    tree.chmod(0o755)


def make_layer(root: Path, layers: Sequence[Path], pem: str, own_usr: bool) -> Path:
    """Blocking: the trust layer for a template of ``layers`` (topmost first) and the CA ``pem``,
    made under ``root`` unless it is there already; :class:`Untrusted` when the layers are not
    plainly readable for it. ``own_usr``: the template's ``/usr`` is its own (writable in the
    sandbox), so the kept copy (``cacerts.EXTRA``) goes there too."""
    dirs, files = _plan(layers, pem, own_usr)
    target = root / _key(dirs, files)
    if target.is_dir():
        return target
    staging = root / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    staging.mkdir(mode=0o700)
    try:
        _write(staging, dirs, files)
        try:
            staging.rename(target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another create (or runtime) renamed the same tree there first: theirs is used.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # the rename, before a sandbox relies on it
    finally:
        os.close(fd)
    return target


def sweep(root: Path) -> None:
    """Remove what makers that are gone left staged (a crash mid-way)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if entry.name.startswith(STAGING_PREFIX):
                pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    shutil.rmtree(entry, ignore_errors=True)


def mountable(root: Path, layer: Path) -> bool:
    """Whether the jail can mount a layer made under ``root`` as it mounts ``layer``'s: idmapped.
    The template store's filesystem was checked when the runtime started; a data dir elsewhere is
    checked once here (an older tmpfs, NFS cannot), and a ``False`` is logged: without the check,
    every create would fail in the jail."""
    if os.stat(root).st_dev == os.stat(layer).st_dev:
        return True
    try:
        _core.check_isolation_support(str(root))
    except (OSError, ValueError) as exc:  # EINVAL is a ValueError (the binding's errno table)
        log.warning(
            "no trust layers: the egress CA is installed in each sandbox, as %s cannot be mounted idmapped: %s",
            root,
            exc,
        )
        return False
    return True


class TrustLayers:
    """Each template's trust layer for this runtime's egress CA: made on a template's first create,
    in a worker thread, then remembered (a template's layers never change: their paths are
    digests). Concurrent first creates wait for the one making it."""

    def __init__(self, root: Path, enabled: bool | None = None) -> None:
        self.root = root
        self.enabled = os.environ.get(SWITCH) != "off" if enabled is None else enabled
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)  # only root: like the template store, it holds files owned canonically
        sweep(root)
        self._known: dict[tuple[tuple[Path, ...], bool, str], Path | None] = {}
        """The answer for each (template layers, own /usr, CA): a layer, or None (logged once)."""
        self._making: dict[tuple[tuple[Path, ...], bool, str], asyncio.Future[Path | None]] = {}
        """The first creates' work in progress, which later ones wait for."""
        self._mountable: bool | None = None
        """Whether the jail can mount layers from :attr:`root` (idmapped); None until first asked."""

    def forget(self) -> int:
        """Remove every layer made so far, for a worker thread; returns how many. Only while no
        sandbox has its overlay mounted: the runtime calls it when it starts and has re-adopted none
        (a sandbox paused to disk mounts nothing until its resume, which asks for its template's layer
        as a create does). Without it the layers of templates since rebuilt or removed, or of an
        egress CA since replaced, would stay for ever (~220 KiB each); a template's next create makes
        its layer again (one read of its trust store)."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in self.root.iterdir():
                if entry.name.startswith(STAGING_PREFIX) or entry.is_symlink() or not entry.is_dir():
                    continue  # a live maker's staging (sweep removes dead ones); nothing else is ours
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        self._known.clear()
        return removed

    async def layer(self, template: Template, pem: str | None) -> Path | None:
        """The trust layer for sandboxes of ``template``, or None: give them ``pem`` to install."""
        if pem is None or not self.enabled:
            return None
        key = (template.layers, not template.host_usr, pem)
        if key in self._known:
            known = self._known[key]
            # One stat: an operator may have emptied the directory (docs/network.md); it is made again.
            if known is None or known.is_dir():
                return known
            del self._known[key]
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = asyncio.ensure_future(self._make(template, pem))
            making.add_done_callback(lambda _: self._making.pop(key, None))
        return await asyncio.shield(making)

    async def _make(self, template: Template, pem: str) -> Path | None:
        key = (template.layers, not template.host_usr, pem)
        layer: Path | None = None
        try:
            if template.host_usr:
                raise Untrusted("its /usr is the host's and its /etc a copy made at start-up")
            if len(template.layers) + 1 > _core.MAX_LAYERS:
                raise Untrusted(f"it has {len(template.layers)} layers: no room for one more")
            if sum(len(str(p)) + 1 for p in template.layers) + len(str(self.root)) + 34 > OVERLAY_LOWER_BYTES:
                raise Untrusted("its layers' paths take all of overlayfs' option string")
            if self._mountable is None:
                self._mountable = await asyncio.to_thread(mountable, self.root, template.layers[0])
            if not self._mountable:
                raise Untrusted(f"{self.root} is on a filesystem the jail cannot mount idmapped")
            layer = await asyncio.to_thread(make_layer, self.root, template.layers, pem, not template.host_usr)
        except ValueError as exc:  # Untrusted, or a CA that is not ASCII PEM (the install refuses it too)
            log.info("template '%s': the egress CA is installed in each sandbox: %s", template.id, exc)
        except OSError as exc:  # not remembered: the next create tries again
            log.warning("template '%s': could not make its trust layer: %s", template.id, exc)
            return None
        self._known[key] = layer
        return layer
