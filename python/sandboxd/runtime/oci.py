"""OCI images as templates: pulled from a registry, or imported from an OCI archive (an
``oci-layout`` tarball) or a ``docker save`` tarball.

``skopeo`` (Debian's package) does the transport: registry protocol, authentication
(``$REGISTRY_AUTH_FILE`` or ``~/.docker/config.json``), manifest lists (it picks linux/amd64 or the
host's platform), and the digest checks of every blob it fetches. It copies the image into an OCI
layout in a staging directory; :mod:`.layers` then unpacks each layer into the template store under
its ``diff_id`` (skipping layers the store already has, so images that share a base share it on
disk), and the image config's ``Env`` and ``WorkingDir`` become the template's config. ``Cmd`` and
``Entrypoint`` are kept for reference only: as on E2B, a sandbox runs the agent, not the image's
entrypoint (a template's start command is set explicitly).

Images that cannot be reached fail fast: before skopeo runs, the registry's ``/v2/`` endpoint must
answer within :data:`REGISTRY_PROBE_TIMEOUT_S`, and the error names the registry. As Docker does,
registries on loopback (``localhost``, ``127.0.0.0/8``, ``::1``) may speak plain HTTP; others need
TLS unless ``insecure`` is asked for.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layers import LayerError, LayerStore, hex_of

REGISTRY_PROBE_TIMEOUT_S = 5.0
"""A registry that does not answer ``GET /v2/`` in this time is reported unreachable at once, rather
than after skopeo's own retries and TCP timeouts (minutes)."""

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

Report = Callable[[str], None]


class ImageError(Exception):
    """An image that cannot be imported, with a message naming what and where."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised image reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def loopback(self) -> bool:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry[1:].split("]")[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_reference(text: str) -> Reference:
    """Docker's rules: ``alpine`` is ``docker.io/library/alpine:latest``; a first component with a
    ``.`` or ``:`` (or ``localhost``) names the registry."""
    ref = text.strip()
    if ref.startswith("docker://"):
        ref = ref[len("docker://") :]
    if not ref or any(c.isspace() for c in ref):
        raise ImageError(f"'{text}' is not an image reference (e.g. debian:trixie, ghcr.io/owner/image:tag)")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        try:
            hex_of(digest)
        except LayerError:
            raise ImageError(f"'{text}': the digest must be sha256:<64 hex digits>") from None
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, ref
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    if not path or path != path.lower():
        raise ImageError(f"'{text}': repository names are lowercase")
    return Reference(registry, path, tag, digest)


@dataclass(slots=True)
class Image:
    """What an import produced: layers (topmost first) and the template config."""

    layers: list[str]
    config: dict[str, Any]
    source: str
    shared: list[str] = field(default_factory=list)
    """Layers that were already in the store (not unpacked again)."""


def probe_registry(ref: Reference, insecure: bool) -> None:
    """Fail fast, naming the registry, unless its ``/v2/`` endpoint answers (any status: 401 means
    it is there and wants a token, which skopeo handles)."""
    schemes = ["https", "http"] if insecure or ref.loopback() else ["https"]
    last: object = None
    for scheme in schemes:
        url = f"{scheme}://{ref.api_host}/v2/"
        try:
            with urllib.request.urlopen(url, timeout=REGISTRY_PROBE_TIMEOUT_S):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = getattr(exc, "reason", exc)
    raise ImageError(f"registry {ref.registry} cannot be reached ({last}); no image was pulled")


def _skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise ImageError("skopeo is not installed: apt-get install skopeo (it fetches and converts images)")
    return path


def _copy(source: str, layout: Path, report: Report, extra: list[str]) -> None:
    """``skopeo copy SOURCE oci:LAYOUT:image``, its progress lines passed on."""
    command = [
        _skopeo(),
        # No signature policy: images are named by the operator, every blob is checked against its
        # digest by skopeo, and each layer's content against its diff_id by us.
        "--insecure-policy",
        "copy",
        *extra,
        source,
        f"oci:{layout}:image",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    output: list[str] = []
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        output.append(line)
        if line:
            report(line)
    if process.wait() != 0:
        raise ImageError(f"skopeo could not copy {source}: {' '.join(output[-5:]) or f'exit {process.returncode}'}")


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / hex_of(digest)


def _json_blob(layout: Path, digest: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(_blob(layout, digest).read_bytes())
    except (OSError, ValueError) as exc:
        raise ImageError(f"the image's {what} ({digest}) is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ImageError(f"the image's {what} ({digest}) is not a JSON object")
    return data


def _store_layout(store: LayerStore, layout: Path, source: str, report: Report) -> Image:
    """Unpack the layers of the one image in an OCI layout into the store."""
    index = _json_blob_path(layout / "index.json", "index")
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise ImageError(f"expected one image in the layout, found {len(manifests)}")
    manifest = _json_blob(layout, manifests[0]["digest"], "manifest")
    config = _json_blob(layout, manifest["config"]["digest"], "config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    blobs = manifest.get("layers") or []
    if len(diff_ids) != len(blobs):
        raise ImageError(f"the image lists {len(blobs)} layers but its config {len(diff_ids)} diff_ids")
    shared: list[str] = []
    for n, (blob, diff_id) in enumerate(zip(blobs, diff_ids, strict=True), 1):
        if store.has(diff_id):
            shared.append(diff_id)
            report(f"layer {n}/{len(blobs)} {diff_id[:19]}: already in the store (shared)")
            continue
        report(f"layer {n}/{len(blobs)} {diff_id[:19]}: unpacking {blob.get('size', 0) >> 20} MiB")
        with _blob(layout, blob["digest"]).open("rb") as raw:
            store.import_tar(raw, source, expected=diff_id, progress=_prefixed(report, f"layer {n}/{len(blobs)}: "))
    image_config = config.get("config") or {}
    env: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep and name:
            env[name] = value
    template_config: dict[str, Any] = {"env": env}
    if image_config.get("WorkingDir"):
        template_config["workdir"] = str(image_config["WorkingDir"])
    if image_config.get("User"):
        template_config["image_user"] = str(image_config["User"])
    command = [*(image_config.get("Entrypoint") or []), *(image_config.get("Cmd") or [])]
    if command:
        template_config["image_cmd"] = [str(c) for c in command]
    return Image(list(reversed(diff_ids)), template_config, source, shared)


def _prefixed(report: Report, prefix: str) -> Report:
    return lambda line: report(prefix + line)


def _json_blob_path(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ImageError(f"the image's {what} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ImageError(f"the image's {what} is not a JSON object")
    return data


def pull(
    store: LayerStore, reference: str, report: Report, insecure: bool = False, login: tuple[str, str] | None = None
) -> Image:
    """Pull ``reference`` from its registry into the store; ``login`` (username, password) for a
    private registry, given to skopeo in an auth file of the staging dir (root-only, removed after),
    never on its command line (which any host user can read)."""
    ref = parse_reference(reference)
    probe_registry(ref, insecure)
    extra = ["--src-tls-verify=false"] if insecure or ref.loopback() else []
    staging = store.staging()
    try:
        if login is not None:
            auth_file = staging / "auth.json"
            token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"auths": {ref.registry: {"auth": token}}}, out)
            extra += ["--src-authfile", str(auth_file)]
        _copy(f"docker://{ref}", staging / "oci", report, extra)
        return _store_layout(store, staging / "oci", f"docker://{ref}", report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def archive_kind(path: Path) -> str:
    """``oci-archive`` (has ``oci-layout``) or ``docker-archive`` (``docker save``: ``manifest.json``)."""
    try:
        with tarfile.open(path) as tar:
            names = {name.lstrip("./") for name in tar.getnames()}
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"'{path}' is not an image archive: {exc}") from None
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise ImageError(
        f"'{path}' is neither an OCI archive (no oci-layout and index.json) nor a `docker save` tarball "
        "(no manifest.json); for a root filesystem tarball use `sandboxd template add NAME --rootfs`"
    )


def import_archive(store: LayerStore, path: Path, report: Report) -> Image:
    """Import an OCI archive or a ``docker save`` tarball into the store."""
    if not path.is_file():
        raise ImageError(f"'{path}' is not a file")
    kind = archive_kind(path)
    staging = store.staging()
    try:
        _copy(f"{kind}:{path.resolve()}", staging / "oci", report, [])
        return _store_layout(store, staging / "oci", f"{kind}:{path.resolve()}", report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
