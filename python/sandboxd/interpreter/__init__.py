"""The code interpreter: E2B's ``runCode`` HTTP contract (port 49999) over Jupyter kernels.

``POST /execute`` streams one JSON object a line (``stdout``, ``stderr``, ``result``, ``error``,
``number_of_executions``, then ``end_of_execution``); ``/contexts`` creates, lists, restarts and
removes isolated execution contexts. Kernels are started and driven with ``jupyter_client``
(no Jupyter server): ``ipykernel`` for Python, Deno's built-in kernel for JavaScript and TypeScript,
``bash_kernel`` for bash, and R or Java kernels where the template has them.

The server comes from the host, like the agent; the kernels are the template's (see
``docs/interpreter.md`` for why, and for what a template must contain).
"""

from __future__ import annotations

INTERPRETER_PORT = 49999
"""The port E2B's SDKs address for the code interpreter (``JUPYTER_PORT`` in both SDKs)."""

PRELOAD_PACKAGES = (
    "dateutil",
    "jupyter_client",
    "orjson",
    "platformdirs",
    "sandboxd.interpreter",
    "traitlets",
    "zmq",
)
"""What a process that forks sandboxed interpreters (the runtime's zygote) imports whole beforehand:
inside a sandbox the host's Python installation is not there to import from. Each is safe to walk
with ``pkgutil.walk_packages`` (``jupyter_core`` is not: its ``__main__`` runs its command line)."""

PRELOAD_MODULES = ("jupyter_core.paths", "jupyter_core.utils", "urllib.request", "http.client", "uuid")
"""Single modules to import beforehand: the parts of ``jupyter_core`` the server uses, and the
standard modules it imports lazily."""
