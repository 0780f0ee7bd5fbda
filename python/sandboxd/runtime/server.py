"""Run the runtime: ``sandboxd serve`` — the control-plane API and the sandbox proxy on one port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd import __version__, _core
from sandboxd.agent.asgi import Receive, Scope, Send, header_map, send_json
from sandboxd.agent.http_server import ConnectionLimits, bind_listeners, serve_until_signalled, server_config

from . import host, leftovers
from .api import ControlPlane
from .backend import ListQuery, LocalBackend
from .code_interpreter import DEFAULT_INDEX
from .connection import protocol_class
from .debian import DEFAULT_MIRROR
from .errors import ApiError
from .host import SandboxFlags
from .inputs import Query
from .manager import HostPlace, Limits, SandboxManager
from .network import NetworkOptions, SandboxNetworks
from .network.addressing import tag_for
from .observe import Observer, Secrets
from .observe import logs as observe_logs
from .observe.endpoints import PATHS as OPERATOR_PATHS
from .observe.endpoints import OperatorEndpoints
from .observe.http import RequestObserver
from .observe.probes import Readiness
from .proxy import ENVD_PORT, SandboxProxy, parse_target
from .secret_api import SecretApi
from .signed import find_signer, operation_of
from .store import DATABASE, Store
from .template_api import TemplateApi
from .template_builder import TemplateBuilder
from .templates import Templates, default_store_dir
from .volume_api import VolumeApi
from .webhooks import Deliveries, WebhookApi, WebhookStore
from .zygote_client import ZygoteClient

log = logging.getLogger("sandboxd.runtime")

DEFAULT_DATA_DIR = Path("/var/lib/sandboxd")


@dataclass
class ServeOptions:
    """``sandboxd serve`` flags."""

    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = DEFAULT_DATA_DIR
    api_key: str | None = None
    domain: str | None = None
    sandboxes: SandboxFlags = field(default_factory=SandboxFlags)
    id_registry: Path = Path(_core.DEFAULT_ID_REGISTRY)
    """The host-wide registry of sandbox id ranges, shared by every runtime on the host."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: str = "text"
    network: NetworkOptions | None = field(default_factory=NetworkOptions)
    """Sandbox networking; None gives sandboxes loopback only (``--no-network``)."""
    template_store: Path | None = None
    """Where template layers live (default ``<data dir>/templates``); several runtimes may share one."""
    debian_mirror: str = DEFAULT_MIRROR
    pypi_index: str = DEFAULT_INDEX
    """The Python package index ``code-interpreter-v1`` is built from."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


class RuntimeApp:
    """One port: requests for a sandbox go to the proxy, the rest to the control plane and the
    operators' endpoints (``/health``, ``/ready``, ``/metrics``, ``/status``: :class:`OperatorEndpoints`
    here, a smaller set for ``--backend kubernetes``); every request is observed (:mod:`.observe.http`)."""

    def __init__(
        self,
        control: ControlPlane,
        proxy: SandboxProxy,
        operators: Callable[[Scope, Receive, Send], Awaitable[None]],
        requests: RequestObserver,
        domain: str | None,
        template_api: TemplateApi | None = None,
        volume_api: VolumeApi | None = None,
        secret_api: SecretApi | None = None,
        webhook_api: WebhookApi | None = None,
    ) -> None:
        self.control = control
        self.template_api = template_api
        """E2B's template build API (this machine's runtime only)."""
        self.volume_api = volume_api
        """E2B's volume API (this machine's runtime only)."""
        self.secret_api = secret_api
        """E2B's secrets API (this machine's, or a cluster's with ``--backend kubernetes``)."""
        self.webhook_api = webhook_api
        """E2B's lifecycle webhooks (this machine's runtime only)."""
        self.proxy = proxy
        self.operators = operators
        self.requests = requests
        self.domain = domain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            target = parse_target(header_map(scope), self.domain)
        except ApiError as exc:
            await self.requests.runtime(_error(exc), scope, receive, send)
            return
        if target is not None:
            await self.requests.proxied(self.proxy, scope, receive, send, *target)
        elif scope["path"] == "/files" and b"signature=" in scope.get("query_string", b""):
            await self.signed_files(scope, receive, send)
        else:
            await self.requests.runtime(self._local, scope, receive, send)

    async def _local(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in OPERATOR_PATHS:
            await self.operators(scope, receive, send)
        elif self.control.matches(scope["path"]):
            await self.control(scope, receive, send)
        elif self.template_api is not None and self.template_api.matches(scope["path"]):
            await self.template_api(scope, receive, send)
        elif self.volume_api is not None and self.volume_api.matches(scope["path"]):
            await self.volume_api(scope, receive, send)
        elif self.secret_api is not None and self.secret_api.matches(scope["path"]):
            await self.secret_api(scope, receive, send)
        elif self.webhook_api is not None and self.webhook_api.matches(scope["path"]):
            await self.webhook_api(scope, receive, send)
        else:
            await send_json(send, 404, {"code": 404, "message": f"no such endpoint: {scope['method']} {scope['path']}"})

    async def signed_files(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A signed ``/files`` URL with no sandbox named (``E2B_SANDBOX_URL``): to the sandbox whose
        token signed it, or envd's 401 when none did (see :mod:`.signed`)."""
        try:
            query = Query(scope.get("query_string", b""))
            signature = query.get("signature", 1024)
            operation = operation_of(scope["method"])
            if signature is None or operation is None:
                raise ApiError(404, f"no such endpoint: {scope['method']} /files without a sandbox")
            candidates = await self._live_tokens()
            sandbox_id = find_signer(
                candidates,
                query.values.get("path", ""),
                operation,
                query.values.get("username", ""),
                signature,
                query.values.get("signature_expiration"),
            )
            if sandbox_id is None:
                raise ApiError(401, "invalid signature")
        except ApiError as exc:
            await self.requests.runtime(_error(exc), scope, receive, send)
            return
        await self.requests.proxied(self.proxy, scope, receive, send, sandbox_id, ENVD_PORT)

    async def _live_tokens(self) -> list[tuple[str, str]]:
        """(id, access token) of every running or paused sandbox, through the backend's listing."""
        tokens: list[tuple[str, str]] = []
        cursor: str | None = None
        while True:
            query = ListQuery(states=["running", "paused"], limit=MAX_SIGNER_PAGE, cursor=cursor)
            rows, cursor = await self.control.backend.list_page(query)
            tokens += [(row.id, row.access_token) for row in rows]
            if cursor is None:
                return tokens


def _error(exc: ApiError) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, exc.status, exc.body())

    return answer


MAX_SIGNER_PAGE = 1000
"""Sandboxes read per page while looking for a signed URL's sandbox (a runtime holds a few hundred)."""


def _api_key(store: Store, given: str | None) -> str:
    if given:
        return given
    key = store.setting("api_key")
    if key is None:
        key = "e2b_" + secrets.token_hex(20)
        store.set_setting("api_key", key)
    return key


def run(options: ServeOptions) -> None:
    """Prepare the data dir and the zygote, then serve until interrupted."""

    known_secrets = Secrets()
    recent = observe_logs.configure(options.log_format, known_secrets)
    if os.geteuid() != 0:
        sys.exit("sandboxd serve needs root: sandboxes are built from namespaces, overlayfs and cgroups")
    if "\n" in str(options.data_dir.resolve()):
        # The host's id registry records the data dir on a line of its own: every create would fail.
        sys.exit("sandboxd serve: --data-dir must not contain a newline")
    # The database holds the API key and every sandbox's access token: owner-only, like ~/.ssh.
    options.data_dir.mkdir(parents=True, exist_ok=True)
    options.data_dir.chmod(0o700)
    # Held while this process lives: if it is killed outright, the next runtime to start on this host
    # removes the table, links' rules and cgroup group it leaves (see leftovers). Taken before anything
    # of this runtime is made or written, and before its signal handlers: a runtime that finds another
    # on its data dir must leave that one's database and groups alone, and a stop signal here finds
    # nothing to clean up.
    tag = tag_for(options.data_dir)
    mark: leftovers.RuntimeMark | None = None
    try:
        mark = leftovers.RuntimeMark(
            host.instance_name(options.data_dir),
            f"inet sandboxd_{tag}",
            f"sd{tag}h",
            data_dir=str(options.data_dir.resolve()),
        )
    except leftovers.MarkHeld as exc:
        sys.exit(f"sandboxd serve: {exc}")
    except OSError as exc:  # a read-only /run, say: the runtime works, only a kill -9 would leave things
        log.warning(
            "no mark in %s (%s): if this runtime is killed outright, what it leaves stays", leftovers.MARK_DIR, exc
        )
    except KeyboardInterrupt:  # Ctrl-C this early: nothing made yet (a torn mark is swept)
        return
    store = Store(options.data_dir / DATABASE)
    api_key = _api_key(store, options.api_key)
    known_secrets.add(api_key)
    observer = Observer(secrets=known_secrets)
    templates = Templates(
        store, options.template_store or default_store_dir(options.data_dir), options.debian_mirror, options.pypi_index
    )
    templates.observe = observer
    with observer.template_build("host"):
        templates.ensure_host()
    templates.resume_collections()
    # `sandboxd template` finds the store this runtime uses through its database.
    store.set_setting("template_store", str(templates.store_dir))
    host.require_isolation(templates, "sandboxd serve")
    _core.become_subreaper()
    clean = False
    try:
        # uvicorn stops gracefully on SIGTERM and SIGINT and then raises the signal again with the
        # handler it found. Both must unwind through _serve's clean-up (the zygote, the network table and
        # links must go), so both get a handler of ours from here on (see _interrupted). SIGTERM's
        # default would end the process on the spot. SIGINT's must not be `signal.default_int_handler`
        # either: asyncio.Runner (uvloop.run) replaces that one with its own, which cancels the main
        # task, and the cancellation cut the clean-up short at its first await: the network helper and
        # the zygote were never stopped, and the process hung for ever on its way out.
        signal.signal(signal.SIGTERM, _interrupted)
        signal.signal(signal.SIGINT, _interrupted)
        _prepare_and_serve(options, store, templates, api_key, observer, recent)
        clean = True
    except KeyboardInterrupt:
        clean = True  # a stop signal before the event loop ran
    finally:
        # The instance's cgroup group, made by _prepare_host: removed if no sandbox is in it, however
        # the start ended (a stop signal at any moment, a port taken). _serve's clean-up removes it
        # too; this covers what came before that clean-up was armed.
        host.remove_instance_if_empty(options.data_dir)
        if clean and mark is not None:
            if host.sandboxes_left(options.data_dir):
                mark.release()  # sandboxes run on, for the next runtime here to adopt
            else:
                mark.close()  # everything it names is gone; after a failed clean-up, it stays to be swept


def _prepare_and_serve(
    options: ServeOptions,
    store: Store,
    templates: Templates,
    api_key: str,
    observer: Observer,
    recent: observe_logs.RecentErrors,
) -> None:
    limits = _prepare_host(options)
    # Listening before anything else runs: the sandbox firewall and `sandboxd status` need the real
    # port, which with --port 0 only the bound socket knows.
    try:
        listeners = bind_listeners(options.host, options.port)
    except OSError as exc:
        sys.exit(f"sandboxd serve cannot listen on {options.host}:{options.port}: {exc.strerror or exc}")
    port = int(listeners[0].getsockname()[1])
    scheme = "https" if options.tls_cert else "http"
    url = f"{scheme}://{options.host}:{port}"
    store.set_setting("url", url)  # where `sandboxd status` finds this runtime
    base_note = ""
    if any(t.name == "base" and t.state == "not built" for t in templates.listing()):
        base_note = (
            "template 'base' is not built yet: the first sandbox that needs it builds it from Debian's archive\n"
            "(a few minutes, once; progress is logged here), or build it now: sandboxd template build base\n"
        )
    if options.log_format == "json":
        # A log pipeline keeps stdout: no key in it. The person who needs it reads it from the data dir.
        log.info(
            "sandboxd %s serving the E2B API and sandbox proxy on %s (data dir %s)",
            __version__,
            url,
            options.data_dir,
            extra={"event": "runtime.started", "url": url, "data_dir": str(options.data_dir)},
        )
    else:
        print(
            f"sandboxd {__version__}: E2B-compatible API and sandbox proxy on {url}\n"
            f"data dir: {options.data_dir}\ntemplate store: {templates.store_dir}\n"
            f"each sandbox: {limits.cpu_count} CPU, {limits.memory_mb} MiB memory, {limits.disk_mb} MiB disk, "
            f"{limits.pids_max} tasks\n{base_note}\n"
            "Point the E2B SDKs at it:\n"
            f"  export E2B_API_KEY={api_key}\n"
            f"  export E2B_API_URL={url}\n"
            f"  export E2B_SANDBOX_URL={url}\n"
            f"  export E2B_VOLUME_API_URL={url}\n",
            flush=True,
        )
    import uvloop

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        uvloop.run(_serve(options, listeners, limits, store, templates, api_key, observer, recent))


class _Stop:
    """What a stop signal found, for :func:`_interrupted`: once the event loop runs, the task it
    cancels (unless that task is cleaning up already)."""

    requested = False
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[None] | None = None
    cleaning = False


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM's and SIGINT's handler outside uvicorn's own (which replaces it while serving).

    Before the event loop runs, as ``signal.default_int_handler``, but not it (see :func:`run`), so
    that asyncio.Runner leaves SIGINT to it. Once it runs, no exception is raised here: a handler's
    exception lands in whatever Python code the main thread was running, and where that was a weakref
    callback or a ``__del__`` the interpreter printed it as "ignored" and the runtime went on starting
    and then served as if no signal had come (a SIGTERM 0.2 s into the start-up hung the stop for good).
    The start-up task is cancelled from the loop instead: its clean-up then runs whole. The signal
    uvicorn raises again once it has stopped serving finds the task cleaning up, and is only noted."""
    _Stop.requested = True
    if _Stop.loop is None:
        raise KeyboardInterrupt
    with contextlib.suppress(RuntimeError):  # the loop closed: serving and its clean-up are over
        _Stop.loop.call_soon_threadsafe(_cancel_unless_cleaning)


def _cancel_unless_cleaning() -> None:
    if _Stop.task is not None and not _Stop.cleaning:
        _Stop.task.cancel()


def _prepare_host(options: ServeOptions) -> Limits:
    """Write the host-wide budgets, free stale id ranges, and size the sandboxes from the host."""
    return host.sandbox_limits(host.prepare(options.data_dir, options.id_registry), options.sandboxes)


async def _serve(
    options: ServeOptions,
    listeners: list[socket.socket],
    limits: Limits,
    store: Store,
    templates: Templates,
    api_key: str,
    observer: Observer,
    recent: observe_logs.RecentErrors,
) -> None:
    from . import zygote

    _Stop.loop, _Stop.task = asyncio.get_running_loop(), asyncio.current_task()
    if _Stop.requested:  # a stop signal came before the loop ran (and its exception was lost)
        return
    zygote_client = ZygoteClient(zygote.start)
    networks: SandboxNetworks | None = None
    manager: SandboxManager | None = None
    place: HostPlace | None = None
    hooks = WebhookStore(store.db)
    deliveries = Deliveries(store, hooks, observer.metrics)
    # Whatever fails while starting (say, the data dir's state) ends the process with its error: the
    # zygote, the network table and the manager's threads are stopped on the way out, as after serving
    # (without this, the metrics thread kept a failed runtime alive, silent). A stop signal at any
    # moment of the start-up cancels this task (_interrupted): the same clean-up runs.
    try:
        deliveries.start()
        await zygote_client.start()
        if options.network is not None:
            # Warm sandboxes hold a network slot each without counting against --max-sandboxes.
            slots = limits.max_sandboxes + limits.warm_sandboxes
            port = int(listeners[0].getsockname()[1])
            networks = SandboxNetworks(store, options.data_dir, options.network, slots, port)
            await networks.start()
        place = await host.open_place(options.data_dir, options.id_registry, limits.disk_mb)
        manager = SandboxManager(
            store, templates, options.data_dir, zygote_client, limits, place, observer=observer, networks=networks
        )
        await manager.start()
        backend = LocalBackend(manager)
        proxy = SandboxProxy(backend, options.domain)
        manager.on_gone.append(proxy.forget)
        readiness = Readiness(zygote_client, options.data_dir, templates)
        operators = OperatorEndpoints(
            manager, zygote_client, readiness, observer.metrics, recent, api_key, options.data_dir
        )
        builder = TemplateBuilder(manager, templates)
        await builder.start()
        app = RuntimeApp(
            ControlPlane(backend, api_key, options.domain),
            proxy,
            operators,
            RequestObserver(observer.metrics),
            options.domain,
            TemplateApi(builder, api_key),
            VolumeApi(manager.volumes, api_key, manager.mounted_by),
            SecretApi(manager.secrets, api_key),
            WebhookApi(hooks, api_key),
        )
        config = server_config(app, options.host, options.port, options.connections)
        observe_logs.adopt_uvicorn()
        # Resets and upgrades need the connection itself (see .connection); TLS is uvicorn's own.
        config.http = protocol_class(proxy, config.http)
        if options.tls_cert is not None:
            config.ssl_certfile = str(options.tls_cert)
            config.ssl_keyfile = str(options.tls_key) if options.tls_key is not None else None
        # Everything made so far (the imported modules, the app, the manager) lives as long as the
        # process: out of the cycle collector's reach, so that its full collections scan only what serving
        # makes. A full collection over the ~90,000 objects the runtime starts with took 14-16 ms of the
        # event loop, one every few hundred creates (the create it fell on waited that long); frozen, such
        # a heap takes microseconds. Garbage from the start-up is collected first.
        gc.collect()
        gc.freeze()
        try:
            await serve_until_signalled(config, listeners)
        finally:
            operators.close()
    finally:
        _Stop.cleaning = True  # a signal from here on is only noted: the clean-up below runs whole
        # Each step runs even if one before it raised, or a second signal interrupted it: a failed
        # step must not leave the zygote, the network table or the disks behind. The stack runs
        # them last-in first-out, so they are pushed in the reverse of the order they run in; once
        # all have run, the last error is raised, with the ones before it as its context.
        async with contextlib.AsyncExitStack() as after:
            after.callback(store.close)
            if place is not None:  # else run()'s own clean-up removes the instance's group
                after.push_async_callback(host.close_place, place)
            after.push_async_callback(zygote_client.stop)
            if networks is not None:
                after.push_async_callback(networks.stop)
            after.push_async_callback(asyncio.to_thread, deliveries.stop)
            if manager is not None:
                after.push_async_callback(manager.stop)
            after.callback(templates.close)
        await asyncio.sleep(0)
