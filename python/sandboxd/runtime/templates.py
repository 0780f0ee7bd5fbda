"""Templates: what a sandbox's root filesystem is made of.

A template is an ordered list of layers in the template store (:mod:`.layers`, shared between
templates, never copied) plus a config (env, user, workdir, and the start and ready commands that
E2B's template builds set), recorded in the runtime's SQLite state. The runtime resolves a name to
its layer directories, which become the sandbox overlay's lower dirs, and hands the config to the
agent with ``/init``.

Built in:

* ``base``: Debian with E2B's base contents (:mod:`.debian`), built once on first need and cached
  in the store. While it builds, a create waits up to :data:`BASE_WAIT_S`, then answers 503 with
  the build's progress (and ``Should-Retry: false``, so the SDK shows the message instead of
  retrying into its own timeout). Where Debian's archive cannot be reached (or mmdebstrap is
  missing), ``base`` falls back to ``host`` with a warning naming why, and the sandbox's
  ``templateID`` says ``host``.
* ``host``: the host's read-only ``/usr`` with a private ``/etc`` and home (no download; what
  sandboxd had before ``base`` was a Debian build). For machines with no package archive in reach.
* ``code-interpreter-v1`` (also ``code-interpreter``): ``base`` plus the kernels and data stack of
  E2B's code-interpreter template, one layer on top of ``base`` (:mod:`.code_interpreter`), built
  the same way: once, on first need (``base`` first if need be), with progress, and the same wait
  and 503. Its sandboxes start the code interpreter (``runCode``, port 49999). Where the package
  index cannot be reached it falls back to ``base`` (whose sandboxes have no code interpreter), as
  ``base`` falls back to ``host``.
* ``desktop``: a name the SDKs ask for by default, resolved to ``base`` until a template of its own
  exists.

Imported (``sandboxd template add|import|pull``): a root filesystem directory or tarball, an OCI
archive or ``docker save`` tarball, or an image pulled from a registry (:mod:`.oci`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxd import _core

from . import build_layer, code_interpreter, debian, oci
from .errors import ApiError
from .layers import LayerError, LayerInfo, LayerStore
from .store import Store, TemplateRow

if TYPE_CHECKING:
    from .observe import Observer

log = logging.getLogger("sandboxd.runtime")

BASE = "base"
HOST = "host"
CODE_INTERPRETER = code_interpreter.NAME
BUILTIN = (BASE, HOST, CODE_INTERPRETER)
BUILT = (BASE, CODE_INTERPRETER)
"""The built-in templates built on first need."""
ALIASES = {"code-interpreter": CODE_INTERPRETER, "desktop": BASE}
"""Other names the SDKs ask for, resolved to the built-in template that stands for them."""

BASE_WAIT_S = 40.0
"""How long a create waits for a build in progress before answering with its progress: under the
SDKs' default request timeout (60 s), so the user reads our message, not a timeout."""

FALLBACK_RETRY_S = 60.0
"""After a build was found impossible here (no archive or index in reach), creates use the fallback
template for this long before trying again."""

MAX_OVERLAY_OPTIONS = 4000
"""overlayfs takes its lower dirs in one mount option string of at most a page (4096 bytes), which
also holds the upper and work dirs."""

OVERLAY_LOWER_BYTES = MAX_OVERLAY_OPTIONS - 600
"""What of it the lower dirs may take (the rest: the upper and work dirs' paths)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

TAG_SEPARATOR = ":"
DEFAULT_TAG = "default"
"""E2B's tags: ``name:tag`` names one build of a template; ``name`` is ``name:default``, the tag a
build gets when it names none. A tag's build is a row of its own, ``name:tag`` (a name cannot hold
``:``), listing that build's layers; ``name``'s row is the default tag's."""

_TAG = re.compile(r"[a-z0-9._-]{1,63}")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

HIDDEN_PREFIX = "."
"""Template rows a build makes for its own build sandboxes (a cached step's layers to resume over):
no template name can start with it, and no listing or ``exists`` shows them (a create needs the build's
id in the name, which only the API key's holder has)."""

Report = Callable[[str], None]


def sizes(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """A template's own CPU count and memory (MiB), kept in its config by the build that asked for them
    (or the snapshot that took them from its sandbox); None where it did not: the runtime's defaults
    (``--sandbox-cpus``, ``--sandbox-memory-mb``). Records made before sizes were kept have none."""

    def positive(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    return positive(config.get("cpu_count")), positive(config.get("memory_mb"))


@dataclass(frozen=True, slots=True)
class Template:
    """What a sandbox is started from."""

    id: str
    """The canonical name (an alias resolves to the template it names)."""
    layers: tuple[Path, ...]
    """Overlay lower dirs, topmost first."""
    host_usr: bool
    """Bind the host's ``/usr`` read-only into the sandbox (the ``host`` template)."""
    config: dict[str, Any] = field(default_factory=dict)
    """``env`` (dict), ``user``, ``workdir``, ``start_cmd``, ``ready_cmd``, ``cpu_count``, ``memory_mb``."""

    @property
    def cpu_count(self) -> int | None:
        """CPUs of each of its sandboxes (E2B's ``cpuCount`` of its build); None: the runtime's default."""
        return sizes(self.config)[0]

    @property
    def memory_mb(self) -> int | None:
        """Memory (MiB) of each of its sandboxes (E2B's ``memoryMB``); None: the runtime's default."""
        return sizes(self.config)[1]

    @property
    def env(self) -> dict[str, str]:
        env = self.config.get("env") or {}
        return {str(k): str(v) for k, v in env.items()}

    @property
    def user(self) -> str | None:
        return self.config.get("user") or None

    @property
    def workdir(self) -> str | None:
        return self.config.get("workdir") or None

    @property
    def start_cmd(self) -> str | None:
        """Started in each new sandbox (E2B's ``set_start_cmd``), before ``ready_cmd`` is polled."""
        return self.config.get("start_cmd") or None

    @property
    def ready_cmd(self) -> str | None:
        """Run until it exits 0 before a create returns."""
        return self.config.get("ready_cmd") or None

    @property
    def code_interpreter(self) -> bool:
        """Whether its sandboxes start the code interpreter (``runCode``, port 49999)."""
        return self.config.get("code_interpreter") is True


@dataclass(slots=True)
class _Build:
    """A built-in template's build in this runtime: its progress, the task running it, and whether
    creates use the fallback for now because it cannot be built here."""

    progress: debian.BuildProgress = field(default_factory=debian.BuildProgress)
    task: asyncio.Future[tuple[list[str], dict[str, Any]]] | None = None
    fallback_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Listed:
    """A template as ``sandboxd template list`` shows it."""

    name: str
    state: str
    """``ready``, ``not built`` (base before its first build) or ``missing layers``."""
    source: str
    layers: list[str]
    size: int


def split_tag(name: str) -> tuple[str, str]:
    """``name:tag`` (or ``name``: the default tag) as its name and tag."""
    base, _, tag = name.partition(TAG_SEPARATOR)
    return base, tag or DEFAULT_TAG


def tagged(name: str, tag: str) -> str:
    """The row name of a template's tag: the default tag's is the template's own name."""
    return name if tag == DEFAULT_TAG else f"{name}{TAG_SEPARATOR}{tag}"


def check_tags(tags: list[str]) -> list[str]:
    """E2B's tag rule (lowercase letters, digits, ``.``, ``_``, ``-``; not a build id), lowercased,
    duplicates dropped in order; 400 naming the tag that breaks it."""
    out: list[str] = []
    for raw in tags:
        tag = raw.strip().lower()
        if not _TAG.fullmatch(tag) or _UUID.fullmatch(tag):
            raise ApiError(400, f"tag '{raw[:80]}' must be 1-63 of a-z, 0-9, '.', '_', '-' and not a build id (a UUID)")
        if tag not in out:
            out.append(tag)
    return out


def default_store_dir(data_dir: Path) -> Path:
    return data_dir / "templates"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name in BUILTIN or name in ALIASES:
        raise ValueError(f"template name '{name}' must match {_NAME.pattern} and not be a built-in name or alias")


def _check_store_path(path: Path) -> None:
    if any(c in str(path) for c in ",:\\") or any(c.isspace() for c in str(path)):
        raise ValueError(f"template store '{path}': overlayfs cannot take paths containing ',', ':', '\\' or spaces")


class Templates:
    """The templates of one runtime: its SQLite rows, over a (possibly shared) template store."""

    def __init__(
        self,
        store: Store,
        store_dir: Path,
        mirror: str = debian.DEFAULT_MIRROR,
        index_url: str = code_interpreter.DEFAULT_INDEX,
    ) -> None:
        _check_store_path(store_dir.resolve())
        self.db = store
        self.store_dir = store_dir.resolve()
        self.layers = LayerStore(self.store_dir)
        self.layers.register_user(store.path)
        self.recipe = debian.Recipe(mirror=mirror)
        self.interpreter_recipe = code_interpreter.Recipe(self.recipe, index_url)
        self.host_dir = self.store_dir / HOST
        self._builds = {name: _Build() for name in BUILT}
        self._build_processes: list[subprocess.Popen[bytes]] = []
        self.observe: Observer | None = None
        """The runtime's observer: base builds go through its ``template_build`` hook."""
        self._keys: dict[str, str] = {}
        """The built-in templates' cache keys (:meth:`_key`), once each: a recipe is a frozen value."""
        self._records: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        """Build cache records as :meth:`_cached_record` last read them, with their file's signature."""

    # -------------------------------------------------------------------------------- builtins

    def ensure_host(self) -> None:
        """Build (or refresh, idempotently) the ``host`` template's root from this host's files."""
        _core.build_base_template(str(self.host_dir))

    def _host(self) -> Template:
        return Template(HOST, (self.host_dir,), True)

    def _template(self, row: TemplateRow, present: bool = False) -> Template:
        """``row``'s template; ``present``: its layers were just looked for, not again."""
        paths = tuple(self.layers.path(d) for d in row.layers)
        missing = [] if present else [d for d in row.layers if not self.layers.has(d)]
        if missing:
            raise ApiError(
                409,
                f"template '{row.name}' lists layers that are not in the template store {self.store_dir}: "
                f"{', '.join(missing)}; import it again",
            )
        options = sum(len(str(p)) + 1 for p in paths)
        if options > OVERLAY_LOWER_BYTES:
            raise ApiError(
                409,
                f"template '{row.name}' has {len(paths)} layers, more than overlayfs takes at this store's path "
                f"length; squash the image or use a shorter --template-store path",
            )
        return Template(row.name, paths, False, row.config)

    def max_layers(self) -> int:
        """How many layers a template of this store can have (its layer paths are all this long)."""
        return OVERLAY_LOWER_BYTES // (len(str(self.layers.path("sha256:" + "0" * 64))) + 1)

    def _key(self, name: str) -> str:
        """The build cache key of a built-in template's current recipe: hashed once (its canonical
        JSON is ~10 us of every create's path otherwise), as the recipes are frozen values."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = self.recipe.key() if name == BASE else self.interpreter_recipe.key()
        return key

    def _describe(self, name: str) -> str:
        return self.recipe.describe() if name == BASE else self.interpreter_recipe.describe()

    def _ready(self, name: str) -> Template | None:
        """A built-in template once built: the current recipe's cached build (recorded as this
        runtime's row of that name), or an older build this runtime already uses."""
        cached = self._cached_record(self._key(name))
        row = self.db.template(name)
        if cached is not None:
            if row is None or row.layers != cached["layers"]:
                row = TemplateRow(
                    name, list(cached["layers"]), dict(cached["config"]), self._describe(name), time.time()
                )
                self.db.put_template(row)
            return self._template(row, present=True)
        if row is not None and all(self.layers.has(d) for d in row.layers):
            return self._template(row, present=True)
        return None

    def _cached_record(self, key: str) -> dict[str, Any] | None:
        """``self.layers.cached(key)`` for every create of a built-in template, its file read and
        parsed again only when it changed: the store replaces a record by renaming a new file over
        it (a new inode), and any write changes its ctime. The layers it lists are looked for every
        time, as ``cached`` does (another process may collect them). The record is only read here
        (:meth:`_ready` copies what it keeps)."""
        path = self.layers.cache / self.layers.cache_record_name(key)
        try:
            st = os.stat(path)
        except OSError:
            self._records.pop(key, None)
            return self.layers.cached(key)
        signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._records.get(key)
        if known is None or known[0] != signature:
            # Read after the stat: a record replaced in between is kept under the older signature,
            # so the next create, seeing a newer one, reads it again.
            record = self.layers.cached(key)
            if record is None:
                self._records.pop(key, None)
                return None
            self._records[key] = (signature, record)
            return record
        record = known[1]
        return record if all(self.layers.has(d) for d in record.get("layers", [])) else None

    def _fallback(self, name: str) -> Template:
        """Where creates asking for a built-in template go while it cannot be built here: ``host``
        for ``base``; ``base`` (else ``host``) for the code interpreter's."""
        if name == CODE_INTERPRETER:
            return self._ready(BASE) or self._host()
        return self._host()

    # ------------------------------------------------------------------------------ resolving

    def canonical(self, name: str) -> str:
        """An alias's template, and ``name:default`` as ``name``."""
        base, tag = split_tag(name)
        return tagged(ALIASES.get(base, base), tag)

    def resolve(self, name: str) -> Template:
        """The template called ``name`` (or an alias), without building anything: 404 naming the
        known templates if there is none (a built-in one not yet built resolves to its fallback)."""
        canonical = self.canonical(name)
        if canonical == HOST:
            return self._host()
        if canonical in BUILT:
            return self._ready(canonical) or self._fallback(canonical)
        row = self.db.template(canonical)
        if row is None and TAG_SEPARATOR in canonical:
            base, tag = split_tag(canonical)
            tags = self.tags(base)
            row = next((r for t, r in tags if _UUID.fullmatch(tag) and r.config.get("build_id") == tag), None)
            if row is None and tags:
                raise ApiError(
                    404, f"template '{base}' has no tag or build '{tag}'; its tags: {', '.join(t for t, _ in tags)}"
                )
        if row is None:
            raise ApiError(404, f"template '{name}' not found; known templates: {', '.join(self.names())}")
        return self._template(row)

    def tags(self, name: str) -> list[tuple[str, TemplateRow]]:
        """The tags of a template made here (``default`` first when it has it), with their rows."""
        rows = self.db.templates()
        out = [(DEFAULT_TAG, r) for r in rows if r.name == name]
        out += [(r.name[len(name) + 1 :], r) for r in rows if r.name.startswith(name + TAG_SEPARATOR)]
        return out

    def built(self, name: str) -> Template | None:
        """Like :meth:`prepare`, but never starts a build: a built-in template not built yet (or only
        its fallback) is None. For the default warm pool, which leaves the first build to a create."""
        canonical = self.canonical(name)
        if canonical in BUILT:
            return self._ready(canonical)
        return self.resolve(canonical)

    async def prepare(self, name: str, wait: float = BASE_WAIT_S) -> Template:
        """For a create: like :meth:`resolve`, but a built-in template is built if it is not yet
        (waiting up to ``wait`` seconds), or falls back where it cannot be built."""
        canonical = self.canonical(name)
        if canonical not in BUILT:
            return self.resolve(canonical)
        ready = self._ready(canonical)
        if ready is not None:
            return ready
        build = self._builds[canonical]
        if time.monotonic() < build.fallback_until:
            return self._fallback(canonical)
        loop = asyncio.get_running_loop()
        if build.task is None or build.task.done():
            build.progress = debian.BuildProgress(started=time.monotonic())
            log.info("template %s: building %s, once (progress follows)", canonical, self._describe(canonical))
            build.task = loop.run_in_executor(None, self._build_blocking, canonical)
        task = build.task
        await asyncio.wait({task}, timeout=wait)
        if not task.done():
            what = (
                "from Debian's archive"
                if canonical == BASE
                else "(base from Debian's archive if need be, then Python packages from the package index)"
            )
            raise ApiError(
                503,
                f"template '{canonical}' is being built {what}, the first time for this template store "
                f"(a few minutes, once): {build.progress.line()}. Retry when `sandboxd serve` logs "
                f"'template {canonical}: ready' (`sandboxd template build {canonical}` builds it ahead of time)",
                headers=[("Should-Retry", "false")],
            )
        error = task.exception()
        if isinstance(error, debian.BuildUnavailable):
            build.fallback_until = time.monotonic() + FALLBACK_RETRY_S
            fallback = self._fallback(canonical)
            log.warning(
                "template %s cannot be built: %s; sandboxes asking for '%s' get '%s' until it can be (tried again "
                "in %ds)",
                canonical,
                error,
                canonical,
                fallback.id,
                FALLBACK_RETRY_S,
            )
            return fallback
        if error is not None:
            raise ApiError(
                503,
                f"building template '{canonical}' failed: {error}. The next create tries again",
                headers=[("Should-Retry", "false")],
            )
        ready = self._ready(canonical)
        if ready is None:  # pragma: no cover - the build just recorded it
            raise ApiError(
                503, f"template '{canonical}' was built but is not in the store", headers=[("Should-Retry", "false")]
            )
        return ready

    def _build_blocking(self, name: str, report: Report | None = None) -> tuple[list[str], dict[str, Any]]:
        """Build a built-in template (in a worker thread, or the CLI's process)."""
        if report is None:

            def report(line: str) -> None:
                log.info("template %s: %s", name, line)

        progress = self._builds[name].progress
        processes = self._build_processes
        with self.observe.template_build(name) if self.observe is not None else contextlib.nullcontext():
            if name == BASE:
                result = debian.build(self.layers, self.recipe, progress, report, processes)
            else:
                result = code_interpreter.build(self.layers, self.interpreter_recipe, progress, report, processes)
        report("ready")
        return result

    def close(self) -> None:
        """End a build in progress (the runtime is stopping; the next one starts it over)."""
        for process in self._build_processes:
            if process.poll() is None:
                process.kill()  # unshare: its --kill-child ends the build and its pid namespace

    # -------------------------------------------------------------------------------- listing

    def names(self) -> list[str]:
        return sorted({*BUILTIN, *ALIASES, *(split_tag(row.name)[0] for row in self._rows(tags=True))})

    def _rows(self, tags: bool = False) -> list[TemplateRow]:
        """The template rows a person made (their default tags, or with ``tags`` every tag's), without
        a build's hidden ones (:data:`HIDDEN_PREFIX`)."""
        rows = [row for row in self.db.templates() if not row.name.startswith(HIDDEN_PREFIX)]
        return rows if tags else [row for row in rows if TAG_SEPARATOR not in row.name]

    def forget_hidden(self) -> None:
        """Delete the hidden rows of builds that ended with a previous runtime."""
        for row in self.db.templates():
            if row.name.startswith(HIDDEN_PREFIX):
                self.db.delete_template(row.name)

    def listing(self) -> list[Listed]:
        out = [Listed(HOST, "ready", "the host's /usr, read-only, with a private /etc", [], 0)]
        for name in BUILT:
            if self._ready(name) is None:
                out.append(Listed(name, "not built", self._describe(name), [], 0))
        for row in self._rows():
            present = all(self.layers.has(d) for d in row.layers)
            size = sum(info.size for d in row.layers if (info := self.layers.info(d)) is not None)
            out.append(Listed(row.name, "ready" if present else "missing layers", row.source, row.layers, size))
        return out

    # ------------------------------------------------------------------------ adding, removing

    def _record(self, name: str, layers: list[str], config: dict[str, Any], source: str) -> TemplateRow:
        row = TemplateRow(name, layers, config, source, time.time())
        self.db.put_template(row)
        return row

    def add_rootfs(self, name: str, rootfs: Path, report: Report) -> TemplateRow:
        """A root filesystem directory or tarball, stored as one layer."""
        _check_name(name)
        if rootfs.is_dir():
            if not (rootfs / "bin").exists() and not (rootfs / "usr" / "bin").exists():
                raise ValueError(f"'{rootfs}' does not look like a root filesystem (no /bin or /usr/bin)")
            with self.layers.lock("gc", shared=True):
                info = self.layers.import_directory(rootfs.resolve(), f"rootfs {rootfs.resolve()}", report)
                return self._record(name, [info.digest], {}, f"rootfs {rootfs.resolve()}")
        if rootfs.is_file():
            with self.layers.lock("gc", shared=True):
                try:
                    with rootfs.open("rb") as raw:
                        info = self.layers.import_tar(raw, f"rootfs {rootfs.resolve()}", progress=report)
                except LayerError as exc:
                    raise ValueError(f"'{rootfs}': {exc}") from None
                tree = self.layers.path(info.digest)
                if not (tree / "bin").exists() and not (tree / "usr" / "bin").exists():
                    raise ValueError(f"'{rootfs}' does not look like a root filesystem (no /bin or /usr/bin)")
                return self._record(name, [info.digest], {}, f"rootfs {rootfs.resolve()}")
        raise FileNotFoundError(f"--rootfs '{rootfs}' is neither a directory nor a tarball")

    def import_archive(self, name: str, archive: Path, report: Report) -> TemplateRow:
        """An OCI archive or a ``docker save`` tarball."""
        _check_name(name)
        with self.layers.lock("gc", shared=True):
            image = oci.import_archive(self.layers, archive, report)
            return self._record(name, image.layers, image.config, image.source)

    def pull(
        self, name: str, reference: str, report: Report, insecure: bool = False, login: tuple[str, str] | None = None
    ) -> TemplateRow:
        """An image from a registry (``login``: a private registry's username and password)."""
        _check_name(name)
        with self.layers.lock("gc", shared=True):
            image = oci.pull(self.layers, reference, report, insecure, login)
            return self._record(name, image.layers, image.config, image.source)

    def build(self, name: str, report: Report, rebuild: bool = False) -> TemplateRow:
        """Build a built-in template now (the CLI's ``template build``), or find it built."""
        if name not in BUILT:
            raise ValueError(f"'{name}' is not a built-in template that is built here: {', '.join(BUILT)} are")
        if rebuild:
            self.layers.uncache(self._key(name))
        with self.layers.lock("gc", shared=True):
            layers, config = self._build_blocking(name, report)
            return self._record(name, layers, config, self._describe(name))

    # ---------------------------------------------------------------------- builds (E2B's API)

    def check_buildable_name(self, name: str) -> None:
        """400 unless ``name`` may be given to a template built through E2B's API."""
        try:
            _check_name(name)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def row_of(self, name: str) -> TemplateRow:
        """The stored record (its layer digests and config) of a template to build on, once ready:
        the host template has no layers and cannot be built on."""
        canonical = self.canonical(name)
        template = self.resolve(canonical)
        row = self.db.template(template.id)
        if template.host_usr or row is None:
            raise ApiError(
                409,
                f"template '{name}' is the host's /usr (Debian's archive was not in reach to build 'base'); "
                "templates cannot be built on it",
            )
        return row

    def record_disk_layer(
        self, name: str, image: Path, id_base: int, below: list[str], config: dict[str, Any], source: str
    ) -> tuple[TemplateRow, LayerInfo]:
        """Blocking: a sandbox disk's writable layer (:mod:`.build_layer`) stored over the layers
        ``below`` and recorded as template ``name``, both under the collector's lock, so the new layer
        is never collected before a record lists it."""
        with self.layers.lock("gc", shared=True):
            info = build_layer.layer_from_disk(self.layers, image, id_base, source)
            return self.record_build(name, [info.digest, *below], config, source), info

    def record_build(
        self,
        name: str,
        layers: list[str],
        config: dict[str, Any],
        source: str,
        tags: tuple[str, ...] | list[str] = (DEFAULT_TAG,),
    ) -> TemplateRow:
        """Record a template's build under each of its tags (replacing what they named before);
        returns the first tag's row."""
        self.check_buildable_name(name)
        rows = [self._record(tagged(name, tag), layers, config, source) for tag in tags]
        return rows[0]

    def assign_tags(self, target: str, tags: list[str]) -> TemplateRow:
        """E2B's ``Template.assign_tags``: the build ``target`` (``name`` or ``name:tag``) is also
        named by each of ``tags``; returns its row."""
        base, _ = split_tag(target)
        canonical = self.canonical(target)
        row = self.db.template(canonical)
        if base in BUILTIN or base in ALIASES or base.startswith(HIDDEN_PREFIX) or row is None:
            raise ApiError(404, f"template '{target[:130]}' not found among the templates built here")
        for tag in tags:
            self._record(tagged(base, tag), row.layers, row.config, row.source)
        return row

    def remove_tags(self, name: str, tags: list[str]) -> None:
        """E2B's ``Template.remove_tags``: the tags go (their builds' layers stay while another tag or
        the build cache lists them). The default tag is the template itself and stays."""
        if TAG_SEPARATOR in name:
            raise ApiError(400, "'name' is a template's name without a tag: the tags go in 'tags'")
        if DEFAULT_TAG in tags:
            raise ApiError(400, f"the '{DEFAULT_TAG}' tag cannot be removed (delete the template instead)")
        known = {tag for tag, _ in self.tags(name)}
        if not known:
            raise ApiError(404, f"template '{name[:64]}' not found among the templates built here")
        missing = [tag for tag in tags if tag not in known]
        if missing:
            raise ApiError(404, f"template '{name}' has no tag {', '.join(missing)}; its tags: {', '.join(known)}")
        for tag in tags:
            self.db.delete_template(tagged(name, tag))

    def is_built(self, name: str) -> bool:
        """Whether the current recipe of a built-in template is in the store."""
        return self.layers.cached(self._key(name)) is not None

    def remove(self, name: str, in_use: Callable[[str], list[str]], wait: bool = True) -> Collected | None:
        """Forget a template (every tag of it), the build cache records of its steps that no other
        template is built on, and the layers nothing lists any more; returns what went.
        ``in_use(name)`` lists the live sandboxes started from it, which must be none.

        The collection waits for the imports and builds that hold the store. Without ``wait``
        (the API's ``DELETE``, which should not hang for a build's length) it runs in a thread of its
        own once they are done, and ``None`` is returned."""
        canonical = self.canonical(name)
        if canonical == HOST or name in ALIASES:
            raise ValueError(f"'{name}' is built in and cannot be removed")
        rows = [row.name for _, row in self.tags(canonical)]
        users = [user for row in rows or [canonical] for user in in_use(row)]
        if users:
            raise ValueError(f"template '{canonical}' is used by live sandboxes: {', '.join(users)}; kill them first")
        if not rows and canonical not in BUILT:
            raise ValueError(f"template '{name}' not found; known templates: {', '.join(self.names())}")
        gone = [self.db.template(row_name) for row_name in rows]
        for row_name in rows or [canonical]:
            self.db.delete_template(row_name)
        if canonical in BUILT:
            self.layers.uncache(self._key(canonical))
        chains = [row.layers for row in gone if row is not None]
        if wait:
            return self._collect(chains)
        try:
            return self._collect(chains, wait=False)
        except BlockingIOError:
            log.info("template %s removed; its layers are collected once the running builds and imports end", name)
            note = self.layers.note_collection(chains)
            threading.Thread(
                target=self._collect_later, args=([(note, chains)],), name="template-gc", daemon=True
            ).start()
            return None

    def resume_collections(self) -> None:
        """Finish, in a thread of their own, the collections that template removals deferred while a
        build held the store and that a stop of their runtime interrupted (:meth:`remove`)."""
        pending = self.layers.pending_collections()
        if pending:
            log.info("template store %s: %d deferred collections to finish", self.store_dir, len(pending))
            threading.Thread(target=self._collect_later, args=(pending,), name="template-gc", daemon=True).start()

    def _collect(self, chains: list[list[str]], wait: bool = True) -> Collected:
        """Forget the cache records that the removed templates' layer lists ``chains`` end with, then
        delete the layers nothing lists any more (:func:`collect_garbage`)."""
        return collect_garbage(
            self.layers, lambda record: any(_ends_with(chain, record) for chain in chains), self._kept_records(), wait
        )

    def _collect_later(self, pending: list[tuple[Path, list[list[str]]]]) -> None:
        """Run deferred collections, waiting for the store; each note goes once its collection ran
        (one skipped because a runtime's database could not be read stays for the next start)."""
        for note, chains in pending:
            try:
                collected = self._collect(chains)
            except Exception:  # a thread of its own: log it, as nobody waits for it
                log.exception("template store %s: a deferred collection failed", self.store_dir)
                continue
            if collected.skipped is None:
                note.unlink(missing_ok=True)
                log.info(
                    "template store %s: %d cache records and %d layers collected after a removal",
                    self.store_dir,
                    collected.records,
                    len(collected.layers),
                )

    def prune(self) -> Collected:
        """``sandboxd template prune``: forget every build cache record that no template ends with
        (the steps of builds that were replaced, failed or removed, and built-in recipes this
        version no longer uses), then delete the layers nothing lists any more. That includes what
        deferred collections would forget: their notes go too."""
        pending = self.layers.pending_collections()
        collected = collect_garbage(self.layers, lambda record: True, self._kept_records())
        if collected.skipped is None:
            for note, _ in pending:
                note.unlink(missing_ok=True)
        return collected

    def _kept_records(self) -> set[str]:
        """The records of the built-in templates' current recipes: never pruned, so ``base`` is not
        rebuilt because a runtime with no row for it yet pruned the store."""
        return {self.layers.cache_record_name(self._key(name)) for name in BUILT}


@dataclass(frozen=True)
class Collected:
    """What one garbage collection deleted."""

    records: int
    layers: list[str]
    size: int
    """Bytes the deleted layers held."""
    skipped: str | None = None
    """Why nothing was collected, when a runtime's database could not be read."""


def collect_garbage(
    layers: LayerStore,
    stale: Callable[[list[str]], bool] | None = None,
    kept_records: Collection[str] = (),
    wait: bool = True,
) -> Collected:
    """Delete the layers that no template of any runtime using this store lists (their databases are
    registered in the store) and that no build cache record lists.

    First, when ``stale`` is given, the build cache records it calls stale are forgotten, except
    those some template's layers end with (a record lists a build's layers up to one of its steps,
    topmost first, so the records of a template's own steps are the ones its layers end with) and
    those named in ``kept_records``.

    Under the store's exclusive ``gc`` lock: every import, pull and template build holds it shared
    while it runs, so what they made and have not recorded yet is never taken, and a collection
    waits for them to finish (without ``wait``: raises ``BlockingIOError`` instead)."""
    with layers.lock("gc", wait=wait):
        try:
            chains = [chain for db_path in layers.users() for chain in _template_layers(db_path)]
        except _Unreadable as exc:  # its templates' layers are unknown: take nothing
            log.warning("template store %s: nothing collected: %s", layers.root, exc)
            return Collected(0, [], 0, skipped=str(exc))
        dropped = 0
        if stale is not None:
            for name, record in layers.cache_records().items():
                if name in kept_records or any(_ends_with(chain, record) for chain in chains):
                    continue
                if stale(record):
                    layers.drop_cache_record(name)
                    dropped += 1
        keep = set(layers.cached_layers())
        keep.update(digest for chain in chains for digest in chain)
        removed = [d for d in layers.digests() if d not in keep]
        size = 0
        for digest in removed:
            info = layers.info(digest)
            size += info.size if info is not None else 0
            layers.remove(digest)
        return Collected(dropped, removed, size)


def _ends_with(chain: list[str], tail: list[str]) -> bool:
    """Whether the layer list ``chain`` (topmost first) ends with ``tail``: ``tail`` is what it is
    built on, or itself."""
    return len(tail) <= len(chain) and chain[len(chain) - len(tail) :] == tail


class _Unreadable(Exception):
    """A runtime using the store has a database whose templates cannot be read."""


def _template_layers(db_path: Path) -> list[list[str]]:
    """Each template's layers (topmost first) in the templates table of a runtime's database
    (read-only: it may be another runtime's). Raises :class:`_Unreadable` rather than answer
    "none" for a database that exists but cannot be read: a collection would take its layers."""
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT layers FROM templates").fetchall()
        finally:
            db.close()
        return [[str(d) for d in json.loads(layers)] for (layers,) in rows]
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise _Unreadable(f"the templates of {db_path} cannot be read ({exc})") from None
