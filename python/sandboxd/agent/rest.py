"""envd's plain-HTTP endpoints besides ``/files``: ``/health``, ``/envs``, ``/init`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from sandboxd import ENVD_VERSION

from . import cacerts, identity
from .asgi import ClientDisconnected, Receive, Send, read_body, send_empty, send_http_error, send_json
from .errors import RpcError
from .state import AgentState
from .users import lookup
from .validate import check_env_vars, check_no_nul

MAX_INIT_BODY = 1 << 20
"""``/init`` carries env vars and a token: 1 MiB is far more than any real one."""


async def health(send: Send) -> None:
    """``GET /health``: 204, as envd."""
    await send_empty(send, 204, [("cache-control", "no-store"), ("x-envd-version", ENVD_VERSION)])


async def envs(state: AgentState, send: Send) -> None:
    """``GET /envs``: the sandbox-wide env vars set through ``/init``."""
    await send_json(send, 200, state.env_vars)


async def metrics(send: Send) -> None:
    """``GET /metrics``: envd's snake_case resource snapshot (psutil)."""
    import psutil  # here, not at the top: ~0.8 MiB of RSS that only this endpoint needs

    memory = psutil.virtual_memory()
    disk = psutil.disk_usage("/")
    cache = getattr(memory, "cached", 0) + getattr(memory, "buffers", 0)
    await send_json(
        send,
        200,
        {
            "ts": int(time.time()),
            "cpu_count": psutil.cpu_count() or os.cpu_count() or 1,
            "cpu_used_pct": psutil.cpu_percent(interval=None),
            "mem_total": memory.total,
            "mem_used": memory.total - memory.available,
            "mem_cache": cache,
            "mem_total_mib": memory.total >> 20,
            "mem_used_mib": (memory.total - memory.available) >> 20,
            "disk_used": disk.used,
            "disk_total": disk.total,
        },
    )


def _str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    return value


async def init(state: AgentState, headers: dict[str, str], receive: Receive, send: Send) -> None:
    """``POST /init``: the orchestrator sets the token, env vars, default user and workdir."""
    if not state.token_matches(headers.get("x-access-token")):
        await send_http_error(send, 401, "unauthorized access, please provide a valid access token")
        return
    try:
        raw = await read_body(receive, MAX_INIT_BODY)
    except ClientDisconnected:
        return
    if raw is None:
        await send_http_error(send, 413, f"/init body exceeds {MAX_INIT_BODY} bytes")
        return
    try:
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        env_vars = body.get("envVars")
        if env_vars is not None and (
            not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values())
        ):
            raise ValueError("'envVars' must be an object of strings")
        if env_vars is not None:
            check_env_vars(env_vars, "envVars")
        token = _str_field(body, "accessToken")
        user = _str_field(body, "defaultUser")
        workdir = _str_field(body, "defaultWorkdir")
        ca_bundle = _str_field(body, "caBundle")
        check_no_nul([v for v in (token, user, workdir) if v is not None], "accessToken, defaultUser or defaultWorkdir")
    except RecursionError:
        await send_http_error(send, 400, "invalid /init body: JSON nested too deeply")
        return
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        await send_http_error(send, 400, f"invalid /init body: {exc}")
        return
    except RpcError as exc:
        await send_http_error(send, 400, f"invalid /init body: {exc.message}")
        return
    if ca_bundle:
        try:
            await asyncio.to_thread(cacerts.install, ca_bundle)
        except (OSError, ValueError) as exc:
            await send_http_error(send, 400, f"could not install 'caBundle': {exc}")
            return
    if user:
        try:
            lookup(user)
        except KeyError:
            # As envd: taken as given and looked up when used (a command then gets envd's "invalid
            # username"). Refused here, a sandbox whose own code removed the account (or /etc) could
            # not be resumed, and its files were lost to the user.
            logging.getLogger("sandboxd.agent").warning("defaultUser '%s' does not exist in this sandbox", user)
    first = not state.env_vars_set
    state.apply_init(access_token=token, env_vars=env_vars, default_user=user, default_workdir=workdir)
    if env_vars is not None:
        # As envd: the variables are set either way; a file the sandbox's own code broke is its loss.
        try:
            if first:
                # In a sandbox the first env vars are the runtime's, as it boots (a create, a warm
                # sandbox's claim, a resume), before its id is named to anyone: no code of the user's
                # has run in this agent's mount namespace, so nothing mounted at /run/e2b can make the
                # write block (and replace_file opens nothing planted on the disk before a pause),
                # and the agent serves nothing else the loop would keep waiting. Inline, no thread:
                # the default executor's first worker, started for these few small files, was ~1.2
                # ms of CPU and ~100 page faults of every create (docs/benchmarks.md, cold13).
                identity.write(env_vars)
            else:
                await asyncio.to_thread(identity.write, env_vars)
        except (OSError, ValueError) as exc:
            logging.getLogger("sandboxd.agent").warning("envd's /run/e2b files were not written: %s", exc)
    await send_empty(send, 204, [("x-envd-version", ENVD_VERSION), ("cache-control", "no-store")])
