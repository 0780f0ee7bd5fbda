"""The egress CA in a trust layer made once per template (:mod:`sandboxd.runtime.trust`), seen from
inside real sandboxes through the official SDK: the CA and the template's certificates are trusted,
no directory of the template changes, what a sandbox writes to its trust store survives a pause, a
sandbox paused by a runtime without the layer resumes with it, a snapshot does not take the layer,
and a template whose trust store is a link gets no layer (the install inside, as before).

HTTPS through a header rule with the CA is test_network_sdk.py's; the host-side reading of hostile
layers is test_trust_layer.py's.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Runtime
from e2b import Sandbox
from sandboxd.runtime.layers import hex_of
from sandboxd.runtime.store import Store
from sandboxd.runtime.templates import default_store_dir
from sandboxd.runtime.trust import SWITCH
from test_runtime_templates import _ldd, _minimal_rootfs, _template_add

pytestmark = pytest.mark.root

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
EXTRA = "/usr/local/share/ca-certificates/sandboxd-egress.crt"
DIRS = (
    "/etc",
    "/etc/ssl",
    "/etc/ssl/certs",
    "/usr",
    "/usr/local",
    "/usr/local/share",
    "/usr/local/share/ca-certificates",
)


def ca_of(runtime: Runtime) -> str:
    return (runtime.data_dir / "egress-ca.pem").read_text().strip()


def lowers(sbx: Sandbox) -> int:
    """How many lower layers the sandbox's root overlay has (its mount options, from inside)."""
    for line in sbx.files.read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if fields[4] == "/" and "lowerdir=" in line:
            options = line.split(" - ", 1)[1].split()[2]
            lower = next(o for o in options.split(",") if o.startswith("lowerdir="))
            return len(lower[len("lowerdir=") :].split(":"))
    raise AssertionError("no overlay at /")


def template_layers(runtime: Runtime, name: str) -> list[str]:
    store = Store(runtime.data_dir / "sandboxd.db")
    try:
        row = store.template(name)
    finally:
        store.close()
    assert row is not None, name
    return row.layers


def store_dir(runtime: Runtime) -> Path:
    return Path(os.environ.get("SANDBOXD_TEMPLATE_STORE") or default_store_dir(runtime.data_dir))


def stats(sbx: Sandbox, paths: tuple[str, ...]) -> list[str]:
    # mode, owner, group, modification time: what overlayfs takes from the topmost layer with the directory.
    result = sbx.commands.run(f"stat -c '%n %a %u %g %Y' {' '.join(paths)}", user="root")
    return result.stdout.splitlines()


def test_a_new_sandbox_trusts_the_egress_ca_and_the_templates_certificates(e2b_env: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        ca = ca_of(e2b_env)
        bundle = sbx.files.read(BUNDLE, user="root")
        assert bundle.count(ca) == 1
        assert bundle.endswith("\n" + ca + "\n")
        assert bundle.count("BEGIN CERTIFICATE") > 100  # Debian's, the template's own
        assert sbx.files.read(EXTRA, user="root") == ca + "\n"
        # What OpenSSL and Python read: the CA among the template's roots.
        check = sbx.commands.run(
            "python3 -c 'import ssl; c = ssl.create_default_context().get_ca_certs(); "
            'print(len(c), sum("sandboxd egress CA" in str(x["subject"]) for x in c))\''
        )
        count, ours = map(int, check.stdout.split())
        assert count > 100 and ours == 1, check.stdout
        # From the layer: the sandbox's root has one lower layer more than its template, and the
        # agent added nothing (no warning, no install).
        assert lowers(sbx) == len(template_layers(e2b_env, "base")) + 1
        # Byte for byte the bundle of one of the runtime's trust layers (the shared runtime has
        # other templates' too).
        made = [p / BUNDLE.lstrip("/") for p in (e2b_env.data_dir / "trust").iterdir()]
        assert [p for p in made if p.read_text() == bundle], made
        assert stats(sbx, (BUNDLE,))[0].split()[1:4] == ["644", "0", "0"]
    finally:
        sbx.kill()


def test_the_layer_changes_no_directory_of_the_template(
    e2b_env: Runtime, start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same template in a runtime that installs the CA in each sandbox (no layer): every
    # directory on the way has the same mode and owner, and those the install does not write into
    # the same time.
    sbx = Sandbox.create()
    try:
        with_layer = stats(sbx, DIRS)
    finally:
        sbx.kill()
    without = start_runtime(env={SWITCH: "off"})
    for name, value in without.env().items():
        monkeypatch.setenv(name, value)
    sbx = Sandbox.create()
    try:
        assert lowers(sbx) == len(template_layers(without, "base"))
        installed = stats(sbx, DIRS)
        assert sbx.files.read(BUNDLE, user="root").count(ca_of(without)) == 1
    finally:
        sbx.kill()
    assert not (without.data_dir / "trust").exists() or not list((without.data_dir / "trust").iterdir())
    written = ("/etc", "/etc/ssl/certs", "/usr/local/share/ca-certificates")  # the install renames files into them
    for ours, theirs in zip(with_layer, installed, strict=True):
        if ours.split()[0] in written:
            ours, theirs = ours.rsplit(" ", 1)[0], theirs.rsplit(" ", 1)[0]
        assert ours == theirs


def _add_binary(root: Path, name: str) -> None:
    path = Path(shutil.which(name) or f"/usr/bin/{name}").resolve()
    for lib in [str(path), *[line.split()[-2] if "=>" in line else line.split()[0] for line in _ldd(path)]]:
        if lib.startswith("/"):
            target = root / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)
    link = root / "usr/bin" / name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(str(path), link)


def test_a_templates_own_directory_attributes_are_kept(e2b_env: Runtime, tmp_path: Path) -> None:
    # A template whose /etc, /etc/ssl and /usr/local are unlike Debian's: the layer's copies of them
    # carry the template's mode, owner and time, so the sandbox sees the template's.
    if shutil.which("ldd") is None:
        pytest.skip("needs ldd to assemble a minimal root filesystem")
    root = tmp_path / "rootfs"
    _minimal_rootfs(root, "odd dirs")
    _add_binary(root, "stat")
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_text("# the template's own\n")
    (root / "usr/local/share").mkdir(parents=True)
    for path, mode, gid, mtime in (("etc", 0o751, 42, 1_500_000_000), ("etc/ssl", 0o711, 7, 1_400_000_000)):
        os.chmod(root / path, mode)
        os.chown(root / path, 0, gid)
        os.utime(root / path, (mtime, mtime))
    os.chmod(root / "usr/local", 0o2775)
    os.chown(root / "usr/local", 0, 50)
    os.utime(root / "usr/local", (1_300_000_000, 1_300_000_000))
    # The directories' entries again at the end of the tarball: unpacked after their contents, their
    # times are the ones set here, not the unpacking's.
    tarball = tmp_path / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
        for path in ("etc", "etc/ssl", "usr/local"):
            tar.add(root / path, arcname=path, recursive=False)
    _template_add(e2b_env, "odd-dirs", tarball)
    (digest,) = template_layers(e2b_env, "odd-dirs")
    layer = store_dir(e2b_env) / "layers" / hex_of(digest)
    assert int((layer / "etc/ssl").stat().st_mtime) == 1_400_000_000
    sbx = Sandbox.create(template="odd-dirs")
    try:
        assert lowers(sbx) == 2
        assert stats(sbx, ("/etc/ssl", "/usr/local")) == [
            "/etc/ssl 711 0 7 1400000000",
            "/usr/local 2775 0 50 1300000000",
        ]
        assert stats(sbx, ("/etc",))[0].startswith("/etc 751 0 42 ")  # its time is resolv.conf's writing
        # The new directory the template lacked is made as the install makes it.
        assert stats(sbx, ("/usr/local/share/ca-certificates",))[0].startswith(
            "/usr/local/share/ca-certificates 755 0 0 "
        )
        assert sbx.files.read(BUNDLE, user="root") == f"# the template's own\n\n{ca_of(e2b_env)}\n"
    finally:
        sbx.kill()


def test_a_templates_linked_trust_store_gets_no_layer_and_the_install_inside(e2b_env: Runtime, tmp_path: Path) -> None:
    # The template's trust store is a link (here to a file of its own; it could name a host file, which
    # the runtime must never read). The runtime makes no layer and says why; the sandbox's own
    # install follows the link inside the sandbox, as before.
    if shutil.which("ldd") is None:
        pytest.skip("needs ldd to assemble a minimal root filesystem")
    root = tmp_path / "rootfs"
    _minimal_rootfs(root, "linked store")
    (root / "etc/pki").mkdir()
    (root / "etc/pki/bundle.pem").write_text("# the real one\n")
    (root / "etc/ssl/certs").mkdir(parents=True)
    os.symlink("/etc/pki/bundle.pem", root / "etc/ssl/certs/ca-certificates.crt")
    _template_add(e2b_env, "linked-store", root)
    sbx = Sandbox.create(template="linked-store")
    try:
        assert lowers(sbx) == 1
        assert sbx.files.read("/etc/pki/bundle.pem", user="root") == f"# the real one\n\n{ca_of(e2b_env)}\n"
        said = [line for line in e2b_env.log.read_text().splitlines() if "template 'linked-store'" in line]
        assert len(said) == 1 and "ca-certificates.crt is a symbolic link" in said[0], said
    finally:
        sbx.kill()


def test_a_trust_store_the_sandbox_rewrote_is_kept_across_pause_and_resume(e2b_env: Runtime) -> None:
    sbx = Sandbox.create()
    try:
        ca = ca_of(e2b_env)
        rewrite = sbx.commands.run(f"printf '# mine\\n' > {BUNDLE}", user="root")
        assert rewrite.exit_code == 0, rewrite.stderr
        sbx.pause(mode="filesystem")  # type: ignore[arg-type]
        resumed = Sandbox.connect(sbx.sandbox_id)
        # Its own copy, above the layer; the resume adds the CA to it, as it always did.
        assert resumed.files.read(BUNDLE, user="root") == f"# mine\n\n{ca}\n"
        assert lowers(resumed) == len(template_layers(e2b_env, "base")) + 1
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_sandbox_paused_without_the_layer_resumes_with_it(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A runtime from before the layer (the switch reproduces it) pauses a sandbox to disk; the next
    # runtime on the same data dir resumes it with one lower layer more, under the same disk.
    runtime = start_runtime(env={SWITCH: "off"})
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    sbx = Sandbox.create()
    try:
        ca = ca_of(runtime)
        base = len(template_layers(runtime, "base"))
        assert lowers(sbx) == base
        sbx.files.write("/home/user/kept", "before the pause")
        sbx.pause(mode="filesystem")  # type: ignore[arg-type]
        runtime.process.terminate()
        runtime.process.wait(30)
        assert runtime.environ is not None
        runtime.environ = {k: v for k, v in runtime.environ.items() if k != SWITCH}
        runtime.restart()
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert lowers(resumed) == base + 1
        assert resumed.files.read("/home/user/kept") == "before the pause"
        bundle = resumed.files.read(BUNDLE, user="root")
        assert bundle.count(ca) == 1 and bundle.count("BEGIN CERTIFICATE") > 100
        assert resumed.commands.run("echo alive").stdout == "alive\n"
        fresh = Sandbox.create()
        try:
            assert lowers(fresh) == base + 1
        finally:
            fresh.kill()
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_restart_with_no_sandbox_running_collects_the_layers_and_one_with_a_sandbox_keeps_them(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = start_runtime()
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    layers = runtime.data_dir / "trust"

    def made() -> set[str]:
        return {p.name for p in layers.iterdir()}

    Sandbox.create().kill()
    first = made()
    assert len(first) == 1
    (layers / ("0" * 64) / "etc").mkdir(parents=True)  # a rebuilt template's, say
    runtime.process.terminate()
    runtime.process.wait(30)
    runtime.restart()
    assert made() == set()  # nothing ran: every layer collected

    sbx = Sandbox.create()  # its template's layer, made again
    try:
        assert made() == first
        runtime.process.terminate()
        runtime.process.wait(30)
        runtime.restart()  # the sandbox is re-adopted with the layer mounted: kept
        assert made() == first
        assert ca_of(runtime) in sbx.files.read(BUNDLE, user="root")
        assert sbx.commands.run("echo alive").stdout == "alive\n"
    finally:
        sbx.kill()


def test_a_snapshot_does_not_take_the_trust_layer(e2b_env: Runtime) -> None:
    source = Sandbox.create()
    snapshot_id = None
    try:
        source.files.write("/home/user/snap", "kept")
        snapshot_id = source.create_snapshot().snapshot_id
        layers = template_layers(e2b_env, snapshot_id)
        assert layers[1:] == template_layers(e2b_env, "base")  # the sandbox's disk over the template's
        top = store_dir(e2b_env) / "layers" / hex_of(layers[0])
        assert (top / "home/user/snap").is_file()
        assert not (top / BUNDLE.lstrip("/")).exists() and not (top / EXTRA.lstrip("/")).exists()
        copy = Sandbox.create(snapshot_id)
        try:
            assert lowers(copy) == len(layers) + 1
            assert copy.files.read(BUNDLE, user="root").count(ca_of(e2b_env)) == 1
            assert copy.files.read("/home/user/snap") == "kept"
        finally:
            copy.kill()
    finally:
        source.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)
