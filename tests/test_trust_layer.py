"""The trust layer (:mod:`sandboxd.runtime.trust`) made from template layers on real files: what it
holds is what the install inside a sandbox makes, its directories are the template's, and layers it
cannot read plainly (links, whiteouts, FIFOs, opaque directories, huge files) give no layer at all.

The sandbox side (the CA trusted, ``stat`` unchanged, pause and resume) is in test_runtime_trust.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sandboxd.agent import cacerts
from sandboxd.runtime import trust
from sandboxd.runtime.templates import Template

PEM = "-----BEGIN CERTIFICATE-----\nMIIBsandboxdtrustlayer\n-----END CERTIFICATE-----\n"
OTHER_PEM = "-----BEGIN CERTIFICATE-----\nMIIBanotherruntime\n-----END CERTIFICATE-----\n"
TEMPLATE_BUNDLE = b"# the template's\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
BUNDLE = "etc/ssl/certs/ca-certificates.crt"
EXTRA = "usr/local/share/ca-certificates/sandboxd-egress.crt"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers are owned canonically (chown needs root)")


def layer(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(mode=0o755)
    return path


def put(base: Path, path: str, data: bytes = TEMPLATE_BUNDLE, mode: int = 0o644) -> Path:
    target = base / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)
    return target


def debianish(tmp_path: Path) -> list[Path]:
    """Two layers as an image has them: the bundle and /usr/local below, /etc changed above with
    attributes of its own (mode, owner, time, a user xattr)."""
    below = layer(tmp_path, "below")
    put(below, BUNDLE)
    (below / "usr/local/share/ca-certificates").mkdir(parents=True)
    above = layer(tmp_path, "above")
    put(above, "etc/motd", b"hello\n")
    os.chmod(above / "etc", 0o751)
    os.chown(above / "etc", 0, 42)
    os.setxattr(above / "etc", "user.origin", b"image")
    os.utime(above / "etc", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.chmod(below / "usr/local", 0o2775)
    os.chown(below / "usr/local", 0, 50)
    return [above, below]


def installed(tmp_path: Path, bundle: bytes, mode: int) -> tuple[bytes, int, bytes]:
    """What ``cacerts.install`` makes of ``bundle`` inside a sandbox: its bytes and mode, and the kept copy."""
    scratch = tmp_path / "install"
    scratch.mkdir()
    target = put(scratch, "ca-certificates.crt", bundle, mode)
    extra = scratch / "local" / "sandboxd-egress.crt"
    cacerts.install(PEM, str(target), str(extra))
    out = target.read_bytes(), stat.S_IMODE(target.stat().st_mode), extra.read_bytes()
    shutil.rmtree(scratch)
    return out


def test_holds_what_the_install_makes_with_the_templates_directories(tmp_path: Path) -> None:
    layers = debianish(tmp_path)
    root = tmp_path / "trust"
    root.mkdir()
    made = trust.make_layer(root, layers, PEM, own_usr=True)
    assert made.parent == root
    want_bundle, want_mode, want_extra = installed(tmp_path, TEMPLATE_BUNDLE, 0o644)
    assert (made / BUNDLE).read_bytes() == want_bundle
    assert stat.S_IMODE((made / BUNDLE).stat().st_mode) == want_mode
    assert (made / EXTRA).read_bytes() == want_extra
    assert stat.S_IMODE((made / EXTRA).stat().st_mode) == 0o644
    for path in (BUNDLE, EXTRA):
        assert ((made / path).stat().st_uid, (made / path).stat().st_gid) == (0, 0)
    # Nothing else in it: the overlay shows every other file of the template's.
    files = sorted(str(p.relative_to(made)) for p in made.rglob("*") if not p.is_dir())
    assert files == sorted([BUNDLE, EXTRA])
    # Each directory as the topmost template layer that has it gives it to the overlay.
    above, below = layers
    for path, source in [
        ("etc", above),
        ("etc/ssl", below),
        ("etc/ssl/certs", below),
        ("usr", below),
        ("usr/local", below),
        ("usr/local/share", below),
        ("usr/local/share/ca-certificates", below),
    ]:
        ours, theirs = (made / path).stat(), (source / path).stat()
        assert (ours.st_mode, ours.st_uid, ours.st_gid) == (theirs.st_mode, theirs.st_uid, theirs.st_gid), path
        assert ours.st_mtime_ns == theirs.st_mtime_ns, path
        assert sorted(os.listxattr(made / path)) == sorted(os.listxattr(source / path)), path
    assert os.getxattr(made / "etc", "user.origin") == b"image"
    assert stat.S_IMODE((made / "etc").stat().st_mode) == 0o751 and (made / "etc").stat().st_gid == 42
    assert stat.S_IMODE((made / "usr/local").stat().st_mode) == 0o2775


def test_is_made_once_and_keyed_by_what_it_holds(tmp_path: Path) -> None:
    layers = debianish(tmp_path)
    root = tmp_path / "trust"
    root.mkdir()
    first = trust.make_layer(root, layers, PEM, own_usr=True)
    assert trust.make_layer(root, layers, PEM, own_usr=True) == first
    another_ca = trust.make_layer(root, layers, OTHER_PEM, own_usr=True)
    without_usr = trust.make_layer(root, layers, PEM, own_usr=False)
    assert not (without_usr / "usr").exists()
    put(layers[0], BUNDLE, TEMPLATE_BUNDLE + b"# rebuilt\n")
    another_bundle = trust.make_layer(root, layers, PEM, own_usr=True)
    assert len({first, another_ca, without_usr, another_bundle}) == 4
    assert sorted(p.name for p in root.iterdir()) == sorted(
        p.name for p in (first, another_ca, without_usr, another_bundle)
    )


def test_a_bundle_that_has_the_ca_already_is_kept_as_it_is(tmp_path: Path) -> None:
    # A template built in a sandbox of this runtime has the CA in its bundle (the install did it).
    only = layer(tmp_path, "only")
    bundle = TEMPLATE_BUNDLE + b"\n" + PEM.encode()
    put(only, BUNDLE, bundle, 0o640)
    os.chown(only / BUNDLE, 0, 7)
    root = tmp_path / "trust"
    root.mkdir()
    made = trust.make_layer(root, [only], PEM, own_usr=True)
    assert (made / BUNDLE).read_bytes() == bundle
    st = (made / BUNDLE).stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 7)
    # The directories the template lacks are made as the install makes them.
    for path in ("usr", "usr/local", "usr/local/share", "usr/local/share/ca-certificates"):
        st = (made / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0), path


def test_what_a_higher_layer_hides_is_not_looked_at(tmp_path: Path) -> None:
    above = layer(tmp_path, "above")
    put(above, BUNDLE, b"# above\n")
    (above / "usr/local/share/ca-certificates").mkdir(parents=True)
    below = layer(tmp_path, "below")
    (below / "etc/ssl/certs").mkdir(parents=True)
    os.symlink("/etc/ssl/certs/ca-certificates.crt", below / BUNDLE)  # hidden by the file above
    lowest = layer(tmp_path, "lowest")
    os.symlink("/etc", lowest / "etc")  # hidden by the directories above
    os.symlink("/usr", lowest / "usr")
    root = tmp_path / "trust"
    root.mkdir()
    made = trust.make_layer(root, [above, below, lowest], PEM, own_usr=True)
    assert (made / BUNDLE).read_bytes() == b"# above\n\n" + PEM.strip().encode() + b"\n"


def _symlinked_bundle(top: Path) -> None:
    (top / "etc/ssl/certs").mkdir(parents=True)
    os.symlink("/etc/ssl/certs/ca-certificates.crt", top / BUNDLE)  # the host's, were it followed


def _symlinked_dir(top: Path) -> None:
    (top / "etc").mkdir()
    os.symlink("/etc/ssl", top / "etc/ssl")


def _fifo(top: Path) -> None:
    (top / "etc/ssl/certs").mkdir(parents=True)
    os.mkfifo(top / BUNDLE)  # an open for reading would wait for a writer for ever


def _device(top: Path) -> None:
    (top / "etc/ssl/certs").mkdir(parents=True)
    os.mknod(top / BUNDLE, 0o644 | stat.S_IFCHR, os.makedev(1, 3))


def _huge(top: Path) -> None:
    with put(top, BUNDLE, b"").open("r+b") as f:
        f.truncate(cacerts.MAX_BUNDLE + 1)


def _whiteout(top: Path) -> None:
    (top / "etc/ssl/certs").mkdir(parents=True)
    os.mknod(top / BUNDLE, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


def _whiteout_dir(top: Path) -> None:
    (top / "etc").mkdir()
    os.mknod(top / "etc/ssl", 0o600 | stat.S_IFCHR, os.makedev(0, 0))


def _opaque(attr: str) -> Callable[[Path], None]:
    def plant(top: Path) -> None:
        (top / "etc/ssl/certs").mkdir(parents=True)
        os.setxattr(top / "etc/ssl", attr, b"y")

    return plant


def _not_a_dir(top: Path) -> None:
    put(top, "etc/ssl", b"a file where a directory was\n")


def _symlinked_usr(top: Path) -> None:
    os.symlink("/usr", top / "usr")


def _nothing(top: Path) -> None:
    (top / "etc/ssl/certs").mkdir(parents=True)


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        (_symlinked_bundle, "is a symbolic link"),
        (_symlinked_dir, "etc/ssl is a symbolic link"),
        (_fifo, "is a special file"),
        (_device, "is a special file"),
        (_huge, "larger than 64 MiB"),
        (_whiteout, "is a whiteout"),
        (_whiteout_dir, "etc/ssl is a whiteout"),
        (_opaque("trusted.overlay.opaque"), "overlayfs' own xattrs (trusted.overlay.opaque)"),
        (_opaque("user.overlay.opaque"), "overlayfs' own xattrs (user.overlay.opaque)"),
        (_not_a_dir, "etc/ssl is a file"),
        (_symlinked_usr, "usr is a symbolic link"),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v)[:20],
)
def test_a_layer_not_plainly_readable_gives_no_layer(tmp_path: Path, plant: Callable[[Path], None], why: str) -> None:
    top = layer(tmp_path, "top")
    plant(top)
    below = layer(tmp_path, "below")
    put(below, BUNDLE)
    (below / "usr/local").mkdir(parents=True)
    root = tmp_path / "trust"
    root.mkdir()
    with pytest.raises(trust.Untrusted) as refused:
        trust.make_layer(root, [top, below], PEM, own_usr=True)
    assert why in str(refused.value), refused.value
    assert list(root.iterdir()) == []  # nothing made, nothing staged


def test_no_bundle_at_all_gives_no_layer(tmp_path: Path) -> None:
    top = layer(tmp_path, "top")
    _nothing(top)
    root = tmp_path / "trust"
    root.mkdir()
    with pytest.raises(trust.Untrusted, match=r"has no /etc/ssl/certs/ca-certificates\.crt"):
        trust.make_layer(root, [top], PEM, own_usr=False)


def test_concurrent_makers_rename_one_tree_and_leave_no_staging(tmp_path: Path) -> None:
    layers = debianish(tmp_path)
    root = tmp_path / "trust"
    root.mkdir()
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def make() -> None:
        start.wait()
        try:
            results.append(trust.make_layer(root, layers, PEM, own_usr=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert [p.name for p in root.iterdir()] == [results[0].name]
    assert (results[0] / BUNDLE).read_bytes().endswith(PEM.strip().encode() + b"\n")


def test_a_dead_makers_staging_is_swept(tmp_path: Path) -> None:
    root = tmp_path / "trust"
    (root / f"{trust.STAGING_PREFIX}999999999-abc/etc").mkdir(parents=True)
    live = root / f"{trust.STAGING_PREFIX}{os.getpid()}-def"
    live.mkdir()
    trust.TrustLayers(root)
    assert [p.name for p in root.iterdir()] == [live.name]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_the_runtime_asks_once_per_template_and_never_for_the_host_template(tmp_path: Path) -> None:
    layers = tuple(debianish(tmp_path))
    broken = layer(tmp_path, "broken")
    _fifo(broken)
    layers_of = TrustLayersProbe(tmp_path / "trust")

    async def main() -> None:
        template = Template("t", layers, False)
        made = await asyncio.gather(*(layers_of.layer(template, PEM) for _ in range(5)))
        assert len(set(made)) == 1 and made[0] is not None
        assert await layers_of.layer(template, None) is None  # no networking: no CA
        assert await layers_of.layer(Template("host", (layers[1],), True), PEM) is None
        assert await layers_of.layer(Template("b", (broken, *layers), False), PEM) is None
        assert await layers_of.layer(Template("b", (broken, *layers), False), PEM) is None  # remembered
        shutil.rmtree(made[0])  # emptied by hand (docs/network.md): made again
        assert await layers_of.layer(template, PEM) == made[0] and made[0].is_dir()
        off = trust.TrustLayers(tmp_path / "trust", enabled=False)
        assert await off.layer(template, PEM) is None

    asyncio.run(main())
    # One make per template, each answer remembered (the host's and the broken one's too: logged once),
    # and one more for the layer removed by hand.
    assert layers_of.made == [(layers, True), ((layers[1],), False), ((broken, *layers), True), (layers, True)]


class TrustLayersProbe(trust.TrustLayers):
    """Counts the blocking makes (the real ones run)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, enabled=True)
        self.made: list[tuple[tuple[Path, ...], bool]] = []

    async def _make(self, template: Template, pem: str) -> Path | None:
        self.made.append((template.layers, not template.host_usr))
        return await super()._make(template, pem)


@pytest.mark.parametrize(("fs", "usable"), [("tmpfs", True), ("ramfs", False)])
def test_a_data_dir_the_jail_cannot_mount_idmapped_gets_no_layers(tmp_path: Path, fs: str, usable: bool) -> None:
    # The data dir on another filesystem than the template store is checked once: ramfs cannot be
    # mounted idmapped (every create would fail in the jail), tmpfs can (Linux >= 6.3).
    if fs == "tmpfs" and tuple(int(n) for n in os.uname().release.split(".")[:2]) < (6, 3):
        pytest.skip("tmpfs is mountable idmapped from Linux 6.3")
    layers = tuple(debianish(tmp_path))
    mount = tmp_path / fs
    mount.mkdir()
    subprocess.run(["mount", "-t", fs, "none", str(mount)], check=True)
    try:
        layers_of = trust.TrustLayers(mount / "trust", enabled=True)
        made = asyncio.run(layers_of.layer(Template("t", layers, False), PEM))
        assert (made is not None) == usable, made
        if made is not None:
            assert made.parent == mount / "trust" and (made / BUNDLE).is_file()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
