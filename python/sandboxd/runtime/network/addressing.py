"""Addresses and interface names of a runtime's sandbox links.

Each sandbox gets a *slot*: an index that names its host-side interface (``sd<tag>h<index>``) and
numbers its link, a /30 of the runtime's IPv4 block (host end ``.1``, the sandbox ``.2``) and a /64
of the runtime's IPv6 prefix (``::1`` and ``::2``). Every sandbox has its own addresses, so the
host routes replies to the right sandbox and the firewall's reverse-path check ties each address
to its interface (a sandbox that takes another address is dropped).

Several runtimes share a host (tests, the Kubernetes mode), so everything here is per runtime:

* the *tag*, 6 hex digits derived from the data dir, names the interfaces, the nftables table and
  the link group, and a lock file under ``/run/sandboxd`` keeps two live runtimes from sharing it;
* the IPv4 block is ``--sandbox-subnet`` if given, else the first block of
  :data:`DEFAULT_V4_RANGE` that overlaps no route, nameserver or other live runtime's block (an
  ``flock`` on ``/run/sandboxd/net-<block>.lock`` held for the runtime's life claims it, taken while
  every claim is read under one more lock); the block chosen is kept
  in the data dir's settings so a restarted runtime takes the same one back;
* the IPv6 prefix is a random ULA /48 made once per data dir.

Freed slots are reused oldest first: a killed sandbox's link disappears with its network namespace,
which the kernel tears down a moment after the last process exits, and the name must be free again
before its slot is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SLOT_PREFIX_V4 = 30
"""A /30 per sandbox: network, gateway (host end), sandbox, broadcast."""

SLOT_PREFIX_V6 = 64
"""A /64 per sandbox, the conventional size of an IPv6 link."""

DEFAULT_V4_RANGE = ipaddress.IPv4Network("10.240.0.0/12")
"""Where runtime blocks are picked when ``--sandbox-subnet`` is not given: inside 10/8, which
sandboxes may never reach (so one runtime's sandboxes are off limits to another's), and high in it,
away from the 10.0.x and 10.1.x networks that homes and clouds use most."""

LOCK_DIR = Path("/run/sandboxd")
"""Host-wide coordination between runtimes (tmpfs: stale locks vanish at reboot)."""

LINK_GROUP_BASE = 0x5D00_0000
"""Link groups of sandboxd runtimes: this prefix and the 24-bit tag (see ``crates/sandboxd-net``)."""


def tag_for(data_dir: Path, node: str | None = None) -> str:
    """The runtime's 6-hex-digit tag, stable for a data dir; and for a ``sandboxd node``, for ``node``
    too (see :func:`sandboxd.kube.node.node_key`): in containers, nodes see their different host
    folders at one path, and one tag would have them share the machine's table and links."""
    key = str(data_dir.resolve()) if node is None else f"{data_dir.resolve()}\0{node}"
    return hashlib.sha256(key.encode()).hexdigest()[:6]


@dataclass(frozen=True, slots=True)
class Slot:
    """One sandbox's link."""

    index: int
    host_name: str
    host_v4: ipaddress.IPv4Address
    sandbox_v4: ipaddress.IPv4Address
    host_v6: ipaddress.IPv6Address
    sandbox_v6: ipaddress.IPv6Address

    def resolv_conf(self) -> str:
        """The sandbox's ``/etc/resolv.conf``: its gateway, where the host's resolver answers."""
        return (
            "# sandboxd: the host answers DNS at the sandbox's gateway\n"
            f"nameserver {self.host_v4}\nnameserver {self.host_v6}\noptions timeout:2 attempts:2\n"
        )


def slot_count(v4_block: ipaddress.IPv4Network) -> int:
    """How many slots a runtime has in ``v4_block``: a /30 each, at most as many as /64s in a /48
    and 100,000."""
    return min(1 << (SLOT_PREFIX_V4 - v4_block.prefixlen), 1 << (SLOT_PREFIX_V6 - 48), 100_000)


def used_range(v4_block: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The part of ``v4_block`` a runtime's sandboxes can have addresses in: its slots, counted
    from the block's start (the whole block up to a /14; the first /14 of a larger one). Nothing
    else of the block is used (no route or firewall rule covers it), so this, not the block, is
    what two runtimes must not share."""
    return ipaddress.IPv4Network((v4_block.network_address, SLOT_PREFIX_V4 - (slot_count(v4_block).bit_length() - 1)))


class AddressPool:
    """The slots of one runtime."""

    def __init__(self, tag: str, v4_block: ipaddress.IPv4Network, v6_prefix: ipaddress.IPv6Network) -> None:
        if v4_block.prefixlen > SLOT_PREFIX_V4 - 1:
            raise ValueError(f"the sandbox subnet {v4_block} is too small: it needs room for two /30s at least")
        if v6_prefix.prefixlen > 48:
            raise ValueError(f"the IPv6 prefix {v6_prefix} must be a /48 or larger")
        self.tag = tag
        self.v4_block = v4_block
        self.v6_prefix = v6_prefix
        self.group = LINK_GROUP_BASE | int(tag, 16)
        self.host_prefix = f"sd{tag}h"
        """Every host-side interface of this runtime starts with this (the firewall matches on it)."""
        self.size = slot_count(v4_block)
        self._free: deque[int] = deque(range(self.size))
        self._taken: set[int] = set()

    def slot(self, index: int) -> Slot:
        base4 = int(self.v4_block.network_address) + (index << (32 - SLOT_PREFIX_V4))
        base6 = int(self.v6_prefix.network_address) + (index << (128 - SLOT_PREFIX_V6))
        return Slot(
            index=index,
            host_name=f"{self.host_prefix}{index}",
            host_v4=ipaddress.IPv4Address(base4 + 1),
            sandbox_v4=ipaddress.IPv4Address(base4 + 2),
            host_v6=ipaddress.IPv6Address(base6 + 1),
            sandbox_v6=ipaddress.IPv6Address(base6 + 2),
        )

    def index_of(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
        """The slot whose sandbox ``ip`` belongs to (how the egress proxy knows who is calling)."""
        if isinstance(ip, ipaddress.IPv4Address):
            if ip not in self.v4_block:
                return None
            index = (int(ip) - int(self.v4_block.network_address)) >> (32 - SLOT_PREFIX_V4)
        else:
            if ip not in self.v6_prefix:
                return None
            index = (int(ip) - int(self.v6_prefix.network_address)) >> (128 - SLOT_PREFIX_V6)
        return index if index < self.size else None

    def allocate(self) -> int:
        """A free slot, oldest freed first; ``OSError`` when none is left."""
        while self._free:
            index = self._free.popleft()
            if index not in self._taken:
                self._taken.add(index)
                return index
        raise OSError(f"no free network slot: all {self.size} addresses of {self.v4_block} are in use")

    def claim(self, index: int) -> None:
        """Take a specific slot (a sandbox re-adopted after a restart)."""
        if not 0 <= index < self.size:
            raise ValueError(f"slot {index} is outside {self.v4_block}")
        self._taken.add(index)

    def release(self, index: int) -> None:
        if index in self._taken:
            self._taken.discard(index)
            self._free.append(index)


# ---------------------------------------------------------------------------------- choosing


def _routes_v4() -> list[ipaddress.IPv4Network]:
    """Every IPv4 route of this network namespace except default routes (``/proc/net/route``)."""
    nets = []
    with contextlib.suppress(OSError), open("/proc/net/route") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) < 8:
                continue
            dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
            net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
            if net.prefixlen:
                nets.append(net)
    return nets


def _nameservers() -> list[ipaddress.IPv4Address]:
    found = []
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.IPv4Address(parts[1]))
    return found


def block_prefix_for(max_sandboxes: int) -> int:
    """The IPv4 prefix length that holds ``max_sandboxes`` /30s (at least a /24)."""
    need = max(max_sandboxes, 64) * 4
    return min(24, 32 - (need - 1).bit_length())


class BlockLock:
    """An ``flock`` on a block's lock file, held while the runtime lives."""

    def __init__(self, block: ipaddress.IPv4Network) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.path = _lock_path(block)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)


def _lock_path(block: ipaddress.IPv4Network) -> Path:
    return LOCK_DIR / f"net-{block.network_address}-{block.prefixlen}.lock"


def _claimed_blocks() -> list[ipaddress.IPv4Network]:
    """The address ranges live runtimes hold (:func:`used_range` of each block), each claimed by a
    lock file whose ``flock`` is taken; the caller holds :data:`CHOOSING_LOCK`. A block's name alone
    cannot tell a claim: two runtimes of different ``--max-sandboxes`` pick blocks of different sizes
    (``net-10.240.0.0-22`` and ``net-10.240.0.0-24`` overlap), so every claim is read and each
    candidate tested against all of them.

    Only a name :func:`_lock_path` could have written for a block a runtime can run with counts: a
    held ``net-0.0.0.0-0.lock`` (or ``net-10.0.0.0-8.lock``) stopped every start, as a claim of
    every block (review7), though a runtime uses at most a /14 of its block, from its start; and a
    name no runtime writes (``net-10.240.0.0-31.lock``, ``net-10.240.0.0-024.lock``) is not a claim.

    A lock file nobody holds is removed here: every runtime takes its block's lock while it holds
    :data:`CHOOSING_LOCK`, so none can be between opening such a file and locking it (which makes the
    unlink safe), and the files no longer pile up in ``/run/sandboxd``, one per block ever used."""
    claimed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(LOCK_DIR):
            block = _block_of_lock_name(entry.name)
            if block is None:
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            except OSError:
                # Not ours to judge (a symlink, another owner's mode): taken, as a start on this
                # very block could not lock it either.
                claimed.append(used_range(block))
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                claimed.append(used_range(block))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            finally:
                os.close(fd)
    return claimed


def _block_of_lock_name(name: str) -> ipaddress.IPv4Network | None:
    """The block of a lock file's name, or None when no runtime could have written it: not
    :func:`_lock_path`'s spelling of a block, or a block too small for a runtime (see
    :class:`AddressPool`)."""
    if not (name.startswith("net-") and name.endswith(".lock")):
        return None
    address, _, prefix = name[len("net-") : -len(".lock")].rpartition("-")
    try:
        block = ipaddress.IPv4Network(f"{address}/{int(prefix)}")
    except ValueError:
        return None
    if block.prefixlen > SLOT_PREFIX_V4 - 1 or _lock_path(block).name != name:
        return None
    return block


CHOOSING_LOCK = "net-choosing"
"""The lock file (in :data:`LOCK_DIR`) a runtime holds while it reads the claims and takes its block's."""

CHOOSING_WAIT_S = 30.0
"""How long a runtime waits for :data:`CHOOSING_LOCK`: its holder scans a directory and reads the
routes (under a millisecond; 78 ms among 2,000 stale lock files), so a holder past this is stopped
(``SIGSTOP``, a frozen cgroup, a debugger) and a start says so instead of hanging without a word
(``review7``)."""


def _wait_for(choosing: int) -> None:
    deadline = time.monotonic() + CHOOSING_WAIT_S
    while True:
        try:
            fcntl.flock(choosing, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(
                    f"another process has held {LOCK_DIR / CHOOSING_LOCK} for {CHOOSING_WAIT_S:g} s (a sandboxd"
                    " runtime choosing its sandbox subnet, and stopped?): this runtime cannot choose its own"
                ) from None
            time.sleep(0.02)


def choose_v4_block(
    preferred: ipaddress.IPv4Network | None, explicit: bool, prefix: int
) -> tuple[ipaddress.IPv4Network, BlockLock]:
    """The runtime's IPv4 block and the lock that claims it: ``preferred`` when no live runtime's
    block overlaps it (or when ``explicit``, the operator's choice: then it must be free), else the
    first block of :data:`DEFAULT_V4_RANGE` that overlaps no claimed block, no route and no
    nameserver of this host."""
    LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    choosing = os.open(LOCK_DIR / CHOOSING_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _wait_for(choosing)
        claimed = _claimed_blocks()
        if preferred is not None:
            taken = [b for b in claimed if b.overlaps(used_range(preferred))]
            if not taken:
                return preferred, BlockLock(preferred)
            if explicit:
                raise OSError(
                    f"the sandbox subnet {preferred} overlaps {taken[0]}, which another sandboxd runtime on this"
                    " host uses: pass a --sandbox-subnet that overlaps no other runtime's"
                )
        routes = _routes_v4()
        servers = _nameservers()
        for block in DEFAULT_V4_RANGE.subnets(new_prefix=prefix):
            if any(block.overlaps(n) for n in (*claimed, *routes)) or any(s in block for s in servers):
                continue
            return block, BlockLock(block)
        raise OSError(f"no free /{prefix} for sandboxes in {DEFAULT_V4_RANGE}: pass --sandbox-subnet")
    finally:
        os.close(choosing)


def new_v6_prefix() -> ipaddress.IPv6Network:
    """A random unique-local /48 (RFC 4193): fd00::/8 and 40 random bits."""
    return ipaddress.IPv6Network(((0xFD << 120) | (secrets.randbits(40) << 80), 48))
