"""``make conformance``: run connectrpc.com/conformance (server mode) against ``server.py``.

Installs the runner with ``go install`` from the Go module proxy (pinned below) into ``.cache/``,
generates the suite's Python protobuf classes from the same module's ``proto/`` directory with
``grpc_tools.protoc``, then runs every case ``config.yaml`` selects. Cases known to fail are listed,
with the reason, in ``known-failing.txt`` (the runner requires them to fail, so the list stays true).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFORMANCE_VERSION = "v1.0.7"
"""connectrpc.com/conformance release the suite runs (its test cases change between releases)."""

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache" / "conformance" / CONFORMANCE_VERSION


def _go(*args: str, **env: str) -> str:
    return subprocess.run(["go", *args], check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout


def install_runner() -> Path:
    runner = CACHE / "bin" / "connectconformance"
    if not runner.exists():
        package = f"connectrpc.com/conformance/cmd/connectconformance@{CONFORMANCE_VERSION}"
        print(f"conformance: go install {package}", flush=True)
        _go("install", package, GOBIN=str(runner.parent))
    return runner


def generate_protos() -> Path:
    gen = CACHE / "gen"
    if (gen / "connectrpc" / "conformance" / "v1" / "service_pb2.py").exists():
        return gen
    info = json.loads(_go("mod", "download", "-json", f"connectrpc.com/conformance@{CONFORMANCE_VERSION}"))
    proto_root = Path(info["Dir"]) / "proto"
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "connectrpc").rglob("*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    tmp = gen.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={tmp}", *protos],
        check=True,
    )
    for package in ("connectrpc", "connectrpc/conformance", "connectrpc/conformance/v1"):
        (tmp / package / "__init__.py").touch()
    shutil.rmtree(gen, ignore_errors=True)
    tmp.rename(gen)
    return gen


def main() -> int:
    runner = install_runner()
    gen = generate_protos()
    command = [
        str(runner),
        "--mode",
        "server",
        "--conf",
        str(HERE / "config.yaml"),
        "--known-failing",
        f"@{HERE / 'known-failing.txt'}",
        *sys.argv[1:],
        "--",
        sys.executable,
        str(HERE / "server.py"),
    ]
    print("conformance:", " ".join(command), flush=True)
    return subprocess.run(command, env={**os.environ, "CONFORMANCE_GEN": str(gen)}).returncode


if __name__ == "__main__":
    sys.exit(main())
