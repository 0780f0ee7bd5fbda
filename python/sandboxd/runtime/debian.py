"""The ``base`` template: a Debian root filesystem built from Debian's package archive with
``mmdebstrap``, with what E2B's base template gives its users.

What E2B's base has, and where each part of ours comes from (read from e2b-dev/E2B
``templates/base/e2b.Dockerfile`` and e2b-dev/infra's template build, ``provision.sh`` and
``configure.sh``):

* user ``user`` (uid 1000, home ``/home/user``, bash) in the ``sudo`` group with passwordless sudo
  (``configure.sh``), root and user without passwords (``passwd -d``);
* ``/usr/local`` writable by everyone and a world-writable ``/code`` (``configure.sh``), so ``pip
  install`` and ``npm install -g`` work as ``user``;
* Python with pip (E2B: the ``python:3.11`` image, whose pip is not PEP 668 "externally managed").
  Here Debian's python3 with ``python`` (python-is-python3), pip, venv and headers; the
  ``EXTERNALLY-MANAGED`` marker is removed, as PEP 668 says container images may do, so ``pip
  install`` installs into ``/usr/local`` (root or ``user``) or ``~/.local`` (``--user``);
* Node.js 20 with npm (E2B installs Node 20). That is why the suite is Debian 13 "trixie": Debian 12
  has only Node 18, which is past its end of life;
* build-essential, git, curl, ca-certificates, sudo, socat, jq, less, iproute2, ping and the usual
  command-line tools (the ``python`` image's buildpack-deps plus ``provision.sh``'s package list).

Left out, because a sandbox here is not a VM: systemd, chrony, openssh-server, fuse3, iptables and
nftables, nfs-common (no init system runs, and the sandbox's network is the runtime's business).

Changed, with the same result: ``/etc/profile`` (:data:`PROFILE`), which every command's login shell
reads; Debian's starts ``id`` and ``run-parts``, ours uses shell builtins.

Reproducible: the recipe (suite, mirror, packages, hooks) is hashed into the build's cache key, and
``SOURCE_DATE_EPOCH`` (mmdebstrap's, and every mtime clamped to it afterwards) makes the tree depend
only on the recipe and the archive's contents; the installed package versions are recorded beside
the layer. For bit-identical rebuilds
over time, point ``--debian-mirror`` at a snapshot.debian.org date.

The build runs ``mmdebstrap --mode=root`` in private mount and pid namespaces (``unshare``), so the
``/proc``, ``/sys`` and ``/dev`` mounts it makes in the chroot vanish with it, and it ends, with
every apt and dpkg it started, when the process that started it does.
Downloaded packages are kept in ``<store>/apt-cache``, so a rebuild downloads nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .layer_step import StepFailed, run_contained
from .layers import LayerInfo, LayerStore, recipe_digest

SUITE = "trixie"
"""Debian 13: Node.js 20 (E2B's base has Node 20), Python 3.13, gcc 14."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"

SOURCE_DATE_EPOCH = 1735689600
"""2025-01-01T00:00:00Z: every file's mtime is clamped to it, so two builds from the same archive
state are identical."""

PACKAGES = (
    # E2B's provision.sh list, less what needs an init system or a VM
    "sudo",
    "ca-certificates",
    "curl",
    "git",
    "socat",
    "less",
    "jq",
    "iproute2",
    "iputils-ping",
    # the python image's buildpack-deps and everyday tools
    "build-essential",
    "pkg-config",
    "wget",
    "gnupg",
    "openssh-client",
    "procps",
    "psmisc",
    "lsof",
    "file",
    "nano",
    "netcat-openbsd",
    "unzip",
    "zip",
    "xz-utils",
    "bzip2",
    "zstd",
    "tzdata",
    # Python
    "python3",
    "python3-pip",
    "python3-venv",
    "python3-dev",
    "python-is-python3",
    # Node.js
    "nodejs",
    "npm",
)

DPKG_OPTIONS = (
    # Manuals and documentation are most of a Debian system's files and no sandbox reads them
    # (Debian's own slim images drop them too); copyright files stay. This stays in the image, so
    # packages a user installs later skip them too.
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    # No fsync per file: a half-built tree is thrown away anyway. Measured: 3m08s -> 2m07s here.
    "force-unsafe-io",
)

CUSTOMIZE = r"""set -eu
root="$1"
chroot "$root" groupadd --gid 1000 user
chroot "$root" useradd --uid 1000 --gid 1000 --groups sudo --create-home --shell /bin/bash user
chroot "$root" passwd --quiet --delete root
chroot "$root" passwd --quiet --delete user
printf 'user ALL=(ALL:ALL) NOPASSWD: ALL\n' > "$root/etc/sudoers.d/user"
chmod 0440 "$root/etc/sudoers.d/user"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
chmod -R a+rwX "$root/usr/local"
mkdir -p "$root/code"
chmod 0777 "$root/code"
printf 'export SHELL=/bin/bash\n' > "$root/etc/profile.d/shell.sh"
: > "$root/etc/resolv.conf"
printf 'sandbox\n' > "$root/etc/hostname"
# The manuals are left out (DPKG_OPTIONS), their directories not: a package whose postinst registers
# a manual page with update-alternatives (OpenJDK's java.1.gz) fails to configure without them.
mkdir -p "$root"/usr/share/man/man1 "$root"/usr/share/man/man5 "$root"/usr/share/man/man7 "$root"/usr/share/man/man8
# /etc/profile without the two programs Debian's starts (PROFILE, beside this script): only over the
# file it was written against ($2, its sha256), so a base-files that changes it keeps Debian's
# (slower, the same) until PROFILE follows.
if printf '%s  %s\n' "$2" "$root/etc/profile" | sha256sum --check --status; then
  cp "$(dirname "$0")/profile" "$root/etc/profile"
  chmod 0644 "$root/etc/profile"
else
  echo "W: base-files' /etc/profile is not the one sandboxd's was written against: Debian's kept" >&2
fi
chroot "$root" dpkg-query --show --showformat='${Package}\t${Version}\n' > "$root/.sandboxd-packages"
"""
"""Run by mmdebstrap once the packages are installed, with the new root as ``$1`` (and
:data:`DEBIAN_PROFILE_SHA256` as ``$2``): E2B's
``configure.sh`` in our words. ``/etc/resolv.conf`` and ``/etc/hostname`` are emptied because
mmdebstrap copies the host's (the runtime writes a sandbox's own)."""

DEBIAN_PROFILE_SHA256 = "8fec28102e0c371e6f2ecb949b95c1ba802260766b18c2445882b082418428b9"
"""sha256 of the ``/etc/profile`` that :data:`PROFILE` reproduces: base-files 13.8+deb13u8 (trixie)."""

PROFILE = r"""# /etc/profile: system-wide .profile file for the Bourne shell (sh(1))
# and Bourne compatible shells (bash(1), ksh(1), ash(1), ...).
#
# sandboxd: Debian's file (base-files' /usr/share/base-files/profile) with the same result, but
# without starting `id -u` and `run-parts`: every command the SDK runs is a login shell
# (bash -l -c), and those two processes were most of its cost.

# The effective uid `id -u` prints, from this shell's own /proc entry ("Uid:" real, effective,
# saved, fs) with the read builtin. Not $EUID: dash has none, and bash takes EUID from the
# environment when it is there.
sandboxd_key=
if [ -r /proc/self/status ]; then
  while read -r sandboxd_key sandboxd_ruid sandboxd_euid sandboxd_rest; do
    [ "$sandboxd_key" = Uid: ] && break
  done < /proc/self/status
fi
[ "$sandboxd_key" = Uid: ] || sandboxd_euid=$(id -u)

if [ "$sandboxd_euid" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH

if [ "${PS1-}" ]; then
  if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
    # The file bash.bashrc already sets the default PS1.
    # PS1='\h:\w\$ '
    if [ -f /etc/bash.bashrc ]; then
      . /etc/bash.bashrc
    fi
  else
    if [ "$sandboxd_euid" -eq 0 ]; then
      PS1='# '
    else
      PS1='$ '
    fi
  fi
fi
unset sandboxd_key sandboxd_ruid sandboxd_euid sandboxd_rest

# What `run-parts --list --regex '^[a-zA-Z0-9_][a-zA-Z0-9._-]*\.sh$' /etc/profile.d` lists, by a
# glob (sorted, as run-parts sorts) and the regex as a pattern: regular files (or links to them),
# whose names start with a letter, digit or underscore and hold only those, dots and dashes.
# A shell started with noglob (`sh -f`, `bash -f`, SHELLOPTS=noglob) would not expand the glob, and
# run-parts needs none: it is expanded with globbing on, and noglob is back before the first script.
if [ -d /etc/profile.d ]; then
  sandboxd_noglob=
  case $- in *f*) sandboxd_noglob=1; set +f ;; esac
  for i in /etc/profile.d/*.sh; do
    if [ "$sandboxd_noglob" ]; then
      set -f
      sandboxd_noglob=
    fi
    case ${i#/etc/profile.d/} in
      [!a-zA-Z0-9_]* | *[!a-zA-Z0-9._-]*) continue ;;
    esac
    if [ -f $i ] && [ -r $i ]; then
      . $i
    fi
  done
  unset i sandboxd_noglob
fi
"""
"""Debian's ``/etc/profile`` with the same result and no process started (see ``docs/benchmarks.md``:
a login shell on ``base`` cost ~7 ms against ~2 on ``host``, mostly ``id`` and ``run-parts``).

The same result wherever Debian's runs coreutils' ``id``. Not where the inherited ``PATH`` finds no
``id`` (a command's ``envs`` may set ``PATH``): Debian's then prints two errors and gives root the
non-root ``PATH``, ours root's; nor where it finds another ``id`` first. Copying that would need the
fork back, and its errors name line numbers of Debian's file anyway. Nor for the shell's own variables
named ``sandboxd_key``, ``sandboxd_ruid``, ``sandboxd_euid``, ``sandboxd_rest`` and
``sandboxd_noglob``, which it uses and unsets (Debian's uses only ``i``, and unsets it too): one given
in a command's ``envs`` is gone in that command.

Written over Debian's in place, as a local admin edits it: ``/etc/profile`` is no conffile and no
file of any package. base-files' postinst copies it from ``/usr/share/base-files/profile`` when
it is missing and, on upgrades, replaces it only when it is one of Debian's past defaults
(``profile.md5sums``), so an ``apt-get upgrade`` in a sandbox keeps ours, with no prompt (a test
runs that postinst). A diversion would change nothing (dpkg unpacks no ``/etc/profile``). Debian's
own stays in ``/usr/share/base-files/profile``, which the tests run beside ours."""

CONFIG = {"env": {"LANG": "C.UTF-8"}, "user": "user", "workdir": "/home/user"}
"""The template's config: what E2B's base sandboxes start with."""

RECIPE_VERSION = 2
"""Bump when the build changes in a way the recipe below does not show."""

PROBE_TIMEOUT_S = 5.0
"""How long an archive or index may take to answer before a build is called unavailable here (and
the runtime falls back)."""


class BuildUnavailable(Exception):
    """The base cannot be built here (no archive in reach, no mmdebstrap): fall back to ``host``."""


class BuildFailed(Exception):
    """mmdebstrap ran and failed."""


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything a base build depends on (besides the archive's contents)."""

    mirror: str = DEFAULT_MIRROR
    suite: str = SUITE

    def key(self) -> str:
        """The build cache key: sha256 over the recipe."""
        recipe = {
            "version": RECIPE_VERSION,
            "mirror": self.mirror.rstrip("/"),
            "suite": self.suite,
            "packages": sorted(PACKAGES),
            "dpkg": DPKG_OPTIONS,
            "customize": CUSTOMIZE,
            "profile": PROFILE,
            "debian_profile": DEBIAN_PROFILE_SHA256,
            "epoch": SOURCE_DATE_EPOCH,
            "config": CONFIG,
        }
        return recipe_digest(recipe)

    def describe(self) -> str:
        return f"Debian {self.suite} from {self.mirror} (mmdebstrap)"


def probe(recipe: Recipe) -> None:
    """Raise :class:`BuildUnavailable` unless mmdebstrap is installed and the archive answers."""
    if shutil.which("mmdebstrap") is None:
        raise BuildUnavailable("mmdebstrap is not installed (apt-get install mmdebstrap)")
    probe_url(f"{recipe.mirror.rstrip('/')}/dists/{recipe.suite}/InRelease", f"Debian's archive at {recipe.mirror}")


def probe_url(url: str, what: str) -> None:
    """Raise :class:`BuildUnavailable` naming ``what`` unless ``url`` answers a HEAD within
    :data:`PROBE_TIMEOUT_S` (a build that needs it would otherwise hang on it or fail late)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BuildUnavailable(f"{what} cannot be reached ({reason})") from None


@dataclass(slots=True)
class BuildProgress:
    """Where a build is, for progress lines and for the message a waiting create answers with."""

    phase: str = "starting"
    packages_total: int = 0
    packages_unpacked: int = 0
    packages_done: int = 0
    started: float = 0.0

    def line(self) -> str:
        elapsed = int(time.monotonic() - self.started) if self.started else 0
        counts = ""
        if self.packages_total and self.phase == "installing packages":
            total = self.packages_total
            counts = f" ({self.packages_unpacked}/{total} unpacked, {self.packages_done}/{total} set up)"
        return f"{self.phase}{counts}, {elapsed // 60}m{elapsed % 60:02d}s so far"


_PHASES = {
    "running apt-get update": "reading the archive's package lists",
    "downloading packages": "downloading packages",
    "extracting archives": "installing packages",
    "installing essential packages": "installing packages",
    "installing remaining packages": "installing packages",
    "running --customize-hook": "adding user, sudo and E2B's settings",
    "cleaning package lists": "cleaning up",
}
_NEWLY = re.compile(r"^\d+ upgraded, (\d+) newly installed")


def build(
    store: LayerStore,
    recipe: Recipe,
    progress: BuildProgress,
    report: Callable[[str], None],
    processes: list[subprocess.Popen[bytes]] | None = None,
) -> tuple[list[str], dict[str, object]]:
    """Build the base into ``store`` unless its recipe is cached; returns (layers, config).

    Holds the store's ``base`` lock throughout, so runtimes and CLIs sharing a store build it once:
    the others wait here and then find it in the cache. ``processes`` receives the running
    mmdebstrap so a runtime that stops can end it."""
    key = recipe.key()
    with store.lock("base-build"):
        cached = store.cached(key)
        if cached is not None:
            return list(cached["layers"]), dict(cached["config"])
        probe(recipe)
        progress.started = time.monotonic()
        staging = store.staging()
        root = staging / "rootfs"
        debs = store.root / "apt-cache"
        debs.mkdir(exist_ok=True)
        log_path = store.root / "base-build.log"
        hook = staging / "customize.sh"
        hook.write_text(CUSTOMIZE)
        (staging / "profile").write_text(PROFILE)
        command = [  # contained (layer_step.CONTAINED): it ends, with every apt and dpkg, when we do
            "mmdebstrap",
            "--verbose",
            "--mode=root",
            "--variant=apt",
            "--format=directory",
            "--skip=essential/unlink",
            "--skip=download/empty",
            '--aptopt=Acquire::Languages "none"',
            '--aptopt=Acquire::Retries "3"',
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            f"--include={','.join(PACKAGES)}",
            f'--setup-hook=mkdir -p "$1/var/cache/apt/archives" && cp -a {shlex.quote(str(debs))}/. '
            '"$1/var/cache/apt/archives/"',
            f'--customize-hook=sh {shlex.quote(str(hook))} "$1" {DEBIAN_PROFILE_SHA256}',
            '--customize-hook=chroot "$1" apt-get autoclean -q',
            f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
            recipe.suite,
            str(root),
            recipe.mirror,
        ]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
            "TMPDIR": str(staging),
        }
        try:
            try:
                run_contained(command, env, log_path, _Follow(progress, report), processes, "mmdebstrap")
            except StepFailed as exc:
                raise BuildFailed(str(exc)) from None
            (root / ".sandboxd-packages").rename(staging / "packages.tsv")
            progress.phase = "storing the layer"
            _finish(root)
            report(progress.line())
            info = store.commit(root, key, "build", recipe.describe())
            shutil.copyfile(staging / "packages.tsv", store.layers / f"{info.digest.split(':')[1]}.packages.tsv")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = {"layers": [key], "config": CONFIG, "source": recipe.describe(), "built_at": time.time()}
        store.cache_put(key, record)
        return [key], dict(CONFIG)


def _finish(root: Path) -> None:
    """Make the tree reproducible and inert: mtimes clamped to :data:`SOURCE_DATE_EPOCH` (mmdebstrap
    clamps them only in tarballs; files made by maintainer scripts and hooks carry the build's
    time), and no device nodes (mmdebstrap populates ``/dev``; a sandbox mounts its own)."""
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                os.unlink(path)
            elif st.st_mtime > SOURCE_DATE_EPOCH:
                os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
    os.utime(root, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))


class _Follow:
    """Turns mmdebstrap's output lines into progress: a line per phase, and one every
    :attr:`EVERY_S` seconds while packages are set up."""

    EVERY_S = 5.0

    def __init__(self, progress: BuildProgress, report: Callable[[str], None]) -> None:
        self.progress = progress
        self.report = report
        self.last = 0.0
        self.totals: list[int] = []

    def __call__(self, raw: str) -> None:
        line = raw.strip()
        progress = self.progress
        if line.startswith("I: "):
            for needle, phase in _PHASES.items():
                if needle in line and progress.phase != phase:
                    progress.phase = phase
                    self.report(progress.line())
                    self.last = time.monotonic()
            return
        newly = _NEWLY.match(line)
        if newly and int(newly.group(1)) not in self.totals:
            self.totals.append(int(newly.group(1)))
            progress.packages_total = sum(self.totals)
        elif line.startswith(("Setting up ", "Unpacking ")):
            if line.startswith("Setting up "):
                progress.packages_done += 1
            else:
                progress.packages_unpacked += 1
            if time.monotonic() - self.last > self.EVERY_S:
                self.last = time.monotonic()
                self.report(progress.line())


def installed_packages(store: LayerStore, layer: LayerInfo) -> str:
    """The ``package<TAB>version`` list recorded when the layer was built."""
    path = store.layers / f"{layer.digest.split(':')[1]}.packages.tsv"
    return path.read_text() if path.exists() else ""
