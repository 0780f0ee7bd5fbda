"""A build sandbox's writable layer, made a template layer.

A template build (:mod:`.template_builder`) runs its steps in an ordinary sandbox; what they changed
is that sandbox's overlayfs upper dir, on its own ext4 disk image, owned by the sandbox's host id
range (the sandbox's uid 0 is host uid ``id_base``) and written by an overlay mounted with
``userxattr`` (opaque directories carry ``user.overlay.opaque``; deletions are 0:0 character
devices). Once the sandbox's processes are gone, the image is mounted again (a detached mount, held
by a descriptor, never attached on the host) and its upper dir is serialised as an OCI layer tar:

* owners mapped back to canonical ids (host ``id_base + n`` -> ``n``; anything outside the range,
  which the sandbox cannot have made, becomes 65534, ``nobody``);
* whiteouts as ``.wh.NAME`` and opaque directories as ``.wh..wh..opq`` (OCI's spelling);
* ``user.*`` xattrs kept except overlayfs' own; ``security.capability`` is not kept (inside a user
  namespace it is written in the v3 form bound to the sandbox's root, which means nothing elsewhere);
* the files the runtime writes into every sandbox's ``/etc`` (``hostname``, ``hosts``,
  ``resolv.conf``) left out: they are the build sandbox's, not the template's.

That stream goes through the store's own hostile-input unpacker (:meth:`.LayerStore.import_tar`),
the path every imported image takes, so the layer is content-addressed like any other and its tree
is owned canonically on disk (the isolation mounts layers idmapped). Mapping ids while serialising
costs one pass over the changed files, which a build makes anyway; an idmapped mount of the image
would save the rewrite of owners but not the copy out of the disk image, which the sandbox's disk
must not outlive.

Blocking: call it in a worker thread.
"""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import IO

from sandboxd import _core

from .layers import LayerInfo, LayerStore

ID_RANGE = 65536
"""Ids 0-65535 inside a sandbox map to ``id_base`` .. ``id_base + 65535`` on the host (docs/security.md)."""

NOBODY = 65534
"""Where an id from outside the sandbox's range goes (the kernel's overflow id)."""

RUNTIME_FILES = frozenset({"etc/hostname", "etc/hosts", "etc/resolv.conf"})
"""Files the runtime writes into each sandbox's upper dir: never part of a template layer."""

OPAQUE_XATTR = "user.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def _canonical(host_id: int, id_base: int) -> int:
    inside = host_id - id_base
    return inside if 0 <= inside < ID_RANGE else NOBODY


def write_upper_tar(upper: str, id_base: int, out: IO[bytes]) -> None:
    """Serialise the upper dir ``upper`` (sorted, so the same tree gives the same stream) to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirs, files in os.walk(upper):
            dirs.sort()
            rel_dir = os.path.relpath(directory, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in sorted([*dirs, *files]):
                path = os.path.join(directory, name)
                arcname = f"{rel_dir}/{name}" if rel_dir else name
                if arcname in RUNTIME_FILES:
                    continue
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    marker = tarfile.TarInfo(
                        f"{rel_dir}/{WHITEOUT_PREFIX}{name}" if rel_dir else WHITEOUT_PREFIX + name
                    )
                    marker.mtime = int(st.st_mtime)
                    tar.addfile(marker)
                    continue
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                    continue
                info = tar.gettarinfo(path, arcname)
                info.uid = _canonical(st.st_uid, id_base)
                info.gid = _canonical(st.st_gid, id_base)
                info.uname = info.gname = ""
                opaque = False
                xattrs: dict[str, str] = {}
                if not stat.S_ISLNK(st.st_mode):
                    for attr in os.listxattr(path, follow_symlinks=False):
                        if attr == OPAQUE_XATTR:
                            opaque = os.getxattr(path, attr, follow_symlinks=False) == b"y"
                        elif attr.startswith("user.") and not attr.startswith("user.overlay."):
                            value = os.getxattr(path, attr, follow_symlinks=False)
                            xattrs[f"SCHILY.xattr.{attr}"] = value.decode("utf-8", "surrogateescape")
                if xattrs:
                    info.pax_headers = {**info.pax_headers, **xattrs}
                if info.isreg():
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as content:
                        tar.addfile(info, content)
                else:
                    tar.addfile(info)
                if opaque and stat.S_ISDIR(st.st_mode):
                    tar.addfile(tarfile.TarInfo(f"{arcname}/{OPAQUE_MARKER}"))


def layer_from_disk(store: LayerStore, image: Path, id_base: int, source: str) -> LayerInfo:
    """The upper dir on a (no longer used) sandbox disk image, stored as a layer of ``store``."""
    mount = _core.mount_disk(str(image))
    try:
        upper = f"/proc/self/fd/{mount}/upper"
        read_fd, write_fd = os.pipe()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(write_fd, "wb") as out:
                    write_upper_tar(upper, id_base, out)
            except BaseException as exc:  # reported by the consumer below
                errors.append(exc)

        producer = threading.Thread(target=produce, name="build-layer", daemon=True)
        producer.start()
        try:
            with os.fdopen(read_fd, "rb") as stream:
                info = store.import_tar(stream, source)
        finally:
            producer.join()
        if errors:
            raise errors[0]
        return info
    finally:
        os.close(mount)
