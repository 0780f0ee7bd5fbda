"""Hostile input the runtime must bound and refuse: what a sandbox's server answers the proxy (a
header line that never ends, framings the runtime's server would choke on), and what a client sends
(pipelined requests by the thousand, an Upgrade whose target is no URL, network rules and webhook
URLs no request can carry). Found by a review of stop 46; each test failed before its fix."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox
from test_runtime_proxy import relay_once

# ----------------------------------------------------------------------------- proxy, unit level


def test_an_interpreter_whose_health_line_never_ends_does_not_fail_the_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The code interpreter's ``/health`` is read by the create, from a server inside the sandbox (a
    template's own, or one a paused sandbox's root replaced). A status line past asyncio's 64 KiB
    line limit raised ``ValueError`` out of ``interpreter_ready`` and so out of the create; "never
    fails the create" says it waits out its time and answers False, as for a server that is slow."""
    from sandboxd.runtime import agent_client

    monkeypatch.setattr(agent_client, "INTERPRETER_READY_S", 0.5)
    answered = []

    async def open_socket(port: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.sendall(b"HTTP/1.1 200 " + b"a" * (80 << 10))  # no line end within asyncio's limit
        answered.append(theirs)
        ours.setblocking(False)
        return ours

    try:
        assert asyncio.run(agent_client.interpreter_ready(open_socket, "sbx")) is False
    finally:
        for sock in answered:
            sock.close()
    assert answered, "the interpreter was never asked"


def test_a_sandbox_answer_whose_header_never_ends_is_refused_at_the_head_limit() -> None:
    """A sandbox's server that starts a header line and never ends it: the proxy must stop at
    ``MAX_RESPONSE_HEAD`` (64 KiB) and answer 502, as it does for a head of many headers. It read on:
    httptools gathers a header's name and value across reads (``bytes +=``, so quadratic too) and
    calls ``on_header``, where the limit is checked, only once the line ends, so the runtime's memory
    grew by all the sandbox sent (found: 64 MiB sent, all of it read, ~130 MiB of the runtime's memory)."""
    total = 64 << 20

    result: dict[str, Any] = {}

    def flood(conn: socket.socket) -> None:
        sent = 0
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Flood: ")
            piece = b"a" * (1 << 20)
            while sent < total:
                conn.sendall(piece)
                sent += len(piece)
            result["all_sent"] = True
            time.sleep(1)  # then the end of the connection: the proxy's only way out today
        except OSError:
            pass
        result["sent"] = sent

    tracemalloc.start()
    try:
        sent = relay_once(flood)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [502], sent
    assert not result.get("all_sent"), f"the proxy read all {total >> 20} MiB of one header line"
    assert peak < 16 << 20, f"the proxy held {peak >> 20} MiB for one sandbox answer's head"


# ------------------------------------------------------------------------- proxy, real runtime

CANNED_SERVER = r"""
import base64, socket, sys, threading

ANSWER = base64.b64decode(sys.argv[2])

def answer(conn):
    try:
        while conn.recv(65536):
            conn.sendall(ANSWER)
    except OSError:
        pass
    conn.close()

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
while True:
    threading.Thread(target=answer, args=(srv.accept()[0],), daemon=True).start()
"""
"""A sandbox server that answers every request on a connection with the same bytes (``argv[2]``,
base64), whatever they are."""


@pytest.fixture(scope="module")
def canned(e2b_env: Runtime) -> Iterator[tuple[Runtime, Sandbox]]:
    """One sandbox of the shared runtime for the canned servers, killed afterwards."""
    sbx = Sandbox.create()
    yield e2b_env, sbx
    sbx.kill()


@pytest.fixture(scope="module")
def e2b_env(runtime: Runtime) -> Iterator[Runtime]:  # module-scoped: the canned sandbox outlives one test
    mp = pytest.MonkeyPatch()
    for name, value in runtime.env().items():
        mp.setenv(name, value)
    mp.delenv("E2B_DEBUG", raising=False)
    yield runtime
    mp.undo()


def _serve_canned(sbx: Sandbox, port: int, answer: bytes) -> None:
    sbx.files.write(f"/tmp/canned-{port}.py", CANNED_SERVER)
    sbx.commands.run(
        f"python3 /tmp/canned-{port}.py {port} {base64.b64encode(answer).decode()}", background=True, timeout=0
    )
    deadline = time.monotonic() + 20
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\""
    while time.monotonic() < deadline:
        if sbx.commands.run(f"{probe} && echo up || true").stdout.strip() == "up":
            return
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} in the sandbox never listened")


def _get_through_proxy(runtime: Runtime, sandbox_id: str, port: int) -> bytes:
    """A raw GET through the runtime's proxy; all the bytes the client got until the end (or 10 s)."""
    with socket.create_connection(("127.0.0.1", runtime.port), timeout=10) as client:
        client.sendall(
            f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nE2b-Sandbox-Id: {sandbox_id}\r\n"
            f"E2b-Sandbox-Port: {port}\r\n\r\n".encode()
        )
        received = b""
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                received += chunk
    return received


@pytest.mark.parametrize(
    ("port", "answer", "expected"),
    [
        # RFC 9110 §8.6 lets a 304 carry the Content-Length a 200 would have: no body follows.
        (8301, b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: "x"\r\n\r\n', b"HTTP/1.1 304"),
        (8302, b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", b"HTTP/1.1 204"),
        # A second answer in the same segment as the first (its Content-Length honoured): the client
        # gets the first answer, whole, and nothing of the second.
        (
            8303,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nX",
            b"HTTP/1.1 200",
        ),
    ],
    ids=["304-with-length", "204-with-length", "two-answers-in-one-read"],
)
def test_a_sandbox_answer_that_uvicorn_would_refuse_to_frame_still_reaches_the_client(
    canned: tuple[Runtime, Sandbox], port: int, answer: bytes, expected: bytes
) -> None:
    """The proxy relays the sandbox's headers (``Content-Length`` among them) and body as the parser
    gave them; the runtime's server then checks the body against that ``Content-Length``. A 304 or
    204 with a length and no body (legal HTTP), or two answers in one read (the second's head with the
    first's body), raised ``RuntimeError`` in the server's ``send``: "Exception in ASGI application"
    with a traceback in the runtime's log, and the client's connection closed with no byte of an
    answer (the head was held for the body that follows)."""
    runtime, sbx = canned
    _serve_canned(sbx, port, answer)
    logged_before = runtime.log.read_text(errors="replace").count("Exception in ASGI application")
    received = _get_through_proxy(runtime, sbx.sandbox_id, port)
    time.sleep(0.2)
    logged = runtime.log.read_text(errors="replace").count("Exception in ASGI application") - logged_before
    assert received.startswith(expected), received[:300]
    assert logged == 0, "the sandbox's answer raised in the runtime's server"
    if expected == b"HTTP/1.1 200":
        assert received.endswith(b"\r\n\r\nhi"), received[:300]


def test_an_upgrade_for_a_sandbox_whose_url_the_parser_refuses_is_answered_400(runtime: Runtime) -> None:
    """An Upgrade request for a sandbox is taken over before uvicorn parses its URL, and
    ``RuntimeProtocol.handle_websocket_upgrade`` parses it (``httptools.parse_url``) unguarded, inside
    ``data_received``: a target llhttp lets through but ``parse_url`` refuses (a port past 65535)
    escaped as an exception of the protocol's callback: no answer (the connection dropped) and an
    error with a traceback in the log for each such request, no API key needed."""
    with socket.create_connection(("127.0.0.1", runtime.port), timeout=10) as client:
        client.sendall(
            b"GET http://a:99999/ HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"E2b-Sandbox-Id: abcdefghij0123456789\r\n\r\n"
        )
        received = b""
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 400"), received[:300]


# -------------------------------------------------------------------------------- control plane


@pytest.mark.parametrize(
    ("network", "names"),
    [
        # Python's `$` matches before a final newline: `_TOKEN.match` and `_DNS_NAME.match` took these.
        ({"rules": {"example.com": [{"transform": {"headers": {"X-Foo\n": "v"}}}]}}, "X-Foo"),
        ({"rules": {"example.com\n": [{"transform": {"headers": {"X-Foo": "v"}}}]}}, "example.com"),
        ({"allowOut": ["example.com\n"], "denyOut": ["0.0.0.0/0"]}, "example.com"),
        # A header value the egress proxy cannot encode (a lone surrogate), unlike every other string field.
        ({"rules": {"example.com": [{"transform": {"headers": {"X-Foo": "\ud800"}}}]}}, "X-Foo"),
    ],
    ids=["header-name-newline", "rule-domain-newline", "allow-out-newline", "header-value-surrogate"],
)
def test_network_settings_no_http_request_can_carry_are_400s(runtime: Runtime, network: Any, names: str) -> None:
    body = json.dumps({"templateID": "base", "network": network}).encode()
    with httpx.Client(base_url=runtime.url, headers={"X-API-KEY": runtime.api_key}, timeout=120) as api:
        answer = api.post("/sandboxes", content=body, headers={"Content-Type": "application/json"})
        if answer.status_code == 201:
            api.delete(f"/sandboxes/{answer.json()['sandboxID']}")
    assert answer.status_code == 400, answer.text
    assert names in answer.json()["message"], answer.text


def test_pipelined_requests_cost_the_runtime_memory_in_proportion_to_what_it_answers(
    start_runtime: Callable[..., Runtime],
) -> None:
    """One read of pipelined requests is parsed whole: uvicorn makes a request cycle (scope, headers,
    an event) for each request in it and queues them all (``HttpToolsProtocol.pipeline``) behind the
    one being answered, and the head-size cap counts each request's head alone. A client that sends
    256 KiB of ``GET /health`` (~8,000 requests, no API key) and reads nothing held ~24 MiB of the
    runtime per connection, for as long as the connection stays open (found: 40 connections, 10 MiB
    sent, the runtime's RSS from 59 to 1006 MiB)."""
    import psutil

    runtime = start_runtime()
    process = psutil.Process(runtime.process.pid)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    blob = request * ((256 << 10) // len(request))
    time.sleep(0.5)
    before = process.memory_info().rss
    clients = []
    try:
        for _ in range(8):
            client = socket.create_connection(("127.0.0.1", runtime.port), timeout=10)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(blob)
            clients.append(client)
        time.sleep(3)
        grown = process.memory_info().rss - before
    finally:
        for client in clients:
            client.close()
    assert grown < 32 << 20, f"8 clients' 2 MiB of pipelined requests grew the runtime by {grown >> 20} MiB"


def test_a_webhook_url_whose_host_cannot_be_encoded_is_a_400(runtime: Runtime) -> None:
    """``check_url`` takes any host ``urlsplit`` finds: ``a..b`` (an empty DNS label) was stored (201),
    and every delivery to it then failed in ``http.client``'s IDNA encoding of the host, with a
    traceback in the log per attempt (``log.exception``), for every lifecycle event, for good."""
    body = {"name": "bad host", "url": "http://a..b/hook", "signatureSecret": "s"}
    with httpx.Client(base_url=runtime.url, headers={"X-API-KEY": runtime.api_key}, timeout=30) as api:
        answer = api.post("/events/webhooks", json=body)
        if answer.status_code == 201:
            api.delete(f"/events/webhooks/{answer.json()['id']}")
    assert answer.status_code == 400, answer.text
    assert "url" in answer.json()["message"], answer.text
