"""``sandboxd agent`` in a process that runs nothing but the agent, started without ``sandboxd.cli``.

``sandboxd.cli`` holds every command's flags and how each runs (the runtime's, the node's, the
interpreter's): ~65 KB of functions and their code that a standalone agent kept for its life for the
few lines that start it. ``python -m sandboxd agent`` (``sandboxd/__main__.py``) comes here directly,
and ``sandboxd.cli.main`` hands the ``agent`` command here, so that both take the same steps; the
line is read by ``sandboxd.cli``'s argparse only when :func:`sandboxd.agent.argv.parse` does not read
it (``--help``, a mistake), as before. 0.07 MiB of idle RSS after 20 ``Start``s (medians of 6 starts;
docs/benchmarks.md, ``rss9``). The console script (``sandboxd.cli:main``) still imports it."""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    """Run ``sandboxd agent``: ``argv`` is the command line after the program (``["agent", ...]``), or
    None for this process's own (``sys.argv[1:]``), which is then run again under ``-OO`` when its
    ``.opt-2.pyc`` files are there (``agent.optimized``)."""
    given = sys.argv[1:] if argv is None else argv
    if argv is None:  # this process's own command line, which it can run again
        from .optimized import reexec_if_compiled

        reexec_if_compiled()  # first: under -OO, when its .opt-2.pyc files are there
    from .lean import (
        dataclass_docs_without_inspect,
        datetime_later,
        defer,
        lazy_protobuf,
        uvicorn_package_without_cli,
        well_known_types_later,
        without_openssl,
    )

    without_openssl()  # first: asyncio, uvloop and uvicorn import ssl
    defer()  # before asyncio imports inspect
    dataclass_docs_without_inspect()  # under -OO no dataclass has a docstring
    datetime_later()  # before anything imports datetime
    uvicorn_package_without_cli()  # before the parser imports the HTTP server's defaults
    lazy_protobuf()
    well_known_types_later()  # before the first message class
    from .argv import parse

    values = parse(given[1:])  # the usual line, without argparse (None: argparse reads it)
    if values is None:
        from sandboxd.cli import build_parser

        values = vars(build_parser(only_agent=True).parse_args(given))
    run_agent(values, lean=True)


def run_agent(values: dict[str, Any], lean: bool = False) -> None:
    """``sandboxd agent`` with its flags' values by destination (argparse's, or ``sandboxd.agent.argv``'s);
    ``lean`` in a process that runs nothing but the agent (``sandboxd.agent.lean``)."""
    if lean and values["grpc_port"] is None:  # grpcio is C++: it needs the real libstdc++
        from .lean import upb_without_libstdcxx

        upb_without_libstdcxx()
    from .http_server import ConnectionLimits
    from .server import AgentOptions, run

    limits = ConnectionLimits(
        max_connections=values["max_connections"],
        head_timeout=values["header_timeout"],
        idle_timeout=values["idle_timeout"],
    )
    run(
        AgentOptions(
            host=values["host"],
            port=values["port"],
            user=values["user"],
            workdir=values["workdir"],
            access_token=values["access_token"],
            grpc_port=values["grpc_port"],
            connections=limits,
        )
    )
