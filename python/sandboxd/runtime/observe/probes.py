"""Readiness: can this runtime create a sandbox right now?

Three checks, each answering None (fine) or what is wrong, in words an operator can act on:

* ``zygote``: a zygote is up to fork sandboxes (it is restarted by itself when it dies);
* ``data_dir``: a file can be created, written and removed in the data dir (read-only remounts and
  full disks show up here, not as a failed create);
* ``template``: the default template's layers are present (``host`` until ``base`` is built).

The data dir check touches the disk, so it runs in a thread with a deadline (a hung disk makes the
runtime not ready, never a hung probe). Results are kept for :data:`CHECK_TTL_S` and concurrent probes
share one check, so a flood of unauthenticated ``/ready`` requests costs one check per interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from ..templates import BASE, Templates
from ..zygote_client import ZygoteClient

CHECK_TTL_S = 1.0
"""How long a readiness answer is reused: kubelet probes every 10 s by default; one second keeps the
answer fresh for a person polling while bounding what a flood of probes costs."""

DISK_CHECK_TIMEOUT_S = 2.0
"""A data dir that cannot take a one-byte file in this time is not one to create sandboxes on."""


class Readiness:
    """The checks behind ``/ready`` and ``sandboxd status``."""

    def __init__(self, zygote: ZygoteClient, data_dir: Path, templates: Templates) -> None:
        self.zygote = zygote
        self.data_dir = data_dir
        self.templates = templates
        self._last: tuple[float, dict[str, str | None]] | None = None
        self._running: asyncio.Future[dict[str, str | None]] | None = None

    async def check(self) -> dict[str, str | None]:
        """``{check: problem or None}``; ready when every value is None."""
        if self._last is not None and time.monotonic() - self._last[0] < CHECK_TTL_S:
            return {**self._last[1], "zygote": self.zygote.down_reason}  # the zygote's state is free to read
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
            self._running.add_done_callback(lambda _: setattr(self, "_running", None))
        return await asyncio.shield(self._running)

    async def _check(self) -> dict[str, str | None]:
        try:
            disk = await asyncio.wait_for(asyncio.to_thread(_writable, self.data_dir), DISK_CHECK_TIMEOUT_S)
        except TimeoutError:
            disk = f"writing to {self.data_dir} did not finish in {DISK_CHECK_TIMEOUT_S:.0f} s"
        checks = {"zygote": self.zygote.down_reason, "data_dir": disk, "template": self._template()}
        self._last = (time.monotonic(), checks)
        return checks

    def _template(self) -> str | None:
        # `base` before its first build resolves to `host`, which a create falls back to meanwhile.
        template = self.templates.resolve(BASE)
        missing = [str(layer) for layer in template.layers if not layer.is_dir()]
        if missing:
            return f"the default template '{template.id}' is missing its layers: {', '.join(missing)}"
        return None


def _writable(data_dir: Path) -> str | None:
    probe = data_dir / f".ready-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"the data dir {data_dir} is not writable: {exc.strerror or exc}"
    return None
