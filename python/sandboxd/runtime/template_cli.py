"""``sandboxd template``: the operator's commands over a runtime's templates (list, add, import, pull,
build, remove, prune), with progress on stderr. They work on the data dir's database whether or not the
runtime is running (SQLite in WAL mode takes both)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import code_interpreter, debian, oci, template_file
from .errors import ApiError
from .layers import LayerError
from .store import DATABASE, Store
from .templates import ALIASES, Collected, Templates, default_store_dir


def _open(args: argparse.Namespace) -> tuple[Store, Templates]:
    from .server import DEFAULT_DATA_DIR

    data_dir: Path = args.data_dir or DEFAULT_DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    store = Store(data_dir / DATABASE)
    chosen = args.template_store or store.setting("template_store") or os.environ.get("SANDBOXD_TEMPLATE_STORE")
    store_dir = Path(chosen) if chosen else default_store_dir(data_dir)
    mirror = getattr(args, "debian_mirror", None) or os.environ.get("SANDBOXD_DEBIAN_MIRROR") or debian.DEFAULT_MIRROR
    index = getattr(args, "pypi_index", None) or os.environ.get("SANDBOXD_PYPI_INDEX") or code_interpreter.DEFAULT_INDEX
    return store, Templates(store, store_dir, mirror, index)


def _report(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


BUILT_IN = ("base", "code-interpreter-v1")
"""The templates ``sandboxd template build NAME`` builds from our own recipes, without a file."""


def _build_file(args: argparse.Namespace, store: Store) -> int | str:
    """``build NAME --from FILE``: the running runtime builds it (steps in an isolated sandbox)."""
    api_key = args.api_key or store.setting("api_key")
    if not api_key:
        return "sandboxd template build: no API key in the data dir (start sandboxd serve once, or give --api-key)"
    print(f"building template '{args.name}' from {args.source} on {args.url}", file=sys.stderr)
    started = time.monotonic()
    try:
        template_id = template_file.build(
            args.source, args.name, url=args.url, api_key=api_key, skip_cache=args.rebuild, report=_report
        )
    except template_file.TemplateFileError:
        raise
    except Exception as exc:  # the SDK's errors carry the runtime's message (a failed step, a refusal)
        return f"sandboxd template build: {type(exc).__name__}: {exc}"
    print(f"template '{args.name}' ({template_id}) built in {time.monotonic() - started:.1f}s")
    return 0


def _collected(collected: Collected) -> str:
    if collected.skipped is not None:
        return f"nothing was deleted: {collected.skipped}"
    return (
        f"{collected.records} build cache records and {len(collected.layers)} layers "
        f"({_size(collected.size)}) that nothing lists any more were deleted"
    )


def run(args: argparse.Namespace) -> int | str:
    """Run one ``sandboxd template`` command; returns an exit status or an error message."""
    command = args.template_command
    try:
        store, templates = _open(args)
    except (OSError, ValueError) as exc:
        return f"sandboxd template {command}: {exc}"
    started = time.monotonic()
    try:
        if command == "list":
            rows = templates.listing()
            print(f"{'NAME':<24} {'STATE':<15} {'SIZE':>10} {'LAYERS':>6}  SOURCE")
            for t in rows:
                print(
                    f"{t.name:<24} {t.state:<15} {_size(t.size) if t.size else '-':>10} {len(t.layers):>6}  {t.source}"
                )
            aliases = ", ".join(f"{alias} -> {target}" for alias, target in sorted(ALIASES.items()))
            print(f"\naliases: {aliases}\nstore: {templates.store_dir}")
            return 0
        if command == "add":
            print(f"adding template '{args.name}' from {args.rootfs}", file=sys.stderr)
            row = templates.add_rootfs(args.name, args.rootfs, _report)
        elif command == "import":
            print(f"importing template '{args.name}' from {args.archive}", file=sys.stderr)
            row = templates.import_archive(args.name, args.archive, _report)
        elif command == "pull":
            print(f"pulling template '{args.name}' from {args.image}", file=sys.stderr)
            row = templates.pull(args.name, args.image, _report, insecure=args.insecure)
        elif command == "build" and args.source is not None:
            return _build_file(args, store)
        elif command == "build":
            if args.name not in BUILT_IN:
                return (
                    f"sandboxd template build: '{args.name}' is not a built-in template "
                    f"({', '.join(BUILT_IN)}); give --from a Dockerfile or a Python file to build it"
                )
            if not args.rebuild and templates.is_built(args.name):
                print(f"template '{args.name}' is built already; --rebuild builds it again")
            else:
                print(f"building template '{args.name}'", file=sys.stderr)
            row = templates.build(args.name, _report, rebuild=args.rebuild)
        elif command == "remove":
            live = {r.id: r.template_id for r in store.live()}
            collected = templates.remove(args.name, lambda name: [i for i, t in live.items() if t == name])
            assert collected is not None  # it waited for the builds holding the store
            print(f"template '{args.name}' removed; {_collected(collected)}")
            return 0
        elif command == "prune":
            print(f"pruned the build cache of {templates.store_dir}: {_collected(templates.prune())}")
            return 0
        else:  # pragma: no cover - argparse enforces the choices
            return f"unknown template command {command}"
    except (ValueError, OSError, LayerError, oci.ImageError, debian.BuildUnavailable, debian.BuildFailed) as exc:
        return f"sandboxd template {command}: {exc}"
    except ApiError as exc:
        return f"sandboxd template {command}: {exc.message}"
    except template_file.TemplateFileError as exc:
        return f"sandboxd template {command}: {exc}"
    finally:
        store.close()
    elapsed = time.monotonic() - started
    print(f"template '{row.name}' ready in {elapsed:.1f}s: {len(row.layers)} layer(s) in {templates.store_dir}")
    return 0
