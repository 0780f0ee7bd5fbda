"""The network helper: a process of its own that answers the sandboxes' DNS (:mod:`.resolver`) and
runs the egress proxy (:mod:`.egress`).

Why a separate process: relaying and (for header rules) decrypting and re-encrypting sandboxes'
traffic is work that grows with what sandboxes download, and in the runtime's process it would
share an event loop and the GIL with the control-plane API. Here it has its own.

The runtime binds the listening sockets (so their ports, which the firewall redirects to, survive a
helper restart), passes them in, and writes the helper's settings to its stdin as JSON. The helper
learns which sandbox is calling, and its current rules, from the runtime's database (read-only),
per connection. It exits when its stdin closes (the runtime went away). :class:`HelperProcess` is
the runtime's side: it starts the helper and restarts it if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .addressing import AddressPool
from .egress import Caller, EgressProxy
from .policy import IPAddress, NetworkConfig, compile_egress
from .resolver import Forwarder, Resolver
from .state import SlotReader
from .tls import LeafContexts, upstream_context

log = logging.getLogger("sandboxd.network")

RESTART_DELAYS_S = (0.0, 0.5, 2.0, 5.0)
"""Waits before successive restarts of a helper that keeps dying (as for the zygote)."""

HEALTHY_AFTER_S = 30.0

HELPER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
"""The helper's whole environment: it needs nothing of the runtime's (and must not see its API key)."""


class HelperProcess:
    """The runtime's side: one helper process at a time, restarted when it dies."""

    def __init__(self, settings: dict[str, Any], sockets: list[socket.socket], log_path: Path) -> None:
        self.settings = settings
        self.sockets = sockets
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        fds = [s.fileno() for s in self.sockets]
        with open(self.log_path, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.runtime.network"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=out,
                pass_fds=fds,
                env=HELPER_ENV,
                start_new_session=True,
            )
        assert process.stdin is not None
        process.stdin.write(json.dumps({**self.settings, "fds": fds}).encode() + b"\n")
        process.stdin.flush()  # stdin stays open: its end tells the helper the runtime is gone
        return process

    async def start(self) -> None:
        self.process = await asyncio.to_thread(self._spawn)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            process = self.process
            assert process is not None
            started = loop.time()
            try:
                status = await asyncio.to_thread(process.wait)
            except asyncio.CancelledError:
                # The thread stays in wait() until the helper exits, and the helper exits only when
                # its stdin ends, with this process: cancelled without stop() (the event loop closing
                # on an error or a second signal), the loop's executor shutdown waited on that thread
                # for ever. Ending the helper here lets the thread, and the runtime, finish.
                _end(process)
                raise
            log.error("the network helper exited (status %s); restarting it", status)
            failures = 1 if loop.time() - started > HEALTHY_AFTER_S else failures + 1
            await asyncio.sleep(RESTART_DELAYS_S[min(failures - 1, len(RESTART_DELAYS_S) - 1)])
            self.process = await asyncio.to_thread(self._spawn)
            self.restarts += 1

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        process = self.process
        if process is not None and process.poll() is None:
            _end(process)
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Ask the helper to exit: its stdin closed (how it notices the runtime is gone) and SIGTERM."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        process.terminate()


def _lookup(pool: AddressPool, slots: SlotReader, ip: IPAddress) -> Caller | None:
    index = pool.index_of(ip)
    if index is None:
        return None
    found = slots.at(index)
    if found is None:
        return None
    sandbox_id, config_json = found
    return Caller(sandbox_id, _compiled(config_json))


@functools.lru_cache(maxsize=1024)
def _compiled(config_json: str) -> Any:
    return compile_egress(NetworkConfig.from_json(config_json))


async def _run(settings: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    pool = AddressPool(
        settings["tag"], ipaddress.IPv4Network(settings["v4_block"]), ipaddress.IPv6Network(settings["v6_prefix"])
    )
    slots = SlotReader(Path(settings["db"]))
    dns_udp, dns_tcp, proxy = (socket.socket(fileno=fd) for fd in settings["fds"])

    def is_sandbox(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return pool.index_of(ip) is not None

    forwarder = Forwarder(settings["upstreams"], is_sandbox)
    await loop.create_datagram_endpoint(forwarder.udp_protocol, sock=dns_udp)
    tcp_server = await asyncio.start_server(forwarder.serve_tcp, sock=dns_tcp)
    leaves = None
    if settings.get("ca_cert") and settings.get("ca_key"):
        leaves = LeafContexts(Path(settings["ca_cert"]), Path(settings["ca_key"]), Path(settings["scratch"]))
    trust = settings.get("trust")
    egress = EgressProxy(
        lookup=functools.partial(_lookup, pool, slots),
        resolver=Resolver(settings["upstreams"]),
        never=[ipaddress.ip_network(n) for n in settings["never"]],
        opened=[ipaddress.ip_network(n) for n in settings["opened"]],
        leaves=leaves,
        upstream_tls=upstream_context(Path(trust) if trust else None),
        secret=slots.secret,
    )
    proxy_task = loop.create_task(egress.serve(proxy))
    # The runtime holds our stdin open while it lives; EOF means it is gone.
    stdin_closed = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    log.info("network helper up: DNS and egress proxy for %s and %s", pool.v4_block, pool.v6_prefix)
    await stdin_closed.wait()
    proxy_task.cancel()
    tcp_server.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(sys.stdin.buffer.readline())
    import uvloop

    uvloop.run(_run(settings))
