"""A small internet of our own, for the networking tests and benches: network namespaces made here,
with HTTP, HTTPS, DNS and a server-first TCP service on addresses chosen here, and a "host"
namespace where ``sandboxd serve`` runs with its egress pointed at that internet (``--uplink``).
Nothing here ever reaches the real network: the host namespace's only routes lead into the lab.

::

    root namespace            <lab>-host ("the host")              <lab>-inet ("the internet")
    (pytest, the SDKs)        sandboxd serve, sandboxes' veths     DNS 203.0.113.53
    client link ───────────── api 100.x.y.2                        web 203.0.113.10, 2001:db8:200::10
                              uplink0 198.51.100.2 ─────────────── web2 203.0.113.20
                                                                   never: 169.254.169.254, 10.99.0.1,
                                                                          fd00:ec2::254

Names (``*.test``, answered by the lab's DNS): ``allowed.test`` and ``denied.test`` are both web's
address (so a name decides, not the address); ``other.test`` is web2; ``metadata.test`` points at
169.254.169.254 (a name for a never-reachable address).

The web servers answer ``GET /whoami`` (which server and what client address it saw, never the
request's headers), ``GET /bytes?n=N`` (N zero bytes), ``GET /slow?n=N&ms=M`` (N bytes, one every M
milliseconds) and record every request's headers in ``<lab dir>/requests.jsonl`` for the test to
read. Port 22 on web says an SSH-like banner first (a server-first protocol).

``python tests/netlab.py up`` builds a lab, starts ``sandboxd serve`` in it and prints one JSON line
with what a client needs, then keeps it all up until its stdin closes (the JS tests use this).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

REPO = Path(__file__).resolve().parent.parent

WEB = "203.0.113.10"
WEB2 = "203.0.113.20"
DNS = "203.0.113.53"
WEB6 = "2001:db8:200::10"
HOST_UPLINK = "198.51.100.2"
INET_UPLINK = "198.51.100.1"
HOST_UPLINK6 = "2001:db8:100::2"
INET_UPLINK6 = "2001:db8:100::1"
NEVER = {"metadata": "169.254.169.254", "private": "10.99.0.1", "metadata6": "fd00:ec2::254"}
"""Addresses in ranges sandboxes may never reach, each with a web server behind it in the lab: if
the firewall let a packet through, it would be answered."""

NAMES = {
    "allowed.test": [WEB, WEB6],
    "denied.test": [WEB],
    "other.test": [WEB2],
    "metadata.test": [NEVER["metadata"]],
}
SSH_BANNER = b"SSH-2.0-netlab\r\n"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ns(name: str, *args: str) -> None:
    _run("ip", "-n", name, *args)


def _client_subnet() -> ipaddress.IPv4Network:
    """A /30 of 100.80.0.0/12 that no route of the root namespace overlaps (random: labs of
    concurrent test runs must not collide)."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = ipaddress.IPv4Network((0x64500000 + (random.randrange(1 << 18) << 2), 30))
        if str(net.network_address) not in used:
            return net
    raise RuntimeError("no free client subnet")


# ------------------------------------------------------------------------------------ the lab


@dataclass
class Lab:
    """The namespaces and servers of one lab (see the module docstring)."""

    dir: Path
    name: str = field(default_factory=lambda: f"sdlab{secrets.token_hex(3)}")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    client_net: ipaddress.IPv4Network | None = None

    @property
    def host_ns(self) -> str:
        return f"{self.name}-host"

    @property
    def inet_ns(self) -> str:
        return f"{self.name}-inet"

    @property
    def api_address(self) -> str:
        assert self.client_net is not None
        return str(self.client_net.network_address + 2)

    @property
    def ca_file(self) -> Path:
        return self.dir / "lab-ca.pem"

    @property
    def requests_file(self) -> Path:
        return self.dir / "requests.jsonl"

    def up(self) -> Lab:
        try:
            return self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> Lab:
        self.dir.mkdir(parents=True, exist_ok=True)
        make_certificates(self.dir)
        for ns in (self.host_ns, self.inet_ns):
            _run("ip", "netns", "add", ns)
            _ns(ns, "link", "set", "lo", "up")
        # host <-> internet
        _run("ip", "link", "add", f"{self.name}u", "type", "veth", "peer", "name", f"{self.name}i")
        _run("ip", "link", "set", f"{self.name}u", "netns", self.host_ns, "name", "uplink0")
        _run("ip", "link", "set", f"{self.name}i", "netns", self.inet_ns, "name", "downlink0")
        for ns, dev, v4, v6 in (
            (self.host_ns, "uplink0", HOST_UPLINK, HOST_UPLINK6),
            (self.inet_ns, "downlink0", INET_UPLINK, INET_UPLINK6),
        ):
            _ns(ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ns(ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ns(ns, "link", "set", dev, "up")
        _ns(self.host_ns, "route", "add", "default", "via", INET_UPLINK)
        _ns(self.host_ns, "-6", "route", "add", "default", "via", INET_UPLINK6)
        # the internet's servers, on its loopback (an address there is local to the namespace)
        for address in (WEB, WEB2, DNS, *NEVER.values(), WEB6):
            prefix = "128" if ":" in address else "32"
            _ns(self.inet_ns, "addr", "add", f"{address}/{prefix}", "dev", "lo")
        # root <-> host: where the SDKs reach the runtime's API
        self.client_net = _client_subnet()
        root_end = f"{self.name}c"
        _run("ip", "link", "add", root_end, "type", "veth", "peer", "name", f"{self.name}a")
        _run("ip", "link", "set", f"{self.name}a", "netns", self.host_ns, "name", "client0")
        _run("ip", "addr", "add", f"{self.client_net.network_address + 1}/30", "dev", root_end)
        _run("ip", "link", "set", root_end, "up")
        _ns(self.host_ns, "addr", "add", f"{self.api_address}/30", "dev", "client0")
        _ns(self.host_ns, "link", "set", "client0", "up")
        # servers: the internet's, and services of the host that sandboxes must never reach
        self.processes.append(self._spawn_in(self.inet_ns, "internet"))
        self.processes.append(self._spawn_in(self.host_ns, "host-services"))
        self._wait_ready()
        return self

    def _spawn_in(self, ns: str, role: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{role}.log").open("ab")
        return subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, str(Path(__file__)), role, str(self.dir)],
            stdout=log,
            stderr=log,
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all((self.dir / f"{role}.ready").exists() for role in ("internet", "host-services")):
                return
            for p in self.processes:
                if p.poll() is not None:
                    raise RuntimeError(f"a lab server exited: {(self.dir / 'internet.log').read_text()}")
            time.sleep(0.05)
        raise RuntimeError("the lab's servers did not start")

    def host_service_ports(self) -> dict[str, int]:
        """Ports of the host's own services (a listener on loopback, one on every address)."""
        return json.loads((self.dir / "host-services.ready").read_text())

    def requests(self) -> list[dict[str, Any]]:
        """Every request the internet's web servers saw (headers included), oldest first."""
        if not self.requests_file.exists():
            return []
        return [json.loads(line) for line in self.requests_file.read_text().splitlines() if line]

    def start_runtime(self, data_dir: Path, api_key: str, *flags: str, port: int | None = None) -> Runtime:
        """``sandboxd serve`` in the host namespace (on ``port``, else a random one; with 0, the one the
        kernel picks, which the runtime prints)."""
        port = 3000 + random.randrange(20000) if port is None else port
        log = data_dir / "serve.log"
        args = [
            "nsenter",
            f"--net=/run/netns/{self.host_ns}",
            sys.executable,
            "-m",
            "sandboxd",
            "serve",
            "--host",
            self.api_address,
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--api-key",
            api_key,
            "--uplink",
            "uplink0",
            "--dns-upstream",
            DNS,
            "--egress-trust",
            str(self.ca_file),
            # no warm pool unless the test asks for one (as conftest._cold)
            *(flags if any(f.startswith("--warm-sandboxes") for f in flags) else ("--warm-sandboxes", "0", *flags)),
        ]
        with log.open("ab") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        runtime = Runtime(process, f"http://{self.api_address}:{port}", api_key, data_dir, log)
        if port == 0:
            runtime.url = runtime.printed_url()
        runtime.wait_healthy()
        return runtime

    def down(self) -> None:
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for ns in (self.host_ns, self.inet_ns):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", f"{self.name}c"], stderr=subprocess.DEVNULL)


@dataclass
class Runtime:
    """``sandboxd serve`` running in a lab's host namespace."""

    process: subprocess.Popen[bytes]
    url: str
    api_key: str
    data_dir: Path
    log: Path

    def env(self) -> dict[str, str]:
        return {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url}

    def printed_url(self, timeout: float = 60) -> str:
        """The URL the runtime printed when it started (``--port 0``: the port it bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandboxd serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            found = re.search(r"sandbox proxy on (http\S+)", self.log.read_text())
            if found:
                return found.group(1)
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd serve printed no URL:\n{self.log.read_text()}")

    def wait_healthy(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandboxd serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd serve did not become healthy:\n{self.log.read_text()}")

    def stop(self) -> None:
        import urllib.request

        if self.process.poll() is None:
            headers = {"X-API-KEY": self.api_key}
            with contextlib.suppress(OSError, ValueError):
                request = urllib.request.Request(f"{self.url}/v2/sandboxes?limit=100", headers=headers)
                with urllib.request.urlopen(request, timeout=10) as answer:
                    for sandbox in json.loads(answer.read()):
                        kill = urllib.request.Request(
                            f"{self.url}/sandboxes/{sandbox['sandboxID']}", headers=headers, method="DELETE"
                        )
                        with contextlib.suppress(OSError):
                            urllib.request.urlopen(kill, timeout=10).close()
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------ certificates


def make_certificates(directory: Path) -> None:
    """The lab's CA (``lab-ca.pem``) and the web servers' certificate for every lab name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netlab CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in (WEB, WEB2, WEB6)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # Python 3.13's default context verifies strictly (VERIFY_X509_STRICT): a leaf needs the
        # issuer's key identifier, as real ones have (the Debian base's python3 is 3.13).
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "lab-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "web.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


# ---------------------------------------------------------------------------------- servers


class _Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests_file: Path
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server_address = self.connection.getsockname()[0]
        record = {
            "server": server_address,
            "client": self.client_address[0],
            "path": self.path,
            "tls": isinstance(self.connection, ssl.SSLSocket),
            "headers": dict(self.headers.items()),
        }
        with self.lock, self.requests_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/whoami":
            body = json.dumps({"server": server_address, "client": self.client_address[0]}).encode()
            self._send(200, body, "application/json")
        elif url.path in ("/bytes", "/slow"):
            n = int(query.get("n", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if url.path == "/slow":
                pause = int(query.get("ms", ["100"])[0]) / 1000
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(pause)
                return
            chunk = bytes(1 << 20)
            view = memoryview(chunk)
            left = n
            while left:
                step = min(left, len(chunk))
                self.wfile.write(view[:step])
                left -= step
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the stdlib's 5 drops SYNs under a burst of connects (a 1 s retransmit)

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.tls = tls
        super().__init__(address, _Web)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        return conn, addr


def _serve_forever(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _dns_server(address: str) -> None:
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    def answer(query_bytes: bytes) -> bytes:
        query = dns.message.from_wire(query_bytes)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        addresses = NAMES.get(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        kind = "AAAA" if question.rdtype == dns.rdatatype.AAAA else "A"
        found = [a for a in addresses if (":" in a) == (kind == "AAAA")]
        if found and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            response.answer.append(dns.rrset.from_text(question.name, 30, "IN", kind, *found))
        return response.to_wire()

    def udp() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 53))
        while True:
            data, peer = sock.recvfrom(4096)
            with contextlib.suppress(Exception):
                sock.sendto(answer(data), peer)

    def tcp() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, 53))
        sock.listen(16)
        while True:
            conn, _ = sock.accept()
            with conn, contextlib.suppress(Exception):
                length = int.from_bytes(conn.recv(2), "big")
                data = b""
                while len(data) < length:
                    data += conn.recv(length - len(data))
                reply = answer(data)
                conn.sendall(len(reply).to_bytes(2, "big") + reply)

    threading.Thread(target=udp, daemon=True).start()
    threading.Thread(target=tcp, daemon=True).start()


def _banner_server(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(16)

    def serve() -> None:
        while True:
            conn, _ = sock.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(SSH_BANNER)
                conn.recv(100)

    threading.Thread(target=serve, daemon=True).start()


def serve_internet(directory: Path) -> None:
    """In the internet namespace: web servers on every address, HTTPS on web's, DNS, a banner."""
    _Web.requests_file = directory / "requests.jsonl"
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(directory / "web.pem")
    for address in (WEB, WEB2, WEB6, *NEVER.values()):
        _serve_forever(_Server((address, 80), None))
    for address in (WEB, WEB2, WEB6):
        _serve_forever(_Server((address, 443), tls))
        _serve_forever(_Server((address, 8443), tls))
    _dns_server(DNS)
    _banner_server(WEB, 22)
    (directory / "internet.ready").write_text("ok")


def serve_host_services(directory: Path) -> None:
    """In the host namespace: what a sandbox must never reach on the host (a loopback-only service
    and one on every address)."""
    ports = {}
    for name, address in (("loopback", "127.0.0.1"), ("any", "0.0.0.0")):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, 0))
        sock.listen(16)
        ports[name] = sock.getsockname()[1]

        def accept(s: socket.socket = sock) -> None:
            while True:
                conn, _ = s.accept()
                with conn, contextlib.suppress(OSError):
                    conn.sendall(b"host service\n")

        threading.Thread(target=accept, daemon=True).start()
    (directory / "host-services.ready").write_text(json.dumps(ports))


def _wait_for_stdin_eof() -> None:
    while sys.stdin.buffer.read(4096):
        pass


def main() -> None:
    role = sys.argv[1]
    if role in ("internet", "host-services"):
        (serve_internet if role == "internet" else serve_host_services)(Path(sys.argv[2]))
        _wait_for_stdin_eof()
        return
    if role == "up":  # for the JS tests: a lab and a runtime, until stdin closes
        base = Path(tempfile.mkdtemp(prefix="sandboxd-netlab-"))
        lab = Lab(base / "lab").up()
        data = base / "data"
        data.mkdir()
        runtime = None
        try:
            runtime = lab.start_runtime(data, f"netlab-{secrets.token_hex(8)}", *sys.argv[2:])
            print(
                json.dumps(
                    {
                        **runtime.env(),
                        "labDir": str(lab.dir),
                        "web": WEB,
                        "web2": WEB2,
                        "web6": WEB6,
                        "never": NEVER,
                        "caFile": str(lab.ca_file),
                    }
                ),
                flush=True,
            )
            _wait_for_stdin_eof()
        finally:
            if runtime is not None:
                runtime.stop()
            lab.down()
            # Removed only when nothing is mounted under it (never delete through a leaked mount).
            if str(base) not in Path("/proc/self/mountinfo").read_text():
                shutil.rmtree(base, ignore_errors=True)
        return
    sys.exit(f"usage: {sys.argv[0]} up [serve flags] | internet DIR | host-services DIR")


if __name__ == "__main__":
    main()
