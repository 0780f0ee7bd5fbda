"""Sandbox networking: egress for every sandbox, E2B's egress controls, DNS, accounting.

Each sandbox gets a veth pair from the host into its own network namespace (``crates/sandboxd-net``
says why veth and not user-mode networking), numbered from this runtime's pool
(:mod:`.addressing`); the host routes and masquerades its traffic, and one nftables table of this
runtime (:mod:`.firewall`) decides what it may reach, from the host side, where nothing inside the
sandbox, root included, can change it. E2B's controls (:mod:`.policy`) become elements of that
table, and, for host names and header rules, the egress proxy's decisions (:mod:`.egress`), which
runs with the DNS forwarder (:mod:`.resolver`) in a helper process of its own (:mod:`.helper`).

:class:`SandboxNetworks` is what the lifecycle manager calls: ``reserve`` a slot before a sandbox
boots (its ``/etc/resolv.conf`` names the slot's gateway), ``attach`` it once the sandbox's network
namespace exists, ``update`` on ``update_network``, ``detach`` when its processes stop, and
``counters`` for its metrics. Setting a sandbox up costs the veth pair (~1-2 ms of netlink) and,
only when its settings are not the defaults, one firewall transaction.

At ``stop`` the runtime deletes its table and every sandbox's link (sandboxes keep running, offline
until a restarted runtime re-adopts them and links them again with the same addresses): with the
table gone, nothing would hold their traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd import _core

from ..errors import ApiError
from ..store import DATABASE, Store
from .addressing import (
    SLOT_PREFIX_V4,
    SLOT_PREFIX_V6,
    AddressPool,
    BlockLock,
    Slot,
    block_prefix_for,
    choose_v4_block,
    new_v6_prefix,
    tag_for,
)
from .firewall import NEVER_V4, NEVER_V6, Firewall, Nft, Ports, SandboxRules
from .helper import HelperProcess
from .policy import IPNetwork, NetworkConfig, compile_egress, validate
from .resolver import upstreams_from_resolv_conf
from .state import NetworkRow, NetworkStore
from .tls import ensure_ca

__all__ = ["NetworkConfig", "NetworkOptions", "NetworkRow", "SandboxNetworks"]

log = logging.getLogger("sandboxd.network")


@dataclass
class NetworkOptions:
    """``sandboxd serve`` flags of sandbox networking."""

    uplink: str | None = None
    """``--uplink``: the only interface sandbox traffic may leave by (default: any, per the routes)."""
    subnet: ipaddress.IPv4Network | None = None
    """``--sandbox-subnet``: the runtime's IPv4 block (default: a free block of 10.240.0.0/12)."""
    dns_upstreams: list[str] = field(default_factory=list)
    """``--dns-upstream``: resolvers the sandboxes' DNS goes to (default: the host's resolv.conf)."""
    allow: list[IPNetwork] = field(default_factory=list)
    """``--sandbox-allow``: never-reachable ranges the operator opens to sandboxes."""
    deny: list[IPNetwork] = field(default_factory=list)
    """``--sandbox-deny``: more ranges sandboxes may never reach."""
    egress_trust: Path | None = None
    """``--egress-trust``: extra CA certificates the egress proxy trusts for upstream TLS."""


def _write_sysctl(path: str, value: str) -> str | None:
    """Writes ``value``; returns the previous value, or None if the file does not exist."""
    try:
        with open(path) as f:
            before = f.read().strip()
        if before != value:
            with open(path, "w") as f:
                f.write(value)
        return before
    except FileNotFoundError:
        return None


def enable_forwarding() -> None:
    """The host must forward the sandboxes' packets (like Docker, Podman or libvirt, this makes the
    host a router; its firewall still decides what it forwards). IPv6 forwarding makes Linux ignore
    router advertisements on interfaces that accept them only as a host (``accept_ra=1``), which
    would lose a SLAAC-configured default route, so those interfaces are switched to ``2`` (accept
    them while forwarding) first."""
    _keep_router_advertisements()
    _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")


def _keep_router_advertisements() -> None:
    base = Path("/proc/sys/net/ipv6/conf")
    with contextlib.suppress(OSError):
        for conf in base.iterdir():
            if conf.name in ("all", "default", "lo"):  # existing interfaces only; lo never gets RAs
                continue
            with contextlib.suppress(OSError):
                if (conf / "accept_ra").read_text().strip() == "1":
                    (conf / "accept_ra").write_text("2")


@functools.lru_cache(maxsize=64)
def _compiled_rules(config: NetworkConfig) -> SandboxRules:
    """The firewall elements of settings without header rules (a frozen, hashable value). Compiling
    them (``ipaddress`` parsing and collapsing) cost each create ~13 µs even for the defaults."""
    return SandboxRules.of(compile_egress(config))


class SandboxNetworks:
    """The network side of every sandbox of one runtime."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        options: NetworkOptions,
        max_sandboxes: int,
        api_port: int,
        node: str | None = None,
    ) -> None:
        self.store = store
        self.rows = NetworkStore(store.db)
        self.data_dir = data_dir
        self.options = options
        self.max_sandboxes = max_sandboxes
        self.api_port = api_port
        self.tag = tag_for(data_dir, node)
        self.pool: AddressPool | None = None
        self.firewall: Firewall | None = None
        self.helper: HelperProcess | None = None
        self._lock: BlockLock | None = None
        self._sockets: list[socket.socket] = []
        self._applied: dict[str, tuple[Slot, SandboxRules]] = {}
        """Sandboxes with a link: their slot and the firewall elements in force for them."""
        self._nft_lock = asyncio.Lock()
        """Serialises firewall transactions (each swaps one sandbox's elements)."""
        self.ca_pem: str | None = None

    # ------------------------------------------------------------------------------ start/stop

    async def start(self) -> None:
        """Claim an address block, install the table (with every sandbox that has a link), start the
        helper."""
        stored = self.store.setting("net_v4_block")
        preferred = self.options.subnet or (ipaddress.IPv4Network(stored) if stored else None)
        prefix = self.options.subnet.prefixlen if self.options.subnet else block_prefix_for(self.max_sandboxes)
        block, self._lock = await asyncio.to_thread(choose_v4_block, preferred, self.options.subnet is not None, prefix)
        self.store.set_setting("net_v4_block", str(block))
        v6 = self.store.setting("net_v6_prefix")
        if v6 is None:
            v6 = str(new_v6_prefix())
            self.store.set_setting("net_v6_prefix", v6)
        self.pool = AddressPool(self.tag, block, ipaddress.IPv6Network(v6))
        await asyncio.to_thread(enable_forwarding)
        self.firewall = Firewall(
            Nft(), self.tag, self.pool.host_prefix, self.options.uplink, self.options.deny, self.options.allow
        )
        ports = self._bind_helper_sockets()
        for row in self.rows.with_slots():
            assert row.slot is not None
            self.pool.claim(row.slot)
            self._applied[row.sandbox_id] = (self.pool.slot(row.slot), self._rules(row.config))
        rules = {slot.host_name: r for slot, r in self._applied.values()}
        await asyncio.to_thread(self.firewall.install, ports, rules)
        cert, key = await asyncio.to_thread(ensure_ca, self.data_dir, f"sandboxd egress CA {self.tag}")
        self.ca_pem = cert.read_text()
        upstreams = self.options.dns_upstreams or upstreams_from_resolv_conf()
        never = [str(n) for n in (*map(ipaddress.ip_network, (*NEVER_V4, *NEVER_V6)), *self.options.deny)]
        settings = {
            "db": str(self.data_dir / DATABASE),
            "tag": self.tag,
            "v4_block": str(block),
            "v6_prefix": v6,
            "upstreams": upstreams,
            "never": never,
            "opened": [str(n) for n in self.options.allow],
            "ca_cert": str(cert),
            "ca_key": str(key),
            "scratch": str(self.data_dir / "egress-scratch"),
            "trust": str(self.options.egress_trust) if self.options.egress_trust else None,
        }
        self.helper = HelperProcess(settings, self._sockets, self.data_dir / "network-helper.log")
        await self.helper.start()
        log.info(
            "sandbox networking: %s and %s, table %s, uplink %s, DNS upstreams %s",
            block,
            v6,
            self.firewall.table,
            self.options.uplink or "any",
            ", ".join(upstreams) or "none",
        )

    def _bind_helper_sockets(self) -> Ports:
        """The helper's listening sockets, on every address of the host (the firewall admits only
        sandboxes' redirected connections to them): DNS on one port for UDP and TCP, the proxy."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            udp.bind(("::", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("::", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(128)
            break
        else:
            raise OSError("could not bind the sandboxes' DNS port")
        proxy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        proxy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        proxy.bind(("::", 0))
        proxy.listen(1024)
        self._sockets = [udp, tcp, proxy]
        return Ports(dns=port, proxy=proxy.getsockname()[1], api=self.api_port)

    async def stop(self) -> None:
        """Remove every trace on the host: the helper, the links, the table, the block's claim."""
        if self.helper is not None:
            await self.helper.stop()
        if self.pool is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_core.net_delete_group, self.pool.group)
        if self.firewall is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.firewall.remove)
            self.firewall.nft.close()
        for sock in self._sockets:
            sock.close()
        if self._lock is not None:
            self._lock.close()

    # --------------------------------------------------------------------------- per sandbox

    @staticmethod
    def check(config: NetworkConfig) -> None:
        """Validate a client's settings (a 400 with E2B's message when E2B would refuse them)."""
        validate(config)

    @staticmethod
    def _rules(config: NetworkConfig) -> SandboxRules:
        if config.rules is None:  # hashable: the common settings (none, or allow/deny lists) are compiled once
            return _compiled_rules(config)
        return SandboxRules.of(compile_egress(config))

    def reserve(self) -> Slot:
        """A slot for a sandbox about to boot (its resolv.conf needs the gateway's address)."""
        assert self.pool is not None
        try:
            return self.pool.slot(self.pool.allocate())
        except OSError as exc:
            raise ApiError(503, f"cannot create sandboxes right now: {exc}") from None

    def unreserve(self, slot: Slot) -> None:
        assert self.pool is not None
        self.pool.release(slot.index)

    async def attach(
        self,
        sandbox_id: str,
        slot: Slot,
        init_pid: int,
        config: NetworkConfig | None = None,
        traffic_token: str | None = None,
        linked: bool = False,
    ) -> None:
        """Link a booted sandbox (its namespace is its init's) and put its rules in force. With no
        ``config``, the stored one (a resume); ``linked``: its veth pair was made ahead (:meth:`link`,
        a warm sandbox). On failure nothing of the link is left."""
        assert self.pool is not None and self.firewall is not None
        if config is None:
            existing = self.rows.get(sandbox_id)
            config = existing.config if existing is not None else NetworkConfig()
            traffic_token = existing.traffic_token if existing is not None else None
        rules = self._rules(config)
        if not linked:
            try:
                await self.link(slot, init_pid)
            except BaseException:
                self.pool.release(slot.index)
                raise
        try:
            if not rules.none:  # the default settings have no elements: no transaction, no thread
                async with self._nft_lock:
                    await asyncio.to_thread(self.firewall.change, slot.host_name, None, rules)
        except BaseException:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_core.net_delete_link, slot.host_name)
            self.pool.release(slot.index)
            raise
        self._applied[sandbox_id] = (slot, rules)
        self.rows.put(NetworkRow(sandbox_id, slot.index, config, traffic_token))

    def record(self, sandbox_id: str, slot: Slot, config: NetworkConfig, traffic_token: str | None) -> None:
        """Store a new sandbox's settings and traffic token ahead of :meth:`attach` (which stores
        them again, and whose failure's :meth:`detach` forgets them)."""
        self.rows.put(NetworkRow(sandbox_id, slot.index, config, traffic_token))

    async def link(self, slot: Slot, init_pid: int) -> None:
        """Make a booted sandbox's veth pair, with no rules yet (:meth:`attach` puts them in force).
        The caller keeps the slot either way."""
        await asyncio.to_thread(self._link, slot, init_pid)

    def _link(self, slot: Slot, init_pid: int) -> Slot:
        """In a worker thread: the veth pair into the sandbox's namespace. A stale interface of the
        slot's name (the namespace of a sandbox that held the slot before, still being torn down by
        the kernel, or left by a runtime that crashed) is removed first."""
        assert self.pool is not None
        fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for attempt in range(2):
                try:
                    self._create_link(slot, fd)
                    return slot
                except FileExistsError:
                    if attempt:
                        raise
                    log.warning("removing a stale interface %s", slot.host_name)
                    _core.net_delete_link(slot.host_name)
            return slot
        finally:
            os.close(fd)

    def _create_link(self, slot: Slot, netns_fd: int) -> None:
        assert self.pool is not None
        _core.net_create_link(
            slot.host_name,
            self.pool.group,
            netns_fd,
            str(slot.host_v4),
            str(slot.sandbox_v4),
            SLOT_PREFIX_V4,
            str(slot.host_v6),
            str(slot.sandbox_v6),
            SLOT_PREFIX_V6,
        )

    async def readopt(self, sandbox_id: str, init_pid: int) -> None:
        """A sandbox re-adopted after a restart: link it again if its link is gone (the previous
        runtime stopped cleanly and removed it)."""
        applied = self._applied.get(sandbox_id)
        if applied is None:
            return
        slot, _rules = applied
        if await asyncio.to_thread(_core.net_link_stats, slot.host_name) is not None:
            return
        fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            await asyncio.to_thread(self._create_link, slot, fd)
        finally:
            os.close(fd)

    async def update(self, sandbox_id: str, update: NetworkConfig) -> None:
        """``update_network``: replace the egress settings of a running sandbox in one transaction.
        Its established connections are not touched."""
        assert self.firewall is not None
        row = self.rows.get(sandbox_id)
        applied = self._applied.get(sandbox_id)
        if row is None or applied is None:
            raise ApiError(409, f'Sandbox "{sandbox_id}" has no network to update: it is not running')
        config = row.config.with_egress(update)
        validate(config)
        slot, old = applied
        new = self._rules(config)
        async with self._nft_lock:
            await asyncio.to_thread(self.firewall.change, slot.host_name, old, new)
            self._applied[sandbox_id] = (slot, new)
            self.rows.set_config(sandbox_id, config)

    async def detach(self, sandbox_id: str, forget: bool) -> None:
        """The sandbox's processes are gone (its link went with its namespace): drop its rules and
        free its slot; ``forget`` its settings too unless it may resume."""
        applied = self._applied.pop(sandbox_id, None)
        if applied is not None and self.firewall is not None and self.pool is not None:
            slot, rules = applied
            try:
                if not rules.none:
                    async with self._nft_lock:
                        await asyncio.to_thread(self.firewall.change, slot.host_name, rules, None)
            except OSError:
                log.exception("removing the firewall elements of sandbox %s failed", sandbox_id)
            self.pool.release(slot.index)
        if forget:
            self.rows.delete(sandbox_id)
        else:
            self.rows.set_slot(sandbox_id, None)

    # ------------------------------------------------------------------------------- queries

    def info(self, sandbox_id: str) -> NetworkRow | None:
        return self.rows.get(sandbox_id)

    def counters(self, sandbox_id: str) -> tuple[int, int] | None:
        """``(bytes into the sandbox, bytes out of it)`` since its link was made, or None. Blocking
        (one netlink exchange, ~40 µs): call from a worker thread."""
        applied = self._applied.get(sandbox_id)
        if applied is None:
            return None
        stats = _core.net_link_stats(applied[0].host_name)
        if stats is None:
            return None
        rx, tx = stats  # the host end receives what the sandbox sends
        return tx, rx
