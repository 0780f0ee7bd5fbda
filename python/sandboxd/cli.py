"""The ``sandboxd`` command: ``agent`` runs inside a sandbox; ``serve`` runs the runtime on the host."""

from __future__ import annotations

import argparse
import sys

from sandboxd import ENVD_VERSION, __version__


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandboxd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__} (envd {ENVD_VERSION})")
    commands = parser.add_subparsers(dest="command", required=True)

    agent = commands.add_parser("agent", help="run the envd-compatible agent (inside a sandbox)")
    agent.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    agent.add_argument("--port", type=_port, default=49983, help="Connect + REST port (default: 49983, as envd)")
    agent.add_argument("--user", help="default user (default: 'user' if it exists, else the current account)")
    agent.add_argument("--workdir", help="default working directory for commands and empty paths")
    agent.add_argument(
        "--access-token", help="require this X-Access-Token on every request (also: $SANDBOXD_ACCESS_TOKEN)"
    )
    agent.add_argument("--grpc-port", type=_port, help="also serve gRPC (grpcio, HTTP/2) on this port")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "agent":
        from sandboxd.agent.server import AgentOptions, run

        run(
            AgentOptions(
                host=args.host,
                port=args.port,
                user=args.user,
                workdir=args.workdir,
                access_token=args.access_token,
                grpc_port=args.grpc_port,
            )
        )
    else:  # pragma: no cover - argparse enforces the choices
        sys.exit(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
