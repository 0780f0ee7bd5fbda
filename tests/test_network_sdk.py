"""Sandbox networking with the official E2B SDK, against a real ``sandboxd serve`` whose egress goes
to a small internet of the test's own (:mod:`netlab`): default egress, E2B's egress controls,
update_network, header rules, what is never reachable (from root inside, whatever it does to its
own network), the traffic token, and per-sandbox accounting.

Each check runs inside the sandbox as a real client (``sandbox_probe.py`` with the host's
``python3``), and the lab's web servers record what reached them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import netlab
import pytest
from e2b import Sandbox, Secret
from e2b.exceptions import SandboxException
from netlab import NEVER, WEB, WEB2, WEB6, Lab, Runtime

pytestmark = pytest.mark.root

ALL_TRAFFIC = "0.0.0.0/0"
PROBE = (Path(__file__).parent / "sandbox_probe.py").read_text()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    import os

    if os.geteuid() != 0:
        pytest.skip("the network lab and the runtime need root")
    lab = Lab(tmp_path_factory.mktemp("netlab")).up()
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def net_runtime(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = lab.start_runtime(tmp_path_factory.mktemp("netdata"), "net-key", "--domain", "lab.test")
    yield runtime
    runtime.stop()


@pytest.fixture
def env(net_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    for name, value in net_runtime.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return net_runtime


def create(**options: Any) -> Sandbox:
    sandbox = Sandbox.create(timeout=300, **options)
    sandbox.files.write("/tmp/probe.py", PROBE)
    return sandbox


def probe(sandbox: Sandbox, *checks: dict[str, Any], user: str = "user") -> list[dict[str, Any]]:
    result = sandbox.commands.run(f"python3 /tmp/probe.py '{json.dumps(list(checks))}'", user=user, timeout=60)
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    return answers


def web(name: str, *, tls: bool = False, ip: str | None = None, port: int | None = None, **more: Any) -> dict[str, Any]:
    check = {"kind": "http", "name": name, "tls": tls, "port": port or (443 if tls else 80), **more}
    if ip is not None:
        check["ip"] = ip
    return check


def tcp(ip: str, port: int, expect: str, **more: Any) -> dict[str, Any]:
    return {"kind": "tcp", "ip": ip, "port": port, "expect": expect, **more}


SSH = "SSH-2.0"
"""What the lab's server-first service on web:22 says."""

HOST_SERVICE = "host service"
"""What the lab host's own services say."""


def oks(answers: list[dict[str, Any]]) -> list[bool]:
    return [a["ok"] for a in answers]


def lab_ca(sandbox: Sandbox, lab: Lab) -> str:
    """The lab's CA, for clients in the sandbox that talk TLS to the lab's servers directly."""
    sandbox.files.write("/tmp/lab-ca.pem", lab.ca_file.read_text())
    return "/tmp/lab-ca.pem"


# ------------------------------------------------------------------------------ default egress


def test_default_egress_reaches_the_internet_by_ip_and_by_name_over_ipv4_and_ipv6(env: Runtime, lab: Lab) -> None:
    sandbox = create()
    try:
        ca = lab_ca(sandbox, lab)
        answers = probe(
            sandbox,
            web(WEB, ip=WEB),
            web("allowed.test"),
            web("allowed.test", tls=True, ca=ca),
            web(WEB6, ip=WEB6),
            {"kind": "dns", "name": "allowed.test"},
        )
        assert oks(answers) == [True] * 5, answers
        assert answers[0]["body"]["server"] == WEB
        assert answers[3]["body"]["server"] == WEB6
        assert set(answers[4]["addresses"]) == {WEB, WEB6}
        # The internet sees the host's address (masqueraded), not the sandbox's.
        assert answers[0]["body"]["client"] == netlab.HOST_UPLINK
        resolv = sandbox.files.read("/etc/resolv.conf")
        assert "nameserver 10." in resolv
        info = sandbox.get_info()
        assert info.allow_internet_access is None and info.network is None
    finally:
        sandbox.kill()


def test_allow_internet_access_false_reaches_nothing(env: Runtime, lab: Lab) -> None:
    sandbox = create(allow_internet_access=False)
    try:
        answers = probe(
            sandbox,
            web(WEB, ip=WEB),
            web(WEB2, ip=WEB2),
            web(WEB6, ip=WEB6),
            web("allowed.test"),
            {"kind": "dns", "name": "allowed.test"},
            tcp(WEB, 22, SSH),
        )
        assert oks(answers) == [False] * 6, answers
        assert sandbox.get_info().allow_internet_access is False
    finally:
        sandbox.kill()


# -------------------------------------------------------------------------- allow and deny


def test_deny_out_by_ip_and_cidr_blocks_only_those(env: Runtime) -> None:
    sandbox = create(network={"deny_out": [WEB, "2001:db8:200::/48"]})
    try:
        answers = probe(sandbox, web(WEB, ip=WEB), web(WEB6, ip=WEB6), web(WEB2, ip=WEB2), tcp(WEB, 22, SSH))
        assert oks(answers) == [False, False, True, False], answers
        assert sandbox.get_info().network == {"deny_out": [WEB, "2001:db8:200::/48"]}
    finally:
        sandbox.kill()


def test_deny_all_with_one_allowed_cidr(env: Runtime) -> None:
    sandbox = create(network={"allow_out": [f"{WEB2}/32"], "deny_out": [ALL_TRAFFIC]})
    try:
        answers = probe(sandbox, web(WEB2, ip=WEB2), web(WEB, ip=WEB), web(WEB6, ip=WEB6), tcp(WEB, 22, SSH))
        assert oks(answers) == [True, False, False, False], answers
    finally:
        sandbox.kill()


def test_allowed_name_works_and_the_same_address_under_a_denied_name_does_not(env: Runtime, lab: Lab) -> None:
    """Names are matched on the connection (SNI, Host), and an allowed name is dialed by the host."""
    sandbox = create(network={"allow_out": ["allowed.test"], "deny_out": [ALL_TRAFFIC]})
    try:
        ca = lab_ca(sandbox, lab)
        answers = probe(
            sandbox,
            web("allowed.test", tls=True, ca=ca),  # SNI allowed.test
            web("allowed.test"),  # Host allowed.test
            web("allowed.test", tls=True, port=8443, ca=ca),  # any port carries a name
            web("denied.test", tls=True, ca=ca),  # the same address, another name
            web("denied.test"),
            web(WEB, ip=WEB),  # the address itself, no name
            tcp(WEB, 22, SSH),  # a server-first protocol: no name, denied by address
            web("other.test"),
            {"kind": "dns", "name": "allowed.test"},  # the resolver stands in for 8.8.8.8: allowed
        )
        assert oks(answers) == [True, True, True, False, False, False, False, False, True], answers
        # A sandbox that points the allowed name at another address still reaches the real host:
        # the proxy dials the name, resolved on the host.
        sandbox.commands.run(f"echo '{WEB2} allowed.test' >> /etc/hosts", user="root")
        steered = probe(sandbox, web("allowed.test"), web("allowed.test", tls=True, ca=ca))
        assert oks(steered) == [True, True], steered
        assert steered[0]["body"]["server"] == WEB and steered[1]["body"]["server"] == WEB
    finally:
        sandbox.kill()


def test_names_in_allow_out_need_all_traffic_denied_as_e2b_says(env: Runtime) -> None:
    with pytest.raises(SandboxException, match="you must include 'ALL_TRAFFIC' in deny out"):
        Sandbox.create(network={"allow_out": ["allowed.test"]})
    with pytest.raises(SandboxException, match=r"invalid denied CIDR example\.com"):
        Sandbox.create(network={"deny_out": ["example.com"]})
    with pytest.raises(SandboxException, match=r"invalid allowed address 1\.2\.3\.4/40"):
        Sandbox.create(network={"allow_out": ["1.2.3.4/40"]})


def test_egress_proxy_is_refused_as_on_e2bs_open_source_runtime(env: Runtime) -> None:
    with pytest.raises(SandboxException, match=r"Egress proxy \(network.egressProxy\) is not enabled for this team"):
        Sandbox.create(network={"egress_proxy": {"address": "proxy.example.com:1080"}})


# ---------------------------------------------------------------------------- update_network


def test_update_network_takes_effect_at_once_without_dropping_open_connections(env: Runtime) -> None:
    sandbox = create()
    try:
        # A download that takes ~3 s, started before the update.
        slow = web(WEB, ip=WEB, path="/slow?n=30&ms=100")
        running = sandbox.commands.run(
            f"python3 /tmp/probe.py '{json.dumps([slow])}' > /tmp/slow.json", background=True
        )
        time.sleep(0.5)
        sandbox.update_network({"allow_out": [WEB2], "deny_out": [ALL_TRAFFIC]})
        after = probe(sandbox, web(WEB, ip=WEB), web(WEB2, ip=WEB2))
        assert oks(after) == [False, True], after
        running.wait()
        finished = json.loads(sandbox.files.read("/tmp/slow.json"))
        assert finished[0]["ok"] and finished[0]["body"] == 30, finished
        assert sandbox.get_info().network == {"allow_out": [WEB2], "deny_out": [ALL_TRAFFIC]}
        # The update replaces everything: an empty one opens the sandbox again.
        Sandbox.update_network(sandbox.sandbox_id, {})
        assert oks(probe(sandbox, web(WEB, ip=WEB))) == [True]
        sandbox.update_network({"allow_internet_access": False})
        assert oks(probe(sandbox, web(WEB2, ip=WEB2), web(WEB, ip=WEB))) == [False, False]
        assert sandbox.get_info().allow_internet_access is False
    finally:
        sandbox.kill()


# ------------------------------------------------------------------------------ header rules


def test_header_rule_reaches_the_server_and_never_the_sandbox(env: Runtime, lab: Lab) -> None:
    secret = "sk-netlab-" + "7f3a9c21e4"
    sandbox = create(
        network={
            "allow_out": ["allowed.test"],
            "deny_out": [ALL_TRAFFIC],
            "rules": {"allowed.test": [{"transform": {"headers": {"Authorization": f"Bearer {secret}"}}}]},
        }
    )
    try:
        before = len(lab.requests())
        # HTTPS: the sandbox trusts the runtime's CA (installed at create), not the lab's.
        answers = probe(
            sandbox,
            web("allowed.test", tls=True, path="/whoami?via=https"),
            web("allowed.test", path="/whoami?via=http"),
        )
        assert oks(answers) == [True, True], answers
        # Trusted through the template's trust layer, made once by the runtime (runtime/trust.py).
        assert len(list((env.data_dir / "trust").iterdir())) == 1
        seen = [r for r in lab.requests()[before:] if r["path"].startswith("/whoami?via=")]
        assert sorted(r["path"] for r in seen) == ["/whoami?via=http", "/whoami?via=https"]
        assert all(r["headers"].get("Authorization") == f"Bearer {secret}" for r in seen), seen
        # Nowhere in the sandbox: not in any process's environment, files or the client's memory.
        # (The searches spell the secret as a pattern that does not contain it, so that searching
        # does not bring it in.)
        pattern = secret[:11] + "[" + secret[11] + "]" + secret[12:]
        search = sandbox.commands.run(
            "grep -rlE --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev --exclude-dir=usr "
            f"'{pattern}' / ; cat /proc/*/environ | tr '\\0' '\\n' | grep -cE '{pattern}' ; true",
            user="root",
        )
        assert search.stdout == "0\n", search.stdout
        memory = sandbox.commands.run(
            "python3 - <<'EOF'\n"
            "import json, re, ssl, socket\n"
            "s = ssl.create_default_context().wrap_socket(socket.create_connection(('allowed.test', 443)),"
            " server_hostname='allowed.test')\n"
            "s.sendall(b'GET /whoami HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "while s.recv(65536): pass\n"
            "found = 0\n"
            "for line in open('/proc/self/maps'):\n"
            "    m = re.match(r'([0-9a-f]+)-([0-9a-f]+) r', line)\n"
            "    if not m or '[vvar]' in line: continue\n"
            "    try:\n"
            "        with open('/proc/self/mem', 'rb') as mem:\n"
            "            mem.seek(int(m[1], 16)); data = mem.read(int(m[2], 16) - int(m[1], 16))\n"
            "    except OSError: continue\n"
            f"    found += len(re.findall(rb'{pattern}', data))\n"
            "print(json.dumps(found))\n"
            "EOF"
        )
        assert json.loads(memory.stdout) == 0
        info = sandbox.get_info()
        assert info.network is not None
        assert info.network["rules"] == {
            "allowed.test": [{"transform": {"headers": {"Authorization": f"Bearer {secret}"}}}]
        }
    finally:
        sandbox.kill()


def test_a_secret_in_a_header_rule_reaches_the_server_in_its_current_version_and_never_the_sandbox(
    env: Runtime, lab: Lab
) -> None:
    """E2B's ``Secret``: a rule's ``Secret.fill(name)`` becomes the secret's value in the egress proxy,
    per connection (an update is in force for the next request); the sandbox, its info and the rule
    as echoed keep the placeholder; once the secret is deleted, requests to the rule's host are not
    sent (neither with the placeholder nor without the header)."""
    name = f"lab-token-{time.monotonic_ns()}"
    first, second = "sk-first-" + "51c0de", "sk-second-" + "9e7a11"
    Secret.create(name, first)
    rule = {"Authorization": f"Bearer {Secret.fill(name)}"}
    sandbox = create(network={"rules": {"allowed.test": [{"transform": {"headers": rule}}]}})
    try:

        def requests_seen(tag: str) -> list[dict[str, Any]]:
            answers = probe(sandbox, web("allowed.test", tls=True, path=f"/whoami?s={tag}"))
            seen = [r for r in lab.requests() if r["path"] == f"/whoami?s={tag}"]
            assert oks(answers) == [bool(seen)], (answers, seen)
            return seen

        (seen,) = requests_seen("first")
        assert seen["headers"].get("Authorization") == f"Bearer {first}"
        Secret.update(name, second)
        (seen,) = requests_seen("second")
        assert seen["headers"].get("Authorization") == f"Bearer {second}"

        # Not over plain HTTP, where anyone on the way could read it: the connection is closed.
        assert oks(probe(sandbox, web("allowed.test", path="/whoami?s=plain"))) == [False]
        assert not [r for r in lab.requests() if r["path"] == "/whoami?s=plain"]
        # Not to another virtual host on a connection to the rule's (a CDN routing by Host).
        fronted = sandbox.commands.run(
            "python3 - <<'EOF'\n"
            "import ssl, socket\n"
            "s = ssl.create_default_context().wrap_socket(socket.create_connection(('allowed.test', 443)),"
            " server_hostname='allowed.test')\n"
            "s.sendall(b'GET /whoami?s=fronted HTTP/1.1\\r\\nHost: elsewhere.test\\r\\n'"
            " b'Connection: close\\r\\n\\r\\n')\n"
            "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
            "EOF"
        )
        assert fronted.stdout.startswith("HTTP/1."), fronted.stdout
        (seen,) = [r for r in lab.requests() if r["path"] == "/whoami?s=fronted"]
        assert "Authorization" not in seen["headers"], seen

        pattern = second[:10] + "[" + second[10] + "]" + second[11:]  # a pattern that does not contain it
        search = sandbox.commands.run(
            "grep -rlE --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev --exclude-dir=usr "
            f"'{pattern}' / ; cat /proc/*/environ | tr '\\0' '\\n' | grep -cE '{pattern}' ; true",
            user="root",
        )
        assert search.stdout == "0\n", search.stdout
        info = sandbox.get_info()
        assert info.network is not None and info.network["rules"]["allowed.test"][0]["transform"]["headers"] == rule

        Secret.destroy(name)
        assert requests_seen("after-delete") == [], "a request went out after its secret was deleted"
    finally:
        sandbox.kill()
        Secret.destroy(name)


SLOW_CLIENT = """
import socket, ssl, sys, time
name, port, path, silent = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    s = socket.create_connection((name, port), timeout=20)
    time.sleep(silent)  # connected, and nothing said yet: a client on a busy machine
    if port == 443:
        s = ssl.create_default_context().wrap_socket(s, server_hostname=name)
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.split(b"\\r\\n", 1)[0].decode())
except Exception as exc:
    print(repr(exc))
"""


def test_a_client_slow_to_speak_still_gets_its_header_rule(env: Runtime, lab: Lab) -> None:
    """The proxy reads a connection's name from its first bytes. To an address that is allowed anyway
    it waits only briefly for them (a server-first protocol must get its greeting), but a client that
    was merely slow to send its ClientHello or request (a busy machine: CI saw a sandbox's first
    HTTPS request to a rule's host go out by address, where it failed to validate) must still get
    its host's rule, secret included; and the server-first protocol its greeting."""
    from sandboxd.runtime.network.egress import PEEK_TIMEOUT_ALLOWED_S

    name = f"slow-token-{time.monotonic_ns()}"
    Secret.create(name, "sk-slow-" + "c1e47")
    rules = {
        "allowed.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}],
        "denied.test": [{"transform": {"headers": {"X-Slow": "plain"}}}],
    }
    sandbox = create(network={"rules": rules})
    try:
        sandbox.files.write("/tmp/slow.py", SLOW_CLIENT)
        silent = PEEK_TIMEOUT_ALLOWED_S * 3
        for host, port, path in (("allowed.test", 443, "/whoami?s=slow-tls"), ("denied.test", 80, "/whoami?s=slow")):
            said = sandbox.commands.run(f"python3 /tmp/slow.py {host} {port} '{path}' {silent}", timeout=60).stdout
            assert said.startswith("HTTP/1.1 200"), (host, said)
        seen = {r["path"]: r["headers"] for r in lab.requests() if r["path"].startswith("/whoami?s=slow")}
        assert seen["/whoami?s=slow-tls"].get("Authorization") == "Bearer sk-slow-c1e47", seen
        assert seen["/whoami?s=slow"].get("X-Slow") == "plain", seen
        assert oks(probe(sandbox, tcp(WEB, 22, SSH))) == [True]
    finally:
        sandbox.kill()
        Secret.destroy(name)


# ------------------------------------------------------------------------ never reachable


def test_never_reachable_from_root_even_after_root_rewires_its_network(env: Runtime, lab: Lab) -> None:
    other = create()
    sandbox = create(network={"allow_out": ["10.0.0.0/8", "169.254.0.0/16", "fc00::/7"]})  # asking is not enough
    try:
        other.commands.run("python3 -m http.server 8000 --bind :: >/dev/null 2>&1", background=True, user="root")
        # Listening before the first probe (it raced the server's start on a busy host: cold18).
        listening = other.commands.run(
            "for i in $(seq 100); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8000))\""
            " 2>/dev/null && echo listening && break; sleep 0.1; done"
        )
        assert "listening" in listening.stdout
        other_v4 = other.commands.run("ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
        other_v6 = other.commands.run("ip -6 -o addr show eth0 scope global").stdout.split()[3].split("/")[0]
        gateway = sandbox.commands.run("ip -4 route show default").stdout.split()[2]
        gateway6 = sandbox.commands.run("ip -6 route show default").stdout.split()[2]
        host = lab.host_service_ports()
        assert oks(probe(other, web("127.0.0.1", ip="127.0.0.1", port=8000, path="/"))) == [True]  # it serves
        never = [
            web(NEVER["metadata"], ip=NEVER["metadata"]),
            web(NEVER["private"], ip=NEVER["private"]),
            web(NEVER["metadata6"], ip=NEVER["metadata6"]),
            web("metadata.test"),  # a public name for a never-reachable address
            tcp("127.0.0.1", host["loopback"], HOST_SERVICE),  # the host's loopback (here: the sandbox's own)
            tcp(gateway, host["any"], HOST_SERVICE),  # the host, at the sandbox's gateway
            tcp(gateway6, host["any"], HOST_SERVICE),
            tcp(netlab.HOST_UPLINK, host["any"], HOST_SERVICE),  # the host's other addresses
            web(lab.api_address, ip=lab.api_address, port=int(env.url.rsplit(":", 1)[1]), path="/health"),
            web(other_v4, ip=other_v4, port=8000, path="/"),  # another sandbox
            web(other_v6, ip=other_v6, port=8000, path="/"),
        ]
        control = web(WEB, ip=WEB)
        first = probe(sandbox, control, *never, user="root")
        assert oks(first) == [True] + [False] * len(never), first
        # Root rewires everything it can inside (each may be refused without CAP_NET_ADMIN; what
        # matters is what follows), then tries again, also from the other sandbox's address.
        sandbox.commands.run(
            f"ip addr add {other_v4}/32 dev eth0; ip -6 addr add {other_v6}/128 dev eth0 nodad;"
            " ip link set eth0 address 02:00:00:00:00:01;"
            f" ip route add 169.254.169.254/32 via {gateway}; ip route add 10.0.0.0/8 dev eth0;"
            " nft flush ruleset; iptables -F; iptables -P OUTPUT ACCEPT; true",
            user="root",
        )
        spoofed = [web(WEB, ip=WEB, source=other_v4), web(NEVER["metadata"], ip=NEVER["metadata"], source=other_v4)]
        second = probe(sandbox, *never, *spoofed, user="root")
        assert oks(second) == [False] * (len(never) + len(spoofed)), second
        assert all(r["client"] != other_v4 for r in lab.requests())
    finally:
        sandbox.kill()
        other.kill()


# -------------------------------------------------------------------------- ingress, metrics


def test_allow_public_traffic_false_needs_the_traffic_token(env: Runtime) -> None:
    sandbox = create(network={"allow_public_traffic": False})
    try:
        sandbox.commands.run("python3 -m http.server 8000 >/dev/null 2>&1", background=True)
        host = sandbox.get_host(8000)
        token = sandbox.traffic_access_token
        assert token
        url = env.url + "/"
        deadline = time.monotonic() + 10
        with httpx.Client() as client:
            while True:
                served = client.get(url, headers={"Host": host, "e2b-traffic-access-token": token})
                if served.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert served.status_code == 200
            missing = client.get(url, headers={"Host": host})
            wrong = client.get(url, headers={"Host": host, "e2b-traffic-access-token": "x" + token})
        assert missing.status_code == 403 and "Token header 'e2b-traffic-access-token' is missing" in missing.text
        assert wrong.status_code == 403 and "is invalid" in wrong.text
        assert sandbox.get_info().network == {"allow_public_traffic": False}
        # envd's port has its own token: the SDK's own calls go on working.
        assert sandbox.commands.run("echo ok").stdout == "ok\n"
        public = create()
        try:
            assert public.traffic_access_token is None
        finally:
            public.kill()
    finally:
        sandbox.kill()


def test_metrics_count_each_sandboxs_own_traffic(env: Runtime) -> None:
    busy, idle = create(), create()
    try:
        size = 20_000_000
        assert oks(probe(busy, web(WEB, ip=WEB, path=f"/bytes?n={size}"))) == [True]
        headers = {"X-API-KEY": env.api_key}
        with httpx.Client(headers=headers) as client:
            busy_m = client.get(f"{env.url}/sandboxes/{busy.sandbox_id}/metrics").json()[-1]
            idle_m = client.get(f"{env.url}/sandboxes/{idle.sandbox_id}/metrics").json()[-1]
        assert busy_m["netInBytes"] >= size and busy_m["netOutBytes"] > 0
        assert idle_m["netInBytes"] < 100_000, idle_m
        assert busy.get_metrics()  # the SDK still reads E2B's fields
    finally:
        busy.kill()
        idle.kill()


# ------------------------------------------------------------------------------- stop, restart


def _host_state(lab: Lab, tag: str) -> tuple[bool, list[str]]:
    """Whether the runtime's table exists in the lab host, and its sandbox links there."""
    import subprocess

    tables = subprocess.run(
        ["ip", "netns", "exec", lab.host_ns, "nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    links = subprocess.run(["ip", "-n", lab.host_ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return f"sandboxd_{tag}" in tables, [n for n in names if n.startswith(f"sd{tag}h")]


def test_stop_removes_the_table_and_links_and_a_restart_links_sandboxes_again(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandboxd.runtime.network.addressing import tag_for

    data = tmp_path_factory.mktemp("restart")
    runtime = lab.start_runtime(data, "restart-key")
    port = int(runtime.url.rsplit(":", 1)[1])
    tag = tag_for(data)
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    try:
        sandbox = create()
        assert oks(probe(sandbox, web(WEB, ip=WEB))) == [True]
        assert _host_state(lab, tag) == (True, [f"sd{tag}h0"])
        # A crash leaves the table in force (the sandbox stays fenced in) ...
        runtime.process.kill()
        runtime.process.wait()
        assert _host_state(lab, tag)[0]
        runtime = lab.start_runtime(data, "restart-key", port=port)
        assert oks(probe(sandbox, web(WEB, ip=WEB), web(NEVER["metadata"], ip=NEVER["metadata"]))) == [True, False]
        # ... a clean stop removes every trace; the sandboxes keep running, offline ...
        runtime.process.terminate()
        runtime.process.wait(20)
        assert _host_state(lab, tag) == (False, [])
        # ... and a restarted runtime links them again, with the same addresses and rules.
        runtime = lab.start_runtime(data, "restart-key", port=port)
        assert _host_state(lab, tag) == (True, [f"sd{tag}h0"])
        assert oks(probe(sandbox, web(WEB, ip=WEB), web(NEVER["metadata"], ip=NEVER["metadata"]))) == [True, False]
    finally:
        runtime.stop()
    assert _host_state(lab, tag) == (False, [])


def test_a_runtime_on_port_0_keeps_sandboxes_off_the_port_it_bound_even_in_an_opened_range(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--port 0``: the firewall names the port the kernel picked, so a sandbox reaches other ports
    of the API's address once the operator opens it (--sandbox-allow), and never the API itself."""
    from sandboxd.runtime.network.addressing import tag_for

    data = tmp_path_factory.mktemp("port0")
    runtime = lab.start_runtime(data, "port0-key", "--sandbox-allow", f"{lab.api_address}/32", port=0)
    port = int(runtime.url.rsplit(":", 1)[1])
    other = port + 1 if port < 65535 else port - 1
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.host_ns,
            sys.executable,
            "-m",
            "http.server",
            str(other),
            "--bind",
            lab.api_address,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    try:
        assert port != 0
        table = subprocess.run(
            ["ip", "netns", "exec", lab.host_ns, "nft", "list", "table", "inet", f"sandboxd_{tag_for(data)}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"tcp dport != {port} accept" in table
        sandbox = create()
        deadline = time.monotonic() + 20
        while oks(probe(sandbox, web(lab.api_address, ip=lab.api_address, port=other, path="/"))) != [True]:
            assert time.monotonic() < deadline, "the opened range's other server never answered"
            time.sleep(0.3)
        api = web(lab.api_address, ip=lab.api_address, port=port, path="/health")
        assert oks(probe(sandbox, api)) == [False]
    finally:
        server.kill()
        server.wait()
        runtime.stop()


# ------------------------------------------------------------------------------ warm sandboxes


def test_a_warm_sandbox_gets_the_claims_egress_rules(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm sandbox's veth pair is made while it waits in the pool; its rules come with the claim.
    So a claim that asks for no internet reaches nothing, and one with the defaults reaches it."""
    runtime = lab.start_runtime(tmp_path_factory.mktemp("warmnet"), "warm-key", "--warm-sandboxes", "2")
    try:
        for name, value in runtime.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        deadline = time.monotonic() + 120
        while warm_ready(runtime) < 2:  # booted, linked and warmed up
            assert time.monotonic() < deadline, "no 2 warm sandboxes after 120 s"
            time.sleep(0.2)
        warm = {p.name for p in (runtime.data_dir / "sandboxes").iterdir()}
        closed = create(allow_internet_access=False)
        opened = create()
        try:
            assert {closed.sandbox_id, opened.sandbox_id} == warm  # both came from the pool
            assert oks(probe(closed, web(WEB, ip=WEB), tcp(WEB, 22, SSH))) == [False, False]
            assert oks(probe(opened, web(WEB, ip=WEB), tcp(WEB, 22, SSH))) == [True, True]
            # A process on the host cannot open a connection to the sandbox's address, even to a
            # port that listens on every address inside: it is refused at once (it used to hang
            # until its timeout). Only the proxy, with its token checks, reaches a sandbox's ports.
            address = opened.commands.run("ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
            opened.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
            inside = opened.commands.run(
                f"for i in $(seq 50); do python3 -c \"import socket; socket.create_connection(('{address}', 8000))\""
                " && echo listening && break; sleep 0.1; done"
            )
            assert "listening" in inside.stdout
            connect = f"import socket; socket.create_connection(('{address}', 8000), timeout=5)"
            from_host = subprocess.run(
                ["nsenter", f"--net=/run/netns/{lab.host_ns}", sys.executable, "-c", connect],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert from_host.returncode != 0 and "ConnectionRefusedError" in from_host.stderr, from_host
        finally:
            closed.kill()
            opened.kill()
    finally:
        runtime.stop()


def warm_ready(runtime: Runtime) -> int:
    """The runtime's ``sandboxd_warm_sandboxes`` gauge: warm sandboxes ready to be claimed."""
    answer = httpx.get(f"{runtime.url}/metrics", headers={"Authorization": f"Bearer {runtime.api_key}"})
    answer.raise_for_status()
    for line in answer.text.splitlines():
        if line.startswith("sandboxd_warm_sandboxes "):
            return int(float(line.split()[1]))
    raise AssertionError("no sandboxd_warm_sandboxes in /metrics")
