"""Languages: E2B's names for them, which Jupyter kernel runs each, and the few lines of code the
server sends a kernel to set an env var or change directory.

Which kernels, and why:

* **Python: ``ipykernel``**, the reference kernel, from the template's own Python (with its data
  stack), as E2B runs it.
* **JavaScript and TypeScript: Deno's built-in kernel** (``deno jupyter``). It is maintained with
  Deno itself and installs as one static binary from PyPI (``pip install deno``) or npm, with no
  native module to build; it runs TypeScript, ESM ``import`` (Node built-ins included), top-level
  ``await`` and Node's ``process``, and returns the last expression as a result, which is what E2B's
  JavaScript examples and tests rely on. Measured against the alternatives on the registries:
  ``ijavascript`` (npm, E2B's base) needs ``zeromq`` 5 compiled at install and has had no release
  since 2021; ``tslab`` prints the last value to stdout instead of returning it (``Result.text`` stays
  empty) and rejects ``import ... from 'fs'`` without Node's type packages. Deno's kernel dies on
  SIGINT, so it is interrupted with Jupyter's ``interrupt_request`` message; a ``require`` shim keeps
  CommonJS-style code working. It costs ~200 MiB of private memory once started (ipykernel: ~40 MiB),
  which is why the server starts it on first use unless told otherwise.
* **bash: ``bash_kernel``** (PyPI, the Jupyter project's), as in E2B's template.
* **R: IRkernel**, as in E2B's template (``code-interpreter-v1`` installs Debian's ``r-cran-irkernel``
  and its kernelspec ``r``). IRkernel sends a cell's value as ``display_data``, so, as on E2B, it
  arrives as a result that is not the main one (``Execution.text`` stays empty).
* **Java** (IJava) only where a template installed its kernelspec; there, and for R in a template
  without IRkernel, creating such a context fails with a message naming the language and what to
  install.

A kernel is found by its kernelspec (``kernel.json``) in the template's Jupyter data directories,
never in the server's own installation (that is the host's, not the template's); without a
kernelspec, Python, JavaScript/TypeScript and bash fall back to the command found on ``PATH``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import ipython_setup

ALIASES = {"js": "javascript", "ts": "typescript", "py": "python", "python3": "python", "sh": "bash"}
"""Other names clients use for a language (E2B accepts ``js`` and ``ts``)."""

ENV_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

DENO_INIT = """\
if (typeof globalThis.require !== "function") {
  const { createRequire } = await import("node:module");
  globalThis.require = createRequire(process.cwd() + "/");
}
"""
"""Deno evaluates cells as ES modules, where ``require`` does not exist; E2B's JavaScript kernel is
Node (CommonJS), and code written for it calls ``require('fs')``."""


BARRIER_MSG_TYPE = "sandboxd_barrier"

DENO_BARRIER = f'await Deno.jupyter.broadcast("{BARRIER_MSG_TYPE}", {{}});'
"""Deno publishes a cell's value from JavaScript, on a path that can deliver it after the cell's
``status: idle`` (3 cells in 100 here). A silent cell that broadcasts a message of ours on that same
path, in order, marks where the previous cell's output ends."""


class LanguageError(ValueError):
    """A language that is unknown, or whose kernel this sandbox does not have."""


@dataclass(frozen=True)
class Language:
    """How the server talks to one language's kernels."""

    name: str
    spec_names: tuple[str, ...]
    """Kernelspec names to prefer, in order, before any spec whose ``language`` matches."""
    spec_languages: tuple[str, ...]
    """The kernelspec ``language`` values that run this language (lower case)."""
    fallback_argv: tuple[str, ...] | None
    """The kernel command when no kernelspec is installed (its program looked up on PATH)."""
    install_hint: str
    set_env: Callable[[Mapping[str, str]], str]
    unset_env: Callable[[list[str]], str]
    chdir: Callable[[str], str]


def _js(value: object) -> str:
    """A JSON literal, which is also a valid string/object literal in JS, R and Java."""
    return json.dumps(value)


LANGUAGES: dict[str, Language] = {}


def _register(language: Language, *names: str) -> None:
    for name in (language.name, *names):
        LANGUAGES[name] = language


_register(
    Language(
        name="python",
        spec_names=("python3", "python"),
        spec_languages=("python",),
        fallback_argv=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
        install_hint="pip install ipykernel",
        set_env=lambda env: f"__import__('os').environ.update({dict(env)!r})",
        unset_env=lambda names: "\n".join(f"__import__('os').environ.pop({n!r}, None)" for n in names),
        chdir=lambda path: f"__import__('os').chdir({path!r})",
    )
)


def _javascript(name: str) -> Language:
    """JavaScript and TypeScript share a kernel (Deno runs both)."""
    return Language(
        name=name,
        spec_names=("deno",),
        spec_languages=("typescript", "javascript"),
        fallback_argv=("deno", "jupyter", "--kernel", "--conn", "{connection_file}"),
        install_hint="pip install deno (or npm install -g deno)",
        set_env=lambda env: f"Object.assign(process.env, {_js(dict(env))});",
        unset_env=lambda names: "".join(f"delete process.env[{_js(n)}];" for n in names),
        chdir=lambda path: f"process.chdir({_js(path)});",
    )


_register(_javascript("javascript"))
_register(_javascript("typescript"))
_register(
    Language(
        name="bash",
        spec_names=("bash",),
        spec_languages=("bash",),
        fallback_argv=("python3", "-m", "bash_kernel", "-f", "{connection_file}"),
        install_hint="pip install bash_kernel && python3 -m bash_kernel.install",
        set_env=lambda env: "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        unset_env=lambda names: "\n".join(f"unset {n}" for n in names),
        chdir=lambda path: f"cd {shlex.quote(path)}",
    )
)
_register(
    Language(
        name="r",
        spec_names=("ir", "r"),
        spec_languages=("r",),
        fallback_argv=None,
        install_hint="install IRkernel and run IRkernel::installspec(user = FALSE)",
        set_env=lambda env: "\n".join(f"Sys.setenv({_js(k)} = {_js(v)})" for k, v in env.items()),
        unset_env=lambda names: "\n".join(f"Sys.unsetenv({_js(n)})" for n in names),
        chdir=lambda path: f"setwd({_js(path)})",
    )
)
_register(
    Language(
        name="java",
        spec_names=("java",),
        spec_languages=("java",),
        fallback_argv=None,
        install_hint="install a JDK and jjava (pip install jjava), or IJava, and its kernelspec",
        # Java cannot change its own environment: like E2B, env vars become system properties.
        set_env=lambda env: "".join(f"System.setProperty({_js(k)}, {_js(v)});" for k, v in env.items()),
        unset_env=lambda names: "".join(f"System.clearProperty({_js(n)});" for n in names),
        chdir=lambda path: f'System.setProperty("user.dir", {_js(path)});',
    )
)

SUPPORTED = ("python", "javascript", "typescript", "bash", "r", "java")


def normalize(language: str | None) -> str:
    """E2B's language name for what a client sent (``None`` → ``python``, ``js`` → ``javascript``)."""
    if language is None or not language.strip():
        return "python"
    name = language.strip().lower()
    name = ALIASES.get(name, name)
    if name not in LANGUAGES:
        raise LanguageError(f"unknown language '{language}': the code interpreter runs {', '.join(SUPPORTED)}")
    return name


def valid_env_name(name: str) -> bool:
    """POSIX env var names (``[A-Za-z_][A-Za-z0-9_]*``): anything else could not be set safely."""
    return bool(name) and not name[0].isdigit() and all(c in ENV_NAME_CHARS for c in name)


@dataclass(frozen=True)
class KernelCommand:
    """A resolved kernel: its command line and how to treat it."""

    language: str
    argv: tuple[str, ...]
    """With ``{connection_file}`` still to be filled in."""
    display_name: str
    interrupt_mode: str
    """``signal`` (SIGINT to the kernel's process group) or ``message`` (``interrupt_request``)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for this kernel (from its kernelspec, and ours)."""
    init_code: str | None = None
    """Sent silently once the kernel answers, before any user code."""
    barrier_code: str | None = None
    """Sent silently after each cell when the kernel can publish output after ``status: idle``; the
    cell ends when this code's ``BARRIER_MSG_TYPE`` message arrives."""
    resource_dir: str = ""
    """The kernelspec's directory: its ``argv`` may name files there as ``{resource_dir}`` (IJava's
    and jjava's launcher jars), which Jupyter fills in when it starts the kernel."""

    @property
    def is_deno(self) -> bool:
        return Path(self.argv[0]).name == "deno"


def kernel_dirs(extra: list[str]) -> list[str]:
    """Where kernelspecs are looked for: ``extra`` first, then Jupyter's data path (``JUPYTER_PATH``,
    the user's, ``/usr/local/share/jupyter``, ``/usr/share/jupyter``) without the directories of the
    Python running this server, which belong to the host's installation, not the template's."""
    from jupyter_core.paths import jupyter_path

    own = (os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix))
    found = [os.path.join(d, "kernels") for d in jupyter_path()]
    found = [d for d in found if not os.path.realpath(d).startswith(own)]
    return [*extra, *found]


def resolve(language: str, dirs: list[str], path: str | None) -> KernelCommand:
    """The kernel for ``language`` (already normalized); blocking (it reads kernelspec files).

    Raises :class:`LanguageError` naming the language and what to install when there is none."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    spec_language = LANGUAGES[language]
    manager = KernelSpecManager(kernel_dirs=dirs, ensure_native_kernel=False)
    specs = manager.find_kernel_specs()
    chosen = None
    for name in spec_language.spec_names:
        if name in specs:
            chosen = name
            break
    if chosen is None:
        for name in sorted(specs):
            try:
                spec = manager.get_kernel_spec(name)
            except (NoSuchKernel, OSError, ValueError):
                continue
            if spec.language.lower() in spec_language.spec_languages:
                chosen = name
                break
    if chosen is not None:
        spec = manager.get_kernel_spec(chosen)
        argv = tuple(spec.argv)
        if argv and not os.path.isabs(argv[0]):
            argv = (shutil.which(argv[0], path=path) or argv[0], *argv[1:])
        command = KernelCommand(
            language=language,
            argv=argv,
            display_name=spec.display_name or chosen,
            interrupt_mode=spec.interrupt_mode,
            env={str(k): str(v) for k, v in (spec.env or {}).items()},
            resource_dir=spec.resource_dir,
        )
    elif spec_language.fallback_argv is not None and shutil.which(spec_language.fallback_argv[0], path=path):
        program = shutil.which(spec_language.fallback_argv[0], path=path)
        assert program is not None
        command = KernelCommand(
            language=language,
            argv=(program, *spec_language.fallback_argv[1:]),
            display_name=f"{language} ({spec_language.fallback_argv[0]})",
            interrupt_mode="signal",
        )
    else:
        raise LanguageError(
            f"this sandbox has no Jupyter kernel for {language}: {spec_language.install_hint} in the template"
            f" (kernelspecs looked for in {', '.join(dirs) or 'no directory'})"
        )
    return _tuned(command)


def _tuned(command: KernelCommand) -> KernelCommand:
    """What the server adds to a kernel: its setup cell, and Deno's quirks."""
    if command.is_deno:
        # SIGINT kills Deno's kernel; interrupt_request stops the cell and keeps the kernel.
        # NO_COLOR: Deno colours text/plain results with ANSI escapes otherwise.
        return KernelCommand(
            language=command.language,
            argv=command.argv,
            display_name=command.display_name,
            interrupt_mode="message",
            env={**command.env, "NO_COLOR": "1"},
            init_code=DENO_INIT,
            barrier_code=DENO_BARRIER,
        )
    if command.language == "python":
        return KernelCommand(
            language=command.language,
            argv=command.argv,
            display_name=command.display_name,
            interrupt_mode=command.interrupt_mode,
            env=command.env,
            init_code=IPYTHON_SETUP,
        )
    return command


def _source(module: object) -> str:
    path = getattr(module, "__file__", None)
    assert path is not None
    return Path(path).read_text()


IPYTHON_SETUP = _source(ipython_setup)
"""Read once at import: inside a sandbox the host's files are not there to read later."""
