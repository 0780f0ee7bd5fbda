"""envd's ``/run/e2b`` files: how code in a sandbox learns that it runs in one, and which.

envd writes ``/run/e2b/.E2B_SANDBOX`` (``true``) at start and, once Firecracker's metadata service
names the sandbox, ``.E2B_SANDBOX_ID``, ``.E2B_TEMPLATE_ID`` and ``.E2B_TEAM_ID``, the same values it
gives every process as environment variables (E2B's docs, "Environment variables": "Knowing if you
are inside a sandbox"). sandboxd has no metadata service: the runtime passes these variables in
``POST /init``'s ``envVars``, and the agent writes the files for those it was given. An agent that
was given no ``E2B_SANDBOX_ID`` (one started by hand or by a test, outside any sandbox) writes
nothing, so it never touches a host's ``/run``.
"""

from __future__ import annotations

import os

from .sysfiles import replace_file

RUN_DIR = "/run/e2b"
IDENTITY = ("E2B_SANDBOX_ID", "E2B_TEMPLATE_ID", "E2B_TEAM_ID")
"""The variables with a file of their own, as envd writes them."""


def write(env_vars: dict[str, str], run_dir: str | None = None) -> None:
    """Write ``.E2B_SANDBOX`` and a ``.NAME`` file per identity variable in ``env_vars`` into the
    absolute ``run_dir`` (default :data:`RUN_DIR`; blocking: call from a thread, or where nothing else
    waits on the event loop). Nothing without ``E2B_SANDBOX_ID``. Each file is replaced whole and
    nothing the sandbox left on the way is followed or opened
    (:func:`~sandboxd.agent.sysfiles.replace_file`): its root may have left links, FIFOs or anything
    else at these paths before a pause, and the resume's ``/init`` must not block on them. A path that
    is in the way (a link at ``/run``, a directory at a file's name) is a ``ValueError``."""
    if "E2B_SANDBOX_ID" not in env_vars:
        return
    run_dir = RUN_DIR if run_dir is None else run_dir  # read at the call: a test's agent points it elsewhere
    values = {"E2B_SANDBOX": "true", **{name: env_vars[name] for name in IDENTITY if name in env_vars}}
    for name, value in values.items():
        replace_file(os.path.join(run_dir, f".{name}"), value.encode(), 0o444)
