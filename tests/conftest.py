"""Fixtures that start a real ``sandboxd agent`` subprocess on loopback and point the E2B SDK at it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sandboxd.runtime import code_interpreter, debian
from sandboxd.runtime.layers import LayerStore

REPO = Path(__file__).resolve().parent.parent

TEMPLATE_STORE = Path(os.environ.setdefault("SANDBOXD_TEMPLATE_STORE", str(REPO / ".cache" / "templates")))
"""One template store for every runtime the tests start (each has its own data dir): the Debian
``base`` is built into it once, by :func:`base_template`, and shared. Set in the environment so
that every ``sandboxd`` the tests start, and the JS tests, use it too."""

TEST_TOOLS = REPO / ".cache" / "test-tools"
"""Debian packages the tests unpack rather than install (``make host-deps``)."""


def require(path_or_tool: str | Path, why: str) -> str:
    """The path of a tool the tests need: skipped if it is missing, but a failure in CI (CI=true),
    where `make host-deps` must have provided it."""
    found = str(path_or_tool) if Path(path_or_tool).exists() else shutil.which(str(path_or_tool))
    if found is None:
        message = f"{path_or_tool} is missing ({why}); run `make host-deps`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


PYENV_LOCK = Path.home() / ".pyenv" / "shims" / ".pyenv-shim"
STALE_LOCK_S = 30.0


@pytest.fixture(autouse=True)
def _no_stale_pyenv_lock() -> None:
    """The standalone-agent tests run commands as the host's root, through root's real login shell.
    On machines whose root profile runs ``pyenv init`` (this project's CI image), every login shell
    takes pyenv's rehash lock for a fraction of a second, and a test that kills a command at that
    moment (SIGKILL skips pyenv's cleanup trap) leaves the lock behind: every later ``bash -l`` on the
    host then waits 60 s for it, and each command test times out. A lock older than any real rehash
    is removed here; it is pyenv's own file, and pyenv recreates it when it next needs it."""
    with contextlib.suppress(OSError):
        if time.time() - PYENV_LOCK.stat().st_mtime > STALE_LOCK_S:
            PYENV_LOCK.unlink()


def ignored_signals(status: str) -> int:
    """The ignored signals of a ``/proc/<pid>/status`` (``SigIgn``), bit ``n - 1`` for signal ``n``."""
    return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)


GLIBC_SIGNALS = (1 << 31) | (1 << 32)
"""glibc's own two signals in a ``SigIgn`` mask: 32 and 33 (``SIGCANCEL`` and ``SIGSETXID``). glibc's
``posix_spawn`` leaves them ignored in every child (GNU make's recipes, so CI's pytest and all it
starts), and its ``sigaction`` (so Python's ``signal``) refuses to change them."""


def ignore_glibc_signals() -> Callable[[], None]:
    """A ``preexec_fn`` step that sets signals 32 and 33 to ``SIG_IGN`` with a raw ``rt_sigaction``
    (glibc's ``sigaction`` refuses them), as a ``posix_spawn`` parent leaves them. Everything ctypes
    needs is made here, in the parent; the returned function only calls it."""
    import ctypes

    class KernelSigaction(ctypes.Structure):  # the kernel's layout, x86-64 and arm64 alike
        _fields_ = [
            ("handler", ctypes.c_ulong),
            ("flags", ctypes.c_ulong),
            ("restorer", ctypes.c_ulong),
            ("mask", ctypes.c_ulong),
        ]

    rt_sigaction = {"x86_64": 13, "aarch64": 134}[os.uname().machine]
    ignore = KernelSigaction(1, 0, 0, 0)  # SIG_IGN
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    args = [(ctypes.c_long(rt_sigaction), ctypes.c_long(sig), ctypes.byref(ignore)) for sig in (32, 33)]

    def ignoring() -> None:
        for number, sig, act in args:
            if syscall(number, sig, act, None, ctypes.c_long(8)) != 0:
                raise OSError(ctypes.get_errno(), f"rt_sigaction({sig.value})")

    return ignoring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agent:
    """A running agent subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    token: str | None
    grpc_port: int | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"X-Access-Token": self.token} if self.token else {}


@contextlib.contextmanager
def peak_rss(agent: Agent) -> Iterator[list[int]]:
    """Samples the agent's RSS every 5 ms; yields ``[baseline, peak]``, filled when the block ends."""
    proc = psutil.Process(agent.process.pid)
    result = [proc.memory_info().rss, 0]
    stop = threading.Event()

    def sample() -> None:
        peak = 0
        while not stop.wait(0.005):
            peak = max(peak, proc.memory_info().rss)
        result[1] = max(peak, proc.memory_info().rss)

    thread = threading.Thread(target=sample, name="rss-sampler")
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def die_with_parent() -> None:
    """``preexec_fn``: the kernel kills the child when the tests' process ends without cleaning up
    (a ``kill -9`` of pytest leaves no agent behind)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, 9)


def wait_healthy(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    status: int = 204,
    timeout: float = 60,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll ``GET /health`` until it answers ``status``; fail with the server's log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1, verify=verify).status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{process.args} did not become healthy in {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def start_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Agent]]:
    """A factory: ``start_agent(*flags, token=None, grpc=False)`` → a running :class:`Agent`."""
    started: list[Agent] = []

    def start(*flags: str, token: str | None = None, grpc: bool = False) -> Agent:
        port = free_port()
        grpc_port = free_port() if grpc else None
        args = [sys.executable, "-m", "sandboxd", "agent", "--port", str(port), *flags]
        if token:
            args += ["--access-token", token]
        if grpc_port:
            args += ["--grpc-port", str(grpc_port)]
        log = tmp_path_factory.mktemp("agent") / "agent.log"
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        agent = Agent(process, port, token, grpc_port, log)
        started.append(agent)
        wait_healthy(agent.url, process, log)
        return agent

    yield start
    for agent in started:
        agent.process.terminate()
    for agent in started:
        try:
            agent.process.wait(10)
        except subprocess.TimeoutExpired:
            agent.process.kill()


@pytest.fixture(scope="session")
def agent(start_agent: Callable[..., Agent]) -> Agent:
    """The shared agent: no token, default user = the account running the tests."""
    return start_agent()


@pytest.fixture
def sandbox(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The official E2B SDK in debug mode, pointed at ``agent``."""
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", agent.url)
    from e2b import Sandbox

    sbx = Sandbox.create()
    yield sbx


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory for one test (absolute, so it does not depend on the user's home)."""
    os.chmod(tmp_path, 0o777)
    return tmp_path


@dataclass
class Runtime:
    """A running ``sandboxd serve`` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    api_key: str
    data_dir: Path
    log: Path
    args: list[str]
    verify: ssl.SSLContext | bool = True
    """What clients trust: a test CA's context when the runtime serves TLS (``start_runtime(tls=...)``)."""
    environ: dict[str, str] | None = None
    """Its whole environment, when not the tests' (``start_runtime(env=...)``)."""

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.verify, ssl.SSLContext) else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "E2B_API_KEY": self.api_key,
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_VOLUME_API_URL": self.url,
        }

    def booted(self, sandbox_id: str) -> None:
        """Return once the sandbox's boot is done: a create is answered once its agent runs, before
        its link and ``/init``, and the proxy holds the sandbox's requests until they are (here the
        agent's ``/health``, through the proxy)."""
        served = httpx.get(
            f"{self.url}/health",
            headers={"X-API-KEY": self.api_key, "E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"},
            verify=self.verify,
            timeout=60,
        )
        assert served.status_code == 204, served.text

    def restart(self) -> None:
        """Start the same runtime again (after it was stopped or killed)."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.environ)
        wait_healthy(self.url, self.process, self.log, status=200, verify=self.verify)


def zygote_pid(runtime: Runtime) -> int:
    """The pid of the runtime's zygote (its child running ``sandboxd.runtime.zygote``)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"sandboxd.runtime.zygote" in cmdline and ppid == runtime.process.pid:
            return int(pid)
    raise AssertionError("the runtime has no zygote process")


def sandboxd_template(runtime: Runtime, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``sandboxd template ARGS --data-dir <runtime's>``, as an operator runs it beside the runtime."""
    command = [sys.executable, "-m", "sandboxd", "template", *args, "--data-dir", str(runtime.data_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def _build_once(
    request: pytest.FixtureRequest, name: str, key: str, build: Callable[[LayerStore, Callable[[str], None]], object]
) -> bool:
    """Build a built-in template into the shared store unless its recipe is there (once per checkout,
    with progress on the terminal); False where it cannot be built here (a failure in CI)."""
    store = LayerStore(TEMPLATE_STORE)
    if store.cached(key) is not None:
        return True
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nbuilding the {name} template into {TEMPLATE_STORE} (once per checkout):", flush=True)
        try:
            build(store, lambda line: print(f"  {line}", flush=True))
        except debian.BuildUnavailable as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the {name} template cannot be built in CI: {exc}")
            print(f"  cannot build it here ({exc}): its sandboxes use its fallback", flush=True)
            return False
    return True


@pytest.fixture(scope="session")
def base_template(request: pytest.FixtureRequest) -> bool:
    """The Debian ``base`` in the shared template store (a few minutes, once). False where it cannot
    be built here (no archive in reach, no mmdebstrap): runtimes then fall back to ``host``."""
    if os.geteuid() != 0:
        pytest.skip("building the base template needs root (mmdebstrap --mode=root)")
    # Layers that tests of earlier sessions imported, whose runtimes' data dirs pytest has since
    # deleted, go; the base and everything a live runtime lists stay.
    from sandboxd.runtime.templates import collect_garbage

    collect_garbage(LayerStore(TEMPLATE_STORE))
    recipe = interpreter_recipe().base
    return _build_once(
        request, "base", recipe.key(), lambda store, report: debian.build(store, recipe, debian.BuildProgress(), report)
    )


def interpreter_recipe() -> code_interpreter.Recipe:
    """The ``code-interpreter-v1`` recipe (and, as its ``base``, base's) the tests' runtimes use: the
    mirror and index from the environment, as ``sandboxd serve`` reads them."""
    base = debian.Recipe(mirror=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or debian.DEFAULT_MIRROR)
    return code_interpreter.Recipe(base, os.environ.get("SANDBOXD_PYPI_INDEX") or code_interpreter.DEFAULT_INDEX)


@pytest.fixture(scope="session")
def interpreter_template(request: pytest.FixtureRequest, base_template: bool) -> bool:
    """``code-interpreter-v1`` (``base`` plus the kernels and data stack) in the shared template store
    (``make interpreter-template`` builds it ahead). False where it cannot be built here: its
    sandboxes are then ``base``'s."""
    if not base_template:
        return False
    recipe = interpreter_recipe()
    return _build_once(
        request,
        "code-interpreter-v1",
        recipe.key(),
        lambda store, report: code_interpreter.build(store, recipe, debian.BuildProgress(), report),
    )


def _cold(flags: tuple[str, ...]) -> tuple[str, ...]:
    """A test's runtime keeps no warm pool unless the test asks for one (``--warm-sandboxes``): its
    sandboxes are then made as the test makes them, and no pool's refills run beside it.
    ``test_runtime_warm`` covers the pool, the default one included."""
    return flags if any(f.startswith("--warm-sandboxes") for f in flags) else ("--warm-sandboxes", "0", *flags)


@pytest.fixture(scope="session")
def runtimes_started() -> list[Runtime]:
    """Every runtime ``start_runtime`` has started this session, in order."""
    return []


@pytest.fixture(scope="session")
def start_runtime(
    tmp_path_factory: pytest.TempPathFactory, base_template: bool, runtimes_started: list[Runtime]
) -> Iterator[Callable[..., Runtime]]:
    """A factory: ``start_runtime(*flags, tls=None, env=None, preexec_fn=None)`` → a running :class:`Runtime`
    with its own data dir, over the shared template store. ``tls``: an SSL context trusting the certificate
    the flags give it (``--tls-cert``/``--tls-key``); ``env``: variables added to its environment;
    ``preexec_fn``: run in the runtime's process before it starts (what its starter leaves it)."""
    if os.geteuid() != 0:
        pytest.skip("the runtime needs root (namespaces, overlayfs, cgroups)")
    started = runtimes_started

    def start(
        *flags: str,
        tls: ssl.SSLContext | None = None,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Runtime:
        port = free_port()
        data_dir = tmp_path_factory.mktemp("runtime")
        log = data_dir / "serve.log"
        args = [
            sys.executable,
            "-m",
            "sandboxd",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--api-key",
            "test-key",
            *_cold(flags),
        ]
        environ = {**os.environ, **env} if env else None
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environ, preexec_fn=preexec_fn)
        runtime = Runtime(process, port, "test-key", data_dir, log, args, tls if tls is not None else True, environ)
        started.append(runtime)
        wait_healthy(runtime.url, runtime.process, runtime.log, status=200, verify=runtime.verify)
        return runtime

    yield start
    for runtime in started:
        _stop(runtime)


def _stop(runtime: Runtime) -> None:
    """Kill a runtime's sandboxes, then stop it (SIGTERM; SIGKILL after 10 s); nothing if it has exited."""
    if runtime.process.poll() is not None:
        return
    with httpx.Client(headers={"X-API-KEY": runtime.api_key}, verify=runtime.verify) as client:
        try:
            for sandbox in client.get(f"{runtime.url}/v2/sandboxes", params={"limit": 100}).json():
                client.delete(f"{runtime.url}/sandboxes/{sandbox['sandboxID']}")
        except (httpx.HTTPError, ValueError):
            pass
    runtime.process.terminate()
    try:
        runtime.process.wait(10)
    except subprocess.TimeoutExpired:
        runtime.process.kill()
        runtime.process.wait()


@pytest.fixture(autouse=True)
def _stop_a_tests_own_runtimes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop, at a test's end, the runtimes ``start_runtime`` started for it (by the test or by its
    function-scoped fixtures); those of module- and session-scoped fixtures, set up before this, stay.
    Before, every runtime lived until the session's end: ~50 at once by the suite's last third, each
    with its zygote, disk pool and warm sandboxes, loading the host every later test ran on (CI78
    failed on a race that only such a load opened)."""
    if "start_runtime" not in request.fixturenames:
        yield
        return
    started: list[Runtime] = request.getfixturevalue("runtimes_started")
    before = len(started)
    yield
    for runtime in started[before:]:
        _stop(runtime)


@pytest.fixture(scope="session")
def runtime(start_runtime: Callable[..., Runtime]) -> Runtime:
    """The shared runtime."""
    return start_runtime("--max-timeout", "3600")


@pytest.fixture
def e2b_env(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """Point the official SDK at the shared runtime (no debug mode)."""
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return runtime


def write_kernelspecs(directory: Path) -> Path:
    """Kernelspecs for this venv's kernels (ipykernel, bash_kernel, Deno), as a template installs its own."""
    deno = Path(sys.executable).parent / "deno"
    specs = {
        "python3": ("python", [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]),
        "bash": ("bash", [sys.executable, "-m", "bash_kernel", "-f", "{connection_file}"]),
        "deno": ("typescript", [str(deno), "jupyter", "--kernel", "--conn", "{connection_file}"]),
    }
    for name, (language, argv) in specs.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        spec = {"argv": argv, "display_name": name, "language": language}
        (directory / name / "kernel.json").write_text(json.dumps(spec))
    return directory


@dataclass
class Interpreter:
    """A running ``sandboxd interpreter`` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    cwd: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def start_interpreter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Interpreter]]:
    """A factory: ``start_interpreter(*flags, envd_url=None, kernelspecs=True)`` → a running
    :class:`Interpreter` whose kernels are this venv's, described by kernelspecs or (``kernelspecs=False``)
    found on PATH; it answers ``/health`` once its Python kernel is warm."""
    started: list[Interpreter] = []

    def start(*flags: str, envd_url: str | None = None, kernelspecs: bool = True) -> Interpreter:
        base = tmp_path_factory.mktemp("interpreter")
        cwd = base / "home"
        cwd.mkdir()
        port = free_port()
        args = [sys.executable, "-m", "sandboxd", "interpreter", "--port", str(port), "--cwd", str(cwd)]
        if kernelspecs:
            args += ["--kernel-dir", str(write_kernelspecs(base / "kernels"))]
        args += ["--envd-url", envd_url or "", *flags]
        log = base / "interpreter.log"
        # A home of its own, as in a sandbox: kernels read startup files from it (bash_kernel sources
        # ~/.bashrc; this host's runs pyenv's init, which takes seconds).
        home = base / "root"
        home.mkdir()
        env = {**os.environ, "HOME": str(home)}
        if not kernelspecs:
            env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        interpreter = Interpreter(process, port, cwd, log)
        started.append(interpreter)
        wait_healthy(interpreter.url, process, log, status=200, timeout=120)
        return interpreter

    yield start
    kernels: list[psutil.Process] = []
    for interpreter in started:
        with contextlib.suppress(psutil.Error):
            kernels += psutil.Process(interpreter.process.pid).children()
        interpreter.process.terminate()
    for interpreter in started:
        try:
            interpreter.process.wait(30)
        except subprocess.TimeoutExpired:
            interpreter.process.kill()
    # A stopped interpreter stops its kernels (Deno's would otherwise run on, unnoticed).
    _, survivors = psutil.wait_procs(kernels, timeout=10)
    for survivor in survivors:
        survivor.kill()
    assert not survivors, f"kernels outlived their interpreter: {[k.pid for k in survivors]}"


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Kubernetes control plane on loopback (etcd + kube-apiserver, -scheduler and
    -controller-manager, built by ``make cluster``), shared by every test and bench of the session."""
    from sandboxd.kube.localcluster import DEFAULT_BIN_DIR, LocalCluster

    if not (DEFAULT_BIN_DIR / "kube-apiserver").exists() or shutil.which("etcd") is None:
        message = f"the local control plane is not built ({DEFAULT_BIN_DIR}, etcd): run `make cluster`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = LocalCluster(tmp_path_factory.mktemp("kube"))
    cluster.start()
    try:
        cluster.apply_rbac()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pair(e2b_env: Runtime) -> Iterator[tuple[Any, Any]]:
    """Two sandboxes of the shared runtime, killed afterwards."""
    from e2b import Sandbox

    a, b = Sandbox.create(), Sandbox.create()
    yield a, b
    a.kill()
    b.kill()
