"""``sandboxd template build NAME --from FILE``: build a template from a Dockerfile or a Python file
through a running runtime, the way a user's own code builds one on E2B.

The build itself is the runtime's (:mod:`.template_api` and :mod:`.template_builder`: steps in an
isolated build sandbox, layers cached and shared); this module is only its client. It drives the
official E2B SDK's ``Template`` builder rather than a parser of our own, so a Dockerfile means here
exactly what ``Template.from_dockerfile`` makes of it on E2B, and a Python file is the one a user
already has: it defines ``template`` (a ``Template()`` chain), as the files E2B's CLI generates do.
The SDK is an optional dependency (``pip install 'sandboxd[templates]'``): the runtime does not need
it to serve builds.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMPLATE_ATTRIBUTE = "template"
"""What a Python template file must define (E2B's generated ``template.py`` exports this name)."""


class TemplateFileError(Exception):
    """The file cannot be built: missing, not a template, or the SDK is not installed."""


def _sdk() -> Any:
    try:
        import e2b
    except ImportError:
        raise TemplateFileError(
            "building from a file needs the E2B SDK: pip install 'sandboxd[templates]' (or e2b)"
        ) from None
    return e2b


def load(path: Path) -> Any:
    """The SDK ``Template`` that ``path`` describes: a Dockerfile (its directory is the build
    context of ``COPY``), or a Python file that defines ``template``."""
    e2b = _sdk()
    if not path.is_file():
        raise TemplateFileError(f"{path}: no such file")
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"sandboxd_template_{abs(hash(path))}", path)
        if spec is None or spec.loader is None:
            raise TemplateFileError(f"{path}: cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        template = getattr(module, TEMPLATE_ATTRIBUTE, None)
        from e2b.template.main import TemplateBuilder, TemplateFinal

        if not isinstance(template, (TemplateBuilder, TemplateFinal)):
            raise TemplateFileError(
                f"{path}: defines no '{TEMPLATE_ATTRIBUTE}' built with e2b's Template() "
                f"(found {type(template).__name__})"
            )
        return template
    try:
        return e2b.Template(file_context_path=path.parent).from_dockerfile(str(path))
    except ValueError as exc:  # the SDK's parser names the instruction it cannot take
        raise TemplateFileError(f"{path}: {exc}") from None


def build(
    path: Path,
    name: str,
    *,
    url: str,
    api_key: str,
    skip_cache: bool,
    report: Callable[[str], None],
) -> str:
    """Build ``path`` as template ``name`` on the runtime at ``url``, streaming its log lines to
    ``report``; returns the template id. Raises :class:`TemplateFileError` when the file cannot be
    built and the SDK's exception (with the runtime's message) when the build fails."""
    e2b = _sdk()
    template = load(path)

    def log(entry: Any) -> None:
        report(f"{entry.level:<5} {entry.message}")

    info = e2b.Template.build(
        template,
        name,
        skip_cache=skip_cache,
        on_build_logs=log,
        api_key=api_key,
        api_url=url,
    )
    return str(info.template_id)
