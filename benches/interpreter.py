"""Scenario ``interpreter``: the code interpreter (``sandboxd interpreter``) through the official
``e2b-code-interpreter`` SDK, beside the same work sent straight to an ipykernel with ``jupyter_client``.

* round trip: ``run_code("1+1")`` on the warm default context (p50/p99 over the runs), beside
  ``execute("1+1")`` on a kernel of the same Python driven by a ``BlockingKernelClient`` until its
  ``execute_reply`` and ``status: idle`` (what our server itself waits for);
* stdout: a cell printing 100 MiB (1 MiB writes) with ``on_stdout`` counting it, beside the same cell
  on the direct kernel, its ``stream`` messages counted (MB/s = 10^6 bytes/s over the call);
* PNG: a cell displaying a 5 MB PNG (random pixels, so it does not compress), received as
  ``results[0].png``, beside the same cell's ``display_data`` on the direct kernel;
* new context: ``create_code_context()`` served from the warm pool, beside starting a kernel with
  ``jupyter_client`` until it answers (what a context costs without a pool);
* start-up: the server process started until ``/health`` says its Python kernel is warm, beside the
  same kernel started alone with ``jupyter_client`` (the floor of "first runCode after create");
* memory: the server's RSS, and the RSS of an idle kernel of each language.

The SDK runs in this process in debug mode against the server on a free port; the kernels are this
venv's (ipykernel, Deno), found on PATH as a template's would be.

Through the runtime (as root, with the ``code-interpreter-v1`` template built), the SDK as E2B's docs
use it, every call through ``sandboxd serve``'s proxy to the interpreter inside the sandbox:

* create→first result: ``Sandbox.create()`` (``e2b_code_interpreter``: the template
  ``code-interpreter-v1``) then ``run_code("1+1")``, beside ``Sandbox.create()`` (``e2b``: ``base``)
  then ``commands.run("true")`` on the same runtime, alternated (p50, p99);
* round trip: ``run_code("1+1")`` on the warm default context of such a sandbox, beside the same call
  to the standalone server above;
* create→first result again on a runtime with ``--warm-template code-interpreter-v1
  --warm-sandboxes 1`` (its sandbox's kernel started ahead of the create), the pool full before each
  create, beside the cold figure above.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from .common import (
    Context,
    MiB,
    Result,
    ScenarioSkipped,
    die_with_parent,
    ensure_interpreter_template,
    free_port,
    median,
    percentile,
    stop_process,
)

STDOUT_CODE = "import sys\nfor _ in range({n}):\n    sys.stdout.write('x' * (1 << 20))\n"
PNG_CODE = """
import os, struct, zlib
from IPython.display import Image, display
def _png(width, height):
    raw = b"".join(b"\\x00" + os.urandom(width * 4) for _ in range(height))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
    return b"\\x89PNG\\r\\n\\x1a\\n" + header + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")
_image = _png(1120, 1120)
display(Image(data=_image, format="png"))
"""
"""1120 x 1120 RGBA of random bytes: a 5.0 MB PNG (6.7 MB as base64 on the wire)."""


class Server:
    """``sandboxd interpreter`` on a free port, kernels from this venv's PATH, HOME of its own."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home = tmp / "home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.log = tmp / "interpreter.log"
        self.started = time.perf_counter()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "sandboxd", "interpreter", "--port", str(self.port), "--cwd", str(home)),
                    *("--envd-url", ""),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.ready_s = self._wait_warm()
        self.ps = psutil.Process(self.process.pid)

    def _wait_warm(self) -> float:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"sandboxd interpreter did not become warm:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        stop_process(self.process)


class DirectKernel:
    """An ipykernel of this venv, started and driven with jupyter_client alone (the baseline)."""

    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        started = time.perf_counter()
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        self.start_s = time.perf_counter() - started
        self.execute("import IPython")  # as warm as ours

    def execute(self, code: str) -> dict[str, Any]:
        """Run a cell; returns the bytes of its stream output and its display data, as a client would."""
        import zmq

        shell, iopub = self.client.shell_channel.socket, self.client.iopub_channel.socket
        poller = zmq.Poller()
        poller.register(shell, zmq.POLLIN)
        poller.register(iopub, zmq.POLLIN)
        msg_id = self.client.execute(code)
        idle = replied = False
        received: dict[str, Any] = {"stream": 0, "data": []}
        while not (idle and replied):
            for sock, _ in poller.poll(120_000):
                _, msg = self.client.session.recv(sock, mode=zmq.NOBLOCK)
                if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if sock is shell:
                    replied = True
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif kind == "stream":
                    received["stream"] += len(msg["content"]["text"])
                elif kind in ("display_data", "execute_result"):
                    received["data"].append(msg["content"]["data"])
        return received

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _sdk(url: str) -> Any:
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = url
    from e2b_code_interpreter import Sandbox

    return Sandbox.create()


def run(ctx: Context) -> None:
    try:
        import e2b_code_interpreter  # noqa: F401
        import ipykernel  # noqa: F401
    except ImportError as exc:
        raise ScenarioSkipped(f"{exc.name} is not installed (pip install -e '.[test]')") from None
    runs = ctx.runs or (1 if ctx.quick else 3)
    round_trips = 30 if ctx.quick else 300
    stdout_mib = 20 if ctx.quick else 100

    direct = DirectKernel()
    server = Server(ctx.tmp)
    try:
        ctx.report(
            Result(
                "interpreter: start-up until the Python kernel is warm (/health 200)",
                "s",
                server.ready_s,
                direct.start_s,
                "an ipykernel started alone with jupyter_client until it answers",
                "lower",
            )
        )
        sandbox = _sdk(server.url)
        sandbox.run_code("1+1")  # the SDK's first connection, outside the timing

        standalone: list[float] = []
        ours = standalone
        base: list[float] = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            text = sandbox.run_code("1+1").text
            ours.append((time.perf_counter() - t0) * 1000)
            if text != "2":
                raise RuntimeError(f"run_code('1+1') returned {text!r}")
            t0 = time.perf_counter()
            direct.execute("1+1")
            base.append((time.perf_counter() - t0) * 1000)
        ctx.report(
            Result(
                'interpreter: run_code("1+1") round trip, warm context, sync SDK',
                "ms (p50)",
                median(ours),
                median(base),
                "the same execute sent straight to an ipykernel (jupyter_client, until reply and idle)",
                "lower",
                p50=median(ours),
                p99=percentile(ours, 99),
                samples={"ours": ours, "baseline": base},
                extra={"baseline_p99_ms": percentile(base, 99)},
            )
        )

        code = STDOUT_CODE.format(n=stdout_mib)
        ours, base = [], []
        got = [0]

        def count(message: Any) -> None:
            got[0] += len(message.line)

        for _ in range(runs):
            got[0] = 0
            t0 = time.perf_counter()
            sandbox.run_code(code, on_stdout=count, timeout=600)
            ours.append(stdout_mib * MiB / (time.perf_counter() - t0) / 1e6)
            if got[0] != stdout_mib * MiB:
                raise RuntimeError(f"on_stdout received {got[0]} bytes of {stdout_mib * MiB}")
            t0 = time.perf_counter()
            received = direct.execute(code)
            base.append(stdout_mib * MiB / (time.perf_counter() - t0) / 1e6)
            if received["stream"] != stdout_mib * MiB:
                raise RuntimeError(f"the direct kernel sent {received['stream']} bytes of {stdout_mib * MiB}")
        ctx.report(
            Result(
                f"interpreter: {stdout_mib} MiB of stdout through on_stdout (sync SDK)",
                "MB/s",
                median(ours),
                median(base),
                "the same cell on an ipykernel, stream messages read with jupyter_client",
                "higher",
                extra={"server_rss_mib": round(server.ps.memory_info().rss / MiB, 1)},
            )
        )

        ours, base = [], []
        size = 0
        for _ in range(max(runs, 3)):
            t0 = time.perf_counter()
            execution = sandbox.run_code(PNG_CODE)
            ours.append((time.perf_counter() - t0) * 1000)
            png = execution.results[0].png if execution.results else None
            if not png:
                raise RuntimeError(f"no PNG came back: {execution.error}")
            size = len(png) * 3 // 4
            t0 = time.perf_counter()
            received = direct.execute(PNG_CODE)
            base.append((time.perf_counter() - t0) * 1000)
            if not received["data"] or "image/png" not in received["data"][0]:
                raise RuntimeError("the direct kernel sent no PNG")
        ctx.report(
            Result(
                f"interpreter: a {size / 1e6:.1f} MB PNG returned as results[0].png",
                "ms (p50)",
                median(ours),
                median(base),
                "the same cell on an ipykernel, its display_data read with jupyter_client",
                "lower",
                p50=median(ours),
                p99=percentile(ours, 99),
            )
        )

        ours = []
        contexts = []
        for _ in range(3 if ctx.quick else 5):
            t0 = time.perf_counter()
            contexts.append(sandbox.create_code_context())
            ours.append((time.perf_counter() - t0) * 1000)
            time.sleep(3)  # let the pool start its next spare, as a real pause between calls would
        for context in contexts:
            sandbox.remove_code_context(context)
        ctx.report(
            Result(
                "interpreter: create_code_context() (a spare from the warm pool)",
                "ms (p50)",
                median(ours),
                direct.start_s * 1000,
                "starting an ipykernel with jupyter_client until it answers",
                "lower",
                p50=median(ours),
                p99=percentile(ours, 99),
            )
        )

        ctx.report(Result("interpreter: server RSS", "MiB", server.ps.memory_info().rss / MiB, None, "-", "lower"))
        for language, name in (("python", "ipykernel"), ("javascript", "Deno kernel")):
            rss = _kernel_rss(sandbox, sandbox.create_code_context(language=language))
            ctx.report(Result(f"interpreter: a new context's idle {name}, RSS", "MiB", rss, None, "-", "lower"))
    finally:
        server.stop()
        direct.stop()
    through_runtime(ctx, standalone, round_trips)


def through_runtime(ctx: Context, standalone: list[float], round_trips: int) -> None:
    """The runtime's rows (module docstring); ``standalone``: the standalone server's round trips."""
    if os.geteuid() != 0:
        ctx.log("  through the runtime: skipped (sandboxd serve needs root)")
        return
    if not ensure_interpreter_template(ctx):
        ctx.log("  through the runtime: skipped (the code-interpreter-v1 template cannot be built here)")
        return
    from e2b import Sandbox as PlainSandbox
    from e2b_code_interpreter import Sandbox

    from .runtime import Runtime, sdk_env

    n = 4 if ctx.quick else 20
    work = ctx.tmp / "runtime"
    work.mkdir()
    rt = Runtime(work, max_sandboxes=8)
    try:
        with sdk_env(rt):
            first_code: list[float] = []
            first_command: list[float] = []
            create_ms: list[float] = []
            for i in range(1 + n):  # the first of each pays for cold caches: untimed
                t0 = time.perf_counter()
                t1, t2 = _create_and_run_code(Sandbox, rt, "a new sandbox")
                plain = PlainSandbox.create()
                rt.created.add(plain.sandbox_id)
                plain.commands.run("true")
                t3 = time.perf_counter()
                plain.kill()
                if i:
                    first_code.append((t2 - t0) * 1000)
                    create_ms.append((t1 - t0) * 1000)
                    first_command.append((t3 - t2) * 1000)
            ctx.log(
                f"  create→first run_code p50 {median(first_code):.0f} ms (create {median(create_ms):.0f} ms), "
                f"create→first command (base) p50 {median(first_command):.0f} ms"
            )
            ctx.report(
                Result(
                    'interpreter via runtime: create→first run_code("1+1") result (code-interpreter-v1)',
                    "ms (p50)",
                    median(first_code),
                    median(first_command),
                    'Sandbox.create() (base) + commands.run("true"), same runtime',
                    "lower",
                    p50=median(first_code),
                    p99=percentile(first_code, 99),
                    samples={"ours": first_code, "baseline": first_command},
                    extra={
                        "create_p50_ms": median(create_ms),
                        "baseline_p99_ms": percentile(first_command, 99),
                    },
                )
            )

            sandbox = Sandbox.create()
            rt.created.add(sandbox.sandbox_id)
            sandbox.run_code("1+1")  # the SDK's first connection through the proxy, outside the timing
            ours: list[float] = []
            for _ in range(round_trips):
                t0 = time.perf_counter()
                text = sandbox.run_code("1+1").text
                ours.append((time.perf_counter() - t0) * 1000)
                if text != "2":
                    raise RuntimeError(f"run_code('1+1') through the runtime returned {text!r}")
            sandbox.kill()
            cold_first = median(first_code)
            ctx.report(
                Result(
                    'interpreter via runtime: run_code("1+1") round trip, warm context, sync SDK',
                    "ms (p50)",
                    median(ours),
                    median(standalone),
                    "the same call to the standalone server (no proxy, no sandbox; the venv's kernel)",
                    "lower",
                    p50=median(ours),
                    p99=percentile(ours, 99),
                    samples={"ours": ours, "baseline": standalone},
                    extra={"baseline_p99_ms": percentile(standalone, 99)},
                )
            )
    finally:
        rt.stop()
    through_warm_pool(ctx, work, n, cold_first)


def through_warm_pool(ctx: Context, work: Path, n: int, cold_p50: float) -> None:
    """The same create→first result on a runtime keeping one warm ``code-interpreter-v1`` sandbox,
    its kernel started ahead of the create (E2B resumes a snapshot with a warm kernel: the same idea)."""
    from e2b_code_interpreter import Sandbox

    from .runtime import Runtime, fill_pool, sdk_env

    (work / "warm").mkdir()
    rt = Runtime(work / "warm", 8, ("--warm-template", "code-interpreter-v1", "--warm-sandboxes", "1"))
    try:
        with sdk_env(rt):
            first_code: list[float] = []
            create_ms: list[float] = []
            for i in range(1 + n):  # the first pays for cold caches: untimed
                fill_pool(rt, 1)  # full: a create back to back with the last one is a cold one
                t0 = time.perf_counter()
                t1, t2 = _create_and_run_code(Sandbox, rt, "a warm sandbox")
                if i:
                    first_code.append((t2 - t0) * 1000)
                    create_ms.append((t1 - t0) * 1000)
            ctx.log(
                f"  --warm-sandboxes 1: create→first run_code p50 {median(first_code):.0f} ms "
                f"(create {median(create_ms):.0f} ms)"
            )
            ctx.report(
                Result(
                    'interpreter via runtime: create→first run_code("1+1") result, --warm-sandboxes 1',
                    "ms (p50)",
                    median(first_code),
                    cold_p50,
                    "the same without warm sandboxes (the cold row above, same run)",
                    "lower",
                    p50=median(first_code),
                    p99=percentile(first_code, 99),
                    samples={"ours": first_code},
                    extra={"create_p50_ms": median(create_ms)},
                )
            )
    finally:
        rt.stop()


def _kernel_rss(sandbox: Any, context: Any) -> float | None:
    code = "import os; os.getpid()" if context.language == "python" else "Deno.pid"
    text = sandbox.run_code(code, context=context).text
    if not text or not text.isdigit():
        return None
    return float(psutil.Process(int(text)).memory_info().rss / MiB)


def _create_and_run_code(sandbox_class: Any, rt: Any, what: str) -> tuple[float, float]:
    """``Sandbox.create()`` then ``run_code("1+1")`` through the code-interpreter SDK (the sandbox
    killed after): ``perf_counter`` when the create returned and when the result came."""
    sandbox = sandbox_class.create()
    rt.created.add(sandbox.sandbox_id)
    created = time.perf_counter()
    text = sandbox.run_code("1+1").text
    done = time.perf_counter()
    sandbox.kill()
    if text != "2":
        raise RuntimeError(f"run_code('1+1') in {what} returned {text!r}")
    return created, done
