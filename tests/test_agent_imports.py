"""What a standalone ``sandboxd agent`` loads (issue 16, the agent's memory): libraries only one kind of
request needs are loaded by the first such request, and uvicorn's command-line half is never loaded.
The RSS figures themselves are in the benches (``commands``: agent RSS idle), not asserted here."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
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
from sandboxd.agent.lean import lazy_protobuf, uvicorn_package_without_cli
uvicorn_package_without_cli()
lazy_protobuf()
from sandboxd.agent.app import AgentApp
from sandboxd.agent.http_server import server_config
from sandboxd.agent.methods import build_methods
from sandboxd.agent.state import AgentState
state = AgentState(default_user="root")
config = server_config(AgentApp(state, build_methods(state)), "127.0.0.1", 0, uvicorn_logging=False)
config.load()
import uvicorn, uvicorn.config, uvicorn.server
print(json.dumps({
    "loaded": config.loaded,
    "config_is_the_submodules": uvicorn.Config is uvicorn.config.Config,
    "unneeded": sorted(m for m in sys.modules if m in ("click", "uvicorn.main", "uvicorn.supervisors",
                       "multiprocessing", "psutil", "python_multipart", "email", "logging.handlers",
                       "google.protobuf.text_format", "hashlib", "hmac", "secrets",
                       "google.protobuf.internal.type_checkers")),
    "uvicorn_date": uvicorn.server.formatdate(784111777.0, usegmt=True),
    "not_run_yet": sorted(m for m, module in sys.modules.items() if type(module).__name__ == "_LazyModule"),
    "run_when_used": [uvicorn.server.platform.system(), uvicorn.server.random.randint(3, 3),
                      uvicorn.config.logging.config.dictConfig.__name__],
}))
"""


def test_the_agent_server_loads_without_uvicorns_command_line() -> None:
    """The same steps as ``sandboxd agent``: uvicorn's package registered without its ``__init__``
    (and without ``email``, whose ``formatdate`` uvicorn's server imports, nor ``logging.config``,
    which uvicorn's config imports), protobuf's pure-Python half registered to load on first use, then
    the agent's app and uvicorn's Config (with its lifespan and protocol classes) loaded."""
    out = subprocess.run([sys.executable, "-c", AGENT_PROCESS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "loaded": True,
        "config_is_the_submodules": True,
        "unneeded": [],
        "uvicorn_date": "Sun, 06 Nov 1994 08:49:37 GMT",  # email.utils.formatdate's, without email
        "not_run_yet": [  # imported by libraries for paths the agent does not take (sandboxd.agent.lean)
            "configparser",
            "google.protobuf.internal.python_message",
            "google.protobuf.json_format",
            "logging.config",
            "platform",
            "random",
        ],
        "run_when_used": ["Linux", 3, "dictConfig"],
    }


def test_the_standalone_agent_serves_every_kind_of_request_without_openssl(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """``sandboxd agent`` keeps OpenSSL out of its process (it serves plain HTTP) and runs on asyncio's
    own loop, since uvloop imports ``ssl``: the token check (hmac), a signed download (sha256), an
    upload, a unary RPC, a command's output stream and a watch all work, and neither libssl nor libcrypto
    is ever mapped."""
    from e2b.sandbox.signature import get_signature

    agent = start_agent(token="lean-token")
    pid = agent.process.pid
    headers = {**agent.headers(), "Connect-Protocol-Version": "1"}
    target = tmp_path / "up.bin"
    body = bytes(range(256)) * 4096
    upload = {**agent.headers(), "Content-Type": "application/octet-stream"}
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, content=body, headers=upload)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, headers={"X-Access-Token": "no"})
    assert r.status_code == 401
    sig = get_signature(str(target), "read", None, "lean-token")["signature"]
    assert httpx.get(f"{agent.url}/files", params={"path": str(target), "signature": sig}).content == body
    stat = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": str(target)}, headers=headers)
    assert stat.status_code == 200 and int(stat.json()["entry"]["size"]) == len(body)
    start = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "head -c 3000000 /dev/zero"]}}).encode()
    r = httpx.post(
        f"{agent.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(start)) + start,
        headers={**headers, "Content-Type": "application/connect+json"},
        timeout=30,
    )
    assert r.status_code == 200 and r.content.endswith(b"{}")
    watch = httpx.post(
        f"{agent.url}/filesystem.Filesystem/CreateWatcher", json={"path": str(tmp_path)}, headers=headers
    )
    assert watch.status_code == 200, watch.text
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libssl" not in maps and "libcrypto" not in maps, "OpenSSL was loaded into the standalone agent"


UVICORN_LOGGERS = """
import json, logging, sys
from sandboxd.agent.http_server import server_config
server_config(None, "127.0.0.1", 0, uvicorn_logging=sys.argv[1] == "uvicorn")
def describe(name):
    log = logging.getLogger(name)
    return {
        "level": log.level,
        "propagate": log.propagate,
        "handlers": [
            [type(h).__name__, type(h.formatter).__name__, h.formatter._fmt, h.formatter.use_colors, h.stream.name]
            for h in log.handlers
        ],
    }
print(json.dumps({name: describe(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")}))
"""


def test_the_agents_uvicorn_loggers_are_set_up_as_uvicorns_default_log_config() -> None:
    """``server_config(uvicorn_logging=False)`` (the agent's, without ``logging.config``) leaves
    uvicorn's loggers as its default ``log_config`` does: the same handler, format, stream and levels."""
    got = {}
    for how in ("uvicorn", "ours"):
        out = subprocess.run(
            [sys.executable, "-c", UVICORN_LOGGERS, how],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        got[how] = json.loads(out.stdout)
    assert got["ours"] == got["uvicorn"]
    assert got["ours"]["uvicorn"]["handlers"] == [
        ["StreamHandler", "DefaultFormatter", "%(levelprefix)s %(message)s", False, "<stderr>"]
    ]


AGENT_HELP = """
import argparse, json, sys
from sandboxd.agent.lean import uvicorn_package_without_cli
uvicorn_package_without_cli()  # as sandboxd.cli.main does for the agent
from sandboxd.cli import build_parser
parser = build_parser(only_agent=True)
parser.parse_args(["agent", "--port", "0"])
no_shutil = "shutil" not in sys.modules
agent = parser._subparsers._group_actions[0].choices["agent"]
ours = [parser.format_help(), agent.format_help()]
parser.formatter_class = agent.formatter_class = argparse.HelpFormatter  # argparse's own, with shutil
print(json.dumps({"no_shutil": no_shutil, "same_help": ours == [parser.format_help(), agent.format_help()]}))
"""


@pytest.mark.parametrize("columns", ["", "57", "200", "junk"])
def test_the_agents_command_line_is_parsed_without_shutil_and_helps_as_argparse_does(columns: str) -> None:
    """argparse imports ``shutil`` (with bz2 and lzma) for the terminal's width; the agent's parser
    asks for the width without it, and its help is what argparse's own formatter prints."""
    env = {**os.environ, "COLUMNS": columns}
    out = subprocess.run(
        [sys.executable, "-c", AGENT_HELP],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"no_shutil": True, "same_help": True}
