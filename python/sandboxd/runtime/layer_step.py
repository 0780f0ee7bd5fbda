"""A build step: a shell script run as root in a chroot over a template's layers, whose changes to the
root filesystem become a new layer on top of them (never a copy of them).

How: in private mount and pid namespaces (``unshare``), an overlayfs whose lower dirs are the
template's layers and whose upper dir is a fresh staging directory is mounted, given ``/proc``, a
``/tmp``, a minimal ``/dev`` and the host's DNS settings, and the script runs in it with ``chroot``.
Everything the script writes lands in the upper dir, which overlayfs keeps in the same format a layer
has: new and changed files, directories, and deletions as whiteouts (a 0:0 character device; a
directory that replaced a lower one carries the ``overlay.opaque`` xattr). After the step the upper
dir is made a layer (:func:`finish_upper`) and committed to the store under the step's key, which the
caller derives from everything the step depends on, as a build cache keys a step by its inputs.

Like ``mmdebstrap`` for ``base``: the namespaces end, with every process the script started and
every mount, when the process that started the step does (``--kill-child`` and a parent-death
signal); ``/tmp``, ``/dev`` and the caches mounted for the step are never part of the layer. The
step runs in the host's network namespace, so it reaches package indexes as the host does.

The step's own code is trusted (a recipe of sandboxd's); the template it runs over need not be, so
the mount points it uses must be plain directories in it, never symlinks (a symlinked ``/proc``
would point a mount at a host path; the private mount namespace would contain it, but a step has no
business following it).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .layers import LayerInfo, LayerStore, hex_of

RECORD = ".sandboxd-packages"
"""A file a step may write at the root (``name<TAB>version`` lines): moved out of the layer and kept
beside it as ``layers/<hex>.packages.tsv``, as the Debian build records its packages."""

KEPT_OVERLAY_XATTRS = ("opaque", "whiteout", "whiteouts")
"""overlayfs xattrs a layer needs (an opaque directory; xattr whiteouts), each also written under
``user.overlay.`` for overlays mounted inside a user namespace. The rest that overlayfs leaves on an
upper dir (``origin``, ``impure``, ``redirect``, ``nlink``, ...) describe the build's own mount and
are dropped."""

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
"""The device nodes a step sees (bind-mounted from the host into a tmpfs ``/dev``)."""

INPUTS_DIR = "/tmp/inputs"
"""Where the script and the step's input files are placed inside the chroot: on the step's ``/tmp``
tmpfs, so not in the layer."""

CACHE_DIR = "/tmp/cache"
"""Where the step's cache (a directory of the store kept across builds) appears in the chroot."""

PHASE_PREFIX = "sandboxd-phase: "
"""A line the script prints to name the phase it enters (for progress lines)."""

_DRIVER = (
    r"""set -eu
root=$1 lower=$2 upper=$3 work=$4 cache=$5 inputs=$6
shift 6
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work,redirect_dir=off,metacopy=off,index=off" \
    "$root"
for dir in proc tmp dev etc; do
    if [ -L "$root/$dir" ] || [ ! -d "$root/$dir" ]; then
        echo "the template's /$dir is not a directory: a build step needs it to be one" >&2
        exit 1
    fi
done
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in DEVICES; do
    : > "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
if [ -f "$root/etc/resolv.conf" ] && [ ! -L "$root/etc/resolv.conf" ]; then
    mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
fi
mkdir -p "${root}CACHE_DIR"
mount --bind "$cache" "${root}CACHE_DIR"
cp -R "$inputs" "${root}INPUTS_DIR"
cd "$root"
exec chroot "$root" /usr/bin/env -i "$@" /bin/sh -eu INPUTS_DIR/step.sh
""".replace("DEVICES", " ".join(DEVICES))
    .replace("CACHE_DIR", CACHE_DIR)
    .replace("INPUTS_DIR", INPUTS_DIR)
)
"""Run by ``sh`` as PID 1 of the step's namespaces: mount the step's root, then become the script."""


CONTAINED = (
    "setpriv",
    "--pdeathsig",
    "KILL",
    "--",
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--fork",
    "--kill-child",
    "--",
)
"""The prefix that runs a build process contained, and ends it, whole, with the process that started
it: uvicorn re-raises SIGTERM at shutdown, so no cleanup code of ours runs then, and a build tool on
SIGTERM may wait for a stalled child. So: ``unshare`` dies with us (parent-death signal), the build
with ``unshare`` (``--kill-child``), and as PID 1 of its own pid namespace it takes every process it
started with it. Its mounts go with its mount namespace; the next runtime sweeps the staging dir."""


class StepFailed(Exception):
    """The script exited with a failure, or the step's root could not be set up."""


def run_contained(
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    on_line: Callable[[str], None],
    processes: list[subprocess.Popen[bytes]] | None,
    what: str,
) -> None:
    """Run ``command`` under :data:`CONTAINED`, its output (stdout and stderr) to ``log_path`` and, line
    by line, to ``on_line``; raise :class:`StepFailed` with the end of the log if it fails. ``what``
    names it in that message; ``processes`` receives it while it runs."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CONTAINED, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        if processes is not None:
            processes.append(process)
        assert process.stdout is not None
        for raw in process.stdout:
            log.write(raw)
            on_line(raw.decode(errors="replace").rstrip("\n"))
        code = process.wait()
    if code != 0:
        tail = log_path.read_bytes()[-4000:].decode(errors="replace")
        raise StepFailed(f"{what} exited with status {code}; the end of {log_path}:\n{tail}")


def run_step(
    store: LayerStore,
    lower: Sequence[Path],
    script: str,
    key: str,
    source: str,
    *,
    cache: Path,
    inputs: Mapping[str, Path] | None = None,
    env: Mapping[str, str],
    log_path: Path,
    on_line: Callable[[str], None],
    processes: list[subprocess.Popen[bytes]] | None = None,
    epoch: int | None = None,
) -> LayerInfo:
    """Run ``script`` (``/bin/sh -eu``, as root, ``env`` only) over the layers ``lower`` (topmost
    first) and commit what it changed as the layer ``key``; returns it. ``cache`` (a host
    directory) is mounted at :data:`CACHE_DIR`; ``inputs`` (name -> host file) are copied into
    :data:`INPUTS_DIR` for the script (and are not part of the layer); every output line goes to ``log_path`` and to
    ``on_line``; ``processes`` receives the running step, so a runtime that stops can end it;
    ``epoch`` clamps the layer's mtimes (``SOURCE_DATE_EPOCH``).
    A layer already stored under ``key`` is returned as it is, without running anything."""
    existing = store.info(key)
    if existing is not None:
        return existing
    hex_of(key)
    staging = store.staging()
    try:
        root, upper, work = staging / "root", staging / "upper", staging / "work"
        for directory in (root, upper, work):
            directory.mkdir()
        upper.chmod(0o755)
        cache.mkdir(parents=True, exist_ok=True)
        given = staging / "inputs"
        given.mkdir()
        (given / "step.sh").write_text(script)
        for name, path in (inputs or {}).items():
            if "/" in name or name in ("", ".", "..", "step.sh"):
                raise ValueError(f"input name '{name}' must be a plain file name other than step.sh")
            shutil.copyfile(path, given / name)
        command = [
            "/bin/sh",
            "-c",
            _DRIVER,
            "sandboxd-step",
            str(root),
            ":".join(str(p) for p in lower),
            str(upper),
            str(work),
            str(cache),
            str(given),
            *(f"{name}={value}" for name, value in env.items()),
        ]
        host_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        run_contained(command, host_env, log_path, on_line, processes, "the build step")
        record = upper / RECORD
        packages = staging / "packages.tsv"
        if record.is_file() and not record.is_symlink():
            record.rename(packages)
        finish_upper(upper, epoch)
        info = store.commit(upper, key, "build", source)
        if packages.exists():
            shutil.copyfile(packages, store.layers / f"{hex_of(info.digest)}.packages.tsv")
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finish_upper(upper: Path, epoch: int | None = None) -> None:
    """Make an overlay upper dir a layer: keep its whiteouts (0:0 character devices) and opaque
    markers (also as ``user.overlay.*``), drop every other device node and the overlay xattrs that
    only describe the build's mount, and clamp mtimes to ``epoch`` when given (reproducible trees)."""
    for directory, dirs, files in os.walk(upper, topdown=False):
        for name in [*files, *dirs]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                    os.unlink(path)
                    continue
            elif stat.S_ISSOCK(st.st_mode):
                os.unlink(path)
                continue
            _layer_xattrs(path)
            if epoch is not None and st.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    _layer_xattrs(str(upper))
    if epoch is not None:
        os.utime(upper, (epoch, epoch))


def _layer_xattrs(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if not name.startswith("trusted.overlay."):
            continue
        kind = name[len("trusted.overlay.") :]
        if kind in KEPT_OVERLAY_XATTRS:
            value = os.getxattr(path, name, follow_symlinks=False)
            os.setxattr(path, f"user.overlay.{kind}", value, follow_symlinks=False)  # never on a symlink
        else:
            os.removexattr(path, name, follow_symlinks=False)
