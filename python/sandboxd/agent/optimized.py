"""The standalone agent under ``python -OO``: its code objects without docstrings and asserts.

Docstrings are constants of every module's, class's and function's code object, kept in memory for
as long as the process runs; no request reads one. ``-OO`` leaves them out (and ``assert``
statements, which in the agent only narrow types for mypy). Measured on a standalone ``sandboxd
agent`` after 20 ``Start /bin/true`` and a quiet 1.5 s, medians of 3 starts alternating: 21.01 → 20.36
MiB of RSS (Python's object arenas 6.66 → 6.31 MiB, ``[heap]`` 2.80 → 2.48), with ``dataclasses``
kept from importing ``inspect`` for docstring-less classes (``lean.dataclass_docs_without_inspect``),
without which ``-OO`` made it larger.

``-OO`` reads ``.opt-2.pyc`` files (``__pycache__/NAME.cpython-311.opt-2.pyc``), and a module without
one is compiled from its source in the process, on every start when bytecode is not written
(``PYTHONDONTWRITEBYTECODE``, a read-only install): that costs more memory than the docstrings save
(rss4 measured +4 MiB with none compiled). CPython's own ``make install`` compiles the standard
library at every level; pip compiles packages at level 0 only. So :func:`reexec_if_compiled` re-runs
the process with ``-OO`` only when the files are there (:data:`PROBES`), and ``python -m
sandboxd.agent.optimized`` (run by ``make install``) writes them.

Only the standalone agent is re-run: the sandboxes' agents are forked from the zygote, which has
imported everything already (``runtime/zygote.py``), and the runtime, the zygote and the code
interpreter run as they are started. The flag is given on the command line, not as
``PYTHONOPTIMIZE``, so that the commands the agent starts do not inherit it.

What changes under ``-OO`` besides memory: ``__doc__`` is None everywhere (``sandboxd --help``'s
description, read only when argparse reads the line), a dataclass's ``__doc__`` is its name
(``lean.dataclass_docs_without_inspect``), and ``assert`` statements do not run (the agent's narrow
types only; none checks input)."""

from __future__ import annotations

import os
import sys
from importlib.util import cache_from_source

OPTIMIZE = 2
"""``-OO``: without docstrings and asserts."""

PROBES = (
    "asyncio/base_events.py",
    "google/protobuf/descriptor.py",
    "uvicorn/protocols/http/httptools_impl.py",
    "sandboxd/agent/server.py",
)
"""One module the agent imports at start from each place its modules come from (the standard
library, ``site-packages``, this package, which an editable install keeps outside ``site-packages``),
found along ``sys.path`` as the import system finds it: when each has its ``.opt-2.pyc``, the place
was compiled."""


def compiled() -> bool:
    """Whether every probe (:data:`PROBES`) has its ``.opt-2.pyc``, without importing anything."""
    for relative in PROBES:
        sources = (os.path.join(entry or os.curdir, relative) for entry in sys.path)
        source = next((path for path in sources if os.path.isfile(path)), None)
        if source is None or not os.path.isfile(cache_from_source(source, optimization=OPTIMIZE)):
            return False
    return True


def reexec_if_compiled() -> None:
    """Replace this process (same PID, descriptors and environment) with itself under ``-OO`` when it
    runs without optimisation (no ``-O``, ``-OO`` or ``PYTHONOPTIMIZE``) and the ``.opt-2.pyc`` files
    are there; otherwise return and run as it is. For ``sandboxd agent`` only, before it imports
    anything else (:func:`sandboxd.agent.standalone.main`). The command line is the one this process was started
    with (``sys.orig_argv``: ``-m sandboxd`` or the ``sandboxd`` script, and any interpreter options),
    with ``-OO`` in front."""
    if sys.flags.optimize or not sys.executable or len(sys.orig_argv) < 2 or not compiled():
        return  # optimized already, or told to run at a level of its own (-O and -OO would make 3: .opt-3.pyc)
    if sys.argv[0] in ("", "-"):  # a program read from standard input, which cannot be read again
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-OO", *sys.orig_argv[1:]])


def compile_all() -> bool:
    """Write the ``.opt-2.pyc`` files of this package and of ``site-packages`` (the standard library's
    are CPython's install's to write). True when every file compiled (a package's Python 2 leftovers
    may not, which matters to nothing the agent imports)."""
    import compileall
    import sysconfig

    paths = sysconfig.get_paths()
    ok = True
    seen: set[str] = set()
    for path in (paths["purelib"], paths["platlib"], os.path.dirname(os.path.dirname(__file__))):
        real = os.path.realpath(path)
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            ok = bool(compileall.compile_dir(real, optimize=OPTIMIZE, quiet=2, workers=0)) and ok
    return ok


if __name__ == "__main__":
    done = compile_all()
    state = "in place: sandboxd agent runs under -OO" if compiled() else "missing: sandboxd agent runs without -OO"
    print(f".opt-2.pyc {state}{'' if done else ' (some files did not compile)'}")
