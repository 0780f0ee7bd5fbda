"""The zygote: a single-threaded process that has imported the whole agent once and forks a
sandboxed agent per create, so no sandbox pays Python's start-up and imports (0.2-0.5 s of CPU
each, which would make 100 creates take tens of seconds on 2 cores).

Why a zygote rather than a pool of warm sandboxes: a pool costs memory for sandboxes nobody asked
for and still pays the imports when it runs dry; a fork of an idle, already-imported process costs
a few milliseconds and shares every page until written (measured: ``benches/runtime``).

The runtime execs it (:func:`start`) and talks to it over a ``SOCK_SEQPACKET`` socketpair, one JSON
message per request and one per answer. The zygote exits when the runtime's end closes (the runtime
died or stopped).

Inside the sandbox the host's Python installation is not visible, so everything the agent will
ever import is imported here first (:func:`preload`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from sandboxd import _core
from sandboxd.agent.sysfiles import replace_file

from .agent_client import AGENT_PORT
from .logs import FAILURE_MARK
from .volumes import MAX_MOUNTS as MAX_VOLUMES

if TYPE_CHECKING:  # the runtime imports this module too, and never the agent
    from sandboxd.agent.server import Prepared

MAX_MESSAGE = 1 << 16


PRELOAD_PACKAGES = (
    "asyncio",
    "concurrent.futures",
    "email",
    "encodings",
    "google.protobuf",
    "json",
    "psutil",
    "python_multipart",
    "sandboxd.agent",
    "uvicorn.lifespan",
    "uvicorn.protocols",
)
"""Packages imported whole, every submodule: libraries import parts of themselves lazily (protobuf's
``json_format`` imports ``descriptor_pb2`` only when it meets a map field), and inside a sandbox the
host's Python installation is not there to import from."""

PRELOAD_MODULES = ("_strptime", "gzip", "hashlib", "hmac", "secrets", "shlex", "unicodedata", "uvloop", "zlib")
"""Standard modules imported lazily by code on the agent's paths (``datetime.strptime`` → ``_strptime``)."""

_SKIP = (
    "test", "_psosx", "_pswindows", "_psbsd", "_psaix", "_pssunos", "mbcs", "oem", "cp65001", "upb",
    "uvicorn.protocols.websockets",  # the servers run with ws="none"; importing one can warn on stderr
)  # fmt: skip


def preload() -> None:
    """Import every module the agent and the code interpreter can reach, so that what is forked from
    here never imports from disk."""
    import importlib
    import mimetypes
    import pkgutil
    import warnings

    import sandboxd.interpreter as interpreter

    for name in (*PRELOAD_MODULES, *interpreter.PRELOAD_MODULES):
        importlib.import_module(name)
    for package_name in (*PRELOAD_PACKAGES, *interpreter.PRELOAD_PACKAGES):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}.", onerror=lambda _: None):
            if any(part in info.name for part in _SKIP):
                continue
            try:
                with warnings.catch_warnings():  # deprecated modules nobody uses warn when imported
                    warnings.simplefilter("ignore")
                    importlib.import_module(info.name)
            except Exception:  # platform-specific modules that cannot load here
                continue
    from sandboxd.agent.app import AgentApp
    from sandboxd.agent.http_server import server_config
    from sandboxd.agent.methods import build_methods
    from sandboxd.agent.server import configure_logging, prepare
    from sandboxd.agent.state import AgentState
    from sandboxd.interpreter import server as interpreter_server

    mimetypes.init()
    # Exercise the construction paths once, so their lazy imports happen now.
    state = AgentState(default_user="root")
    server_config(AgentApp(state, build_methods(state)), "127.0.0.1", 0).load()
    interpreter_server.preload()
    # The agent's own, which every sandbox's agent starts from (last: its uvicorn loggers are the agent's).
    global _PREPARED
    _PREPARED = prepare(AGENT_HOST, AGENT_PORT)
    configure_logging()  # the agent's handler, made once here rather than in every sandbox


def _write_files(files: dict[str, str]) -> None:
    """In the sandbox, as its root (after its ``pivot_root``: ``/`` is its own): files the runtime
    sets per sandbox (its ``/etc/resolv.conf``), each replaced whole by a new file renamed over it.

    The sandbox's root may have left anything on the way before a pause, and it is the sandbox's
    own set-up it broke, so a file that cannot be written is a warning in its log (``sandbox
    logs``), not a failed start: the agent starts, and the user keeps their files. Nothing on the
    path is followed (no link, so no magic link of ``/proc`` to a host file, is ever written
    through): each directory is opened ``O_NOFOLLOW`` from ``/``, and the new file is created in
    it ``O_EXCL | O_NOFOLLOW`` under a random name, so nothing planted under a name is opened."""
    for path, content in files.items():
        try:
            replace_file(path, content.encode())
        except (OSError, ValueError) as exc:
            _skipped("sandboxd.agent.dns", f"the sandbox's DNS was not set up ({path} was not written)", exc)


def _skipped(logger: str, what: str, exc: Exception) -> None:
    """Log (the agent's log: ``sandbox logs``) a start-up step the sandbox's own files refused, which
    the agent starts without; ``exc`` says why."""
    import logging

    from sandboxd.agent.server import configure_logging

    configure_logging()
    logging.getLogger(logger).warning("%s: %s", what, exc)


AGENT_HOST = "127.0.0.1"
"""Where the agent listens in its sandbox, on envd's port (the runtime connects inside the sandbox's
network namespace)."""

_PREPARED: Prepared | None = None
"""The agent's state and server settings, built by :func:`preload` (see :class:`Prepared`)."""

LISTEN_BACKLOG = 128
"""The early socket's backlog until the agent's server takes it over (and sets its own): only the
runtime's ``/init`` connects that soon."""


def _listen(host: str, port: int) -> socket.socket:
    """The agent's listening socket, bound before its start-up (~10 ms of Python in a fresh fork):
    the runtime's first connect succeeds at once and its ``/init`` waits in the backlog until the
    agent serves, instead of the runtime polling with connects that are refused meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    return sock


_IGNORED: list[int] = []
"""The signals the zygote ignores, its own SIGINT and what it inherited (``nohup sandboxd serve``'s
SIGHUP; a shell without job control gives a background job SIGINT and SIGQUIT ignored), but SIGPIPE
and SIGXFSZ (CPython's own, reset by every spawn of the agent and by ``subprocess``): set back to
their defaults in each sandbox's agent, before it starts anything. Ignored dispositions survive
``fork`` and ``execve``, so every command, terminal, code interpreter and kernel of every sandbox
would otherwise ignore them, by how the runtime was started: a hang-up or a Ctrl-C that never
arrives. Listed once here, so that a create pays only for the signals there are."""


def _run_agent(
    log_fd: int,
    files: dict[str, str],
    interpreter: bool = False,
    ca_bundle: str | None = None,
    fault: str | None = None,
) -> None:
    """In the sandbox (PID 2): write the runtime's files and add its CA to the trust store, start the
    code interpreter if the template has it (a grandchild, reparented to the sandbox's init), then
    become the agent. Never returns. ``fault``: the runtime's test hook (``manager.RESUME_FAULT``),
    this agent's reason to exit before it listens.

    The CA is added here, before the agent's event loop exists, rather than by ``POST /init``'s
    ``caBundle``, where it must run in a worker thread: the agent's first thread, started for it,
    was ~1.2 ms of every create's ``/init`` (timeline of 20 creates each way, same run). A new
    sandbox usually gets none to add: its trust store came with the runtime's trust layer
    (:mod:`.trust`). A resume, and a template without such a layer, do."""
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.environ.clear()
    os.environ.update(
        {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    )
    os.chdir("/")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_DFL)
    code = 0
    try:
        if fault:
            delay, _, reason = fault.removeprefix("after:").partition(":")
            if not fault.startswith("after:"):
                delay, reason = "0", fault
            time.sleep(float(delay))
            if reason:  # "after:S:" only delays the agent's start
                raise RuntimeError(reason)
        _write_files(files)
        if ca_bundle:
            from sandboxd.agent import cacerts

            try:
                cacerts.install(ca_bundle)
            except (OSError, ValueError) as exc:  # what the sandbox's own code left at its trust store
                # Its own TLS it broke, not the runtime's: without the CA, HTTPS the egress proxy
                # intercepts fails to validate (closed), and the agent still starts, so its files can
                # be reached.
                _skipped(
                    "sandboxd.agent.cacerts",
                    "the egress CA was not added to the trust store; HTTPS with header rules will not validate",
                    exc,
                )
        if interpreter:
            from sandboxd.interpreter import INTERPRETER_PORT
            from sandboxd.interpreter.server import InterpreterOptions, fork_server

            # Its kernels run as root in /home/user, as on E2B; they are the template's own.
            fork_server(InterpreterOptions(port=INTERPRETER_PORT, cwd="/home/user"))
        from sandboxd.agent.server import AgentOptions, run

        # No token yet: the runtime sets it with POST /init the moment the agent listens, so the
        # zygote never holds a secret that a later sandbox could find in its copied memory.
        listener = _listen(AGENT_HOST, AGENT_PORT)
        run(AgentOptions(host=AGENT_HOST, port=AGENT_PORT, listener=listener, prepared=_PREPARED), exits_after=True)
    except BaseException as exc:
        # The runtime gives this line's reason to the create or resume it fails (.logs.agent_failure).
        reason = f"{type(exc).__name__}: {exc}"
        print(f"{FAILURE_MARK}{reason}", file=sys.stderr, flush=True)
        code = 1
    finally:
        os._exit(code)


def _volumes(request: dict[str, Any]) -> dict[str, Any]:
    """``enter_sandbox``'s ``volumes``: each mount received, as this process's path to it, and its
    target inside the sandbox."""
    targets = request.get("volumes") or []
    if not targets:
        return {}
    return {"volumes": [(f"/proc/self/fd/{fd}", t) for fd, t in zip(request["volume_fds"], targets, strict=True)]}


def _become_sandbox(
    request: dict[str, Any],
    disk_fd: int | None,
    log_fd: int,
    report: int,
    premade: _core.PremadeCgroup | None = None,
) -> NoReturn:
    """In "A", a single-threaded copy of the zygote that holds no descriptor of the zygote's but these:
    put itself into a new sandbox, report on ``report`` and exit; in the sandbox's payload ("C"),
    become the agent (``enter_sandbox``'s ``payload``, which C runs and never returns from).
    ``disk_fd`` is the sandbox's mounted disk, ``request["volume_fds"]`` its volumes' mounts,
    ``premade`` the cgroup a spare made ahead of need (:func:`_premake`). Never returns into the
    zygote's loop."""

    def become_agent() -> None:  # "C": PID 2 inside the sandbox; never returns
        os.close(report)
        if disk_fd is not None:
            os.close(disk_fd)  # attached inside; the agent needs no handle on the raw disk
        for fd in request["volume_fds"]:
            os.close(fd)  # likewise: mounted inside, idmapped; the raw mounts stay outside
        _run_agent(
            log_fd,
            request.get("files") or {},
            request.get("interpreter") is True,
            request.get("ca_bundle"),
            request.get("fault"),
        )

    try:
        if request.get("nice"):  # a warm sandbox (.warm): inherited by its init and agent
            os.setpriority(os.PRIO_PROCESS, 0, int(request["nice"]))
        # With a payload, the sandbox's init and its agent are clones sharing A's memory rather
        # than forks: no copy of this process's page tables on a create (the zygote's fork of A
        # aside). On success A writes its report (P<init pid>) and exits inside enter_sandbox,
        # never running Python again: the agent runs Python on this very memory.
        _core.enter_sandbox(
            request["id"],
            request["template_dirs"],
            request["sandbox_dir"],
            instance=request["instance"],
            id_base=request["id_base"],
            host_usr_ro=request.get("host_usr_ro", True),
            disk_fd=disk_fd,
            nested_userns=request.get("nested_userns", False),
            memory_bytes=request.get("memory_bytes"),
            cpu_cores=request.get("cpu_cores"),
            pids_max=request.get("pids_max"),
            open_files=request.get("open_files"),
            inotify_instances=request.get("inotify_instances"),
            inotify_watches=request.get("inotify_watches"),
            cpu_weight=request.get("cpu_weight"),  # a warm sandbox's: it boots on what creates leave
            **_volumes(request),
            payload=become_agent,
            premade_cgroup=premade,
            report_fd=report,
        )
        raise RuntimeError("enter_sandbox returned without an error")  # not reached
    except BaseException as exc:  # A must never return into the zygote's loop
        if premade is not None:  # unless enter_sandbox took it (then it removed it, or it is the sandbox's)
            premade.discard()
        # Here only once the sandbox's processes are gone (or never were): Python is A's again.
        _tell(report, _report(f"E{exc}".encode(errors="replace")))
        os._exit(1)


def _tell(report: int, message: bytes) -> None:
    """A's report to the zygote. A zygote gone meanwhile (a broken pipe) has no one to tell: A still
    exits where it is, never unwinding into its copy of the zygote's loop."""
    with contextlib.suppress(OSError):
        os.write(report, message)


PREMAKE_NICE = 10
"""The niceness at which a spare makes its cgroup. A spare is forked as soon as the last create's "A"
has exited, while that create's agent starts and the runtime links it: ~1 ms of system calls that
should take only what those leave of a 2-core host. Back to the zygote's own niceness once made."""


class Premake(NamedTuple):
    """What a spare makes its cgroup with: the last request's instance and cgroup limits, the likeliest
    next ones (a request with others has its limits rewritten, or the group made afresh)."""

    instance: str
    memory_bytes: int | None
    cpu_cores: float | None
    pids_max: int | None

    @classmethod
    def of(cls, request: dict[str, Any]) -> Premake:
        return cls(request["instance"], request.get("memory_bytes"), request.get("cpu_cores"), request.get("pids_max"))


def _premake(premake: Premake | None) -> _core.PremadeCgroup | None:
    """In a spare, before its request: the sandbox's cgroup made and limited ahead of need (the
    create's "A" then renames and joins it: six ``rename`` calls instead of ~70 system calls on the
    create's path, ``docs/benchmarks.md``). None when there is nothing to go by yet (the zygote's
    first spare) or it cannot be made (cgroup v2 cannot rename a group): the create makes it then."""
    if premake is None:
        return None
    own = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(own, PREMAKE_NICE))
        return _core.PremadeCgroup(
            premake.instance,
            memory_bytes=premake.memory_bytes,
            cpu_cores=premake.cpu_cores,
            pids_max=premake.pids_max,
        )
    except (OSError, ValueError, TypeError):  # TypeError: a limit of the wrong type in the request
        return None
    finally:
        with contextlib.suppress(OSError):  # a zygote that could not renice back still serves
            os.setpriority(os.PRIO_PROCESS, 0, own)


def _spare(channel_fd: int, report: int, premake_source: bytes | None) -> NoReturn:
    """In a spare "A" (forked by the serve loop while no create is in flight, ahead of need): make
    the sandbox's cgroup with the last request's instance and limits (``premake_source``, that
    request as received; :func:`_premake`), then wait on ``channel_fd`` for its own request (one
    message, with the agent's log, the disk and the volumes' mounts as ``SCM_RIGHTS``) and become
    that sandbox. A channel closed unused (the zygote stopped, or could not hand it a request):
    exit. Never returns.

    A spare pays the fork of the zygote (its page tables copied, then the child's first writes
    faulting in private pages; ~4 ms of every create before the jail started, ``docs/benchmarks.md``)
    while the zygote is idle. It is the same copy of the zygote a fork at request time would be, with
    the same descriptors closed (the serve loop closes them), so a sandbox made from it sees nothing
    more."""
    premade = None
    try:
        premade = _premake(_premake_of(premake_source))
        channel = socket.socket(fileno=channel_fd)
        data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 2 + MAX_VOLUMES)
        channel.close()
        if not data:  # the zygote is gone, or stopped and closed its end
            if premade is not None:
                premade.discard()
            os._exit(0)
        request = json.loads(data)
        log_fd, rest = fds[0], fds[1:]
        request["volume_fds"] = rest[1:]
    except BaseException:
        if premade is not None:  # never left behind: os._exit runs no finalizer
            premade.discard()
        os._exit(1)
    _become_sandbox(request, rest[0] if rest else None, log_fd, report, premade)


def _premake_of(source: bytes | None) -> Premake | None:
    """The :class:`Premake` of a request as received; None without one, or if it has none."""
    if source is None:
        return None
    try:
        return Premake.of(json.loads(source))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _sandbox(data: bytes, fds: list[int], log_fd: int, report: int) -> NoReturn:
    """In an "A" forked at request time (no spare was ready: a burst, or a spare that died): become
    the sandbox of ``data``, the request as received, with ``fds`` (the disk's, then each volume's
    mount, in the order of its ``volumes``) and the agent's log opened by the zygote. Never returns."""
    try:
        request = json.loads(data)
        request["volume_fds"] = fds[1:]
    except BaseException as exc:
        _tell(report, _report(f"E{type(exc).__name__}: {exc}".encode(errors="replace")))
        os._exit(1)
    _become_sandbox(request, fds[0] if fds else None, log_fd, report)


REPORT_MAX = select.PIPE_BUF
"""A's report is one ``write`` of at most ``PIPE_BUF`` bytes, which the kernel makes atomic: the
zygote reads it whole and answers at once, without waiting for A to exit."""


def _report(message: bytes) -> bytes:
    """A's report on its pipe: ``P<init pid>`` or ``E<why>``, newline-terminated, cut to one atomic write."""
    return message[: REPORT_MAX - 1].replace(b"\n", b" ") + b"\n"


def serve(sock: socket.socket) -> None:
    """Answer create requests until the runtime closes its end (:func:`_core.zygote_serve`: the loop
    runs no Python in the zygote, whose every page written after a fork is a copy-on-write fault,
    shared as it is with every live sandbox; ~190 pages a create when the loop was Python's).

    Creates overlap: a new request is forked while earlier sandboxes are still setting up (most of
    a create is the kernel attaching cgroups and the new init mounting its root), and each answer
    names its sandbox. Answers go out as soon as a sandbox's "A" has reported (its newline-ended
    message), not when A has exited: A is a copy of this large process, and tearing its address
    space down took milliseconds of every create (``benches/runtime``). A is reaped at the EOF
    that follows; an A that dies without a whole report is answered then, with what it said.

    A request goes to the spare (:func:`_spare`) if one is ready, else to an A forked for it
    (:func:`_sandbox`); a new spare is forked :data:`SPARE_DELAY_S` after no create is in flight
    (every A has exited), so its fork competes neither with a create's own nor with what follows
    it. Each fork closes the zygote's descriptors a sandbox must not keep: the socket to the runtime
    (a process inside could otherwise forge answers) and other creates' pipes."""
    _core.zygote_serve(sock.fileno(), _spare, _sandbox, spare_delay=_spare_delay())


SPARE_DELAY_S = 0.02
"""How long after the last create's "A" has exited the zygote forks its next spare. A exits once the
sandbox's agent runs: then the agent starts, the runtime links the sandbox and sends its ``/init``,
the create is answered and the client's first command comes, ~15-20 ms on a quiet 2-core host. A
fork of the zygote (~3 ms of its CPU and ~3 of the spare's) beside them took a CPU they waited for.
A create that comes sooner forks its A on the spot (~3 ms more for it), as a burst's do. Measured
(``docs/benchmarks.md``, ``cold19``): 20 ms was the best of 10-60 ms both for creates 0.15 s apart and
back to back (create, first command, kill), ~2.5-3.4 ms off a cold create→first command; 40 ms and
more lose it back to back, where the next create then comes before its spare. Shorter on a host with
more CPUs (:func:`_spare_delay`)."""


def _spare_delay(cpus: int | None = None) -> float:
    """:data:`SPARE_DELAY_S` on a host of 2 CPUs (or fewer) that this process may run on, shorter on
    more (``2 / cpus`` of it): the fork competes less for a CPU there, and a create's next create, in
    a loop of create, command and kill, comes sooner; one that comes before the spare is forked pays
    the fork on its path instead. ``SANDBOXD_SPARE_DELAY_S`` (seconds, 0 to 60) where it is set: for
    the benchmarks' A/B of the delay and the tests only, not a setting."""
    raw = os.environ.get("SANDBOXD_SPARE_DELAY_S")
    if raw is not None:
        with contextlib.suppress(ValueError):
            return min(60.0, max(0.0, float(raw)))
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return SPARE_DELAY_S * min(1.0, 2 / max(cpus, 1))


ZYGOTE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
"""The zygote's whole environment. It is exec'd afresh rather than forked from the runtime, so that
no sandbox can read the runtime's command line, environment or memory (``--api-key``!) through
``/proc/1/cmdline``, ``/proc/1/environ`` or its inherited pages."""


def start() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start the zygote process; returns the runtime's end of its socket, and the process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(ZYGOTE_ENV)
    if "SANDBOXD_SPARE_DELAY_S" in os.environ:  # the benchmarks' A/B (_spare_delay)
        env["SANDBOXD_SPARE_DELAY_S"] = os.environ["SANDBOXD_SPARE_DELAY_S"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sandboxd.runtime.zygote", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    theirs.close()
    return ours, process


def main(fd: int) -> None:
    """The zygote process: preload, then serve create requests until the runtime goes away."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Once here rather than in each agent (a fork inherits it): glibc's 32 and 33, ignored when
    # the runtime was started by a posix_spawn parent (GNU make), are out of ``signal``'s reach,
    # and the agent's own children (``subprocess``) would inherit them ignored.
    _core.default_ignored_glibc_signals()
    _IGNORED.extend(
        sig
        for sig in signal.valid_signals()
        if sig not in (signal.SIGPIPE, signal.SIGXFSZ) and signal.getsignal(sig) == signal.SIG_IGN
    )
    preload()
    freeze_heap()
    hold_free_chunks()
    clear_type_cache()
    collapse_heap()
    serve(sock)


def freeze_heap() -> None:
    """Collect once, then move every object the preload made into the collector's permanent
    generation (``gc.freeze``), so that a sandbox's collections never walk them: a collection writes
    the header of each object it moves or scans, and every page written in a fork is a private copy.
    Without this the preload's young objects are promoted by each sandbox's first collections, on
    its own copy of their pages. Measured (4 sandboxes each, 10 commands and a file round trip, then
    idle, two runs in both orders): a sandbox's PSS 23.4 → 21.9 MiB, its private dirty memory 13.1 →
    11.5 MiB; the agent's start-up and its page faults are unchanged (a create's collections are
    young-generation ones)."""
    import gc

    gc.collect()
    gc.freeze()


def hold_free_chunks() -> int:
    """Take every free chunk of the allocator's heap for good (:func:`_core.hold_free_chunks`), once
    the preload's garbage is freed, so that what a fork allocates is carved from the heap's top.

    The preload leaves ~840 free chunks (~355 kB) scattered through a ~14 MB heap. In a fork, a
    ``malloc`` served from one writes its header and its bin neighbours' links, each on a page shared
    with the zygote: ~3 copy-on-write faults per allocation, where the top gives a few contiguous
    pages. Measured over bursts of 100 cold creates (``docs/benchmarks.md``, ``cold10``): "A"'s page
    faults ~680 → ~420 per create and the agent's ~1,500 → ~1,390. No memory is added: those pages
    are resident already; the bytes held are returned."""
    return _core.hold_free_chunks()


def clear_type_cache() -> None:
    """Empty the interpreter's attribute cache (``sys._clear_type_cache``) once the preload is done.

    A type attribute lookup that misses the cache writes the entry, taking a reference to the new
    name and dropping the old one's: with the preload's entries, each of a fork's misses writes a
    page of some name the preload looked up last, a copy-on-write fault; an emptied entry holds
    ``None``, whose page every process writes anyway. The fork's hits that the preload's entries
    would have given are fewer than those faults: measured over bursts of 100 cold creates
    (``docs/benchmarks.md``, ``cold10``), an agent's page faults to its ``/init`` ~1,390 → ~1,275."""
    sys._clear_type_cache()


def collapse_heap() -> int:
    """Gather the zygote's anonymous memory (its heap and Python's arenas, ~46 MiB after the
    preload) into transparent huge pages, last before it serves (:func:`_core.collapse_anonymous`),
    then map them by 4 KiB entries again (:func:`_core.split_huge_mappings`); the bytes collapsed.

    The zygote's fork of "A" is the one copy of page tables a cold create makes (``cold11``): ~11,600
    entries, one per 4 KiB page, each made copy-on-write, ~75 % of the fork's CPU in
    ``copy_page_range``. The entries of one huge page (a large folio) a fork copies in batches (Linux
    6.9+), one reference and mapcount update per run instead of 512. They are 4 KiB entries, not one
    2 MiB entry, because a fork holding a 2 MiB entry splits it on its first write into the range, in
    every sandbox's A: while the serve loop was Python its own writes split the zygote's entries
    within its first create anyway; the Rust loop writes ~20 pages a create, and A's CPU per create
    in a burst rose 3.9 → 4.7 ms until the zygote split them once here (4.0, ``docs/benchmarks.md``,
    ``cold15``). Only whole aligned ranges can be collapsed (about half of the memory: Python's 1 MiB
    arenas and the heap are not aligned). Only ``MADV_COLLAPSE``, never ``MADV_HUGEPAGE``: a
    sandbox's own new memory still comes in 4 KiB pages. Nothing changes what a sandbox sees: the
    same pages, the same contents. Measured over bursts of 100 cold creates (``cold14``): the
    zygote's CPU per create 4.64 → 3.42 ms (medians of 8 rounds); a fork of the preloaded zygote alone
    ~3.0 → ~2.1 ms."""
    collapsed = _core.collapse_anonymous()
    if collapsed:
        _core.split_huge_mappings()
    return collapsed


if __name__ == "__main__":
    main(int(sys.argv[1]))
