"""``sandboxd agent``'s command line read without argparse (``sandboxd.agent.argv``): the values argparse
gives, or None and argparse reads the line (issue 16, the agent's memory)."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_healthy
from sandboxd.agent import argv
from sandboxd.cli import build_parser

READ_HERE = [
    [],
    ["--port", "0"],
    ["--port=65535", "--host", "0.0.0.0"],
    ["--host", "::1", "--port", "8080", "--user", "root", "--workdir", "/home/user"],
    ["--access-token", "secret", "--grpc-port", "50051"],
    ["--access-token=", "--user="],  # empty values, as argparse takes them after "="
    ["--user=-dash", "--workdir=/a=b"],  # after "=" a value may start with "-" or hold "="
    ["--max-connections", "10", "--header-timeout", "2.5", "--idle-timeout", "1e3"],
    ["--header-timeout", "inf", "--idle-timeout", "0.001"],
    ["--port", "1", "--port", "2"],  # the last one counts
    ["--port", " 42 "],  # int() allows the spaces, in both
    ["--host", "h", "--user", "u", "--workdir", "w", "--access-token", "t", "--grpc-port", "3"],
]

LEFT_TO_ARGPARSE = [
    ["-h"],
    ["--help"],
    ["--version"],
    ["--po", "1"],  # an abbreviation argparse allows
    ["--ho=x"],
    ["--unknown", "1"],
    ["positional"],
    ["--port"],  # no value
    ["--port", "70000"],
    ["--port", "-1"],
    ["--port=-1"],
    ["--port", "x"],
    ["--user", "-x"],  # argparse takes -x for a flag
    ["--max-connections", "0"],
    ["--header-timeout", "-1"],
    ["--idle-timeout", "nope"],
    ["--", "--port", "1"],
]


def argparse_values(args: list[str]) -> dict[str, object] | None:
    """What ``sandboxd agent ARGS`` gives through argparse, by destination; None when it refuses it."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            namespace = build_parser(only_agent=True).parse_args(["agent", *args])
        except SystemExit:
            return None
    values = vars(namespace)
    assert values.pop("command") == "agent"
    return values


@pytest.mark.parametrize("args", READ_HERE, ids=lambda a: " ".join(a) or "(none)")
def test_a_usual_line_gives_what_argparse_gives(args: list[str]) -> None:
    expected = argparse_values(args)
    assert expected is not None
    assert argv.parse(args) == expected


@pytest.mark.parametrize("args", LEFT_TO_ARGPARSE, ids=" ".join)
def test_anything_else_is_left_to_argparse(args: list[str]) -> None:
    assert argv.parse(args) is None


def test_the_flags_are_the_parsers() -> None:
    """Every flag of ``build_parser``'s agent is read here, with its default: a flag added there and
    not here would leave the agent without it."""
    parser = build_parser(only_agent=True)
    agent = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["agent"]
    flags = {s: a.dest for a in agent._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert {flag: dest for flag, (dest, _) in argv.FLAGS.items()} == flags
    assert argv.defaults() == argparse_values([])


def test_help_and_errors_still_come_from_argparse() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "sandboxd", "agent", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: sandboxd agent")
    refused = subprocess.run(
        [sys.executable, "-m", "sandboxd", "agent", "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "argument --port: 70000 is not a TCP port" in refused.stderr


def test_a_line_only_argparse_reads_still_starts_the_agent(tmp_path: Path) -> None:
    """An abbreviated flag (argparse allows them) is left to argparse, and the agent starts with its
    values: the fallback path runs the same agent."""
    port = free_port()
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "agent", "--po", str(port), "--work", str(tmp_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.terminate()
        process.wait(10)
