"""Run the agent: uvicorn (uvloop + httptools) for Connect and REST, and optionally grpcio."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import uvicorn

from sandboxd import ENVD_VERSION, __version__

from .app import AgentApp
from .asgi import server_config
from .methods import build_methods
from .state import AgentState
from .users import default_user_name

log = logging.getLogger("sandboxd.agent")

OOM_SCORE_ADJ = -900
"""The agent's own OOM score: user processes (envd sets them to 100) die first under memory pressure."""


@dataclass
class AgentOptions:
    """``sandboxd agent`` flags."""

    host: str = "127.0.0.1"
    port: int = 49983
    user: str | None = None
    workdir: str | None = None
    access_token: str | None = None
    grpc_port: int | None = None


def protect_from_oom() -> None:
    """Lower our OOM score when allowed (root); silently keep it otherwise."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass


async def serve(options: AgentOptions) -> None:
    """Serve until cancelled or signalled."""
    state = AgentState(
        default_user=default_user_name(options.user),
        default_workdir=options.workdir,
        access_token=options.access_token or os.environ.get("SANDBOXD_ACCESS_TOKEN") or None,
    )
    state.user()  # fail fast on an unknown --user
    methods = build_methods(state)
    protect_from_oom()
    config = server_config(AgentApp(state, methods), options.host, options.port)
    server = uvicorn.Server(config)
    grpc_server = None
    if options.grpc_port is not None:
        from .grpc_server import start_grpc

        grpc_server = await start_grpc(state, methods, options.host, options.grpc_port)
    log.warning(
        "sandboxd agent %s (envd %s) on http://%s:%d%s, default user %s",
        __version__,
        ENVD_VERSION,
        options.host,
        options.port,
        f", gRPC on {options.host}:{options.grpc_port}" if grpc_server else "",
        state.default_user,
    )
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1)


def run(options: AgentOptions) -> None:
    """Run :func:`serve` on uvloop."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(options))
