"""``sandboxd agent``'s command line read without argparse, when it is one argparse reads the same way.

argparse (with ``gettext``) was 0.2 MiB of a standalone agent's RSS at start (22.66 → 22.43 MiB,
medians of 3 starts alternating; ``docs/benchmarks.md``, ``rss5``), for nine flags read once.
:func:`parse` reads the common case: every argument one of :data:`FLAGS`, spelled out, as ``--flag
value`` or ``--flag=value``, each value valid. Anything else (``--help``, an abbreviation, an unknown
flag, a value that looks like a flag, a value argparse would refuse) gives None, and ``sandboxd.cli``
parses the line with argparse as before, which answers it or explains the error. So the agent starts
with the values argparse would have given, or argparse runs.
``tests/test_agent_argv.py`` compares the two on a table of command lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def port(value: str) -> int:
    """A TCP port, as ``sandboxd.cli``'s ``--port`` takes it (ValueError otherwise)."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(value)
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(value)
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(value)
    return number


FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--host": ("host", str),
    "--port": ("port", port),
    "--user": ("user", str),
    "--workdir": ("workdir", str),
    "--access-token": ("access_token", str),
    "--grpc-port": ("grpc_port", port),
    "--max-connections": ("max_connections", positive_int),
    "--header-timeout": ("header_timeout", positive_float),
    "--idle-timeout": ("idle_timeout", positive_float),
}
"""``sandboxd agent``'s flags (``sandboxd.cli.build_parser``): destination and conversion."""


def defaults() -> dict[str, Any]:
    """The flags' defaults, as ``sandboxd.cli.build_parser`` sets them."""
    from .http_server import DEFAULT_HEAD_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS

    return {
        "host": "127.0.0.1",
        "port": 49983,
        "user": None,
        "workdir": None,
        "access_token": None,
        "grpc_port": None,
        "max_connections": DEFAULT_MAX_CONNECTIONS,
        "header_timeout": DEFAULT_HEAD_TIMEOUT_S,
        "idle_timeout": DEFAULT_IDLE_TIMEOUT_S,
    }


def parse(args: list[str]) -> dict[str, Any] | None:
    """The values of ``sandboxd agent ARGS`` (``args`` without ``agent``) by destination, as argparse
    gives them; None when argparse must read the line (see the module documentation)."""
    values = defaults()
    i = 0
    while i < len(args):
        arg = args[i]
        flag, equals, value = arg.partition("=")
        if flag not in FLAGS:
            return None  # help, an abbreviation, an unknown flag, a positional argument: argparse's
        if not equals:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            if value.startswith("-"):
                return None  # argparse takes it for a flag (or, for some, a negative number)
            i += 1
        i += 1
        dest, convert = FLAGS[flag]
        try:
            values[dest] = convert(value)
        except ValueError:
            return None
    return values
