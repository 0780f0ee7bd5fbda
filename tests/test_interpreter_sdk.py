"""The code interpreter driven by E2B's official ``e2b-code-interpreter`` SDK, pinned, through E2B's
documented ``run_code`` examples, against two targets:

* ``standalone``: ``sandboxd interpreter`` on a free port with this venv's kernels (ipykernel, Deno,
  bash_kernel) and a real agent for the sandbox's env vars, the SDK in debug mode (it then sends its
  code-interpreter requests to ``E2B_SANDBOX_URL``);
* ``runtime``: a sandbox of ``sandboxd serve`` created as E2B's docs do (``Sandbox.create()``, whose
  default template is ``code-interpreter-v1``), every call going through the runtime's proxy
  (``E2b-Sandbox-Port: 49999``) to the interpreter the sandbox started, with the template's kernels.

The tests that poke at the standalone server itself (raw requests, its start-up paths) take the
``interpreter`` fixture and run against it alone.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import Agent, Interpreter, Runtime
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import ExecutionError, Sandbox

SANDBOX_ENVS = {"SANDBOX_WIDE": "from-init", "SHADOWED": "global"}
"""Sandbox-wide env vars, as ``Sandbox.create(envs=...)`` sets them (the runtime sends them to the
agent with ``POST /init``; the interpreter reads them from the agent's ``/envs``)."""


@pytest.fixture(scope="module")
def envd(start_agent: Callable[..., Agent]) -> Agent:
    """An agent of this module's own, holding :data:`SANDBOX_ENVS` as the runtime would set them."""
    agent = start_agent()
    response = httpx.post(f"{agent.url}/init", json={"envVars": SANDBOX_ENVS})
    assert response.status_code == 204, response.text
    return agent


@pytest.fixture(scope="module")
def interpreter(start_interpreter: Callable[..., Interpreter], envd: Agent) -> Interpreter:
    return start_interpreter(envd_url=envd.url)


@dataclass
class Target:
    """Where the SDK's calls go: the environment that points it there, a sandbox made that way,
    the default contexts' cwd, and how to make a directory the kernels can use."""

    env: dict[str, str]
    sandbox: Sandbox
    cwd: str
    make_dir: Callable[[], str]
    in_template: bool
    """Whether the kernels include R's and Java's (the template's IRkernel and jjava; this venv has
    neither)."""


@pytest.fixture(scope="module", params=["standalone", "runtime"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if request.param == "standalone":
        interpreter: Interpreter = request.getfixturevalue("interpreter")
        env = {"E2B_DEBUG": "true", "E2B_SANDBOX_URL": interpreter.url}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            sandbox = Sandbox.create()
        yield Target(
            env, sandbox, str(interpreter.cwd), lambda: str(tmp_path_factory.mktemp("context")), in_template=False
        )
        return
    if not request.getfixturevalue("interpreter_template"):
        pytest.skip("the code-interpreter-v1 template cannot be built on this machine")
    runtime: Runtime = request.getfixturevalue("runtime")
    env = {**runtime.env(), "E2B_DEBUG": "false"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        sandbox = Sandbox.create(envs=SANDBOX_ENVS)  # the SDK's default template: code-interpreter-v1

    def make_dir() -> str:
        path = f"/home/user/context-{uuid.uuid4().hex[:8]}"
        sandbox.files.make_dir(path)
        return path

    try:
        assert sandbox.get_info().template_id == "code-interpreter-v1"
        yield Target(env, sandbox, "/home/user", make_dir, in_template=True)
    finally:
        sandbox.kill()


@pytest.fixture
def sandbox(target: Target, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    for name, value in target.env.items():
        monkeypatch.setenv(name, value)
    return target.sandbox


def test_state_persists_between_calls(sandbox: Sandbox) -> None:
    first = sandbox.run_code("test_stateful = 1")
    second = sandbox.run_code("test_stateful += 1; test_stateful")

    assert first.error is None and first.results == []
    assert second.text == "2"
    assert second.results[0].is_main_result
    assert second.execution_count == first.execution_count + 1  # type: ignore[operator]


def test_async_sdk(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in target.env.items():
        monkeypatch.setenv(name, value)
    from e2b_code_interpreter import AsyncSandbox

    async def scenario() -> tuple[list[str], Any, Any]:
        sandbox = await AsyncSandbox.connect(target.sandbox.sandbox_id)
        lines: list[str] = []

        async def on_stdout(message: Any) -> None:
            lines.append(message.line)

        execution = await sandbox.run_code("for i in range(3): print(i)\n'done'", on_stdout=on_stdout)
        context = await sandbox.create_code_context(language="js")
        js = await sandbox.run_code("[1, 2].map((x) => x * 2)", context=context)
        await sandbox.remove_code_context(context)
        return lines, execution, js

    lines, execution, js = asyncio.run(scenario())
    assert "".join(lines) == "0\n1\n2\n"  # ipykernel batches what is printed within 0.2 s
    assert execution.text == "done"
    assert js.text == "[ 2, 4 ]"


def test_matplotlib_chart_is_png_and_chart_data(sandbox: Sandbox) -> None:
    code = """
import matplotlib.pyplot as plt
import numpy as np

x = np.linspace(0, 10, 50)
plt.figure(figsize=(6, 4))
plt.plot(x, np.sin(x), label="sin")
plt.title("Sine wave")
plt.xlabel("x")
plt.ylabel("sin(x)")
plt.show()
"""
    execution = sandbox.run_code(code)

    assert execution.error is None
    [result] = execution.results
    assert not result.is_main_result  # a display, not the cell's value
    assert result.text == "<Figure size 600x400 with 1 Axes>"
    png = base64.b64decode(result.png)  # type: ignore[arg-type]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    # figsize (6, 4) at matplotlib-inline's 100 dpi, cropped to the drawing (bbox_inches="tight")
    assert 500 < width <= 600 and 300 < height <= 400, (width, height)
    chart = result.chart
    assert chart is not None
    assert chart.type.value == "line"
    assert chart.title == "Sine wave"
    assert chart.x_label == "x" and chart.y_label == "sin(x)"
    [line] = chart.elements
    assert line.label == "sin"
    assert len(line.points) == 50
    assert line.points[0] == (0.0, 0.0)
    assert line.points[-1][0] == pytest.approx(10.0)
    assert not result.extra


def test_dataframe_is_html_and_data(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        'import pandas as pd\npd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], '
        '"when": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"])})'
    )

    assert execution.error is None
    [result] = execution.results
    assert result.is_main_result
    assert result.data == {
        "a": [1, 2, 3],
        "b": ["x", "y", "z"],
        "when": ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "2024-01-03T00:00:00"],
    }
    assert result.html is not None and '<table border="1" class="dataframe">' in result.html
    assert "<td>y</td>" in result.html
    assert result.text is not None and result.text.splitlines()[0].split() == ["a", "b", "when"]
    assert set(result.formats()) == {"text", "html", "data"}


def test_stdout_and_stderr_callbacks_stream_in_order(sandbox: Sandbox) -> None:
    events: list[tuple[str, str, float]] = []
    code = """
import sys, time
print("one", flush=True)
time.sleep(0.5)
print("two", file=sys.stderr, flush=True)
time.sleep(0.5)
print("three", flush=True)
"""
    started = time.monotonic()
    execution = sandbox.run_code(
        code,
        on_stdout=lambda m: events.append(("stdout", m.line, time.monotonic() - started)),
        on_stderr=lambda m: events.append(("stderr", m.line, time.monotonic() - started)),
    )
    total = time.monotonic() - started

    assert [(kind, text) for kind, text, _ in events] == [
        ("stdout", "one\n"),
        ("stderr", "two\n"),
        ("stdout", "three\n"),
    ]
    assert execution.logs.stdout == ["one\n", "three\n"]
    assert execution.logs.stderr == ["two\n"]
    # Streamed as it happens: the first line arrived long before the cell ended.
    assert events[0][2] < total - 0.7, (events, total)


def test_error_has_name_value_and_traceback(sandbox: Sandbox) -> None:
    errors = []
    code = 'print("before")\ndef divide(a, b):\n    return a / b\ndivide(1, 0)\nprint("after")'
    execution = sandbox.run_code(code, on_error=errors.append)

    assert execution.logs.stdout == ["before\n"]
    assert execution.error is not None
    assert errors == [execution.error]
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    traceback = execution.error.traceback
    assert "\x1b[" not in traceback  # no ANSI colours
    assert "----> 4 divide(1, 0)" in traceback
    assert "return a / b" in traceback
    assert traceback.splitlines()[-1] == "ZeroDivisionError: division by zero"


def test_timeout_interrupts_and_the_context_survives(sandbox: Sandbox) -> None:
    sandbox.run_code("survivor = 'still here'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\ntime.sleep(60)\nsurvivor = 'overwritten'", timeout=2)
    assert time.monotonic() - started < 10

    started = time.monotonic()
    execution = sandbox.run_code("survivor", timeout=20)
    # The next call did not wait for the 60 s sleep: it was interrupted, and the state survived.
    assert time.monotonic() - started < 10
    assert execution.text == "still here"
    history = sandbox.run_code("[line for line in _ih if 'time.sleep(60)' in line]")
    assert history.error is None and history.text and "time.sleep(60)" in history.text


def test_contexts_cwd_isolation_restart_and_remove(sandbox: Sandbox, target: Target) -> None:
    directory = target.make_dir()
    sandbox.run_code("shared_name = 'default context'")
    context = sandbox.create_code_context(cwd=directory)
    assert context.language == "python"
    assert context.cwd == directory

    cwd = sandbox.run_code("import os; os.getcwd()", context=context)
    assert cwd.text == directory
    isolated = sandbox.run_code("shared_name", context=context)
    assert isolated.error is not None and isolated.error.name == "NameError"
    assert isolated.error.value == "name 'shared_name' is not defined"

    listed = sandbox.list_code_contexts()
    assert listed[-1].id == context.id and listed[-1].cwd == directory
    assert {"python", "javascript"} <= {c.language for c in listed}

    sandbox.run_code("x = 1", context=context)
    sandbox.restart_code_context(context)
    restarted = sandbox.run_code("x", context=context)
    assert restarted.error is not None and restarted.error.value == "name 'x' is not defined"
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == directory

    sandbox.remove_code_context(context.id)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(NotFoundException, match=f"Context {context.id} not found"):
        sandbox.run_code("1", context=context)
    assert sandbox.run_code("shared_name").text == "default context"


def test_context_in_another_language(sandbox: Sandbox, target: Target) -> None:
    directory = target.make_dir()
    context = sandbox.create_code_context(cwd=directory, language="javascript")
    assert context.language == "javascript"
    assert sandbox.run_code("process.cwd()", context=context).text == directory


def test_envs_apply_to_one_execution(sandbox: Sandbox) -> None:
    per_call = sandbox.run_code("import os; os.getenv('FOO')", envs={"FOO": "bar"})
    after = sandbox.run_code("import os; os.getenv('FOO', 'default')")
    assert per_call.text == "bar"
    assert after.text == "default"

    odd = 'it\'s "quoted"\n$HOME; `x` \\ é'
    quoting = sandbox.run_code("import os; print(os.environ['ODD'], end='')", envs={"ODD": odd})
    assert "".join(quoting.logs.stdout) == odd
    bash_quoting = sandbox.run_code('printf %s "$ODD"', envs={"ODD": odd}, language="bash")
    assert "".join(bash_quoting.logs.stdout) == odd + "\n", repr(
        bash_quoting.logs.stdout
    )  # bash_kernel ends output with a newline

    bash = sandbox.run_code("echo $FOO", envs={"FOO": "bar baz"}, language="bash")
    bash_after = sandbox.run_code("echo ${FOO:-default}", language="bash")
    assert bash.logs.stdout == ["bar baz\n"]
    assert bash_after.logs.stdout == ["default\n"]

    js = sandbox.run_code("process.env.FOO", envs={"FOO": "bar"}, language="javascript")
    js_after = sandbox.run_code("process.env.FOO || 'default'", language="javascript")
    assert js.text == "bar"
    assert js_after.text == "default"


def test_sandbox_envs_from_the_agent_and_overriding_them(sandbox: Sandbox) -> None:
    assert sandbox.run_code("import os; os.getenv('SANDBOX_WIDE')").text == "from-init"
    overridden = sandbox.run_code("import os; os.getenv('SHADOWED')", envs={"SHADOWED": "per-call"})
    assert overridden.text == "per-call"
    assert sandbox.run_code("import os; os.getenv('SHADOWED')").text == "global"
    assert sandbox.run_code("echo $SANDBOX_WIDE", language="bash").logs.stdout == ["from-init\n"]


def test_javascript_and_typescript(sandbox: Sandbox) -> None:
    hello = sandbox.run_code("console.log('Hello, World!')", language="js")
    assert hello.logs.stdout == ["Hello, World!\n"]

    esm = sandbox.run_code("import { readFileSync } from 'fs'\nconsole.log(typeof readFileSync)", language="js")
    assert esm.logs.stdout == ["function\n"]
    awaited = sandbox.run_code("await Promise.resolve('Hello World!')", language="js")
    assert awaited.text == "Hello World!"
    required = sandbox.run_code("const os = require('os'); os.platform()", language="js")
    assert required.text == "linux"

    sandbox.run_code("let counter = 41", language="js")
    assert sandbox.run_code("++counter", language="js").text == "42"

    typed = sandbox.run_code("const message: string = 'Hello, TS'; console.log(message)", language="ts")
    assert typed.logs.stdout == ["Hello, TS\n"]

    failed = sandbox.run_code("throw new TypeError('nope')", language="js")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("TypeError", "nope")


def test_javascript_timeout_interrupts_and_the_context_survives(sandbox: Sandbox) -> None:
    sandbox.run_code("globalThis.kept = 'yes'", language="js")
    with pytest.raises(TimeoutException):
        sandbox.run_code("while (true) {}", language="js", timeout=2)
    started = time.monotonic()
    assert sandbox.run_code("kept", language="js", timeout=20).text == "yes"
    assert time.monotonic() - started < 10


def test_bash(sandbox: Sandbox, target: Target) -> None:
    pwd = sandbox.run_code("pwd", language="bash")
    assert "".join(pwd.logs.stdout).strip() == target.cwd
    sandbox.run_code("GREETING=hello", language="bash")
    assert sandbox.run_code('echo "$GREETING world"', language="bash").logs.stdout == ["hello world\n"]
    # IPython's shell escape, as in E2B's own test_bash
    assert "".join(sandbox.run_code("!pwd").logs.stdout).strip() == target.cwd


def test_every_result_format(sandbox: Sandbox) -> None:
    code = r"""
import base64, io
import matplotlib
from matplotlib.figure import Figure
from IPython.display import HTML, Markdown, SVG, Latex, JSON, Javascript, Image, display

fig = Figure(figsize=(1, 1))
fig.add_subplot().plot([0, 1])
jpeg = io.BytesIO()
fig.savefig(jpeg, format="jpeg")

display(HTML("<b>bold</b>"))
display(Markdown("**bold**"))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>'))
display(Latex(r"$e^{i\pi} + 1 = 0$"))
display(JSON({"k": [1, 2]}))
display(Javascript("console.log(1)"))
display(Image(data=jpeg.getvalue(), format="jpeg"))
display({"application/pdf": base64.b64encode(b"%PDF-1.4 tiny").decode()}, raw=True)
display({"application/vnd.custom+json": {"x": 1}, "text/plain": "custom"}, raw=True)
{"answer": 42}
"""
    execution = sandbox.run_code(code)

    assert execution.error is None, execution.error
    html, markdown, svg, latex, json_result, javascript, jpeg, pdf, custom, main = execution.results
    assert html.html == "<b>bold</b>" and not html.is_main_result
    assert markdown.markdown == "**bold**"
    assert svg.svg is not None and svg.svg.startswith("<svg")
    assert latex.latex == r"$e^{i\pi} + 1 = 0$"
    assert json_result.json == {"k": [1, 2]}
    assert javascript.javascript == "console.log(1)"
    assert base64.b64decode(jpeg.jpeg).startswith(b"\xff\xd8\xff")  # type: ignore[arg-type]
    assert base64.b64decode(pdf.pdf) == b"%PDF-1.4 tiny"  # type: ignore[arg-type]
    assert custom.text == "custom" and custom.extra == {"application/vnd.custom+json": {"x": 1}}
    assert main.is_main_result and main.json == {"answer": 42} and main.text == "{'answer': 42}"


def _streamed(sandbox: Sandbox, code: str, language: str) -> tuple[Any, list[tuple[str, float]], float]:
    """Run ``code``, noting when each stdout line arrives: (its execution, (line, seconds) pairs, the
    seconds it took in all)."""
    events: list[tuple[str, float]] = []
    started = time.monotonic()
    execution = sandbox.run_code(
        code, language=language, on_stdout=lambda m: events.append((m.line, time.monotonic() - started))
    )
    return execution, events, time.monotonic() - started


def _r_value(execution: Any) -> str | None:
    """The text of an R cell's one result (IRkernel sends values as display data)."""
    assert execution.error is None, execution.error
    assert len(execution.results) == 1, execution.results
    text: str | None = execution.results[0].text
    return text


def test_r(sandbox: Sandbox, target: Target) -> None:
    """E2B's R examples (docs: code-interpreting/supported-languages/r) on the template's IRkernel."""
    if not target.in_template:
        pytest.skip("no R kernel outside the template (the runtime target runs these)")
    hello = sandbox.run_code('print("Hello, world!")', language="r")
    assert hello.error is None and hello.logs.stdout == ['[1] "Hello, world!"\n']

    total = sandbox.run_code("x <- 1:10; sum(x)", language="r")
    # IRkernel shows a value as display_data, which E2B's server (and ours) passes on as a result that
    # is not the main one: Execution.text stays None on E2B too.
    assert total.error is None and [r.text for r in total.results] == ["[1] 55"]
    assert not total.results[0].is_main_result and total.text is None

    directory = target.make_dir()
    context = sandbox.create_code_context(cwd=directory, language="r")
    assert context.language == "r"
    sandbox.run_code("kept <- 41", context=context)
    assert _r_value(sandbox.run_code("kept + 1", context=context)) == "[1] 42"
    assert _r_value(sandbox.run_code("getwd()", context=context)) == f'[1] "{directory}"'
    isolated = sandbox.run_code('exists("kept")', language="r")  # the default R context is another kernel
    assert _r_value(isolated) == "[1] FALSE"

    assert _r_value(sandbox.run_code('Sys.getenv("FOO")', envs={"FOO": "bar"}, language="r")) == '[1] "bar"'
    assert _r_value(sandbox.run_code('Sys.getenv("FOO", "unset")', language="r")) == '[1] "unset"'

    errors: list[ExecutionError] = []
    failed = sandbox.run_code('cat("before\\n"); stop("nope")', language="r", on_error=errors.append)
    assert isinstance(failed.error, ExecutionError)
    assert errors == [failed.error]
    assert "nope" in failed.error.value
    assert failed.logs.stdout == ["before\n"]

    streamed, events, total_s = _streamed(sandbox, 'cat("one\\n"); Sys.sleep(1); cat("two\\n")', "r")
    assert [line for line, _ in events] == ["one\n", "two\n"] and streamed.logs.stdout == ["one\n", "two\n"]
    assert events[0][1] < total_s - 0.7, (events, total_s)  # streamed as it happened
    sandbox.remove_code_context(context)


def _java_value(execution: Any) -> str | None:
    """The text of a Java cell's value (jjava sends it as the main result)."""
    assert execution.error is None, execution.error
    assert len(execution.results) == 1 and execution.results[0].is_main_result, execution.results
    text: str | None = execution.results[0].text
    return text


def test_java(target: Target) -> None:
    """E2B's Java example (docs: code-interpreting/supported-languages/java) on the template's jjava,
    whose kernelspec names its jars by ``{resource_dir}``; a context and its cwd (``user.dir``), env
    vars (as system properties, as on E2B), errors and streamed output. One Java kernel at a time: each
    is two JVMs, ~270 MiB, beside the module's other kernels in a 1 GiB sandbox."""
    if not target.in_template:
        pytest.skip("no Java kernel outside the template (the runtime target runs these)")
    # A sandbox of its own: the module's has many kernels running by now, and two JVMs more can pass
    # its memory limit (the kernel killed and restarted: its variables gone).
    with pytest.MonkeyPatch.context() as patch:
        for name, value in target.env.items():
            patch.setenv(name, value)
        own = Sandbox.create(envs=SANDBOX_ENVS)
    try:
        _java_examples(own)
    finally:
        own.kill()


def _java_examples(sandbox: Sandbox) -> None:
    directory = "/home/user/java-context"
    sandbox.files.make_dir(directory)
    context = sandbox.create_code_context(cwd=directory, language="java")
    assert context.language == "java"
    assert sandbox.run_code("int kept = 41;", context=context, timeout=120).error is None
    assert _java_value(sandbox.run_code("kept + 1", context=context)) == "42"
    assert _java_value(sandbox.run_code('System.getProperty("user.dir")', context=context)) == directory
    sandbox.remove_code_context(context)

    hello = sandbox.run_code('System.out.println("Hello, world!");', language="java", timeout=120)
    assert hello.error is None and hello.logs.stdout == ["Hello, world!\n"]
    assert _java_value(sandbox.run_code("int x = 40 + 2; x", language="java")) == "42"
    unknown = sandbox.run_code("kept", language="java")  # the default Java context is another kernel
    assert unknown.error is not None and unknown.error.name == "CompilationException"

    assert _java_value(sandbox.run_code('System.getProperty("FOO")', envs={"FOO": "bar"}, language="java")) == "bar"
    assert _java_value(sandbox.run_code('System.getProperty("FOO", "unset")', language="java")) == "unset"

    errors: list[ExecutionError] = []
    failed = sandbox.run_code('throw new RuntimeException("nope");', language="java", on_error=errors.append)
    assert isinstance(failed.error, ExecutionError) and errors == [failed.error]
    assert failed.error.name == "RuntimeException" and "nope" in failed.error.value

    code = 'System.out.println("one"); Thread.sleep(1000); System.err.println("two");'
    streamed, events, total_s = _streamed(sandbox, code, "java")
    assert streamed.logs.stdout == ["one\n"] and streamed.logs.stderr == ["two\n"]
    assert events and events[0][0] == "one\n" and events[0][1] < total_s - 0.7, (events, total_s)


def test_unknown_and_missing_languages_say_so(sandbox: Sandbox, target: Target) -> None:
    with pytest.raises(SandboxException, match="400 Bad Request: unknown language 'cobol'"):
        sandbox.run_code("DISPLAY 'HI'", language="cobol")
    if not target.in_template:
        with pytest.raises(
            SandboxException, match="400 Bad Request: this sandbox has no Jupyter kernel for r: install IRkernel"
        ):
            sandbox.run_code('print("Hello")', language="r")
        with pytest.raises(SandboxException, match="400 Bad Request: this sandbox has no Jupyter kernel for java"):
            sandbox.create_code_context(language="java")


def test_a_kernel_that_dies_is_restarted(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    sandbox.run_code("lost = True", context=context)

    died = sandbox.run_code("import os; os._exit(3)", context=context)

    assert died.error is not None
    assert died.error.name == "ContextRestarting"
    assert "the python kernel exited with code 3" in died.error.value
    after = sandbox.run_code("lost", context=context, timeout=60)
    assert after.error is not None and after.error.name == "NameError"
    assert sandbox.run_code("1 + 1", context=context).text == "2"
    sandbox.remove_code_context(context)


def test_kernels_found_on_path_without_kernelspecs(
    start_interpreter: Callable[..., Interpreter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template that installed ipykernel, bash_kernel and deno with pip but no kernelspec for them."""
    interpreter = start_interpreter("--pool", "python=0", kernelspecs=False)
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", interpreter.url)
    sandbox = Sandbox.create()
    assert sandbox.run_code("import sys; sys.prefix").text == sys.prefix
    assert sandbox.run_code("Deno.version.deno", language="ts").text
    assert sandbox.run_code("echo $((1 + 2))", language="bash").logs.stdout == ["3\n"]


def test_the_runtime_seam_preload_then_fork(tmp_path: Path) -> None:
    """What the runtime's zygote will do: import the packages whole and preload, then fork the server
    from a single-threaded process. Inside a sandbox the host's Python files are not there, so any
    import after the fork is refused here, as it would fail there; the server must still start its
    kernels (Python at once, Deno on first use), create contexts, and reach for the agent's /envs."""
    from conftest import free_port, write_kernelspecs

    port = free_port()
    kernels = write_kernelspecs(tmp_path / "kernels")
    script = f"""
import importlib, pkgutil, sys
from sandboxd.runtime import zygote
import sandboxd.interpreter
zygote.preload()
for name in sandboxd.interpreter.PRELOAD_PACKAGES:  # as the zygote walks its PRELOAD_PACKAGES
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=lambda _: None):
        if not any(part in info.name for part in zygote._SKIP):
            try:
                importlib.import_module(info.name)
            except Exception:
                pass
for name in sandboxd.interpreter.PRELOAD_MODULES:
    importlib.import_module(name)
import sandboxd.interpreter.server as server
server.preload()

class HostFilesGone:
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"{{name}} was imported after the fork: add it to the preload")

sys.meta_path.insert(0, HostFilesGone())
print(server.fork_server(server.InterpreterOptions(
    port={port}, cwd={str(tmp_path)!r}, kernel_dirs=[{str(kernels)!r}], envd_url="http://127.0.0.1:9",
    pool={{"python": 1}})))
"""
    out = tmp_path / "out.log"  # a file, not a pipe: the server keeps the descriptors it inherited
    with out.open("wb") as log:
        subprocess.run([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True)
    pid = int(next(line for line in out.read_text().splitlines() if line.isdigit()))
    url = f"http://127.0.0.1:{port}"
    kernels: list[psutil.Process] = []
    try:
        server = psutil.Process(pid)
        assert server.ppid() != os.getpid()  # reparented: the forking process is gone
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        answer = httpx.post(f"{url}/execute", json={"code": "import os; os.getcwd()"}, timeout=60)
        assert f'"text":"{tmp_path}"' in answer.text, (answer.text, out.read_text())
        context = httpx.post(f"{url}/contexts", json={"cwd": "/"}, timeout=60).json()
        assert b'"text":"42"' in _raw_execute(url, {"code": "6 * 7", "context_id": context["id"]}).content
        js = httpx.post(f"{url}/execute", json={"code": "6 * 7", "language": "ts"}, timeout=120)
        assert '"text":"42"' in js.text, (js.text, out.read_text())
        assert "was imported after the fork" not in out.read_text()
        kernels = server.children()
        assert len(kernels) == 4  # the default Python kernel, the context's, the next spare, Deno's
    finally:
        os.kill(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([psutil.Process(pid)], timeout=30)
    # It stopped its kernels before it exited.
    assert not alive, out.read_text()
    _, kernels_alive = psutil.wait_procs(kernels, timeout=10)
    assert not kernels_alive, [k.cmdline() for k in kernels_alive]
    assert "was imported after the fork" not in out.read_text()


def test_a_context_runs_one_cell_at_a_time_and_a_client_that_leaves_the_queue_runs_nothing(
    interpreter: Interpreter,
) -> None:
    url = interpreter.url
    context = httpx.post(f"{url}/contexts", json={}, timeout=60).json()
    first = {"code": "import time\ntime.sleep(3)\norder = ['first']", "context_id": context["id"]}
    queued = {"code": "order.append('queued')", "context_id": context["id"]}
    abandoned = {"code": "order.append('abandoned')", "context_id": context["id"]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(_raw_execute, url, first)
        time.sleep(0.5)
        waiting = pool.submit(_raw_execute, url, queued)
        time.sleep(0.5)
        with pytest.raises(httpx.ReadTimeout):  # gives up while the first cell still runs
            httpx.post(f"{url}/execute", json=abandoned, timeout=httpx.Timeout(30, read=0.5))
        assert b"end_of_execution" in running.result().content
        assert b"end_of_execution" in waiting.result().content
    assert (
        b"\"text\":\"['first', 'queued']\"" in _raw_execute(url, {"code": "order", "context_id": context["id"]}).content
    )
    httpx.delete(f"{url}/contexts/{context['id']}")


def _raw_execute(url: str, body: Any) -> httpx.Response:
    return httpx.post(f"{url}/execute", content=body if isinstance(body, bytes) else json.dumps(body), timeout=30)


def test_bad_requests_get_a_4xx_that_says_why(interpreter: Interpreter) -> None:
    url = interpreter.url
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"language": "python"}, 400, "'code' is required"),
        ({"code": 1}, 400, "'code' is required and must be a string"),
        ({"code": "1", "context_id": "x", "language": "python"}, 400, "Only one of context_id or language"),
        ({"code": "1", "context_id": "nope"}, 404, "Context nope not found"),
        ({"code": "1", "env_vars": {"1BAD": "x"}}, 400, "env var name '1BAD' is invalid"),
        ({"code": "1", "env_vars": {"A": 1}}, 400, "env var 'A' must be a string"),
        ({"code": "1", "env_vars": {"A": "a\0b"}}, 400, "contains NUL"),
        ({"code": "1", "env_vars": ["A"]}, 400, "'env_vars' must be an object"),
        (b'{"code": "\\ud800"}', 400, "unpaired surrogate"),
        (b"[" * 100_000, 400, "not valid JSON"),
        (b'{"code": "' + b"x" * (17 << 20) + b'"}', 413, "exceeds"),
    ]
    for body, status, message in cases:
        response = _raw_execute(url, body)
        assert response.status_code == status, (body[:50] if isinstance(body, bytes) else body, response.text)
        assert message in response.text
        assert response.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{url}/execute").status_code == 405
    assert httpx.get(f"{url}/nowhere").status_code == 404
    assert httpx.delete(f"{url}/contexts/nope").status_code == 404
    assert httpx.post(f"{url}/contexts/nope/restart").status_code == 404
    created = httpx.post(f"{url}/contexts", json={"cwd": "/does/not/exist"})
    assert created.status_code == 400 and "is not a directory" in created.text
    assert httpx.post(f"{url}/contexts", json={"language": 3}).status_code == 400
    assert httpx.get(f"{url}/health").json() == "OK"
    # and the server is fine
    assert b'"text":"2"' in _raw_execute(url, {"code": "1 + 1"}).content


def test_a_slow_reader_pauses_the_kernel_and_loses_nothing(start_interpreter: Callable[..., Interpreter]) -> None:
    """100 MiB of output to a client that does not read: the kernel is stopped (SIGSTOP) instead of
    the server buffering it all, and every byte arrives once the client reads. A server of its own,
    so its memory is this test's alone (not what earlier cells left in the shared one)."""
    interpreter = start_interpreter("--pool", "python=0")
    server = psutil.Process(interpreter.process.pid)
    idle_rss = server.memory_info().rss
    context = httpx.post(f"{interpreter.url}/contexts", json={}).json()
    body = json.dumps(
        {"code": "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))", "context_id": context["id"]}
    ).encode()
    with socket.create_connection(("127.0.0.1", interpreter.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        kernel = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kernels = [p for p in server.children() if p.status() == psutil.STATUS_STOPPED]
            if kernels:
                kernel = kernels[0]
                break
            time.sleep(0.1)
        assert kernel is not None, "the writing kernel was never paused"
        time.sleep(1)
        assert kernel.status() == psutil.STATUS_STOPPED
        # Buffering the whole output would cost at least twice its 100 MiB (ZeroMQ's copy, then the
        # JSON lines); paused, the server holds its high-water mark plus what was in flight (measured:
        # +85 MiB at load 6 on 2 cores, more on a machine loaded many times over).
        assert server.memory_info().rss - idle_rss < 150 << 20

        sock.settimeout(60)
        received = bytearray()
        end = b'{"type":"end_of_execution"}\n\r\n0\r\n\r\n'
        while not received.endswith(end):
            chunk = sock.recv(4 << 20)
            assert chunk, "the server closed the stream early"
            received += chunk
    head, _, chunked = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    stream = _dechunk(chunked)
    text = "".join(json.loads(line)["text"] for line in stream.splitlines() if b'"stdout"' in line[:20])
    assert len(text) == 100 << 20 and set(text) == {"x"}
    httpx.delete(f"{interpreter.url}/contexts/{context['id']}")


def _dechunk(data: bytes) -> bytes:
    out = io.BytesIO()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.write(data[:size])
        data = data[size + 2 :]
    return out.getvalue()


def test_health_wait_holds_the_answer_until_the_kernel_is_ready(tmp_path: Path) -> None:
    """``GET /health?wait=S`` (the runtime's create waits on it): answered 200 the moment the Python
    kernel is ready, 503 once S seconds pass before that; without ``wait`` (or with a bad one), the
    state at once. The kernel here takes 3 s more to start than ipykernel does."""
    from conftest import free_port

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = ["/bin/sh", "-c", f'sleep 3; exec "{sys.executable}" -m ipykernel_launcher -f "$0"', "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "slow", "language": "python"}))
    port = free_port()
    args = [sys.executable, "-m", "sandboxd", "interpreter", "--port", str(port), "--cwd", str(tmp_path)]
    args += ["--kernel-dir", str(spec.parent), "--envd-url", "", "--pool", "python=0"]
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "interpreter.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(home)})
    try:
        deadline = time.monotonic() + 60
        while True:  # the server listens before its kernel answers
            with contextlib.suppress(httpx.TransportError):
                first = httpx.get(f"{url}/health", timeout=5)
                break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert first.status_code == 503, log.read_text()
        for bad in ("wait=soon", "wait=-1", "wait=nan", "wait="):
            assert httpx.get(f"{url}/health?{bad}", timeout=5).status_code == 503
        assert httpx.get(f"{url}/health?wait=0.1", timeout=5).status_code == 503  # not ready within 0.1 s
        held = httpx.get(f"{url}/health?wait=120", timeout=130)
        assert (held.status_code, held.json()) == (200, "OK"), log.read_text()
        assert b'"text":"2"' in _raw_execute(url, {"code": "1 + 1"}).content
        assert httpx.get(f"{url}/health?wait=120", timeout=5).status_code == 200  # ready: no wait
    finally:
        process.terminate()
        process.wait(30)


def test_health_spares_on_use_holds_the_spare_kernel_until_the_first_cell(
    start_interpreter: Callable[..., Interpreter],
) -> None:
    """``GET /health?spares=on-use`` (a warm sandbox's warm-up): the pool's spare kernel is not
    started on the 1 s timer while the server waits, only once the first cell has run."""
    from sandboxd.interpreter.contexts import POOL_DELAY

    interpreter = start_interpreter("--pool", "python=1")  # answers /health 200: its default kernel is warm
    server = psutil.Process(interpreter.process.pid)
    held = httpx.get(f"{interpreter.url}/health?wait=120&spares=on-use", timeout=130)
    assert (held.status_code, held.json()) == (200, "OK")
    time.sleep(POOL_DELAY * 3)  # the timer would have started the spare by now
    assert len(server.children()) == 1, [k.cmdline() for k in server.children()]
    assert b'"text":"2"' in _raw_execute(interpreter.url, {"code": "1 + 1"}).content
    deadline = time.monotonic() + 120
    while len(server.children()) < 2:  # the default kernel, and now the spare
        assert time.monotonic() < deadline, "no spare kernel after the first cell"
        time.sleep(0.1)
    context = httpx.post(f"{interpreter.url}/contexts", json={}, timeout=60).json()
    assert b'"text":"2"' in _raw_execute(interpreter.url, {"code": "1 + 1", "context_id": context["id"]}).content


def test_kernels_are_interrupted_when_the_runtime_was_started_with_sigint_ignored(
    start_runtime: Callable[..., Runtime], interpreter_template: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `nohup sandboxd serve &` from a script: the runtime starts with SIGHUP, SIGINT and SIGQUIT
    # ignored, and the zygote ignores SIGINT of its own. A run_code's timeout is a SIGINT to the
    # kernel's process group (bash, R; Python's too), which an inherited SIG_IGN would swallow:
    # each kernel's cell is cut short and the next call does not wait for it (review7).
    def ignoring() -> None:
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)

    if not interpreter_template:
        pytest.skip("no code-interpreter-v1 template here")
    runtime = start_runtime("--max-timeout", "3600", preexec_fn=ignoring)
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sandbox = Sandbox.create(timeout=600)
    try:
        for language, sleep, after in (
            (None, "import time\ntime.sleep(60)", "'after'"),
            ("bash", "sleep 60", "echo after"),
            ("r", "Sys.sleep(60)", "cat('after')"),
        ):
            context = sandbox.create_code_context(language=language) if language else None
            sandbox.run_code("1", context=context, timeout=120)  # started, whatever it costs
            with pytest.raises(TimeoutException):
                sandbox.run_code(sleep, context=context, timeout=2)
            started = time.monotonic()
            execution = sandbox.run_code(after, context=context, timeout=30)
            assert time.monotonic() - started < 20, language
            assert "after" in (execution.text or "") + "".join(execution.logs.stdout), (language, execution)
    finally:
        sandbox.kill()
