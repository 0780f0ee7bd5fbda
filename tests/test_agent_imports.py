"""What a standalone ``sandboxd agent`` loads (issue 16, the agent's memory): libraries only one kind of
request needs are loaded by the first such request, and uvicorn's command-line half is never loaded.
The RSS figures themselves are in the benches (``commands``: agent RSS idle), not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import Agent


def mapped(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped into the process (an extension module
    is mapped from the moment it is imported)."""
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def test_psutil_is_loaded_by_the_first_metrics_request(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    pid = agent.process.pid
    assert httpx.get(f"{agent.url}/health").status_code == 204
    assert not mapped(pid, "_psutil_linux"), "psutil was imported before any request needed it"
    response = httpx.get(f"{agent.url}/metrics")
    assert response.status_code == 200
    assert response.json()["mem_total"] > 0
    assert mapped(pid, "_psutil_linux")


AGENT_PROCESS = """
import json, sys
from sandboxd.agent.lean import uvicorn_package_without_cli
uvicorn_package_without_cli()
from sandboxd.agent.app import AgentApp
from sandboxd.agent.http_server import server_config
from sandboxd.agent.methods import build_methods
from sandboxd.agent.state import AgentState
state = AgentState(default_user="root")
config = server_config(AgentApp(state, build_methods(state)), "127.0.0.1", 0)
config.load()
import uvicorn, uvicorn.config
print(json.dumps({
    "loaded": config.loaded,
    "config_is_the_submodules": uvicorn.Config is uvicorn.config.Config,
    "unneeded": sorted(m for m in sys.modules if m in ("click", "uvicorn.main", "uvicorn.supervisors",
                       "multiprocessing", "psutil", "python_multipart")),
}))
"""


def test_the_agent_server_loads_without_uvicorns_command_line() -> None:
    """The same steps as ``sandboxd agent``: uvicorn's package registered without its ``__init__``,
    then the agent's app and uvicorn's Config (with its lifespan and protocol classes) loaded."""
    out = subprocess.run([sys.executable, "-c", AGENT_PROCESS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"loaded": True, "config_is_the_submodules": True, "unneeded": []}
