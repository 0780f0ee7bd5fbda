"""The cost of watching the runtime: what the observation layer (request ids, status counters, byte
counts, failure logs; ``sandboxd.runtime.observe.http``) adds to a proxied request, beside the same
request without it; and a ``/metrics`` scrape with 256 running sandboxes' worth of series.

In-process, on one event loop, with an upstream that answers at once: the figures isolate the layer
(a real proxied request costs hundreds of microseconds more in the proxy and the agent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from sandboxd.runtime.observe.http import RequestObserver
from sandboxd.runtime.observe.metrics import RuntimeMetrics, RuntimeView, SandboxView

from .common import Context, Result, percentile

CHUNK = b"x" * (64 << 10)
SANDBOXES = 256
"""The default --max-sandboxes: the most per-sandbox series a scrape carries by default."""

Message = dict[str, Any]


def _upstream(chunks: int) -> Callable[..., Awaitable[None]]:
    async def answer(scope: Any, receive: Any, send: Any, sandbox_id: str, port: int) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return answer


async def _timed(n: int, call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - started) / n * 1e6


async def _proxied(chunks: int, n: int, rounds: int) -> tuple[list[float], list[float]]:
    observer = RequestObserver(RuntimeMetrics())
    upstream = _upstream(chunks)
    scope = {"type": "http", "method": "POST", "path": "/process.Process/Start", "headers": []}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def bare() -> None:
        await upstream(scope, receive, send, "sbx", 49983)

    async def observed() -> None:
        await observer.proxied(upstream, scope, receive, send, "sbx", 49983)

    ours: list[float] = []
    base: list[float] = []
    for _ in range(rounds):  # interleaved, so a noisy neighbour hits both alike
        base.append(await _timed(n, bare))
        ours.append(await _timed(n, observed))
    return ours, base


def _scrape(rounds: int) -> list[float]:
    metrics = RuntimeMetrics()
    stats = SimpleNamespace(cpu_usage_ns=123_000_000, memory_bytes=50 << 20, pids_current=7)
    view = RuntimeView(
        states={"running": SANDBOXES, "paused": 0, "starting": 0},
        running=[SandboxView(f"sandbox{i:012d}", "base", None, lambda: stats) for i in range(SANDBOXES)],
        zygote_up=True,
        disk_used=lambda sandbox_id, may_walk: 8192,
    )
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        metrics.render(view, "")
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(ctx: Context) -> None:
    rounds = ctx.runs or (5 if ctx.quick else 15)
    for chunks, n, what in ((1, 5000, "a small response"), (64, 300, "64 x 64 KiB of response")):
        ours, base = asyncio.run(_proxied(chunks, n if not ctx.quick else n // 5, rounds))
        p50, base50 = percentile(ours, 50), percentile(base, 50)
        ctx.report(
            Result(
                name=f"observe: proxied request with {what}, observation layer on",
                unit="us per request (p50 of rounds)",
                ours=p50,
                baseline=base50,
                baseline_name="the same request without the layer",
                better="lower",
                p50=p50,
                p99=percentile(ours, 99),
                extra={"added_us": round((p50 or 0) - (base50 or 0), 2), "requests_per_round": n, "rounds": rounds},
            )
        )
    scrapes = _scrape(rounds)
    p50 = percentile(scrapes, 50)
    ctx.report(
        Result(
            name=f"observe: /metrics render with {SANDBOXES} running sandboxes (in the scrape thread)",
            unit="ms (p50)",
            ours=p50,
            baseline=None,
            baseline_name="none: a budget figure (Prometheus times out at 10 s)",
            better="lower",
            p50=p50,
            p99=percentile(scrapes, 99),
        )
    )
