"""Uploaded into sandboxes by the networking tests and run there with the host's ``python3``: tries
connections and prints what happened as JSON, so one command runs many checks at once.

``python3 probe.py CHECKS_JSON`` where CHECKS_JSON is a list of checks, each one of

* ``{"kind": "http", "name": N, "port": P, "tls": bool, "ip": IP?, "path": "/whoami", "ca": FILE?,
  "source": IP?}``: a GET with ``Host: N`` (and SNI N), to IP when given, else to N resolved here;
* ``{"kind": "tcp", "ip": IP, "port": P, "expect": TEXT, "source": IP?}``: a connection, which succeeds
  when the server's first words start with TEXT;
* ``{"kind": "dns", "name": N}``: ``getaddrinfo``.

Prints ``[{"ok": bool, ...}, ...]`` in the same order. Every check has a short timeout: a refused
one fails fast (the firewall resets or answers "prohibited"), a dropped one after the timeout.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import ssl
import sys
from typing import Any

TIMEOUT_S = 4.0


def _connect(host: str, port: int, source: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if source is None and family == socket.AF_INET and not host.replace(".", "").isdigit():
        return socket.create_connection((host, port), timeout=TIMEOUT_S)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    if source is not None:
        sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: a source address this host may not have
        sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def http(check: dict[str, Any]) -> dict[str, Any]:
    name = check["name"]
    sock = _connect(check.get("ip") or name, check["port"], check.get("source"))
    if check.get("tls"):
        context = ssl.create_default_context(cafile=check.get("ca"))
        sock = context.wrap_socket(sock, server_hostname=name)
    path = check.get("path", "/whoami")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = len(body)
    return {"ok": status == 200, "status": status, "body": parsed}


def tcp(check: dict[str, Any]) -> dict[str, Any]:
    sock = _connect(check["ip"], check["port"], check.get("source"))
    sock.settimeout(1.0)
    try:
        said = sock.recv(100).decode(errors="replace")
    except TimeoutError:
        said = ""
    sock.close()
    return {"ok": said.startswith(check["expect"]), "said": said}


def dns(check: dict[str, Any]) -> dict[str, Any]:
    found = sorted({info[4][0] for info in socket.getaddrinfo(check["name"], 80, proto=socket.IPPROTO_TCP)})
    return {"ok": bool(found), "addresses": found}


def run(check: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"http": http, "tcp": tcp, "dns": dns}[check["kind"]](check)
    except Exception as exc:  # every failure is an answer: it is what the test looks at
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    checks = json.loads(sys.argv[1])
    with concurrent.futures.ThreadPoolExecutor(max(len(checks), 1)) as pool:
        print(json.dumps(list(pool.map(run, checks))))


if __name__ == "__main__":
    main()
