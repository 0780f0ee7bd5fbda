"""Scenario ``network``: sandbox egress beside the host's own, in a lab internet of network namespaces.

The bench builds ``tests/netlab.py``'s lab (nothing reaches the real network) and runs ``sandboxd
serve`` in its host namespace. The same client program (``CLIENT``, the host's ``python3``) runs
inside a sandbox and, for the baseline, directly in the host namespace:

* download throughput of 1 GiB (quick: 256 MiB) from the lab's web server, through the sandbox's
  veth pair, the host's forwarding and masquerade, beside the same download made by the host; and
  the same download by a sandbox whose rules name hosts (its TCP goes through the egress proxy);
* TCP connect latency (connect + close, p50 of 300) to the same server, beside the host's;
* create → first command (``Sandbox.create`` + ``commands.run("true")``) with networking beside the
  same runtime flags with ``--no-network`` (sandboxd before networking), in the same run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import REPO, Context, Result, ScenarioSkipped, percentile

sys.path.insert(0, str(REPO / "tests"))

CLIENT = r"""
import json, socket, sys, time
mode, host, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "download":
    s = socket.create_connection((host, 80))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    t = time.perf_counter()
    s.sendall(f"GET /bytes?n={arg} HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".encode())
    buf = bytearray(1 << 20)
    total = 0
    while n := s.recv_into(buf):
        total += n
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t}))
else:
    samples = []
    for _ in range(arg):
        t = time.perf_counter()
        c = socket.create_connection((host, 80))
        samples.append((time.perf_counter() - t) * 1e6)
        c.close()
    print(json.dumps(samples))
"""


def run(ctx: Context) -> None:
    if os.geteuid() != 0:
        raise ScenarioSkipped("needs root: the lab is made of network namespaces, and sandboxd serve needs root")
    import subprocess

    import netlab
    from e2b import Sandbox

    size = (256 if ctx.quick else 1024) << 20
    connects = 100 if ctx.quick else 300
    creates = 10 if ctx.quick else 30
    lab = netlab.Lab(ctx.tmp / "lab").up()
    runtimes: list[netlab.Runtime] = []
    try:
        ctx.log("starting sandboxd serve in the lab (with networking, and --no-network)")
        with_net = lab.start_runtime(_data(ctx, "net"), "bench-net")
        runtimes.append(with_net)
        without = lab.start_runtime(_data(ctx, "nonet"), "bench-nonet", "--no-network")
        runtimes.append(without)
        (ctx.tmp / "client.py").write_text(CLIENT)

        def on_host(*args: str) -> str:
            command = ["nsenter", f"--net=/run/netns/{lab.host_ns}", "python3", str(ctx.tmp / "client.py"), *args]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout

        _env(with_net)
        sandbox = Sandbox.create(timeout=600)
        named = Sandbox.create(timeout=600, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
        try:
            for s in (sandbox, named):
                s.files.write("/tmp/client.py", CLIENT)

            def in_sandbox(s: Sandbox, *args: str) -> str:
                return s.commands.run("python3 /tmp/client.py " + " ".join(args), timeout=600).stdout

            ctx.log(f"download of {size >> 20} MiB")
            host_rate = _rate(on_host("download", netlab.WEB, str(size)))
            ours_rate = _rate(in_sandbox(sandbox, "download", netlab.WEB, str(size)))
            named_rate = _rate(in_sandbox(named, "download", "allowed.test", str(size)))
            label = f"{size >> 20} MiB"
            ctx.report(
                Result(
                    f"network: download {label} from the lab internet, sandbox",
                    "MB/s",
                    ours_rate,
                    host_rate,
                    "the same download by the host (same client, same server)",
                    "higher",
                )
            )
            ctx.report(
                Result(
                    f"network: download {label}, sandbox whose rules name hosts (egress proxy)",
                    "MB/s",
                    named_rate,
                    host_rate,
                    "the same download by the host (same client, same server)",
                    "higher",
                )
            )
            ctx.log(f"connect latency, {connects} connects")
            host_lat = json.loads(on_host("connect", netlab.WEB, str(connects)))
            ours_lat = json.loads(in_sandbox(sandbox, "connect", netlab.WEB, str(connects)))
            ctx.report(
                Result(
                    "network: TCP connect to the lab internet, sandbox",
                    "us (p50)",
                    percentile(ours_lat, 50),
                    percentile(host_lat, 50),
                    "the host's own connect to the same server",
                    "lower",
                    p50=percentile(ours_lat, 50),
                    p99=percentile(ours_lat, 99),
                    samples={"ours": ours_lat, "baseline": host_lat},
                )
            )
        finally:
            sandbox.kill()
            named.kill()

        ctx.log(f"create -> first command, {creates} each")
        ours_ms = _creates(creates)
        _env(without)
        base_ms = _creates(creates)
        ctx.report(
            Result(
                "network: create->first command with networking",
                "ms (p50)",
                percentile(ours_ms, 50),
                percentile(base_ms, 50),
                "the same runtime with --no-network (loopback only)",
                "lower",
                p50=percentile(ours_ms, 50),
                p99=percentile(ours_ms, 99),
                samples={"ours": ours_ms, "baseline": base_ms},
            )
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        lab.down()


def _data(ctx: Context, name: str) -> Path:
    path = ctx.tmp / name
    path.mkdir()
    return path


def _env(runtime: object) -> None:
    for name, value in runtime.env().items():  # type: ignore[attr-defined]
        os.environ[name] = value
    os.environ.pop("E2B_DEBUG", None)


def _rate(output: str) -> float:
    answer = json.loads(output)
    return float(answer["bytes"] / answer["seconds"] / 1e6)


def _creates(n: int) -> list[float]:
    from e2b import Sandbox

    samples = []
    for _ in range(n):
        t = time.perf_counter()
        sandbox = Sandbox.create(timeout=60)
        sandbox.commands.run("true")
        samples.append((time.perf_counter() - t) * 1e3)
        sandbox.kill()
    return samples
