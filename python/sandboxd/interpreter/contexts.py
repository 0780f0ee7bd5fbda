"""Execution contexts, as E2B's SDKs see them: an id, a language and a working directory, each backed
by one kernel, whose variables persist from one ``runCode`` to the next.

* Each language has a *default* context (``runCode(code, language=...)`` without a context). The
  Python one starts with the server, so its kernel is warm when the first ``runCode`` arrives; the
  others start when first asked for (or with the server, with ``--prestart``).
* A context runs one cell at a time; later requests wait their turn, in order.
* ``env_vars`` apply to one execution: set in the kernel before the cell, and afterwards set back to
  the sandbox's value (``GET /envs`` of the agent, as E2B's server does) or removed.
* A client that goes away mid-cell (the SDK's ``timeout``) interrupts the cell; the context and its
  variables survive. A cell that ignores the interrupt for ``INTERRUPT_GRACE`` seconds costs its
  context a restart instead, so that the next call is not stuck behind it.
* A kernel that dies (an ``exit()``, the OOM killer) is restarted at once; the cell it was running
  reports ``ContextRestarting``.
* A warm *pool* of spare kernels makes ``create_code_context`` instant; a spare is started in the
  background whenever one is taken. The first spare waits until the first cell has finished (or a
  context is created, or ``POOL_DELAY`` passed): started as the default kernel became ready, it ran
  beside the sandbox's first ``runCode``, the call a user waits on, and its launch held up the
  event loop answering ``/health`` (~20 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .kernel import Execution, Kernel, KernelError
from .languages import LANGUAGES, KernelCommand, LanguageError, kernel_dirs, resolve

log = logging.getLogger("sandboxd.interpreter")

INTERRUPT_GRACE = 10.0
"""Seconds an interrupted cell gets to stop before its kernel is restarted. A cell in a long C call
(a big numpy operation) sees SIGINT only when the call returns."""

KEEPALIVE_INTERVAL = 5.0
"""Seconds without output after which ``/execute`` writes a keepalive line (as E2B's server), so a
client that vanished without closing its connection is noticed by the next write."""

ENVS_TIMEOUT = 5.0
"""Seconds to wait for the agent's ``GET /envs``."""

MAX_ENVS_BODY = 1 << 20
"""The agent's ``/init`` takes at most 1 MiB, so its ``/envs`` cannot be larger."""

POOL_DELAY = 1.0
"""Seconds after the default kernels are ready before the pool starts its first spare, unless a cell
finished or a context was created before. A kernel's start is ~0.5 s of CPU: on 2 cores, started at
once it slowed the first ``runCode`` of a new sandbox, which comes within milliseconds of
``/health`` turning 200."""


@dataclass
class Options:
    """How contexts are made."""

    cwd: str = "/home/user"
    """The working directory of default contexts and of contexts created without one."""
    kernel_dirs: list[str] = field(default_factory=list)
    """Extra kernelspec directories, searched before Jupyter's data path."""
    env: dict[str, str] = field(default_factory=dict)
    """The environment kernels start with."""
    runtime_dir: Path = Path("/tmp")
    """Where connection files go (private to the server)."""
    envd_url: str | None = None
    """The agent, whose ``GET /envs`` has the sandbox-wide env vars; None: there are none."""
    prestart: tuple[str, ...] = ("python",)
    """Languages whose default context gets its kernel at start-up rather than on first use."""
    pool: dict[str, int] = field(default_factory=lambda: {"python": 1})
    """Spare kernels kept warm per language, for new contexts."""


class Context:
    """One execution context: its kernel and the lock that lets one cell run at a time."""

    def __init__(self, language: str, cwd: str) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.kernel: Kernel | None = None
        self.lock = asyncio.Lock()
        self.starting: asyncio.Task[Kernel] | None = None
        self.envs_applied = False
        """Whether the sandbox-wide env vars were set in the current kernel process."""

    def describe(self) -> dict[str, str]:
        return wire.context(self.id, self.language, self.cwd)


class Run:
    """One ``/execute``: the context is held from :meth:`Contexts.open_run` until :meth:`close`
    has let the cell finish (interrupting it if the client left) and undone the call's env vars."""

    def __init__(
        self, contexts: Contexts, context: Context, kernel: Kernel, execution: Execution, envs: dict[str, str]
    ):
        self.contexts = contexts
        self.context = context
        self.kernel = kernel
        self.execution = execution
        self.envs = envs
        self._client_gone = False
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The output to stream, ending with ``end_of_execution`` (or early, if the client left)."""
        async for chunk in self.execution.chunks(KEEPALIVE_INTERVAL):
            if self._client_gone:
                return
            yield chunk

    def client_gone(self) -> None:
        """The client disconnected: stop streaming; :meth:`close` interrupts the cell."""
        self._client_gone = True
        self.execution.stop_streaming()

    def close(self) -> None:
        """Release the context once the cell is over (in the background: never blocks the caller)."""
        if not self._closed:
            self._closed = True
            self.contexts._spawn(self._finish())

    async def _finish(self) -> None:
        try:
            if not self.execution.finished:
                await self.kernel.interrupt()
                try:
                    await asyncio.wait_for(self.execution.wait(), INTERRUPT_GRACE)
                except TimeoutError:
                    log.warning(
                        "a %s cell ignored its interrupt for %.0f s: restarting", self.kernel.language, INTERRUPT_GRACE
                    )
                    await self.contexts._restart(self.context, None)
            if self.envs and self.kernel.alive and self.context.kernel is self.kernel:
                await self.contexts._reset_envs(self.context, self.kernel, self.envs)
        finally:
            self.context.lock.release()
            self.contexts._first_use.set()  # the first result is out: spares may start now


class Contexts:
    """All contexts of one server, the default context per language, and the warm pool."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}
        self.pool: dict[str, list[Kernel]] = {}
        self._filling: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._dirs = kernel_dirs(options.kernel_dirs)
        self._commands: dict[str, KernelCommand] = {}
        self._global_envs: dict[str, str] | None = None
        self._closing = False
        self._first_use = asyncio.Event()
        """Set when a cell has finished or a context was created: the pool may start its spares."""
        self._spares_on_use = False
        """Set by :meth:`spares_on_use`: no ``POOL_DELAY``, the spares wait for ``_first_use``."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the default contexts (Python first: it is what the first ``runCode`` wants)."""
        for language in ("python", "javascript"):
            try:
                context = await self.default(language, start=False)
            except LanguageError as exc:
                log.warning("no default %s context: %s", language, exc)
                continue
            if language in self.options.prestart:
                self._ensure_starting(context)
        for language in self.options.prestart:
            if language not in ("python", "javascript"):
                with contextlib.suppress(LanguageError):
                    self._ensure_starting(await self.default(language, start=False))
        self._spawn(self._fill_pools_after_defaults())

    async def _fill_pools_after_defaults(self) -> None:
        for context in list(self.contexts.values()):
            if context.starting is not None:
                with contextlib.suppress(KernelError, asyncio.CancelledError):
                    await context.starting
        try:
            await asyncio.wait_for(self._first_use.wait(), POOL_DELAY)
        except TimeoutError:
            if self._spares_on_use:
                await self._first_use.wait()
        for language in self.options.pool:
            self._fill_pool(language)

    def spares_on_use(self) -> None:
        """Start no spare kernel until a cell has finished or a context was created, however long
        that takes: a warm sandbox's warm-up asks (``GET /health?spares=on-use``). Started while it
        waits in the pool, a spare is ~60 MiB more per warm sandbox, twice the CPU before the pool
        is refilled, and, claimed during its start-up, reniced to 0 beside the first ``runCode``."""
        self._spares_on_use = True

    async def close(self) -> None:
        """Stop every kernel."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        kernels = [c.kernel for c in self.contexts.values() if c.kernel is not None]
        kernels += [k for spares in self.pool.values() for k in spares]
        self.contexts.clear()
        self.pool.clear()
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- contexts -----------------------------------------------------------------------------

    async def command(self, language: str) -> KernelCommand:
        """The kernel for a language (cached once found; kernelspecs are read off the loop)."""
        command = self._commands.get(language)
        if command is None:
            command = await asyncio.to_thread(resolve, language, self._dirs, self.options.env.get("PATH"))
            self._commands[language] = command
        return command

    async def create(self, language: str, cwd: str | None, start: bool = True) -> Context:
        """A new context (``POST /contexts``); its kernel comes from the pool or starts now."""
        await self.command(language)  # fails fast, naming the language, when there is no kernel
        cwd = cwd or self.options.cwd
        if not await asyncio.to_thread(os.path.isdir, cwd):
            raise NotADirectoryError(f"cwd '{cwd}' is not a directory in the sandbox")
        context = Context(language, cwd)
        self.contexts[context.id] = context
        if start:
            self._first_use.set()  # a user's own context: the pool starts the next one's kernel
            self._ensure_starting(context)
            try:
                await context.starting  # type: ignore[misc]
            except BaseException:
                self.contexts.pop(context.id, None)
                raise
        return context

    async def default(self, language: str, start: bool = True) -> Context:
        """The language's default context, created on first use."""
        context_id = self.defaults.get(language)
        context = self.contexts.get(context_id) if context_id else None
        if context is None:
            context = await self.create(language, self.options.cwd, start=False)
            self.defaults[language] = context.id
        if start:
            self._ensure_starting(context)
        return context

    def get(self, context_id: str) -> Context | None:
        return self.contexts.get(context_id)

    async def remove(self, context: Context) -> None:
        """Drop a context and stop its kernel (a running cell ends with ``ContextRemoved``)."""
        self.contexts.pop(context.id, None)
        if self.defaults.get(context.language) == context.id:
            del self.defaults[context.language]
        if context.starting is not None:
            with contextlib.suppress(KernelError, asyncio.CancelledError):
                await context.starting
        if context.kernel is not None:
            await context.kernel.shutdown()

    async def restart(self, context: Context) -> None:
        """``POST /contexts/{id}/restart``: a fresh kernel, same id and working directory."""
        await self._restart(context, wire.error("ContextRestarting", "Context was restarted", ""))

    async def _restart(self, context: Context, reason: bytes | None) -> None:
        if context.starting is not None and not context.starting.done():
            with contextlib.suppress(KernelError):
                await context.starting
        if context.kernel is None:
            self._ensure_starting(context)
        else:
            self._begin_restart(context, context.kernel, reason)
        await context.starting  # type: ignore[misc]

    def _begin_restart(self, context: Context, kernel: Kernel, reason: bytes | None) -> None:
        """Restart ``kernel`` in place as the context's pending start (same process slot, fresh state)."""

        async def restart() -> Kernel:
            await kernel.restart(reason)
            context.envs_applied = False
            await self._chdir(context, kernel)
            return kernel

        context.starting = asyncio.ensure_future(restart())
        context.starting.add_done_callback(_retrieve)

    def _ensure_starting(self, context: Context) -> None:
        """Start the context's kernel unless it is running, starting or restarting."""
        task = context.starting
        if task is not None and not task.done():
            return
        healthy = context.kernel is not None and context.kernel.alive
        if task is not None and not task.cancelled() and task.exception() is None and healthy:
            return
        old, context.kernel = context.kernel, None
        if old is not None:  # died, or its restart failed: start over with a new process
            self._spawn(old.shutdown())
        context.starting = asyncio.ensure_future(self._start_kernel(context))
        context.starting.add_done_callback(_retrieve)

    async def _start_kernel(self, context: Context) -> Kernel:
        spare = self._take_spare(context.language)
        if spare is not None:
            kernel = spare
            kernel.on_death = lambda k: self._on_death(context, k)
        else:
            command = await self.command(context.language)
            kernel = Kernel(
                command, context.cwd, self.options.env, self.options.runtime_dir, lambda k: self._on_death(context, k)
            )
            try:
                await kernel.start()
            except BaseException:
                await kernel.shutdown()
                raise
        context.kernel = kernel
        context.envs_applied = False
        await self._chdir(context, kernel)
        if spare is not None:
            self._fill_pool(context.language)
        return kernel

    async def _chdir(self, context: Context, kernel: Kernel) -> None:
        """Move a kernel started elsewhere (a spare) into the context's working directory."""
        if kernel.cwd != context.cwd:
            error = await kernel.run_silent(LANGUAGES[context.language].chdir(context.cwd))
            if error is not None:
                raise KernelError(f"could not change to '{context.cwd}': {error[0]}: {error[1]}")

    def _on_death(self, context: Context, kernel: Kernel) -> None:
        if self._closing or self.contexts.get(context.id) is not context or context.kernel is not kernel:
            return
        log.warning("the %s kernel of context %s died: restarting it", kernel.language, context.id)
        if kernel.pump_alive:
            self._begin_restart(context, kernel, None)
        else:  # its pump failed: a new Kernel (new process, new pump)
            context.kernel = None
            self._spawn(kernel.shutdown())
            self._ensure_starting(context)

    async def kernel_of(self, context: Context) -> Kernel:
        """The context's kernel, ready (waits for a start or restart in progress)."""
        self._ensure_starting(context)
        assert context.starting is not None
        return await asyncio.shield(context.starting)

    # -- the warm pool ------------------------------------------------------------------------

    def _spare_died(self, kernel: Kernel) -> None:
        spares = self.pool.get(kernel.language, [])
        if kernel in spares:
            spares.remove(kernel)
            self._spawn(kernel.shutdown())
            self._fill_pool(kernel.language)

    def _take_spare(self, language: str) -> Kernel | None:
        spares = self.pool.get(language, [])
        while spares:
            kernel = spares.pop(0)
            if kernel.alive:
                return kernel
            self._spawn(kernel.shutdown())
        return None

    def _fill_pool(self, language: str) -> None:
        if self._closing or language in self._filling:
            return
        want = self.options.pool.get(language, 0)
        if len(self.pool.get(language, [])) >= want:
            return
        self._filling.add(language)
        self._spawn(self._fill(language, want))

    async def _fill(self, language: str, want: int) -> None:
        try:
            command = await self.command(language)
            while not self._closing and len(self.pool.setdefault(language, [])) < want:
                kernel = Kernel(command, self.options.cwd, self.options.env, self.options.runtime_dir, self._spare_died)
                try:
                    await kernel.start()
                except KernelError as exc:
                    log.warning("could not start a spare %s kernel: %s", language, exc)
                    await kernel.shutdown()
                    return
                if self._closing:
                    await kernel.shutdown()
                    return
                self.pool[language].append(kernel)
        except LanguageError:
            return
        finally:
            self._filling.discard(language)

    # -- executions ---------------------------------------------------------------------------

    async def open_run(self, context: Context, code: str, envs: dict[str, str], token: str | None) -> Run:
        """Wait for the context, prepare its kernel and send the cell. Cancel-safe: cancelled while
        waiting, nothing is held; cancelled later, the context is released once the cell is over."""
        await context.lock.acquire()
        prepare = asyncio.ensure_future(self._prepare(context, code, envs, token))
        try:
            return await asyncio.shield(prepare)
        except asyncio.CancelledError:
            prepare.add_done_callback(lambda task: _close_or_release(task, context))
            raise
        except BaseException:
            context.lock.release()
            raise

    async def _prepare(self, context: Context, code: str, envs: dict[str, str], token: str | None) -> Run:
        kernel = await self.kernel_of(context)
        language = LANGUAGES[context.language]
        if not context.envs_applied:
            sandbox_envs = await self._sandbox_envs(token)
            if sandbox_envs:
                await kernel.run_silent(language.set_env(sandbox_envs))
            context.envs_applied = True
        if envs:
            error = await kernel.run_silent(language.set_env(envs))
            if error is not None:
                raise KernelError(f"could not set env_vars: {error[0]}: {error[1]}")
        return Run(self, context, kernel, kernel.execute(code), envs)

    async def _reset_envs(self, context: Context, kernel: Kernel, envs: dict[str, str]) -> None:
        """Put the call's env vars back to the sandbox's values, or remove them."""
        language = LANGUAGES[context.language]
        sandbox_envs = self._global_envs or {}
        restore = {k: sandbox_envs[k] for k in envs if k in sandbox_envs}
        remove = [k for k in envs if k not in sandbox_envs]
        code = "\n".join(
            part for part in (restore and language.set_env(restore), remove and language.unset_env(remove)) if part
        )
        if code:
            error = await kernel.run_silent(code)
            if error is not None:
                log.warning("could not reset env vars in a %s kernel: %s: %s", context.language, *error)

    async def _sandbox_envs(self, token: str | None) -> dict[str, str]:
        """The sandbox-wide env vars (``Sandbox.create(envs=...)``), from the agent's ``/envs``."""
        if self.options.envd_url is None:
            return {}
        envs = await asyncio.to_thread(_fetch_envs, self.options.envd_url, token)
        if envs is not None:
            self._global_envs = envs
        return self._global_envs or {}


def _fetch_envs(envd_url: str, token: str | None) -> dict[str, str] | None:
    request = urllib.request.Request(f"{envd_url.rstrip('/')}/envs")
    if token:
        request.add_header("X-Access-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=ENVS_TIMEOUT) as response:
            body = response.read(MAX_ENVS_BODY + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("could not read the sandbox's env vars from %s/envs: %s", envd_url, exc)
        return None
    try:
        envs = json.loads(body) if len(body) <= MAX_ENVS_BODY else None
    except ValueError:
        envs = None
    if not isinstance(envs, dict):
        return None
    return {str(k): str(v) for k, v in envs.items() if isinstance(v, str)}


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A start nobody awaits any more must not log "exception never retrieved"."""
    if not task.cancelled():
        task.exception()


def _close_or_release(task: asyncio.Future[Run], context: Context) -> None:
    if task.cancelled() or task.exception() is not None:
        context.lock.release()
    else:
        run = task.result()
        run.client_gone()
        run.close()
