"""The runtime's nftables table: what sandboxes can never reach, and each sandbox's egress rules.

The host's firewall is touched only through one table per runtime, ``inet sandboxd_<tag>``,
replaced whole and atomically at start and deleted at stop. Every rule matches packets by the
*host-side* interface they arrive on (``sd<tag>h*``), which nothing inside a sandbox can rename or
re-address, so root inside changing its routes, addresses, MAC or its own nftables changes nothing
here. Per-sandbox rules are *data*, elements of sets keyed by that interface name, so creating,
updating (``update_network``) or removing a sandbox is one small atomic transaction of elements,
and a sandbox with the default settings needs no change to the table at all.

What the chains do, for packets from a sandbox:

* ``pre_filter`` (prerouting, before NAT): drop a source address that does not route back through
  the arrival interface (reverse-path check: a sandbox cannot take another's address or spoof the
  internet's).
* ``pre_nat``: DNS to the gateway goes to the runtime's resolver; TCP of sandboxes whose rules
  need names or header transforms goes to the egress proxy (:mod:`.egress`), which applies the
  same never-reachable ranges itself.
* ``input``: the host itself answers nothing but those two (redirected connections only; DNS not
  for sandboxes whose rules deny it) and IPv6 neighbour discovery. So the host's services, on any
  address, the runtime's API and proxy, and everything else listening on the host are
  unreachable. The helper's ports take no connection from other hosts either.
* ``forward``: never into another sandbox, only out through ``--uplink`` when given; established
  flows pass (``update_network`` drops no connection); never-reachable ranges (:data:`NEVER_V4`,
  :data:`NEVER_V6`, ``--sandbox-deny``) are refused unless the operator opened them
  (``--sandbox-allow``); then the sandbox's allow set, then its deny set; everything else passes.
  Nothing enters a sandbox but replies.
* ``output``, for packets *to* a sandbox from the host itself: no new TCP or UDP flow. Nothing on the
  host talks to a sandbox through its address (the runtime and its proxy reach an agent through the
  sandbox's own namespace), so a host process, whoever runs it, cannot reach a sandbox's ports
  without the proxy's checks (the access token, ``allow_public_traffic``'s traffic token). Without
  this chain the sandbox's answer was refused by ``input`` and such a connection hung until its
  timeout; now it is refused at once and its first packet never enters the sandbox (nor a UDP
  datagram, which ``input`` could not stop).
* ``post_nat``: masquerade to the outgoing interface's address.

A refused TCP connection gets a reset and anything else an ICMP "administratively prohibited", so a
denied ``pip install`` fails at once instead of hanging; spoofed packets are dropped silently.

nftables is driven through ``libnftables`` (the library the ``nft`` tool is built on) in-process:
an ``nft`` process per change costs ~4 ms here, the library ~0.3-1 ms (measured while choosing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .policy import Egress, IPNetwork

NEVER_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918 private (and every runtime's sandbox addresses)
    "100.64.0.0/10",  # RFC 6598 shared address space (carrier NAT, some clouds' internal services)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, with the clouds' metadata service 169.254.169.254
    "172.16.0.0/12",  # RFC 1918 private
    "192.168.0.0/16",  # RFC 1918 private
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address
)
"""IPv4 ranges a sandbox never reaches: E2B's ``DeniedSandboxCIDRs`` plus the ranges that are
never a destination on the internet."""

NEVER_V6 = (
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped
    "fc00::/7",  # unique local (with fd00:ec2::254, a cloud metadata address, and every runtime's sandboxes)
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)
"""IPv6 ranges a sandbox never reaches (E2B's list plus the never-routable ones)."""


class NftError(OSError):
    """nftables refused a command (its message says why)."""


class Nft:
    """One libnftables context; calls are serialised (a context is not thread-safe)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise OSError(f"sandbox networking needs libnftables (Debian: apt-get install nftables): {exc}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("libnftables: could not create a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()
        """Serialises use of the context (the library keeps per-context state and buffers)."""

    def run(self, commands: str) -> str:
        """Runs ``commands`` (nft syntax) as one transaction; returns what nft printed."""
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(f"nftables refused the change: {err.strip() or 'unknown error'}")
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


@dataclass(frozen=True, slots=True)
class SandboxRules:
    """One sandbox's elements in the table (empty: the default, which needs none)."""

    allow4: tuple[str, ...] = ()
    deny4: tuple[str, ...] = ()
    allow6: tuple[str, ...] = ()
    deny6: tuple[str, ...] = ()
    proxied: bool = False
    no_dns: bool = False

    @staticmethod
    def of(egress: Egress) -> SandboxRules:
        def split(nets: Iterable[IPNetwork]) -> tuple[tuple[str, ...], tuple[str, ...]]:
            v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
            v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
            # Concatenated interval sets cannot merge overlapping elements themselves.
            return (
                tuple(str(n) for n in ipaddress.collapse_addresses(v4)),
                tuple(str(n) for n in ipaddress.collapse_addresses(v6)),
            )

        allow4, allow6 = split(egress.allow_nets)
        deny4, deny6 = split(egress.deny_nets)
        return SandboxRules(allow4, deny4, allow6, deny6, egress.proxied, not egress.resolver_reachable)

    @property
    def none(self) -> bool:
        """No elements: the default settings', whose rules the table's own chains are."""
        return self == _NO_RULES

    def elements(self, table: str, ifname: str, verb: str) -> list[str]:
        """``add``/``delete element`` commands for this sandbox's elements."""
        commands = []
        key = f'"{ifname}"'
        for set_name, nets in (
            ("allow4", self.allow4),
            ("deny4", self.deny4),
            ("allow6", self.allow6),
            ("deny6", self.deny6),
        ):
            if nets:
                commands.append(f"{verb} element {table} {set_name} {{ {', '.join(f'{key} . {n}' for n in nets)} }}")
        if self.proxied:
            commands.append(f"{verb} element {table} proxied {{ {key} }}")
        if self.no_dns:
            commands.append(f"{verb} element {table} nodns {{ {key} }}")
        return commands


_NO_RULES = SandboxRules()


def _set(name: str, kind: str, elements: Iterable[str]) -> str:
    items = list(elements)
    body = f"type {kind}; flags interval;"
    if kind in ("ipv4_addr", "ipv6_addr"):
        body += " auto-merge;"
    if items:
        body += f" elements = {{ {', '.join(items)} }};"
    return f"  set {name} {{ {body} }}\n"


@dataclass(frozen=True, slots=True)
class Ports:
    """Where the runtime's helpers listen (host-wide wildcard sockets; reachable only redirected)."""

    dns: int
    proxy: int
    api: int


class Firewall:
    """The table of one runtime."""

    def __init__(
        self,
        nft: Nft,
        tag: str,
        host_prefix: str,
        uplink: str | None,
        extra_never: Iterable[IPNetwork] = (),
        opened: Iterable[IPNetwork] = (),
    ) -> None:
        self.nft = nft
        self.table = f"inet sandboxd_{tag}"
        self.ifaces = f'"{host_prefix}*"'
        self.uplink = uplink
        never = [ipaddress.ip_network(n) for n in (*NEVER_V4, *NEVER_V6)] + list(extra_never)
        self.never4 = [str(n) for n in never if n.version == 4]
        self.never6 = [str(n) for n in never if n.version == 6]
        opened = list(opened)
        self.open4 = [str(n) for n in opened if n.version == 4]
        self.open6 = [str(n) for n in opened if n.version == 6]

    def ruleset(self, ports: Ports, sandboxes: dict[str, SandboxRules]) -> str:
        i = self.ifaces
        uplink = f'    oifname != "{self.uplink}" goto refuse\n' if self.uplink else ""
        text = [f"table {self.table} {{\n"]
        text.append(_set("never4", "ipv4_addr", self.never4))
        text.append(_set("never6", "ipv6_addr", self.never6))
        text.append(_set("open4", "ipv4_addr", self.open4))
        text.append(_set("open6", "ipv6_addr", self.open6))
        for name, kind in (
            ("allow4", "ifname . ipv4_addr"),
            ("deny4", "ifname . ipv4_addr"),
            ("allow6", "ifname . ipv6_addr"),
            ("deny6", "ifname . ipv6_addr"),
        ):
            text.append(_set(name, kind, ()))
        text.append("  set proxied { type ifname; }\n  set nodns { type ifname; }\n")
        text.append(
            f"""  chain pre_filter {{
    type filter hook prerouting priority mangle; policy accept;
    iifname != {i} return
    fib saddr . iif oif missing drop
  }}
  chain pre_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname != {i} return
    meta l4proto {{ tcp, udp }} th dport 53 fib daddr type local redirect to :{ports.dns}
    iifname @proxied meta l4proto tcp fib daddr type != local redirect to :{ports.proxy}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {i} jump from_sandbox
    meta l4proto {{ tcp, udp }} th dport {{ {ports.dns}, {ports.proxy} }} iifname != "lo" drop
  }}
  chain from_sandbox {{
    iifname @nodns ct status dnat th dport {ports.dns} goto refuse
    ct status dnat meta l4proto {{ tcp, udp }} th dport {{ {ports.dns}, {ports.proxy} }} accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    ip daddr @open4 tcp dport != {ports.api} accept
    ip6 daddr @open6 tcp dport != {ports.api} accept
    goto refuse
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname {i} meta l4proto {{ tcp, udp }} ct state new goto refuse
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {i} jump egress
    oifname {i} jump ingress
  }}
  chain egress {{
    oifname {i} goto refuse
{uplink}    ct state established,related accept
    ip daddr @never4 ip daddr != @open4 goto refuse
    ip6 daddr @never6 ip6 daddr != @open6 goto refuse
    iifname . ip daddr @allow4 accept
    iifname . ip daddr @deny4 goto refuse
    iifname . ip6 daddr @allow6 accept
    iifname . ip6 daddr @deny6 goto refuse
  }}
  chain ingress {{
    ct state established,related accept
    drop
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
  chain post_nat {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname {i} oifname != {i} masquerade
  }}
}}
"""
        )
        for ifname, rules in sandboxes.items():
            text.extend(line + "\n" for line in rules.elements(self.table, ifname, "add"))
        return "".join(text)

    def install(self, ports: Ports, sandboxes: dict[str, SandboxRules]) -> None:
        """Replace the table whole, in one transaction (no moment without rules)."""
        self.nft.run(f"table {self.table}\ndelete table {self.table}\n" + self.ruleset(ports, sandboxes))

    def remove(self) -> None:
        self.nft.run(f"table {self.table}\ndelete table {self.table}\n")

    def change(self, ifname: str, old: SandboxRules | None, new: SandboxRules | None) -> None:
        """Swap one sandbox's elements for new ones, atomically (nothing in between)."""
        commands = []
        if old is not None:
            commands += old.elements(self.table, ifname, "delete")
        if new is not None:
            commands += new.elements(self.table, ifname, "add")
        if commands:
            self.nft.run("\n".join(commands) + "\n")
