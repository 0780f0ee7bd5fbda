"""Template builds: E2B's ``Template`` steps run in a build sandbox, kept as a layer over the parent's.

A build (the SDKs' ``Template.build``, through :mod:`.template_api`) names a parent (``fromTemplate``,
or ``fromImage``: Debian and E2B's base images are this runtime's ``base``; any other image is pulled
from its registry, :mod:`.oci`, and recorded as a template of its own) and a list of steps. It
runs them in an ordinary sandbox of the parent, created through the runtime's own manager, so a build
has exactly the isolation of any sandbox (its own user namespace and host id range, seccomp, cgroup
limits, its own disk, network egress) and its steps are treated as what they are: untrusted code.
Nothing of a user's step runs on the host or as host root.

Steps go through the sandbox's agent as a client's would (:mod:`.agent_client`):

* ``RUN cmd [user]``: ``bash -l -c cmd`` as the step's user (the build's current one: the parent's
  default user, ``user`` in ``base``, as on E2B, until a ``USER`` step), in the current workdir,
  with the build's env; its output is the build's log, and a non-zero exit fails the build with
  that output in the logs;
* ``ENV k v ...``: for the following steps and for the template's sandboxes;
* ``WORKDIR dir``: created (``mkdir -p``), the following steps' cwd and the sandboxes' default;
* ``USER name``: the following steps' user and the sandboxes' default (created, with a home, when
  the image lacks it, as E2B's builds do);
* ``COPY src dest [user] [mode]``: the uploaded archive (``GET /templates/{id}/files/{hash}``) is
  written into the sandbox and unpacked there, by ``tar`` in the sandbox, as Docker's ``COPY`` places
  things (a directory's contents into ``dest``; a file into ``dest/`` or as ``dest``), then owned by
  the user and given the mode.

At a layer cut the sandbox's processes are stopped (its disk kept), its writable layer becomes a
layer (:mod:`.build_layer`: canonical owners, overlay whiteouts and opaque dirs kept), the sandbox
goes, and the next steps run in a new build sandbox over the layers so far. The template is its
build's layers on top of the parent's layers, which are shared, never copied.

The cache is per step, as E2B's: each step's key chains the previous step's key with the step (its
type, arguments and copied files' hash), and each cut layer (and each step that changed no file) is
cached under its step's key with the env, user and workdir after it. A build resumes from its
longest cached prefix (those steps are logged ``CACHED``), over that prefix's layers; a step's
``force`` (``skip_cache``) or the build's reruns from there. Layers are cut where they pay
(:data:`CUT_AFTER_S`), at most :data:`MAX_BUILD_LAYERS` per build, and always after the last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import build_layer, oci, snapshots
from .agent_client import CommandResult, run_command, upload_file
from .errors import ApiError
from .layers import LayerError, LayerInfo, recipe_digest
from .manager import DISK_IMAGE, CreateRequest, SandboxManager
from .store import SandboxRow, TemplateRow
from .template_uploads import COLLECT_EVERY_S, HASH, Held, Uploads
from .templates import ALIASES, BASE, BUILTIN, DEFAULT_TAG, HIDDEN_PREFIX, TAG_SEPARATOR, Templates, check_tags

log = logging.getLogger("sandboxd.runtime")

BUILD_METADATA = "sandboxd.template-build"
"""The metadata key that marks a build sandbox (its value is the build's id)."""

BUILD_SANDBOX_TIMEOUT_S = 3600
"""A build sandbox's lifetime: a build that takes longer is ended with it."""

PARENT_WAIT_S = 1800.0
"""How long a build waits for a built-in parent (``base`` on a fresh store) being built: a build has
no request timeout to stay under, unlike a create."""

MAX_LOG_ENTRIES = 10000
"""Log entries kept per build (the oldest are dropped past it): a step's output is bounded."""

MAX_BUILDS = 256
"""Build records kept (status and log, for ``get_build_status``); past it the oldest finished one
is forgotten, so memory stays bounded however many builds are requested."""

STATUS_PAGE = 100
"""Entries per status answer, as E2B's API gives (the SDK keeps asking until it gets none)."""

MAX_STEPS = 256
"""Steps per build: a build is a list a person wrote."""

CUT_AFTER_S = 1.0
"""A step's layer is cut (and cached) once the steps since the last cut took this long: a cut (pause
the build sandbox, store its writable layer, start the next sandbox over it) costs about 0.1 s here
for a small layer (``benches/templates.py``; the build log's "cut ... in" and "started ... in"
lines), so cutting after quicker steps would slow a first build by more than a rebuild saves. The
last step's layer is always cut. Steps that leave processes running are not cut after (a cut ends
the sandbox, and a later step may use them, as a build on E2B may)."""

MAX_BUILD_LAYERS = 8
"""Layers one build puts over its parent's: once a build has cut this many less one, the rest of its
steps share one layer (no squash needed: a run of steps is one layer). overlayfs takes its lower
dirs in one page of mount options (about 35 layers at the default store path,
:meth:`.Templates.max_layers`), and a template is the parent of the next one's build."""

LAYER_HEADROOM = 8
"""Layers left free under that limit by cuts before the last step, for builds ``from_template`` of
this one (past it a build keeps one layer for the rest of its steps)."""

MAX_ARG = 64 << 10
"""Bytes per step argument (a command line, a path)."""

MAX_LOGIN = 4096
"""Bytes of a registry username or password (registry tokens used as passwords run to a few KiB)."""

DEBIAN_IMAGES = re.compile(
    r"(?:docker\.io/)?(?:library/)?debian(?::[a-z0-9._-]+)?|(?:docker\.io/)?e2bdev/base(?::[a-z0-9._-]+)?"
)
"""``from_debian_image`` (``debian:<variant>``) and ``from_base_image`` (``e2bdev/base``): this
runtime's ``base``, Debian with E2B's base contents (``docs/templates.md``)."""

TAIL_LINES = 20
"""Output lines of a failed step quoted in the build's failure reason (all of it is in the log)."""

LEFT_RUNNING = (
    'cd /proc && for p in [0-9]*; do [ "$p" -gt 2 ] && [ "$p" != "$$" ] || continue;'
    ' read -r s 2>/dev/null < "$p/stat" || continue; s=${s##*) }; case $s in Z*|X*) continue ;; esac;'
    ' echo "$p"; done; true'
)
"""The processes of a build sandbox but its init and agent (pids 1 and 2) and this shell, from shell
builtins alone (no ``ps`` in every image). Not a zombie (``Z``, or ``X`` being reaped): a process a
step killed as it ended is one until the init reaps it, and is no server a later step could use
(CI53: a step's ``kill`` of its server, then this check before the init's reap, kept a layer uncut)."""

LEFT_RUNNING_RECHECK_S = 0.1
"""How long the build waits to look again when processes seem left running: a process sent a signal
by the step's last command may not have run to its exit yet on a busy host."""

COPY_SCRIPT = r"""set -eu
archive=$1; src=$2; dest=$3; owner=$4; mode=$5
tmp=$(mktemp -d /tmp/.sandboxd-copy.XXXXXX)
trap 'rm -rf "$tmp" "$archive"' EXIT
tar -xf "$archive" -C "$tmp" --no-same-owner
from="$tmp/$src"
[ -e "$from" ] || [ -L "$from" ] || { echo "copy: '$src' is not in the uploaded files" >&2; exit 1; }
if [ -n "$owner" ]; then chown -R -h "$owner" "$tmp"; fi
if [ -n "$mode" ]; then find "$tmp" -mindepth 1 ! -type l -exec chmod "$mode" {} +; fi
if [ -d "$from" ] && [ ! -L "$from" ]; then
  mkdir -p "$dest"; cp -a "$from/." "$dest/"
else
  case "$dest" in
    */) mkdir -p "$dest"; cp -a "$from" "$dest" ;;
    *) mkdir -p "$(dirname "$dest")"; cp -a "$from" "$dest" ;;
  esac
fi
"""
"""Run by root in the build sandbox (its own tar and coreutils), never on the host."""


class BuildFailed(Exception):
    """A step failed: ``step`` is its number (1-based, as E2B reports it) or ``base``/``finalize``."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True, slots=True)
class Step:
    type: str
    args: tuple[str, ...]
    files_hash: str | None
    force: bool


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """A validated build trigger (E2B's ``TemplateBuildStartV2``)."""

    parent: str
    """The template to build on (for ``image``: the name its pull is recorded under)."""
    image: str | None
    """``fromImage`` of an image that is not Debian's: pulled from its registry first."""
    steps: tuple[Step, ...]
    force: bool
    start_cmd: str | None
    ready_cmd: str | None
    login: tuple[str, str] | None = field(default=None, repr=False)
    """``fromImageRegistry`` of type ``registry``: the username and password to pull ``image`` with
    (used for the pull only: not logged, not stored, not in a cache key)."""

    def keys(self, parent_row: TemplateRow) -> list[str]:
        """Each step's cache key, chained as E2B chains them: the previous step's key (the first step's
        is the parent's layers and config) with this step's type, arguments and files' hash. A step's
        key names everything before it, so a changed step changes its own key and every later one."""
        key = recipe_digest({"parent": {"layers": parent_row.layers, "config": inherited(parent_row.config)}})
        out = []
        for step in self.steps:
            key = recipe_digest({"previous": key, "step": [step.type, list(step.args), step.files_hash]})
            out.append(key)
        return out

    def cacheable(self) -> int:
        """How many leading steps may come from the cache: none with the build's ``force``, else
        those before the first ``skip_cache`` step (which reruns, with every step after it)."""
        if self.force:
            return 0
        return next((index for index, step in enumerate(self.steps) if step.force), len(self.steps))


def inherited(config: dict[str, Any]) -> dict[str, Any]:
    """What of a parent's config a template built on it keeps: not the parent's own build id (a
    rebuild's is new), nor whose snapshot it was (a template built on a snapshot is no snapshot), nor
    its sizes (as on E2B, each build has its own ``cpuCount``/``memoryMB``, the defaults if not given)."""
    dropped = ("build_id", snapshots.SOURCE_KEY, "cpu_count", "memory_mb")
    return {k: v for k, v in config.items() if k not in dropped}


@dataclass(slots=True)
class LogLine:
    timestamp: float
    level: str
    message: str
    step: str | None = None


@dataclass(slots=True)
class Build:
    """One build: what it builds, its status and its log."""

    template_id: str
    build_id: str
    name: str
    tags: list[str]
    cpu_count: int | None = None
    """Each of its sandboxes' CPUs (E2B's ``cpuCount``); None: the runtime's ``--sandbox-cpus``."""
    memory_mb: int | None = None
    """Each of its sandboxes' memory in MiB (``memoryMB``); None: the runtime's ``--sandbox-memory-mb``."""
    status: str = "waiting"
    """``waiting`` (requested, not triggered), ``building``, ``ready`` or ``error``."""
    logs: list[LogLine] = field(default_factory=list)
    dropped: int = 0
    """Log entries dropped from the front past :data:`MAX_LOG_ENTRIES` (offsets stay stable)."""
    reason: BuildFailed | None = None
    task: asyncio.Task[None] | None = None
    uploads: Held = field(default_factory=Held)
    """The uploads its ``COPY`` steps use, held from its trigger to its end (:mod:`.template_uploads`)."""

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        self.logs.append(LogLine(time.time(), level, message, step))
        if len(self.logs) > MAX_LOG_ENTRIES:
            del self.logs[0]
            self.dropped += 1

    def page(self, offset: int, limit: int) -> list[LogLine]:
        start = max(offset - self.dropped, 0)
        return self.logs[start : start + limit]


def parse_name(raw: str, tags: list[str]) -> tuple[str, list[str]]:
    """E2B's ``name`` or ``name:tag`` with the request's ``tags``: the template's name and the tags its
    build gets (``default`` when none is named, as E2B does); 400 on a bad tag."""
    name, _, tag = raw.partition(TAG_SEPARATOR)
    return name, check_tags([*([tag] if tag else []), *tags]) or [DEFAULT_TAG]


def parse_spec(body: dict[str, Any]) -> BuildSpec:
    """A trigger body, checked field by field (400 naming the field)."""
    from_template = body.get("fromTemplate")
    from_image = body.get("fromImage")
    if from_template is not None and not isinstance(from_template, str):
        raise ApiError(400, "'fromTemplate' must be a string")
    if from_image is not None and not isinstance(from_image, str):
        raise ApiError(400, "'fromImage' must be a string")
    login = _registry_login(body.get("fromImageRegistry"))
    if login is not None and (not from_image or from_template):
        raise ApiError(400, "'fromImageRegistry' goes with 'fromImage' (the SDK's from_image with a username)")
    image = None
    if from_template:
        parent = from_template
    elif from_image and DEBIAN_IMAGES.fullmatch(from_image):
        parent = BASE
    elif from_image:
        try:
            oci.parse_reference(from_image)
        except oci.ImageError as exc:
            raise ApiError(400, f"'fromImage': {exc}") from None
        image = from_image
        parent = "image-" + hashlib.sha256(from_image.encode()).hexdigest()[:16]
    else:
        raise ApiError(400, "a build needs 'fromTemplate' or 'fromImage' (the SDK's from_template, from_image, ...)")
    raw_steps = body.get("steps") or []
    if not isinstance(raw_steps, list) or len(raw_steps) > MAX_STEPS:
        raise ApiError(400, f"'steps' must be an array of at most {MAX_STEPS} steps")
    steps = []
    for index, raw in enumerate(raw_steps):
        where = f"steps[{index}]"
        if not isinstance(raw, dict):
            raise ApiError(400, f"'{where}' must be an object")
        kind = raw.get("type")
        args = raw.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) and len(a) <= MAX_ARG for a in args):
            raise ApiError(400, f"'{where}.args' must be an array of strings of at most {MAX_ARG} bytes")
        files_hash = raw.get("filesHash")
        if files_hash is not None and (not isinstance(files_hash, str) or not HASH.fullmatch(files_hash)):
            raise ApiError(400, f"'{where}.filesHash' must be a sha256 in hex")
        force = raw.get("force") or False
        if not isinstance(force, bool):
            raise ApiError(400, f"'{where}.force' must be a boolean")
        _check_step(where, kind, args, files_hash)
        steps.append(Step(str(kind), tuple(args), files_hash, force))
    force = body.get("force") or False
    start_cmd = body.get("startCmd")
    ready_cmd = body.get("readyCmd")
    if not isinstance(force, bool):
        raise ApiError(400, "'force' must be a boolean")
    for name, value in (("startCmd", start_cmd), ("readyCmd", ready_cmd)):
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"'{name}' must be a string")
    return BuildSpec(parent, image, tuple(steps), force, start_cmd or None, ready_cmd or None, login)


def _registry_login(raw: object) -> tuple[str, str] | None:
    """E2B's ``fromImageRegistry``: ``{type: registry, username, password}`` is a login for the pull;
    the cloud registries' types (``aws``, ``gcp``) need their token exchange, which is not done here."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(400, "'fromImageRegistry' must be an object")
    kind = raw.get("type")
    if kind in ("aws", "gcp"):
        raise ApiError(
            400,
            f"'fromImageRegistry' of type '{kind}' is not supported by sandboxd: give the registry's username and "
            "password (from_image(..., username=, password=)), or log in on the host (skopeo login) and omit them",
        )
    if kind != "registry":
        raise ApiError(400, "'fromImageRegistry.type' must be 'registry' (or E2B's 'aws' or 'gcp')")
    username, password = raw.get("username"), raw.get("password")
    for name, value in (("username", username), ("password", password)):
        if not isinstance(value, str) or not value or len(value) > MAX_LOGIN:
            raise ApiError(400, f"'fromImageRegistry.{name}' must be a non-empty string of at most {MAX_LOGIN} bytes")
    assert isinstance(username, str) and isinstance(password, str)
    if ":" in username:
        raise ApiError(400, "'fromImageRegistry.username' cannot contain ':' (basic authentication's separator)")
    return username, password


def _check_step(where: str, kind: object, args: list[str], files_hash: str | None) -> None:
    counts = {"RUN": (1, 2), "ENV": (2, MAX_STEPS * 2), "WORKDIR": (1, 1), "USER": (1, 1), "COPY": (2, 4)}
    if kind not in counts:
        raise ApiError(400, f"'{where}.type' must be one of {', '.join(counts)}, got {json.dumps(str(kind)[:40])}")
    low, high = counts[str(kind)]
    if not low <= len(args) <= high or (kind == "ENV" and len(args) % 2):
        raise ApiError(400, f"'{where}' ({kind}) has {len(args)} arguments")
    if kind == "COPY":
        if files_hash is None:
            raise ApiError(400, f"'{where}' (COPY) needs 'filesHash' (the upload's hash)")
        src = args[0]
        if src.startswith("/") or ".." in src.split("/"):
            raise ApiError(400, f"'{where}' (COPY): the source must be a relative path inside the build context")
        if not args[1]:
            raise ApiError(400, f"'{where}' (COPY): the destination is empty")
    if kind in ("WORKDIR", "USER") and not args[0]:
        raise ApiError(400, f"'{where}' ({kind}) has an empty argument")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _State:
    """What the steps so far left for the next ones and for the template's sandboxes."""

    env: dict[str, str]
    user: str | None
    """Set by a ``USER`` step (else the parent's); ``None``: the agent's default."""
    workdir: str | None

    @classmethod
    def of(cls, config: dict[str, Any]) -> _State:
        env = config.get("env") or {}
        return cls({str(k): str(v) for k, v in env.items()}, config.get("user") or None, config.get("workdir") or None)

    def config(self) -> dict[str, Any]:
        return {"env": dict(self.env), "user": self.user, "workdir": self.workdir}


@dataclass(slots=True)
class _Session:
    """A build sandbox while its steps run, and what the steps so far left for the next."""

    build: Build
    row: SandboxRow | None
    """The build sandbox (``None`` between a layer cut and the next sandbox)."""
    layers: list[str]
    """The layers it was started over (topmost first): its writable layer goes on top of them."""
    state: _State
    step: str = "base"

    @property
    def sandbox_id(self) -> str:
        assert self.row is not None
        return self.row.id

    @property
    def token(self) -> str:
        assert self.row is not None
        return self.row.access_token

    @property
    def user(self) -> str:
        """Who runs a step that names no user: the current ``USER``, else root."""
        return self.state.user or "root"

    @property
    def workdir(self) -> str | None:
        return self.state.workdir

    @property
    def env(self) -> dict[str, str]:
        return self.state.env


class TemplateBuilder:
    """Every build of this runtime (in memory: a build's record lasts as long as the runtime; the
    templates it makes are in the store and the database)."""

    def __init__(self, manager: SandboxManager, templates: Templates) -> None:
        self.manager = manager
        self.templates = templates
        self.uploads = Uploads(templates.store_dir / "uploads")
        self.builds: dict[str, Build] = {}
        self._collector: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Kill the build sandboxes a previous runtime left (re-adopted with the rest): their builds'
        records went with it, so nothing would ever finish them."""
        for row in self.manager.store.live():
            if BUILD_METADATA in row.metadata:
                with contextlib.suppress(ApiError):
                    await self.manager.kill(row.id, "its template build ended with the runtime that ran it")
        self.templates.forget_hidden()
        self._collector = asyncio.get_running_loop().create_task(self._collect_uploads_every())

    async def _collect_uploads_every(self) -> None:
        while True:
            await self._collect_uploads()
            await asyncio.sleep(COLLECT_EVERY_S)

    async def _collect_uploads(self) -> None:
        try:
            await asyncio.to_thread(self.uploads.collect)
        except OSError as exc:  # the next pass tries again
            log.warning("template uploads: collection failed: %s", exc)

    # ------------------------------------------------------------------------------ requests

    def request(
        self, raw_name: str, tags: list[str], cpu_count: int | None = None, memory_mb: int | None = None
    ) -> Build:
        name, tags = parse_name(raw_name, tags)
        self.templates.check_buildable_name(name)
        build_id = str(uuid.uuid4())
        build = Build(
            template_id=name, build_id=build_id, name=name, tags=tags, cpu_count=cpu_count, memory_mb=memory_mb
        )
        if len(self.builds) >= MAX_BUILDS:
            finished = [b for b in self.builds.values() if b.status in ("ready", "error", "waiting")]
            if not finished:
                raise ApiError(429, f"{MAX_BUILDS} template builds are running; wait for one to finish")
            del self.builds[finished[0].build_id]  # the oldest (dicts keep insertion order)
        self.builds[build.build_id] = build
        return build

    def get(self, template_id: str, build_id: str) -> Build:
        build = self.builds.get(build_id)
        if build is None or build.template_id != template_id:
            raise ApiError(404, f"build '{build_id[:64]}' of template '{template_id[:64]}' not found")
        return build

    def rows(self) -> list[TemplateRow]:
        """Every template a sandbox can be created from here, built-ins once built (``host`` has no
        layers and is left out)."""
        rows = []
        for name in self.templates.names():
            with contextlib.suppress(ApiError):
                template = self.templates.resolve(name)
                row = self.templates.db.template(template.id)
                if row is not None and template.id == name:
                    rows.append(row)
        return rows

    @staticmethod
    def build_id_of(row: TemplateRow) -> str:
        """The build that made a template's row (:meth:`TemplateRow.build_id`)."""
        return row.build_id()

    async def remove(self, name: str) -> None:
        """Forget a template and delete the layers nothing else uses (409 while sandboxes use it).
        Built-in templates are the operator's (``sandboxd template remove`` on the host)."""
        if name.startswith(HIDDEN_PREFIX):
            raise ApiError(404, f"template '{name[:64]}' not found")
        if self.templates.canonical(name) in BUILTIN or name in ALIASES:
            raise ApiError(
                400, f"'{name}' is built in: an operator removes it with `sandboxd template remove` on the host"
            )
        in_use = {row.id: row.template_id for row in self.manager.store.live()}
        try:
            await asyncio.to_thread(
                self.templates.remove, name, lambda t: [i for i, u in in_use.items() if u == t], wait=False
            )
        except ValueError as exc:
            message = str(exc)
            status = 404 if "not found" in message else 409 if "live sandboxes" in message else 400
            raise ApiError(status, message) from None

    def trigger(self, build: Build, spec: BuildSpec) -> None:
        if build.status != "waiting":
            raise ApiError(409, f"build '{build.build_id}' was already started ({build.status})")
        hashes = [step.files_hash for step in spec.steps if step.files_hash is not None]
        try:
            build.uploads = self.uploads.hold(hashes)
        except ApiError as exc:
            raise ApiError(400, f"a COPY step: {exc.message}") from None
        build.status = "building"
        build.task = asyncio.get_running_loop().create_task(self._run(build, spec))

    # --------------------------------------------------------------------------------- builds

    async def _run(self, build: Build, spec: BuildSpec) -> None:
        observe = self.manager.observe
        try:
            with observe.template_build(build.name), contextlib.ExitStack() as held:
                # Held shared until the build is recorded: the cache records it found and the layers
                # it made are not listed by any template yet, and a collection (`template prune`, a
                # template's removal) waits for it instead of taking them.
                await asyncio.to_thread(held.enter_context, self.templates.layers.lock("gc", shared=True))
                await self._build(build, spec)
            build.log(f"Template '{build.name}' is ready", step="finalize")
            build.status = "ready"
        except BuildFailed as exc:
            build.log(f"Build failed: {exc}", "error", exc.step)
            build.reason = exc
            build.status = "error"
        except Exception as exc:  # anything else is this runtime's failure, reported as the build's
            log.exception("template build %s of %s failed", build.build_id, build.name)
            failed = BuildFailed(f"the build failed in sandboxd: {exc}", "finalize")
            build.log(str(failed), "error", "finalize")
            build.reason = failed
            build.status = "error"
        finally:
            build.uploads.close()
        await self._collect_uploads()

    async def _build(self, build: Build, spec: BuildSpec) -> None:
        if spec.image is not None:
            build.log(f"Pulling {spec.image}", step="base")
            try:
                await asyncio.to_thread(self._pull, spec.parent, spec.image, build, spec.login)
            except (oci.ImageError, LayerError, ValueError, OSError) as exc:
                raise BuildFailed(f"the image {spec.image}: {exc}", "base") from None
        build.log(f"Building template '{build.name}' from '{spec.image or spec.parent}'", step="base")
        try:
            await self.templates.prepare(spec.parent, wait=PARENT_WAIT_S)
            parent_row = self.templates.row_of(spec.parent)
        except ApiError as exc:
            raise BuildFailed(f"the parent template '{spec.parent}': {exc.message}", "base") from None
        keys = spec.keys(parent_row)
        found = await asyncio.to_thread(self._longest_cached, keys[: spec.cacheable()])
        done, layers, state = found or (0, list(parent_row.layers), _State.of(parent_row.config))
        for index, step in enumerate(spec.steps[:done], 1):
            build.log(f"CACHED [builder {index}/{len(spec.steps)}] {_describe(step)}", step=str(index))
        if done < len(spec.steps):
            layers, state = await self._run_steps(
                build, spec, parent_row, keys, done, _Session(build, None, layers, state)
            )
        config = {
            **inherited(parent_row.config),
            **state.config(),
            "start_cmd": spec.start_cmd,
            "ready_cmd": spec.ready_cmd,
            "build_id": build.build_id,
            "cpu_count": build.cpu_count,
            "memory_mb": build.memory_mb,
        }
        self.templates.record_build(build.name, layers, config, f"template build from {parent_row.name}", build.tags)

    async def _run_steps(
        self, build: Build, spec: BuildSpec, parent_row: TemplateRow, keys: list[str], done: int, run: _Session
    ) -> tuple[list[str], _State]:
        """Run the steps from ``done`` on in a build sandbox over ``run.layers``. Each step's result is
        cached under its key: a step that changed no file (``ENV``, a ``USER`` that exists) for free, one that did
        when its layer is cut (:data:`CUT_AFTER_S`); the last step's layer is always cut."""
        hidden = f"{HIDDEN_PREFIX}build-{build.build_id}"
        try:
            await self._open(run, parent_row, hidden)
            dirty, since_cut = False, time.monotonic()
            for index in range(done, len(spec.steps)):
                step = spec.steps[index]
                run.step = str(index + 1)
                build.log(f"[builder {index + 1}/{len(spec.steps)}] {_describe(step)}", step=run.step)
                dirty = await self._step(run, step) or dirty
                last = index == len(spec.steps) - 1
                if not dirty:
                    record = {"layers": run.layers, "state": run.state.config()}
                    await asyncio.to_thread(self.templates.layers.cache_put, keys[index], record)
                elif last or (
                    time.monotonic() - since_cut >= CUT_AFTER_S
                    and self._room_for_cut(run, parent_row)
                    and not await self._left_running(run)
                ):
                    await self._cut(run, keys[index], parent_row.name, final=last)
                    dirty = False
                    if not last:
                        await self._open(run, parent_row, hidden)
                    since_cut = time.monotonic()
            return run.layers, run.state
        finally:
            if run.row is not None:
                with contextlib.suppress(ApiError):
                    await self.manager.kill(run.row.id, f"template build {build.build_id} ended")
            self.templates.db.delete_template(hidden)

    async def _open(self, run: _Session, parent_row: TemplateRow, hidden: str) -> None:
        """A build sandbox over ``run.layers``: the parent template itself, or (resuming from a cached
        step or after a cut) a hidden template row of those layers, which no listing shows."""
        template = parent_row.name
        if run.layers != parent_row.layers:
            template = hidden
            config = {**inherited(parent_row.config), **run.state.config()}
            self.templates.db.put_template(
                TemplateRow(hidden, run.layers, config, f"build {run.build.build_id}", time.time())
            )
        started = time.monotonic()
        run.row = await self.manager.create(
            CreateRequest(
                template=template,
                timeout=BUILD_SANDBOX_TIMEOUT_S,
                metadata={BUILD_METADATA: run.build.build_id},
                env_vars={},
            )
        )
        run.build.log(
            f"Build sandbox {run.row.id} started over {len(run.layers)} layers of '{parent_row.name}' "
            f"in {time.monotonic() - started:.2f} s",
            step=run.step,
        )

    async def _cut(self, run: _Session, key: str, parent: str, final: bool) -> None:
        """Keep what the build sandbox's steps changed as a layer on top of ``run.layers``, cached
        under ``key`` (the last step run); the sandbox goes."""
        started = time.monotonic()
        build = run.build
        if final:
            build.log("Saving the template's layer", step="finalize")
        assert run.row is not None
        await self.manager.pause(run.row.id, "filesystem", f"template build {build.build_id}: keeping its layer")
        image = self.manager.sandboxes_dir / run.row.id / DISK_IMAGE
        assert run.row.id_base is not None
        info, layers = await asyncio.to_thread(
            self._layer, image, run.row.id_base, f"build of {build.name}", key, run.layers, run.state
        )
        with contextlib.suppress(ApiError):
            await self.manager.kill(run.row.id, f"template build {build.build_id}: layer kept")
        run.row, run.layers = None, layers
        build.log(
            f"Layer {info.digest[:19]} ({info.size >> 10} KiB, {info.entries} entries) over '{parent}' "
            f"cut after step {run.step} in {time.monotonic() - started:.2f} s",
            step="finalize" if final else run.step,
        )

    def _room_for_cut(self, run: _Session, parent_row: TemplateRow) -> bool:
        """Whether a layer may be cut before the last step: at most :data:`MAX_BUILD_LAYERS` per
        build, and :data:`LAYER_HEADROOM` left under overlayfs' limit for builds on this template."""
        own = len(run.layers) - len(parent_row.layers)
        return own < MAX_BUILD_LAYERS - 1 and len(run.layers) + 2 + LAYER_HEADROOM <= self.templates.max_layers()

    async def _left_running(self, run: _Session) -> bool:
        """Whether the steps left processes running (a server a later step uses, as E2B's builds
        allow): a cut would end them, so the build keeps its sandbox until they are gone. Looked at
        twice, :data:`LEFT_RUNNING_RECHECK_S` apart, before it says so (a process dying as the step
        ended is not left running)."""
        if not await self._processes_left(run):
            return False
        await asyncio.sleep(LEFT_RUNNING_RECHECK_S)
        if not await self._processes_left(run):
            return False
        run.build.log(f"No layer cut after step {run.step}: processes the steps started still run", step=run.step)
        return True

    async def _processes_left(self, run: _Session) -> bool:
        """Whether a process but the init, the agent and the checking shell is in the sandbox now."""
        pids: list[str] = []

        def on_line(stream: str, line: str) -> None:
            if stream == "stdout" and line.strip().isdigit():  # not what a login profile prints
                pids.append(line)

        try:
            result = await run_command(
                self._open_socket(run.sandbox_id), run.token, LEFT_RUNNING, "root", None, {}, on_line
            )
        except (OSError, ValueError):
            return False
        return result.exit_code == 0 and bool(pids)

    async def _step(self, run: _Session, step: Step) -> bool:
        """Run one step; whether it may have changed files (then its layer must be cut to cache it)."""
        if step.type == "ENV":
            run.env.update(zip(step.args[::2], step.args[1::2], strict=True))
            return False
        if step.type == "USER":
            name = step.args[0]
            at_home = run.workdir is not None and run.workdir == await self._home(run, run.user)
            created = not await self._user_exists(run, name)
            if created:  # as E2B's builds: a user the image lacks is made, with a home
                quoted = shlex.quote(name)
                await self._exec(run, f"useradd -m {quoted} 2>/dev/null || adduser -D -g '' {quoted}", "root")
            if at_home:  # the workdir was "home" (E2B's unset one, which base's config spells out): the new user's
                run.state.workdir = await self._home(run, name)
            run.state.user = name
            return created
        if step.type == "WORKDIR":
            target = os.path.join(run.workdir or "/", step.args[0])
            quoted = shlex.quote(target)
            await self._exec(run, f"mkdir -p {quoted} && chown {shlex.quote(run.user)}: {quoted}", "root")
            run.state.workdir = target
        elif step.type == "RUN":
            user = step.args[1] if len(step.args) > 1 and step.args[1] else run.user
            await self._exec(run, step.args[0], user)
        elif step.type == "COPY":
            await self._copy(run, step)
        return True

    async def _user_exists(self, run: _Session, name: str) -> bool:
        return (await self._check(run, f"id -u {shlex.quote(name)}", _ignore)).exit_code == 0

    async def _home(self, run: _Session, name: str) -> str | None:
        """``name``'s home directory in the build sandbox's /etc/passwd (read by the shell: an image
        may have no ``getent``), or None."""
        homes: list[str] = []

        def on_line(stream: str, line: str) -> None:
            if stream == "stdout":
                homes.append(line)

        quoted = shlex.quote(name)
        script = f'while IFS=: read -r n _ _ _ _ h _; do [ "$n" = {quoted} ] && echo "$h"; done < /etc/passwd'
        await self._check(run, script, on_line)
        return homes[0] if homes else None

    async def _check(self, run: _Session, command: str, on_line: Callable[[str, str], None]) -> CommandResult:
        """Run a command of the builder's own as root, quietly: its exit code and output are the answer."""
        try:
            return await run_command(self._open_socket(run.sandbox_id), run.token, command, "root", None, {}, on_line)
        except (OSError, ValueError) as exc:  # ValueError: an answer that is not what an agent sends
            raise BuildFailed(f"step {run.step}: {exc}", run.step) from None

    def _longest_cached(self, keys: list[str]) -> tuple[int, list[str], _State] | None:
        """In a worker thread (a cache file read per step): how many leading steps the cache holds,
        with their layers and state, or None for none."""
        for index in reversed(range(len(keys))):
            record = self.templates.layers.cached(keys[index])
            if record is not None and isinstance(record.get("state"), dict):
                return index + 1, list(record["layers"]), _State.of(record["state"])
        return None

    def _pull(self, name: str, reference: str, build: Build, login: tuple[str, str] | None) -> None:
        """In a worker thread: the image as a template of its own (its layers shared with the build)."""
        self.templates.pull(name, reference, lambda line: build.log(line, step="base"), login=login)

    def _layer(
        self, image: Path, id_base: int, source: str, key: str, below: list[str], state: _State
    ) -> tuple[LayerInfo, list[str]]:
        """In a worker thread: the disk's writable layer stored, and cached under ``key`` while the
        garbage collector is held off (it keeps what a cache record lists)."""
        with self.templates.layers.lock("gc", shared=True):
            info = build_layer.layer_from_disk(self.templates.layers, image, id_base, source)
            layers = [info.digest, *below]
            self.templates.layers.cache_put(key, {"layers": layers, "state": state.config()})
            return info, layers

    def _open_socket(self, sandbox_id: str) -> Callable[[int], Awaitable[socket.socket]]:
        return functools.partial(self.manager.open_socket, sandbox_id)

    async def _exec(self, run: _Session, command: str, user: str, quiet: bool = False) -> None:
        """Run one command of a step; a failure (with the output's last lines) fails the build."""
        tail: list[str] = []

        def on_line(stream: str, line: str) -> None:
            tail.append(line)
            del tail[:-TAIL_LINES]
            if not quiet:
                run.build.log(line, "info" if stream == "stdout" else "warn", run.step)

        try:
            result = await run_command(
                self._open_socket(run.sandbox_id), run.token, command, user, run.workdir, run.env, on_line
            )
        except (OSError, ValueError) as exc:  # ValueError: an answer that is not what an agent sends
            raise BuildFailed(f"step {run.step}: {exc}", run.step) from None
        if result.exit_code != 0:
            shown = "\n".join(tail)
            raise BuildFailed(
                f"step {run.step} failed: '{command[:200]}' as {user} ended with {result.status or 'an error'}"
                + (f": {shown}" if shown else ""),
                run.step,
            )

    async def _copy(self, run: _Session, step: Step) -> None:
        """A COPY step: the upload goes into the sandbox's /tmp, and the sandbox's own tar places it."""
        assert step.files_hash is not None
        fd = run.build.uploads.fd(step.files_hash)  # held since the trigger: not collected meanwhile
        inside = f"/tmp/.sandboxd-upload-{step.files_hash[:16]}.tar"
        size = os.fstat(fd).st_size

        async def chunks() -> AsyncIterator[bytes]:
            offset = 0
            while chunk := await asyncio.to_thread(os.pread, fd, 1 << 20, offset):
                offset += len(chunk)
                yield chunk

        try:
            await upload_file(self._open_socket(run.sandbox_id), run.token, inside, chunks(), size)
        except OSError as exc:
            raise BuildFailed(f"step {run.step}: {exc}", run.step) from None
        src, dest = step.args[0], step.args[1]
        if not dest.startswith("/"):
            dest = os.path.join(run.workdir or "/", dest) + ("/" if dest.endswith("/") else "")
        owner = (step.args[2] if len(step.args) > 2 else "") or run.user
        if ":" not in owner:
            owner += ":"  # and the user's login group, as Docker's COPY --chown=user does
        mode = step.args[3] if len(step.args) > 3 else ""
        arguments = ("sh", "-c", COPY_SCRIPT, "copy", inside, src.rstrip("/") or ".", dest, owner, mode)
        await self._exec(run, " ".join(shlex.quote(a) for a in arguments), "root")


def _ignore(_stream: str, _line: str) -> None:
    """An output handler for a check whose exit code is the answer."""


def _describe(step: Step) -> str:
    return f"{step.type} {' '.join(step.args)}"[:300]


def status_answer(build: Build, offset: int, limit: int) -> dict[str, Any]:
    """E2B's ``TemplateBuildInfo`` for ``GET /templates/{id}/builds/{build}/status``."""
    entries = build.page(offset, limit)
    answer: dict[str, Any] = {
        "templateID": build.template_id,
        "buildID": build.build_id,
        "status": build.status,
        "logs": [f"[{_iso(e.timestamp)}] {e.message}" for e in entries],
        "logEntries": [_entry(e) for e in entries],
    }
    if build.reason is not None:
        answer["reason"] = {
            "message": str(build.reason),
            "step": build.reason.step,
            "logEntries": [_entry(e) for e in build.logs if e.step == build.reason.step][-50:],
        }
    return answer


def _entry(line: LogLine) -> dict[str, Any]:
    entry: dict[str, Any] = {"timestamp": _iso(line.timestamp), "level": line.level, "message": line.message}
    if line.step is not None:
        entry["step"] = line.step
    return entry
