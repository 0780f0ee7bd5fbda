"""The congestion control of the agent's side of a connection: Reno for a peer on loopback (the runtime's
proxy reaches every sandbox's agent at 127.0.0.1 in its namespace), the host's default for any other
(``http_server.LOOPBACK_CONGESTION``: BBR paces every send and caps its window, which on loopback only
cost throughput and CPU). Read from the agent's own socket, taken with ``pidfd_getfd(2)``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Agent

SYS_PIDFD_GETFD = 438
"""The same number on x86-64 and arm64 (the syscall table is shared since Linux 5.x)."""


def _default() -> bytes:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_bytes().strip()


@contextlib.contextmanager
def _agent_side(agent: Agent, client: socket.socket) -> Iterator[socket.socket]:
    """The agent's end of ``client``'s connection: a duplicate of its descriptor in the agent."""
    libc = ctypes.CDLL(None, use_errno=True)
    want = client.getsockname()
    pidfd = os.pidfd_open(agent.process.pid)
    try:
        for name in os.listdir(f"/proc/{agent.process.pid}/fd"):
            if not os.readlink(f"/proc/{agent.process.pid}/fd/{name}").startswith("socket:"):
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                error = ctypes.get_errno()
                pytest.skip(f"pidfd_getfd: {os.strerror(error)} (needs ptrace rights over the agent)")
            sock = socket.socket(fileno=fd)
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] == want[:2]:
                    yield sock
                    return
            except OSError:  # a listening or unconnected socket
                pass
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no socket in the agent is connected to {want}")


def _health(client: socket.socket) -> None:
    """One request on ``client``, answered: the agent has accepted and admitted the connection."""
    client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.recv(4096).startswith(b"HTTP/1.1 ")


def _congestion(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")


def test_a_loopback_peer_gets_reno(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as client:
        _health(client)
        with _agent_side(agent, client) as theirs:
            assert _congestion(theirs) == b"reno"
        # The client's own socket is not the agent's to change.
        assert _congestion(client) == _default()


def _own_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only a route lookup
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_any_other_peer_keeps_the_host_default(start_agent: Callable[..., Agent]) -> None:
    if _default() == b"reno":
        pytest.skip("the host's default is Reno already: nothing would tell the two cases apart")
    address = _own_address()
    if address is None:
        pytest.skip("no address but loopback")
    # All addresses (the fixture checks its health on loopback), with a token: reachable from the
    # network for the test's few seconds, as a standalone agent on a host would be.
    agent = start_agent("--host", "0.0.0.0", token=os.urandom(16).hex())
    with socket.create_connection((address, agent.port), timeout=5) as client:
        _health(client)
        with _agent_side(agent, client) as theirs:
            assert _congestion(theirs) == _default()
