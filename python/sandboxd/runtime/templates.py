"""Templates: the built-in one (the host's read-only ``/usr`` plus a private ``/etc`` and home), and
root filesystems registered with ``sandboxd template add NAME --rootfs DIR|TARBALL``."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sandboxd import _core

from .errors import ApiError

BUILTIN = "base"
ALIASES = {"code-interpreter-v1": BUILTIN, "code-interpreter": BUILTIN, "desktop": BUILTIN}
"""Names the SDKs ask for by default (the JS code-interpreter SDK asks for ``code-interpreter-v1``)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


@dataclass(frozen=True, slots=True)
class Template:
    """A root filesystem a sandbox's overlay sits on."""

    id: str
    """The canonical id (an alias resolves to the template it names)."""
    root: Path
    host_usr: bool
    """Bind the host's ``/usr`` read-only into the sandbox (the built-in template)."""


class Templates:
    """The registry, in ``<data dir>/templates``: one directory per template plus ``index.json``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "templates"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / "index.json"

    def _index(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def ensure_builtin(self) -> None:
        """Build (or refresh, idempotently) the built-in template's root."""
        _core.build_base_template(str(self.dir / BUILTIN))

    def names(self) -> list[str]:
        return sorted({BUILTIN, *ALIASES, *self._index()})

    def resolve(self, name: str) -> Template:
        """The template called ``name`` (or an alias); 404 naming the known ones otherwise."""
        canonical = ALIASES.get(name, name)
        if canonical == BUILTIN:
            return Template(BUILTIN, self.dir / BUILTIN, True)
        entry = self._index().get(canonical)
        if entry is None:
            raise ApiError(404, f"template '{name}' not found; known templates: {', '.join(self.names())}")
        return Template(canonical, Path(str(entry["root"])), bool(entry.get("host_usr", False)))

    def add(self, name: str, rootfs: Path) -> Template:
        """Register a root filesystem: a directory (used in place) or a tarball (extracted here)."""
        if not _NAME.fullmatch(name) or name == BUILTIN or name in ALIASES:
            raise ValueError(f"template name '{name}' must match {_NAME.pattern} and not be a built-in name")
        if rootfs.is_dir():
            root = rootfs.resolve()
        elif rootfs.is_file():
            root = self.dir / name
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            with tarfile.open(rootfs) as tar:
                tar.extractall(root, filter="tar")
        else:
            raise FileNotFoundError(f"--rootfs '{rootfs}' is neither a directory nor a tarball")
        if not (root / "bin").exists() and not (root / "usr" / "bin").exists():
            raise ValueError(f"'{rootfs}' does not look like a root filesystem (no /bin or /usr/bin)")
        index = self._index()
        index[name] = {"root": str(root), "host_usr": False}
        self.index_path.write_text(json.dumps(index, indent=2))
        return Template(name, root, False)
