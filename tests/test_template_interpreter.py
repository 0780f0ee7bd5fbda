"""The ``code-interpreter-v1`` template and its sandboxes: a layer built over ``base`` (not a copy of
it), with the kernels and E2B's data stack; the code interpreter started with every sandbox of it,
warm when ``Sandbox.create()`` returns, and what a pause does to it. Real builds, a real runtime, the
official SDK.

The ``run_code`` examples themselves (R's included) run in ``test_interpreter_sdk.py`` (its ``runtime`` target).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import TEMPLATE_STORE, Runtime, interpreter_recipe
from e2b import Sandbox as PlainSandbox
from e2b_code_interpreter import Sandbox
from sandboxd.runtime import code_interpreter, debian, layer_step
from sandboxd.runtime.layers import LayerStore, hex_of

pytestmark = pytest.mark.root

IMPORTS = {
    "numpy": "numpy",
    "pandas": "pandas",
    "matplotlib": "matplotlib.pyplot",
    "pillow": "PIL.Image",
    "scipy": "scipy.stats",
    "scikit-learn": "sklearn.linear_model",
    "scikit-image": "skimage.filters",
    "seaborn": "seaborn",
    "plotly": "plotly.express",
    "bokeh": "bokeh.plotting",
    "sympy": "sympy",
    "xarray": "xarray",
    "openpyxl": "openpyxl",
    "xlrd": "xlrd",
    "python-docx": "docx",
    "opencv-python-headless": "cv2",
    "imageio": "imageio",
    "soundfile": "soundfile",
    "nltk": "nltk",
    "textblob": "textblob",
    "requests": "requests",
    "aiohttp": "aiohttp",
    "beautifulsoup4": "bs4",
    "joblib": "joblib",
    "pytz": "pytz",
    "tornado": "tornado",
    "urllib3": "urllib3",
    "pytest": "pytest",
    "e2b-charts": "e2b_charts",
    "orjson": "orjson",
}
"""The module each package of the recipe's data stack is imported as."""


def _normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``ImageIO`` is ``imageio``, ``bash_kernel`` is
    ``bash-kernel``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def built(interpreter_template: bool) -> dict[str, object]:
    if not interpreter_template:
        pytest.skip("the code-interpreter-v1 template cannot be built on this machine")
    record = LayerStore(TEMPLATE_STORE).cached(interpreter_recipe().key())
    assert record is not None
    return record


@pytest.fixture
def sdk(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, built: dict[str, object]) -> Runtime:
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return runtime


def test_the_template_is_one_layer_over_base(built: dict[str, object]) -> None:
    store = LayerStore(TEMPLATE_STORE)
    recipe = interpreter_recipe()
    own, *beneath = built["layers"]  # type: ignore[misc]
    assert beneath == [recipe.base.key()]  # base's own layer, shared, not a copy
    assert own == recipe.key()
    assert built["config"] == {**debian.CONFIG, "code_interpreter": True}
    tree = store.path(own)
    kernels = tree / "usr" / "local" / "share" / "jupyter" / "kernels"
    assert {p.name for p in kernels.iterdir()} >= {"python3", "bash", "deno", "r", "java"}
    assert "{resource_dir}" in " ".join(json.loads((kernels / "java" / "kernel.json").read_text())["argv"])
    assert json.loads((kernels / "deno" / "kernel.json").read_text())["language"] == "typescript"
    assert json.loads((kernels / "r" / "kernel.json").read_text())["language"] == "R"
    assert (tree / "usr" / "local" / "bin" / "deno").is_file()
    assert (tree / "usr" / "lib" / "R" / "site-library" / "IRkernel").is_dir()
    assert (tree / "usr" / "lib" / "jvm" / "java-21-openjdk-amd64" / "bin" / "jshell").is_file()
    assert not (tree / "var" / "lib" / "apt" / "lists").exists()  # apt's lists stayed in the step's cache
    base_bin = store.path(recipe.base.key()) / "usr" / "bin"
    repeated = [
        p.name
        for p in (tree / "usr" / "bin").iterdir()
        if (base_bin / p.name).is_symlink() or (base_bin / p.name).exists()
    ]
    assert repeated == []  # R's commands are new; nothing of base is repeated in it
    assert (tree / "usr" / "bin" / "R").is_file()
    assert not (tree / "tmp").exists() or not any((tree / "tmp").iterdir())  # the step's /tmp was a tmpfs
    assert not (tree / layer_step.RECORD).exists()
    recorded = (store.layers / f"{hex_of(own)}.packages.tsv").read_text().splitlines()
    packages = {_normalized(name): version for name, version in (line.split("\t", 1) for line in recorded)}
    for pinned in code_interpreter.PACKAGES:
        name, version = pinned.split("==")
        assert packages.get(_normalized(name)) == version, pinned
    for name in code_interpreter.DEBIAN_PACKAGES:
        assert packages.get(name), name
    info = store.info(own)
    assert info is not None and info.kind == "build"


def test_a_build_step_keeps_deletions_and_replaced_directories_as_overlayfs_does(
    built: dict[str, object], tmp_path: Path
) -> None:
    """A step over base that deletes a file, replaces a directory and adds files: the layer holds
    exactly that (a whiteout, an opaque directory, the new files), and stacked over base it reads as
    the step left it."""
    store = LayerStore(TEMPLATE_STORE)
    base = store.path(built["layers"][1])  # type: ignore[index]
    script = (
        "rm /etc/motd\nrm -rf /etc/skel && mkdir /etc/skel && touch /etc/skel/only\n"
        "mkdir -p /usr/local/made && cat /etc/hostname > /usr/local/made/by-step\n"
        'test -e /dev/null && test -d /proc/self && test "$FROM_ENV" = yes\n'
        "printf 'one\\t1\\n' > /.sandboxd-packages\n"
    )
    key = "sha256:" + hashlib.sha256(f"test {uuid.uuid4()}".encode()).hexdigest()
    scratch = store
    lines: list[str] = []
    try:
        info = layer_step.run_step(
            scratch,
            [base],
            script,
            key,
            "test step",
            cache=tmp_path / "cache",
            env={"PATH": "/usr/bin:/bin", "FROM_ENV": "yes"},
            log_path=tmp_path / "step.log",
            on_line=lines.append,
            epoch=debian.SOURCE_DATE_EPOCH,
        )
        layer = scratch.path(info.digest)
        motd = (layer / "etc" / "motd").lstat()
        assert motd.st_rdev == 0 and oct(motd.st_mode).startswith("0o20")  # a whiteout: 0:0 character device
        skel = str(layer / "etc" / "skel")
        assert os.getxattr(skel, "trusted.overlay.opaque") == b"y"
        assert os.getxattr(skel, "user.overlay.opaque") == b"y"
        assert not [a for a in os.listxattr(str(layer / "etc")) if a.startswith("trusted.overlay.")]
        assert (layer / "usr" / "local" / "made" / "by-step").read_text() == "sandbox\n"
        assert int((layer / "usr" / "local" / "made" / "by-step").stat().st_mtime) <= debian.SOURCE_DATE_EPOCH
        assert (scratch.layers / f"{hex_of(info.digest)}.packages.tsv").read_text() == "one\t1\n"
        # stacked over base, in a mount namespace of its own
        merged = tmp_path / "merged"
        merged.mkdir()
        check = (
            f"mount -t overlay overlay -o lowerdir={layer}:{base} {merged} && "
            f"test ! -e {merged}/etc/motd && test -e {merged}/etc/passwd && "
            f"ls -A {merged}/etc/skel && cat {merged}/usr/local/made/by-step"
        )
        out = subprocess.run(["unshare", "--mount", "sh", "-c", check], capture_output=True, text=True, check=True)
        assert out.stdout == "only\nsandbox\n", out
    finally:
        scratch.remove(key)


def test_a_failing_step_fails_with_its_output_and_leaves_nothing(built: dict[str, object], tmp_path: Path) -> None:
    store = LayerStore(TEMPLATE_STORE)
    base = store.path(built["layers"][1])  # type: ignore[index]
    key = "sha256:" + hashlib.sha256(f"test {uuid.uuid4()}".encode()).hexdigest()
    with pytest.raises(layer_step.StepFailed, match=r"status 3(.|\n)*what went wrong"):
        layer_step.run_step(
            store,
            [base],
            "echo what went wrong\nexit 3\n",
            key,
            "failing step",
            cache=tmp_path / "cache",
            env={"PATH": "/usr/bin:/bin"},
            log_path=tmp_path / "step.log",
            on_line=lambda _: None,
        )
    assert not store.has(key) and not store.path(key).exists()


def test_the_interpreter_is_warm_when_create_returns(sdk: Runtime) -> None:
    sandbox = Sandbox.create()  # the SDK's default template: code-interpreter-v1
    try:
        # No wait: the create returned once the interpreter's Python kernel answered.
        health = httpx.get(
            f"{sdk.url}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999"}
        )
        assert (health.status_code, health.json()) == (200, "OK")
        started = time.monotonic()
        assert sandbox.run_code("1 + 1").text == "2"
        assert time.monotonic() - started < 5  # a warm kernel, not one starting now
        where = sandbox.run_code("import os, sys; sys.executable, sys.version_info[:2], os.getcwd(), os.getuid()")
        assert where.text == "('/usr/bin/python', (3, 13), '/home/user', 0)"  # the template's Python, as on E2B
        ours = sandbox.run_code("import sandboxd")
        assert ours.error is not None and ours.error.name == "ModuleNotFoundError"  # nothing of ours in it
        imports = "\n".join(f"import {module}" for module in IMPORTS.values())
        stack = sandbox.run_code(imports + "\n'imported'", timeout=120)
        assert stack.error is None and stack.text == "imported", stack.error
        assert sandbox.commands.run("python -c 'import numpy; print(numpy.__version__)'").stdout == "2.3.5\n"
    finally:
        sandbox.kill()


def test_a_full_pause_keeps_the_kernels_and_a_filesystem_pause_starts_a_fresh_interpreter(sdk: Runtime) -> None:
    sandbox = Sandbox.create()
    try:
        sandbox.run_code("kept = 'in memory'")
        kernel_pid = sandbox.run_code("import os; os.getpid()").text
        sandbox.pause()  # mode "full": the cgroup is frozen, kernels included
        resumed = Sandbox.connect(sandbox.sandbox_id)
        assert resumed.run_code("kept").text == "in memory"
        assert resumed.run_code("import os; os.getpid()").text == kernel_pid

        resumed.run_code("open('/home/user/on-disk', 'w').write('kept')")
        resumed.pause(mode="filesystem")  # processes stop, files stay
        fresh = Sandbox.connect(sandbox.sandbox_id)
        lost = fresh.run_code("kept")
        assert lost.error is not None and lost.error.name == "NameError"
        assert fresh.run_code("open('/home/user/on-disk').read()").text == "kept"
    finally:
        sandbox.kill()


def test_a_resume_whose_agent_dies_before_it_listens_does_not_wait_for_the_kernel(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch, built: dict[str, object]
) -> None:
    # The agent exits before it starts the interpreter (the runtime's fault hook, which only its own
    # environment can set, makes every resumed agent exit so): the resume fails at once with its
    # reason, not after the 30 s the runtime gives a kernel to warm up.
    from e2b.exceptions import SandboxException

    runtime = start_runtime(env={"SANDBOXD_FAULT_RESUMED_AGENT": "the test's fault"})
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sandbox = Sandbox.create()
    try:
        assert sandbox.run_code("1 + 1").text == "2"  # its kernel was up
        sandbox.pause(mode="filesystem")
        started = time.monotonic()
        with pytest.raises(SandboxException, match=re.escape("RuntimeError: the test's fault")):
            Sandbox.connect(sandbox.sandbox_id)
        waited = time.monotonic() - started
        assert waited < 5, f"the resume waited {waited:.1f} s for a kernel whose agent had exited"
    finally:
        sandbox.kill()


def test_templates_without_the_flag_start_no_interpreter(sdk: Runtime) -> None:
    sandbox = PlainSandbox.create(template="base")
    try:
        health = httpx.get(
            f"{sdk.url}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999"}
        )
        assert health.status_code == 502 and "port is not open" in health.text
        assert sandbox.commands.run("ss -Hltn 'sport = :49999'").stdout == ""  # nothing listens there
    finally:
        sandbox.kill()


def test_a_warm_sandbox_comes_with_its_kernel_started_and_the_claims_envs(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch, built: dict[str, object]
) -> None:
    """``--warm-template code-interpreter-v1``: the pooled sandbox's Python kernel was started before
    the create that claimed it (it joins the pool once the kernel is ready), yet the first run_code
    sees the claim's env vars and the default cwd, and is the kernel's first visible execution."""
    runtime = start_runtime("--warm-template", "code-interpreter-v1", "--warm-sandboxes", "1")
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    deadline = time.monotonic() + 180
    while True:  # the runtime's gauge counts claimable warm sandboxes only
        text = httpx.get(f"{runtime.url}/metrics", headers={"Authorization": f"Bearer {runtime.api_key}"}).text
        ready = [line.split()[-1] for line in text.splitlines() if line.startswith("sandboxd_warm_sandboxes ")]
        if ready and float(ready[0]) >= 1:
            break
        assert time.monotonic() < deadline, f"no warm sandbox after 180 s:\n{runtime.log.read_text()[-3000:]}"
        time.sleep(0.2)
    warm = {p.name for p in (runtime.data_dir / "sandboxes").iterdir()}
    assert len(warm) == 1
    # Pooled only once its kernel is ready: its interpreter answers /health 200 already (asked from
    # inside its network namespace: the sandbox has no row yet, so the proxy does not know it).
    (pooled,) = warm
    inside = _cgroup_procs(runtime, pooled)[0]
    probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:49999/health').status)"
    health = subprocess.run(
        ["nsenter", "-t", str(inside), "-n", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert health.stdout.strip() == "200", health.stderr
    kernels = [p for p in map(psutil.Process, _cgroup_procs(runtime, pooled)) if "ipykernel" in " ".join(p.cmdline())]
    assert len(kernels) == 1  # the default kernel; the spare waits for the claimed sandbox's first cell
    before = time.time()
    sandbox = Sandbox.create(envs={"WHO": "the claim"})
    try:
        assert sandbox.sandbox_id in warm  # served from the pool
        first = sandbox.run_code("import os; os.environ.get('WHO'), os.getcwd(), os.getpid()")
        assert first.error is None and first.execution_count == 1, first
        who, cwd, inner_pid = first.text.strip("()").split(", ")
        assert (who, cwd) == ("'the claim'", "'/home/user'")
        kernel = None
        procs = _cgroup_procs(runtime, sandbox.sandbox_id)
        for pid in procs:  # the host's view of the process that answered: its NSpid ends with its own pid
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
                if nspid[-1] == inner_pid:
                    kernel = psutil.Process(pid)
        assert kernel is not None, procs
        assert "ipykernel_launcher" in " ".join(kernel.cmdline())
        assert kernel.create_time() < before  # started in the pool, not by the claim
    finally:
        sandbox.kill()


def _cgroup_procs(runtime: Runtime, sandbox_id: str) -> list[int]:
    """The host pids of a sandbox's processes, from its cgroup (v2, else v1's memory hierarchy)."""
    from sandboxd.runtime.host import instance_name

    group = Path("sandboxd") / instance_name(runtime.data_dir) / sandbox_id
    for directory in (Path("/sys/fs/cgroup") / group, Path("/sys/fs/cgroup/memory") / group):
        with contextlib.suppress(OSError):
            return [int(x) for x in (directory / "cgroup.procs").read_text().split()]
    return []
