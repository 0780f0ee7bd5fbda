"""Run the code interpreter: uvicorn (uvloop + httptools, the agent's settings) on port 49999, with
the default Python context's kernel starting at once.

In a sandbox this runs beside the agent, from the host's installation like the agent (forked from
the runtime's zygote, which imported :data:`sandboxd.interpreter.PRELOAD_PACKAGES` and ran
:func:`preload`), and starts the template's kernels. ``sandboxd interpreter`` runs it on its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd.agent.http_server import serve_until_signalled, server_config

from . import INTERPRETER_PORT
from .app import InterpreterApp
from .contexts import Contexts, Options
from .kernel import KernelError

log = logging.getLogger("sandboxd.interpreter")

PRIVATE_ENV_PREFIX = "SANDBOXD_"
"""Our own variables (the agent's access token among them) never reach a kernel."""


@dataclass
class InterpreterOptions:
    """``sandboxd interpreter`` flags."""

    host: str = "127.0.0.1"
    port: int = INTERPRETER_PORT
    cwd: str = "/home/user"
    kernel_dirs: list[str] = field(default_factory=list)
    envd_url: str | None = "http://127.0.0.1:49983"
    prestart: tuple[str, ...] = ("python",)
    pool: dict[str, int] = field(default_factory=lambda: {"python": 1})


def default_cwd(wanted: str) -> str:
    """``wanted`` if it is a directory, else the home directory, else ``/`` (a host without ``user``)."""
    for candidate in (wanted, os.path.expanduser("~"), "/"):
        if os.path.isdir(candidate):
            return candidate
    return "/"


def kernel_env() -> dict[str, str]:
    """The environment kernels start with: ours, minus sandboxd's private variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIX)}


async def serve(options: InterpreterOptions) -> None:
    """Serve until cancelled or signalled; every kernel is stopped on the way out."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="sandboxd-interpreter-"))
    contexts = Contexts(
        Options(
            cwd=default_cwd(options.cwd),
            kernel_dirs=options.kernel_dirs,
            env=kernel_env(),
            runtime_dir=runtime_dir,
            envd_url=options.envd_url,
            prestart=options.prestart,
            pool=options.pool,
        )
    )
    started = asyncio.Event()
    marking: asyncio.Task[None] | None = None
    try:
        await contexts.start()
        marking = asyncio.ensure_future(_mark_started(contexts, started))
        config = server_config(InterpreterApp(contexts, started), options.host, options.port)
        log.warning("sandboxd interpreter on http://%s:%d, cwd %s", options.host, options.port, contexts.options.cwd)
        # uvicorn stops on SIGTERM/SIGINT, then restores the handlers it found and raises the signal
        # again: with the default handlers that kills us before the kernels are stopped (they would
        # outlive us; Deno's never notice). Found handlers that do nothing let the cleanup below run.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stopped)
        await serve_until_signalled(config)
    finally:
        if marking is not None:
            marking.cancel()
        await contexts.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _stopped(sig: int, frame: object) -> None:
    """The signal uvicorn raises again once it has stopped serving: handled, by cleaning up."""


async def _mark_started(contexts: Contexts, started: asyncio.Event) -> None:
    """/health turns 200 once the default Python kernel answered (or could not start: the error is
    then reported by /execute, where a person sees it)."""
    context = contexts.contexts.get(contexts.defaults.get("python", ""))
    if context is not None and context.starting is not None:
        try:
            await context.starting
        except (KernelError, OSError) as exc:
            log.warning("the default python kernel did not start: %s", exc)
    started.set()


def preload() -> None:
    """What a zygote runs once before forking interpreters: the lazy imports of ``jupyter_client``
    (its kernel provisioners are found through package metadata, which a sandbox cannot read)."""
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    KernelProvisionerFactory.instance()


def fork_server(options: InterpreterOptions) -> int:
    """Start the server in a grandchild process and return its pid: the seam for the runtime, whose
    sandboxed child calls this while still single-threaded (before the agent's event loop), after
    :func:`preload` ran in the zygote. The intermediate child exits at once, so the server is
    reparented to the sandbox's init, which reaps it, and the caller never has a zombie to wait for."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        grandchild = os.fork()
        if grandchild == 0:
            os.close(write_end)
            code = 0
            try:
                os.setsid()
                run(options)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.write(write_end, str(grandchild).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pid = int(pipe.read() or b"0")
    os.waitpid(child, 0)
    return pid


def run(options: InterpreterOptions) -> None:
    """Run :func:`serve` on uvloop."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(options))
