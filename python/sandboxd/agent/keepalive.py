"""In-band keepalives for server streams, shared by every transport.

envd sends a keepalive message whenever no data message went out for the client's
``Keepalive-Ping-Interval``; the timer restarts after each message. This wraps any async iterator
that way, without cancelling the iterator's pending step (which would close a generator).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def with_keepalives(source: AsyncIterator[T], interval: float, make: Callable[[], T]) -> AsyncIterator[T]:
    """Yield ``source``'s items, and ``make()`` after each ``interval`` seconds of silence."""
    step: asyncio.Future[T] | None = None
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({step}, timeout=interval)
            if not done:
                yield make()
                continue
            try:
                item = step.result()
            except StopAsyncIteration:
                step = None
                return
            step = None
            yield item
    finally:
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await step
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
