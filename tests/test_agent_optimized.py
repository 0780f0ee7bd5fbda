"""The standalone agent under ``-OO`` (``sandboxd.agent.optimized``): the process runs itself again with
the flag when, and only when, the ``.opt-2.pyc`` files are there; same PID, arguments and environment.
What the agent does under ``-OO`` is checked by test_agent_imports (a request of each kind)."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from collections.abc import Callable
from importlib.util import cache_from_source
from pathlib import Path

import pytest
from conftest import Agent
from sandboxd.agent.optimized import PROBES, compiled

SCRIPT = """
import json, os, sys
print(os.getpid(), file=sys.stderr, flush=True)
from sandboxd.agent.optimized import compiled, reexec_if_compiled
reexec_if_compiled()
print(json.dumps({"optimize": sys.flags.optimize, "argv": sys.argv[1:], "compiled": compiled(),
                  "PYTHONOPTIMIZE": os.environ.get("PYTHONOPTIMIZE"), "inherited": os.environ.get("INHERITED")}))
"""


def run(tmp_path: Path, *flags: str) -> tuple[dict[str, object], list[str]]:
    """The script above, with ``tmp_path`` ahead on ``sys.path`` (where the probes are found first)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "lib"), "INHERITED": "yes"}
    env.pop("PYTHONOPTIMIZE", None)
    out = subprocess.run(
        [sys.executable, *flags, str(script), "one", "--two"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr.split()


@pytest.fixture
def probes(tmp_path: Path) -> list[Path]:
    """A copy of every probe's source under ``tmp_path/lib`` (found before the real ones)."""
    paths = []
    for relative in PROBES:
        path = tmp_path / "lib" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('"""a probe"""\n')
        paths.append(path)
    return paths


def test_without_the_opt2_files_the_process_runs_as_started(tmp_path: Path, probes: list[Path]) -> None:
    for path in probes[:-1]:  # all but one compiled: still not enough
        py_compile.compile(str(path), cfile=cache_from_source(str(path), optimization=2), optimize=2)
    got, pids = run(tmp_path)
    assert got["optimize"] == 0 and got["compiled"] is False
    assert len(pids) == 1


def test_with_the_opt2_files_the_process_runs_itself_again_under_OO(tmp_path: Path, probes: list[Path]) -> None:
    """The same PID, arguments and environment, with ``-OO`` on the command line and not in the
    environment (so the commands the agent starts do not inherit it)."""
    for path in probes:
        py_compile.compile(str(path), cfile=cache_from_source(str(path), optimization=2), optimize=2)
    got, pids = run(tmp_path)
    assert got == {
        "optimize": 2,
        "argv": ["one", "--two"],
        "compiled": True,
        "PYTHONOPTIMIZE": None,
        "inherited": "yes",
    }
    assert len(pids) == 2 and pids[0] == pids[1], "not the same process run again"
    got, pids = run(tmp_path, "-OO")  # already optimized: no second run
    assert got["optimize"] == 2 and len(pids) == 1
    got, pids = run(tmp_path, "-O")  # a level asked for (with -OO it would be 3, whose .pyc nobody writes)
    assert got["optimize"] == 1 and len(pids) == 1


def test_a_program_read_from_standard_input_is_not_run_again(tmp_path: Path, probes: list[Path]) -> None:
    """Its text is gone once read: it runs as started, compiled files or not."""
    for path in probes:
        py_compile.compile(str(path), cfile=cache_from_source(str(path), optimization=2), optimize=2)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "lib")}
    env.pop("PYTHONOPTIMIZE", None)
    out = subprocess.run(
        [sys.executable, "-", "one"], input=SCRIPT, capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["optimize"] == 0 and got["compiled"] is True and got["argv"] == ["one"]
    assert len(out.stderr.split()) == 1


def test_the_agent_runs_under_OO_where_its_opt2_files_are_compiled(start_agent: Callable[..., Agent]) -> None:
    """``make install`` compiles them (``python -m sandboxd.agent.optimized``); the tests' agents then
    all run under ``-OO``. Where they are missing, the agent runs as started."""
    agent = start_agent()
    argv = Path(f"/proc/{agent.process.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0] == sys.executable.encode()
    assert (argv[1] == b"-OO") == compiled(), argv
    assert b"agent" in argv
