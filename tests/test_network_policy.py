"""E2B's egress rules as sandboxd checks and decides them, and the egress proxy's parsers, without a
sandbox: validation with E2B's messages, decisions, name matching, SNI and Host extraction from real
client bytes, header rewriting, the firewall elements a sandbox's rules become, and the table's name
(a node's cgroup group with it)."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
from pathlib import Path

import pytest
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.network.egress import _Rewriter, client_hello_sni, http_host
from sandboxd.runtime.network.firewall import SandboxRules
from sandboxd.runtime.network.policy import (
    NetworkConfig,
    compile_egress,
    fill_secrets,
    match_domain,
    secret_references,
    validate,
)

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (NetworkConfig(deny_out=("example.com",)), "invalid denied CIDR example.com"),
        (NetworkConfig(deny_out=("0.0.0.0",)), "invalid denied CIDR 0.0.0.0"),
        (NetworkConfig(allow_out=("1.2.3.4/33",)), "invalid allowed address 1.2.3.4/33"),
        (NetworkConfig(allow_out=("bad name",)), "invalid allowed address bad name"),
        (NetworkConfig(allow_out=("example.com",)), "you must include 'ALL_TRAFFIC' in deny out"),
        (NetworkConfig(dns_servers=("::1",)), "each entry must be an IPv4 address"),
        (NetworkConfig(rules={"*": ({"a": "b"},)}), 'Rule domain "*" is not a valid domain name.'),
        (NetworkConfig(rules={"a.com": ({"bad name": "x"},)}), "must contain only valid HTTP token characters"),
        (NetworkConfig(rules={"a.com": ({"x": "a\r\nb"},)}), "contains invalid characters"),
        (NetworkConfig(rules={f"h{i}.com": () for i in range(11)}), "at most 10 domains"),
        (NetworkConfig(https_ports=(49983,)), "the envd port (49983) cannot be listed"),
    ],
)
def test_bad_settings_get_e2bs_400(config: NetworkConfig, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        validate(config)
    assert caught.value.status == 400 and message in caught.value.message


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(deny_out=("x" * 500_000,)),
        NetworkConfig(allow_out=("1.2.3.4/" + "9" * 500_000,)),
        NetworkConfig(dns_servers=("1" * 500_000,)),
        NetworkConfig(rules={"a" * 500_000: ({"a": "b"},)}),
        NetworkConfig(rules={"a.com": ({"bad name" * 50_000: "x"},)}),
        NetworkConfig(rules={"a.com": ({"n" * 500_000: "x"},)}),
        NetworkConfig(mask_request_host="h" * 500_000),
    ],
    ids=["deny", "allow", "dns", "domain", "header-token", "header-long", "mask"],
)
def test_a_refused_entry_is_quoted_clipped(config: NetworkConfig) -> None:
    # E2B's messages quote the entry they refuse; one may be as long as the 1 MiB body allows.
    with pytest.raises(ApiError) as caught:
        validate(config)
    assert caught.value.status == 400
    assert 20 < len(caught.value.message) < 600, len(caught.value.message)
    assert "…" in caught.value.message


def test_e2bs_decision_order_and_all_traffic() -> None:
    config = NetworkConfig(allow_out=("api.example.com", "1.2.3.0/24"), deny_out=("0.0.0.0/0",))
    validate(config)
    egress = compile_egress(config)
    assert egress.proxied and egress.all_denied
    assert egress.address_verdict(ip("1.2.3.4")) is True
    assert egress.address_verdict(ip("8.8.8.8")) is True  # the default nameserver, names being allowed
    assert egress.address_verdict(ip("5.6.7.8")) is False
    assert egress.address_verdict(ip("2001:db8::1")) is False  # all traffic is IPv6 too
    assert egress.name_allowed("API.example.com.") and not egress.name_allowed("example.com")
    assert egress.resolver_reachable
    # dns_servers replaces the default; [] allows none, and the resolver follows 8.8.8.8's fate.
    no_dns = compile_egress(NetworkConfig(allow_out=("a.com",), deny_out=("0.0.0.0/0",), dns_servers=()))
    assert not no_dns.resolver_reachable
    # allow_internet_access=False keeps allow_out and denies the rest.
    closed = compile_egress(NetworkConfig(allow_internet_access=False, allow_out=("9.9.9.9",), deny_out=("1.1.1.1",)))
    assert closed.address_verdict(ip("9.9.9.9")) is True and closed.address_verdict(ip("4.4.4.4")) is False
    assert not closed.resolver_reachable and not closed.proxied
    assert compile_egress(NetworkConfig(deny_out=("8.8.8.0/24",))).resolver_reachable is False
    assert compile_egress(NetworkConfig()).address_verdict(ip("4.4.4.4")) is None


def test_domain_patterns_match_as_e2bs() -> None:
    assert match_domain("a.example.com", "*.example.com")
    assert match_domain("a.b.example.com", "*.example.com")
    assert not match_domain("example.com", "*.example.com")
    assert not match_domain("badexample.com", "*.example.com")
    assert match_domain("anything.io", "*")
    assert match_domain("Example.COM", "example.com")


def test_header_rules_prefer_the_exact_name_then_the_longest_wildcard() -> None:
    egress = compile_egress(
        NetworkConfig(
            rules={
                "*.example.com": ({"a": "wild"},),
                "*.api.example.com": ({"a": "longer"},),
                "x.api.example.com": ({"a": "exact"},),
            }
        )
    )
    assert egress.headers_for("x.api.example.com") == (("a", "exact"),)
    assert egress.headers_for("y.api.example.com") == (("a", "longer"),)
    assert egress.headers_for("www.example.com") == (("a", "wild"),)
    assert egress.headers_for("example.org") is None


def _client_hello(name: str | None) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name) if name else None
    if tls is None:
        context.check_hostname = False
        tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_and_host_are_read_from_real_client_bytes() -> None:
    hello = _client_hello("API.Example.com")
    assert client_hello_sni(hello) == "api.example.com"
    assert client_hello_sni(hello[:40]) is True  # more is on its way
    assert client_hello_sni(_client_hello(None)) is None
    assert client_hello_sni(b"GET / HTTP/1.1\r\n") is False
    assert http_host(b"GET / HTTP/1.1\r\nhost: Web.Test:8080\r\n\r\n") == "web.test"
    assert http_host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n") == "2001:db8::1"
    assert http_host(b"GET / HTTP/1.1\r\nX: y\r\n") is True
    assert http_host(b"SSH-2.0-x\r\n") is False


def test_rewriter_sets_headers_per_request_and_keeps_bodies() -> None:
    rules = {"api.test": (("Authorization", "Bearer s"),)}
    rewriter = _Rewriter(lambda host: rules.get(host))
    stream = (
        b"POST /a HTTP/1.1\r\nHost: api.test\r\nAuthorization: mine\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: other.test\r\nContent-Length: 2\r\n\r\nhi"
    )
    out = b"".join(rewriter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    first, _, second = out.partition(b"GET /b")
    assert b"Authorization: Bearer s" in first and b"mine" not in first
    assert first.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    assert b"Authorization" not in second and second.endswith(b"\r\n\r\nhi")


def test_firewall_elements_of_a_sandbox() -> None:
    rules = SandboxRules.of(
        compile_egress(NetworkConfig(allow_out=("10.1.0.0/16", "10.1.2.3"), deny_out=("0.0.0.0/0",)))
    )
    assert rules.allow4 == ("10.1.0.0/16",)  # overlapping entries are merged for nftables
    assert rules.deny6 == ("::/0",)
    commands = rules.elements("inet t", "sdabch1", "add")
    assert 'add element inet t allow4 { "sdabch1" . 10.1.0.0/16 }' in commands
    assert SandboxRules.of(compile_egress(NetworkConfig())).elements("inet t", "x", "add") == []


def test_secret_placeholders_are_found_and_filled_and_a_missing_one_is_named() -> None:
    rules = {
        "a.test": (
            {"Authorization": "Bearer ${e2b.secrets.OpenAI}", "X-Both": "${e2b.secrets.one}:${e2b.secrets.two}"},
        ),
        "b.test": ({"X-Plain": "no placeholder", "X-Odd": "${e2b.secrets.}${e2b.secret.x}${e2b.secrets.a b}"},),
    }
    assert secret_references(NetworkConfig(rules=rules)) == {"openai", "one", "two"}
    values = {"openai": "sk-1", "one": "1", "two": "$2"}  # a value is never read as a placeholder
    headers = tuple(rules["a.test"][0].items()) + tuple(rules["b.test"][0].items())
    assert fill_secrets(headers, values.get) == (
        ("Authorization", "Bearer sk-1"),
        ("X-Both", "1:$2"),
        ("X-Plain", "no placeholder"),
        ("X-Odd", "${e2b.secrets.}${e2b.secret.x}${e2b.secrets.a b}"),
    )
    assert fill_secrets(headers, {"openai": "sk-1", "one": "1"}.get) == "two"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Bearer ${e2b.secrets.a b}", "malformed secret placeholder"),
        ("Bearer ${e2b.secrets.}", "malformed secret placeholder"),
        ("Bearer ${e2b.secrets." + "x" * 129 + "}", "malformed secret placeholder"),
        ("Bearer ${e2b.secrets.unclosed", "malformed secret placeholder"),
        ("Bearer ${e2b.identity.tokens.aws}", "workload identity"),
    ],
)
def test_a_rule_with_a_placeholder_that_cannot_be_filled_is_refused(value: str, message: str) -> None:
    with pytest.raises(ApiError, match=message):
        validate(NetworkConfig(rules={"api.test": ({"Authorization": value},)}))


def test_nodes_that_see_their_own_host_folders_at_one_path_get_tables_of_their_own(tmp_path: Path) -> None:
    """Two ``sandboxd node`` DaemonSets on one machine mount different host folders at one container
    path: each gets its own nftables table (and so links and helper) and cgroup group by its Node's
    name, as runtimes get theirs by their data dirs. A restart keeps them, a rename too (its sandboxes
    are found again), and a data dir a node used before keeps the names of its path alone."""
    from sandboxd.kube.node import node_key
    from sandboxd.runtime.host import instance_name
    from sandboxd.runtime.network import NetworkOptions, SandboxNetworks
    from sandboxd.runtime.network.addressing import tag_for
    from sandboxd.runtime.network.firewall import Firewall
    from sandboxd.runtime.store import Store

    mount = tmp_path / "var-lib-sandboxd"  # the DaemonSets' one mount point
    db = mount / "sandboxd.db"

    def start(name: str, *, new_folder: bool = True, used_before: bool = False) -> tuple[str, str]:
        """The table and cgroup group of a node starting as ``sandboxd node`` does."""
        if new_folder:  # another host folder behind the same path
            shutil.rmtree(mount, ignore_errors=True)
            mount.mkdir()
        if used_before:
            Store(db).close()  # a node of an earlier version ran here
        store = Store(db)
        try:
            key = node_key(store, name, fresh=not used_before and new_folder)
            networks = SandboxNetworks(store, mount, NetworkOptions(), 8, 1, node=key)
            table = Firewall(None, networks.tag, "sdx", None).table  # type: ignore[arg-type]  # no nft call
            return table, instance_name(mount, key)
        finally:
            store.close()

    a = start("machine-sandboxd")
    assert start("machine-sandboxd", new_folder=False) == a  # a restart
    assert start("machine-sandboxd-renamed", new_folder=False) == a  # a rename finds its sandboxes
    b = start("machine-sandboxd-gpu")
    assert a[0] != b[0] and a[1] != b[1], (a, b)
    assert a[0].startswith("inet sandboxd_") and b[0].startswith("inet sandboxd_")
    by_path = (f"inet sandboxd_{tag_for(mount)}", instance_name(mount))  # sandboxd serve's, as before
    assert by_path not in (a, b)
    assert start("machine-sandboxd", used_before=True) == by_path
    assert start("machine-sandboxd", new_folder=False) == by_path


def test_the_proxys_resolver_asks_again_soon_after_a_lost_query_and_keeps_answers_for_their_ttl() -> None:
    """A real UDP DNS server on loopback that ignores the first query it gets: the egress proxy's
    resolver has its answer about a second later (it waited the whole 4 s before, while the
    sandbox's client waited on its connection), and a second lookup asks nothing."""
    import asyncio
    import socket
    import threading
    import time

    import dns.message
    import dns.rdatatype
    import dns.rrset
    from sandboxd.runtime.network.resolver import Resolver

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    asked: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            kind = dns.rdatatype.to_text(query.question[0].rdtype)
            asked.append(kind)
            if asked.count(kind) == 1:
                continue  # lost
            response = dns.message.make_response(query)
            found = {"A": "198.18.0.2", "AAAA": "2001:db8::2"}[kind]
            response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", kind, found))
            server.sendto(response.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        resolver = Resolver([f"127.0.0.1:{server.getsockname()[1]}"])
        began = time.monotonic()
        assert asyncio.run(resolver.addresses("lossy.test")) == ["198.18.0.2", "2001:db8::2"]
        took = time.monotonic() - began
        assert 0.9 < took < 4.0, took  # one retry for each kind, asked at once (it took 8 s)
        assert sorted(asked) == ["A", "A", "AAAA", "AAAA"]
        assert asyncio.run(resolver.addresses("lossy.test")) == ["198.18.0.2", "2001:db8::2"]
        assert len(asked) == 4  # from the cache
    finally:
        stop.set()
        thread.join()
        server.close()
