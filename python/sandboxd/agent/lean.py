"""What a standalone ``sandboxd agent`` process leaves unimported, to keep its resident memory down.

``import uvicorn`` runs the package's ``__init__``, which imports ``uvicorn.main`` for ``uvicorn.run``
and the ``uvicorn`` command: click, the reload and multi-worker supervisors (multiprocessing, tempfile,
watchfiles). The agent uses none of it; it needs ``uvicorn.config``, ``uvicorn.server`` and the
httptools protocol, which import only each other. Measured with the agent's own imports on top:
2.5 MiB of RSS and 35 modules (35.1 → 32.6 MiB), about 7 % of an idle agent.

Inside a sandbox the agent is forked from the zygote, which has imported uvicorn whole beforehand
(shared, copy-on-write pages), so this matters to the standalone agent only.
"""

from __future__ import annotations

import importlib.util
import sys


def uvicorn_package_without_cli() -> None:
    """Register the ``uvicorn`` package without running its ``__init__``, so that importing its
    submodules (``uvicorn.config``, ``uvicorn.server``, ``uvicorn.protocols…``) does not load the CLI.

    The package gets the two names its own submodules import from it (``uvicorn.lifespan`` does
    ``from uvicorn import Config``): ``Config`` and ``Server``. ``uvicorn.run``, ``uvicorn.main`` and
    ``uvicorn.__version__`` stay missing in this process. Call it only in a process
    that runs nothing but the agent (``sandboxd agent``), before anything imports uvicorn; when
    uvicorn is imported already, it does nothing."""
    if "uvicorn" in sys.modules:
        return
    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the import error comes where uvicorn is used
    package = importlib.util.module_from_spec(spec)
    sys.modules["uvicorn"] = package
    from uvicorn.config import Config
    from uvicorn.server import Server

    package.Config = Config  # type: ignore[attr-defined]
    package.Server = Server  # type: ignore[attr-defined]
