"""OCI images as templates: pulled from a registry this test runs on loopback (the distribution
registry, from Debian's docker-registry package), imported from an OCI archive and from a
``docker save`` tarball, all serving images the test assembles itself (no Docker: layers are tars
written here, the layout by hand, and skopeo pushes and converts).

Layers are stored once by digest and shared; OCI whiteouts and opaque directories become overlayfs
ones; hostile layer tarballs are refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_TOOLS, Runtime, free_port, require, sandboxd_template
from e2b import Sandbox

BUSYBOX = TEST_TOOLS / "busybox-static" / "bin" / "busybox"
REGISTRY = TEST_TOOLS / "docker-registry" / "usr" / "bin" / "docker-registry"
MTIME = 1_700_000_000

Entry = tuple[str, str, bytes | str | None]
"""(path, kind: dir|file|sym|whiteout|opaque, data or link target)."""


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed layer tar; OCI whiteouts are ``.wh.NAME`` files, opaque dirs ``.wh..wh..opq``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, data in entries:
            if kind == "whiteout":
                parent, _, name = path.rpartition("/")
                path, kind, data = f"{parent}/.wh.{name}".lstrip("/"), "file", b""
            elif kind == "opaque":
                path, kind, data = f"{path}/.wh..wh..opq", "file", b""
            info = tarfile.TarInfo(path)
            info.mtime = MTIME
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def busybox_layer() -> bytes:
    busybox = Path(require(BUSYBOX, "image layers")).read_bytes()
    entries: list[Entry] = [("bin", "dir", None), ("bin/busybox", "file", busybox)]
    entries += [(f"bin/{applet}", "sym", "busybox") for applet in ("sh", "cat", "ls", "echo", "id", "pwd", "env")]
    entries += [
        ("etc", "dir", None),
        ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        ("etc/group", "file", b"root:x:0:\nuser:x:1000:\n"),
        ("etc/from-base", "file", b"base\n"),
        ("opt/data", "dir", None),
        ("opt/data/old-1", "file", b"1"),
        ("opt/data/old-2", "file", b"2"),
        ("tmp", "dir", None),
        ("root", "dir", None),
        ("home/user", "dir", None),
        ("srv/app", "dir", None),
    ]
    return layer_tar(entries)


def oci_layout(directory: Path, layers: list[bytes], env: list[str], workdir: str) -> list[str]:
    """Write an OCI image layout (gzip layers, config, manifest, index); returns the diff_ids."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]
    descriptors = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gzip.compress(layer, mtime=0))}
        for layer in layers
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": descriptors,
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return diff_ids


@dataclass
class Images:
    """Two images sharing their base layer, as OCI layouts, plus the registry serving them."""

    app: Path
    other: Path
    app_diff_ids: list[str]
    other_diff_ids: list[str]
    registry: str


def _skopeo(*args: str) -> None:
    skopeo = require("skopeo", "image transport")
    subprocess.run([skopeo, "--insecure-policy", *args], check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def _registry(work: Path, auth: str = "") -> Iterator[str]:
    """The distribution registry on a free loopback port, storing under ``work`` (``auth``: its
    config's ``auth:`` section); yields its address once it answers."""
    registry = require(REGISTRY, "the loopback registry")
    port = free_port()
    config = work / "registry.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    process = subprocess.Popen([registry, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/v2/"]).returncode:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    require(REGISTRY, "the loopback registry")  # skip before building the images
    work = tmp_path_factory.mktemp("images")
    base = busybox_layer()
    app_layer = layer_tar(
        [
            ("etc/added", "file", b"added by layer 2\n"),
            ("etc/from-base", "whiteout", None),
            ("opt/data", "opaque", None),
            ("opt/data/new", "file", b"new\n"),
        ]
    )
    other_layer = layer_tar([("etc/other", "file", b"other\n")])
    app_ids = oci_layout(work / "app", [base, app_layer], ["PATH=/bin", "GREETING=hello from the image"], "/srv/app")
    other_ids = oci_layout(work / "other", [base, other_layer], ["PATH=/bin"], "/")
    with _registry(work) as address:
        for name in ("app", "other"):
            _skopeo("copy", "--dest-tls-verify=false", f"oci:{work / name}:latest", f"docker://{address}/t/{name}:1")
        yield Images(work / "app", work / "other", app_ids, other_ids, address)


@pytest.fixture(scope="module")
def image_runtime(start_runtime: Callable[..., Runtime], tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """A runtime with a template store of its own, so layer counts and removal are this test's alone."""
    return start_runtime("--template-store", str(tmp_path_factory.mktemp("image-store")))


def _layers_of(runtime: Runtime, name: str) -> list[str]:
    db = sqlite3.connect(f"file:{runtime.data_dir / 'sandboxd.db'}?mode=ro", uri=True)
    try:
        (layers,) = db.execute("SELECT layers FROM templates WHERE name = ?", (name,)).fetchone()
    finally:
        db.close()
    return list(json.loads(layers))


def _store(runtime: Runtime) -> Path:
    db = sqlite3.connect(f"file:{runtime.data_dir / 'sandboxd.db'}?mode=ro", uri=True)
    try:
        (value,) = db.execute("SELECT value FROM settings WHERE key = 'template_store'").fetchone()
    finally:
        db.close()
    return Path(value)


def _create(runtime: Runtime, template: str) -> Sandbox:
    return Sandbox.create(template=template, api_key=runtime.api_key, api_url=runtime.url, sandbox_url=runtime.url)


def _check_app_image(runtime: Runtime, template: str) -> None:
    sbx = _create(runtime, template)
    try:
        assert sbx.get_info().template_id == template
        out = sbx.commands.run("cat /etc/added; ls /etc; ls /opt/data; echo $GREETING; pwd").stdout.split("\n")
        assert out[0] == "added by layer 2"
        assert "from-base" not in out[1:4], "the whiteout did not hide the base layer's file"
        assert "added" in " ".join(out)
        assert "new" in out and "old-1" not in out and "old-2" not in out, f"opaque dir not applied: {out}"
        assert "hello from the image" in out
        assert out[-2] == "/srv/app"
        assert not sbx.files.exists("/etc/from-base")
        sbx.files.write("/opt/data/mine", "written in the sandbox")
        assert sbx.files.read("/opt/data/mine") == "written in the sandbox"
    finally:
        sbx.kill()


def test_pull_from_a_loopback_registry(image_runtime: Runtime, images: Images) -> None:
    pulled = sandboxd_template(image_runtime, "pull", "app", f"{images.registry}/t/app:1")
    assert "layer 2/2" in pulled.stderr
    assert _layers_of(image_runtime, "app") == list(reversed(images.app_diff_ids))
    _check_app_image(image_runtime, "app")


def test_images_share_their_common_layer(image_runtime: Runtime, images: Images) -> None:
    sandboxd_template(image_runtime, "pull", "app2", f"{images.registry}/t/app:1")
    pulled = sandboxd_template(image_runtime, "pull", "other", f"{images.registry}/t/other:1")
    assert "already in the store (shared)" in pulled.stderr
    assert images.app_diff_ids[0] == images.other_diff_ids[0]
    store = _store(image_runtime)
    base = store / "layers" / images.app_diff_ids[0].split(":")[1]
    assert base.is_dir()
    # One directory per distinct layer: base, app's layer, other's layer.
    distinct = {*images.app_diff_ids, *images.other_diff_ids}
    assert {f"sha256:{p.name}" for p in (store / "layers").iterdir() if p.is_dir()} >= distinct


def test_unreachable_registry_fails_fast_naming_it(image_runtime: Runtime) -> None:
    closed = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = sandboxd_template(image_runtime, "pull", "nowhere", f"{closed}/t/app:1", check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    assert f"registry {closed} cannot be reached" in result.stderr


def test_import_an_oci_archive_and_a_docker_save_tarball(
    image_runtime: Runtime, images: Images, tmp_path: Path
) -> None:
    archive = tmp_path / "app-oci.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(images.app, arcname=".")
    sandboxd_template(image_runtime, "import", "from-oci", str(archive))
    saved = tmp_path / "app-docker.tar"
    _skopeo("copy", f"oci:{images.app}:latest", f"docker-archive:{saved}:t/app:1")
    sandboxd_template(image_runtime, "import", "from-docker", str(saved))
    for name in ("from-oci", "from-docker"):
        assert _layers_of(image_runtime, name) == list(reversed(images.app_diff_ids))
        _check_app_image(image_runtime, name)
    bogus = tmp_path / "rootfs.tar"
    with tarfile.open(bogus, "w") as tar:
        tar.add(images.app / "oci-layout", arcname="etc/oci-layout-not-at-the-top")
    result = sandboxd_template(image_runtime, "import", "bogus", str(bogus), check=False)
    assert result.returncode != 0 and "neither an OCI archive" in result.stderr


def test_remove_deletes_only_unshared_layers(image_runtime: Runtime, images: Images) -> None:
    sandboxd_template(image_runtime, "pull", "keep", f"{images.registry}/t/other:1")
    sandboxd_template(image_runtime, "pull", "gone", f"{images.registry}/t/app:1")
    sbx = _create(image_runtime, "gone")
    try:
        refused = sandboxd_template(image_runtime, "remove", "gone", check=False)
        assert refused.returncode != 0 and "used by live sandboxes" in refused.stderr
    finally:
        sbx.kill()
    for other in ("app", "app2", "from-oci", "from-docker"):
        sandboxd_template(image_runtime, "remove", other, check=False)
    sandboxd_template(image_runtime, "remove", "gone")
    store = _store(image_runtime)
    assert not (store / "layers" / images.app_diff_ids[1].split(":")[1]).exists()
    assert (store / "layers" / images.app_diff_ids[0].split(":")[1]).is_dir(), "the shared base layer was deleted"
    listed = sandboxd_template(image_runtime, "list").stdout
    assert "keep" in listed and "gone" not in listed.split("aliases:")[0]


# ------------------------------------------------------------------------- hostile layer tarballs


@pytest.fixture
def layer_store(tmp_path: Path) -> object:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers keeps owners and makes whiteout devices: needs root")
    from sandboxd.runtime.layers import LayerStore

    return LayerStore(tmp_path / "store")


def _import(store: object, data: bytes, expected: str | None = None) -> object:
    from sandboxd.runtime.layers import LayerStore

    assert isinstance(store, LayerStore)
    return store.import_tar(io.BytesIO(data), "test", expected=expected)


def test_layer_entries_that_leave_the_layer_are_refused(layer_store: object, tmp_path: Path) -> None:
    from sandboxd.runtime.layers import LayerError

    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(LayerError, match="leaves the layer"):
        _import(layer_store, layer_tar([("../escaped", "file", b"x")]))
    with pytest.raises(LayerError, match="outside the layer"):
        _import(layer_store, layer_tar([("link", "sym", str(outside)), ("link/planted", "file", b"x")]))
    assert list(outside.iterdir()) == []
    hard = io.BytesIO()
    with tarfile.open(fileobj=hard, mode="w") as tar:
        info = tarfile.TarInfo("h")
        info.type, info.linkname = tarfile.LNKTYPE, "../../etc/passwd"
        tar.addfile(info)
    with pytest.raises(LayerError, match="leaves the layer"):
        _import(layer_store, hard.getvalue())


def test_device_nodes_are_skipped_and_digests_checked(layer_store: object) -> None:
    from sandboxd.runtime.layers import LayerError, LayerInfo, LayerStore

    assert isinstance(layer_store, LayerStore)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        disk = tarfile.TarInfo("dev-sda")
        disk.type, disk.devmajor, disk.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(disk)
        info = tarfile.TarInfo("ok")
        tar.addfile(info, io.BytesIO(b""))
    raw = data.getvalue()
    stored = _import(layer_store, raw)
    assert isinstance(stored, LayerInfo)
    tree = layer_store.path(stored.digest)
    assert (tree / "ok").exists() and not (tree / "dev-sda").exists()
    assert stored.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    with pytest.raises(LayerError, match="tampered"):
        _import(layer_store, layer_tar([("x", "file", b"x")]), expected="sha256:" + "0" * 64)


def test_template_build_from_an_image_in_a_loopback_registry(image_runtime: Runtime, images: Images) -> None:
    """The SDK's ``from_image``: the image is pulled (its layers shared), and the steps run over it in a
    build sandbox, as root unless a ``set_user`` says otherwise (the image's users are its own)."""
    from e2b import BuildException, Template

    api = {"api_key": image_runtime.api_key, "api_url": image_runtime.url}
    template = Template().from_image(f"{images.registry}/t/app:1").run_cmd("id -u > /etc/built-by; rm /etc/added")
    Template.build(template, "built-on-app", **api)
    layers = _layers_of(image_runtime, "built-on-app")
    assert layers[1:] == list(reversed(images.app_diff_ids)), "the image's layers are shared, under one of the build"
    sbx = _create(image_runtime, "built-on-app")
    try:
        assert (
            sbx.commands.run("cat /etc/built-by; echo $GREETING; pwd").stdout == "0\nhello from the image\n/srv/app\n"
        )
        assert not sbx.files.exists("/etc/added") and not sbx.files.exists("/etc/from-base")
    finally:
        sbx.kill()

    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(BuildException, match=f"registry {closed} cannot be reached"):
        Template.build(Template().from_image(f"{closed}/t/app:1").run_cmd("true"), "built-on-nothing", **api)


def test_template_build_from_a_private_registry_with_a_login(
    image_runtime: Runtime, images: Images, tmp_path: Path
) -> None:
    """``from_image(..., username=, password=)`` (E2B's ``fromImageRegistry``): the pull logs in to a
    registry that refuses anonymous pulls; without the login, or with a wrong one, the build fails
    naming the registry's refusal; the password is in no log line; E2B's cloud types are refused."""
    import warnings

    from e2b import BuildException, Template

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt, which the registry's htpasswd wants, from the C library

    password = os.urandom(12).hex()
    (tmp_path / "htpasswd").write_text(f"builder:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = f"auth:\n  htpasswd:\n    realm: sandboxd-test\n    path: {tmp_path / 'htpasswd'}\n"
    with _registry(tmp_path, auth) as address:
        _skopeo(
            "copy", "--dest-tls-verify=false", f"--dest-creds=builder:{password}",
            f"oci:{images.app}:latest", f"docker://{address}/private/app:1",
        )  # fmt: skip
        api = {"api_key": image_runtime.api_key, "api_url": image_runtime.url}
        image = f"{address}/private/app:1"
        logs: list[str] = []
        template = Template().from_image(image, username="builder", password=password).run_cmd("echo in > /etc/in")
        Template.build(template, "built-on-private", on_build_logs=lambda e: logs.append(e.message), **api)
        assert not [line for line in logs if password in line]
        sbx = _create(image_runtime, "built-on-private")
        try:
            assert sbx.commands.run("cat /etc/in /etc/added").stdout == "in\nadded by layer 2\n"
        finally:
            sbx.kill()

        for refused in (Template().from_image(image), Template().from_image(image, username="builder", password="no")):
            with pytest.raises(BuildException, match="skopeo could not copy"):
                Template.build(refused.run_cmd("true"), "built-on-refused", **api)
        cloud = Template().from_aws_registry(image, access_key_id="a", secret_access_key="b", region="r")
        with pytest.raises(BuildException, match="type 'aws' is not supported"):
            Template.build(cloud.run_cmd("true"), "built-on-aws", **api)
