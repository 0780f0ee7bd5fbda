"""E2B's sandbox lifecycle webhooks (its documentation's "Sandbox lifecycle webhooks" page), as the
page calls them (``requests`` with the API key), against a real ``sandboxd serve`` driven by the
official SDK, with a real HTTP endpoint on loopback receiving the deliveries and checking them with
the page's own ``verify_webhook_signature``."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Runtime
from e2b import Sandbox
from sandboxd.runtime import webhooks
from sandboxd.runtime.inputs import Body
from sandboxd.runtime.store import SandboxRow, Store
from sandboxd.runtime.webhooks import Deliveries, WebhookStore

CREATED = "sandbox.lifecycle.created"
UPDATED = "sandbox.lifecycle.updated"
KILLED = "sandbox.lifecycle.killed"
ALL_TYPES = [
    CREATED,
    "sandbox.lifecycle.killed",
    "sandbox.lifecycle.paused",
    "sandbox.lifecycle.resumed",
    UPDATED,
    "sandbox.lifecycle.checkpointed",
]


def verify_webhook_signature(secret: str, payload: str, payload_signature: str) -> bool:
    """The documentation page's verification, as written there."""
    hash_bytes = hashlib.sha256((secret + payload).encode("utf-8")).digest()
    expected_signature = base64.b64encode(hash_bytes).decode("utf-8")
    expected_signature = expected_signature.replace("+", "-").replace("/", "_").rstrip("=")
    return expected_signature == payload_signature


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    raw: str
    status: int = 200
    """What the endpoint answered."""

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed


@dataclass
class Endpoint:
    """A webhook endpoint on loopback: records each POST and answers the next scripted status (200
    once the script is used up)."""

    url: str
    received: queue.Queue[Delivery] = field(default_factory=queue.Queue)
    """Each delivery, for :meth:`take`."""
    log: list[Delivery] = field(default_factory=list)
    """Each delivery, kept."""
    statuses: list[int] = field(default_factory=list)
    by_type: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Scripted answers to the deliveries of an event type, in turn: (seconds the receiver takes to
    handle it, status). A delivery is recorded once handled."""

    skipped: list[Delivery] = field(default_factory=list)
    """Deliveries a :meth:`take` passed over, for a later one: concurrent deliveries may arrive in
    any order (CI54: a take of one event dropped the next one wanted)."""

    def take(self, want: Callable[[Delivery], bool], timeout: float = 30) -> Delivery:
        """The first delivery ``want`` accepts, within ``timeout``; those it passes over are kept for
        the next take."""
        for i, delivery in enumerate(self.skipped):
            if want(delivery):
                return self.skipped.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no such delivery arrived")
            try:
                delivery = self.received.get(timeout=left)
            except queue.Empty:
                raise AssertionError("no such delivery arrived") from None
            if want(delivery):
                return delivery
            self.skipped.append(delivery)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server: ThreadingHTTPServer
    box: list[Endpoint] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length).decode()
            target = box[0]
            delivery = Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
            scripted = target.by_type.get(delivery.event["type"])
            took, status = scripted.pop(0) if scripted else (0.0, 0)
            time.sleep(took)
            delivery.status = status or (target.statuses.pop(0) if target.statuses else 200)
            target.log.append(delivery)
            target.received.put(delivery)
            status = delivery.status
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Endpoint(f"http://127.0.0.1:{server.server_address[1]}/webhook"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hooks(e2b_env: Runtime) -> Iterator[tuple[str, dict[str, str]]]:
    """The API's base URL and headers; every webhook registered through them is deleted afterwards
    (the runtime is shared by the session's tests)."""
    headers = {"X-API-Key": e2b_env.api_key}
    base = e2b_env.url
    yield base, headers
    for hook in requests.get(f"{base}/events/webhooks", headers=headers, timeout=30).json():
        requests.delete(f"{base}/events/webhooks/{hook['id']}", headers=headers, timeout=30)


def _register(base: str, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    resp = requests.post(
        f"{base}/events/webhooks", headers={**headers, "Content-Type": "application/json"}, json=fields, timeout=30
    )
    assert resp.status_code == 201, resp.text
    hook: dict[str, Any] = resp.json()
    return hook


def test_the_docs_examples_register_list_get_update_delete(hooks: tuple[str, dict[str, str]]) -> None:
    base, headers = hooks
    E2B_API_KEY = headers["X-API-Key"]
    # Register webhook
    resp = requests.post(
        f"{base}/events/webhooks",
        headers={"X-API-Key": E2B_API_KEY, "Content-Type": "application/json"},
        json={
            "name": "My Sandbox Webhook",
            "url": "https://your-webhook-endpoint.com/webhook",
            "enabled": True,
            "events": [CREATED, UPDATED, KILLED],
            "signatureSecret": "secret-for-event-signature-verification",
        },
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    webhook_id = resp.json()["id"]
    uuid.UUID(webhook_id)
    # List webhooks
    resp = requests.get(f"{base}/events/webhooks", headers={"X-API-Key": E2B_API_KEY}, timeout=30)
    assert resp.status_code == 200
    assert [h["id"] for h in resp.json()] == [webhook_id]
    # Get webhook configuration: the page's fields, and never the secret.
    webhook_config = requests.get(
        f"{base}/events/webhooks/{webhook_id}", headers={"X-API-Key": E2B_API_KEY}, timeout=30
    ).json()
    assert webhook_config["id"] == webhook_id
    assert webhook_config["name"] == "My Sandbox Webhook"
    assert webhook_config["enabled"] is True
    assert webhook_config["url"] == "https://your-webhook-endpoint.com/webhook"
    assert webhook_config["events"] == [CREATED, UPDATED, KILLED]
    uuid.UUID(webhook_config["teamId"])
    assert webhook_config["teamID"] == webhook_config["teamId"]
    assert webhook_config["createdAt"].endswith("Z")
    assert "secret" not in json.dumps(webhook_config).lower().replace("webhook", "")
    # Update webhook configuration: the fields given replace the old ones, the rest stay.
    resp = requests.patch(
        f"{base}/events/webhooks/{webhook_id}",
        headers={"X-API-Key": E2B_API_KEY, "Content-Type": "application/json"},
        json={"url": "https://your-updated-webhook-endpoint.com/webhook", "enabled": False, "events": [CREATED]},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    updated = requests.get(f"{base}/events/webhooks/{webhook_id}", headers=headers, timeout=30).json()
    assert updated["url"] == "https://your-updated-webhook-endpoint.com/webhook"
    assert updated["enabled"] is False and updated["events"] == [CREATED]
    assert updated["name"] == "My Sandbox Webhook" and updated["createdAt"] == webhook_config["createdAt"]
    # Delete webhook
    resp = requests.delete(f"{base}/events/webhooks/{webhook_id}", headers={"X-API-Key": E2B_API_KEY}, timeout=30)
    assert resp.status_code == 200
    gone = requests.get(f"{base}/events/webhooks/{webhook_id}", headers=headers, timeout=30)
    assert gone.status_code == 404 and gone.json()["code"] == 404
    assert requests.get(f"{base}/events/webhooks", headers=headers, timeout=30).json() == []


def test_deliveries_carry_the_events_signed_as_the_docs_verify(
    hooks: tuple[str, dict[str, str]], endpoint: Endpoint
) -> None:
    base, headers = hooks
    secret = "secret-for-event-signature-verification"
    hook = _register(
        base, headers, name="all", url=endpoint.url, events=[CREATED, UPDATED, KILLED], signatureSecret=secret
    )
    sbx = Sandbox.create(timeout=300, metadata={"owner": "webhook-test"})
    sbx.set_timeout(120)
    sbx.kill()

    def of_ours(kind: str) -> Callable[[Delivery], bool]:
        return lambda d: d.event["sandboxId"] == sbx.sandbox_id and d.event["type"] == kind

    created, updated, killed = (endpoint.take(of_ours(kind)) for kind in (CREATED, UPDATED, KILLED))
    for delivery in (created, updated, killed):
        assert delivery.path == "/webhook"
        assert delivery.headers["content-type"] == "application/json"
        assert verify_webhook_signature(secret, delivery.raw, delivery.headers["e2b-signature"])
        assert not verify_webhook_signature("another secret", delivery.raw, delivery.headers["e2b-signature"])
        assert delivery.headers["e2b-webhook-id"] == hook["id"]
        assert delivery.headers["e2b-signature-version"] == "v1"
        uuid.UUID(delivery.headers["e2b-delivery-id"])
        event = delivery.event
        assert event["version"] == "v1" and event["sandboxTemplateId"] == "base"
        assert event["sandboxTeamId"] == hook["teamId"]
        assert event["eventData"]["sandbox_metadata"] == {"owner": "webhook-test"}
    assert len({d.headers["e2b-delivery-id"] for d in (created, updated, killed)}) == 3
    assert "set_timeout" in updated.event["eventData"]
    assert killed.event["eventData"]["kill_reason"] == "killed through the API"
    # The payload is the event as the lifecycle events API answers it.
    listed = requests.get(
        f"{base}/events/sandboxes/{sbx.sandbox_id}", headers=headers, params={"orderAsc": "true"}, timeout=30
    ).json()
    assert [e for e in listed if e["type"] in (CREATED, UPDATED, KILLED)] == [
        created.event,
        updated.event,
        killed.event,
    ]


def _deliveries(base: str, headers: dict[str, str]) -> dict[str, float]:
    """``sandboxd_webhook_deliveries_total`` by result, from the runtime's ``/metrics``."""
    text = requests.get(f"{base}/metrics", headers=headers, timeout=30).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sandboxd_webhook_deliveries_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('result="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


def test_a_failed_delivery_is_sent_again(hooks: tuple[str, dict[str, str]], endpoint: Endpoint) -> None:
    base, headers = hooks
    before = _deliveries(base, headers)
    endpoint.statuses = [503]
    _register(base, headers, name="retry", url=endpoint.url, events=[CREATED], signatureSecret="s3cret")
    sbx = Sandbox.create(timeout=60)
    try:
        first = endpoint.take(lambda d: d.event["sandboxId"] == sbx.sandbox_id)
        again = endpoint.take(lambda d: d.event["sandboxId"] == sbx.sandbox_id)
    finally:
        sbx.kill()
    assert again.raw == first.raw
    assert again.headers["e2b-delivery-id"] != first.headers["e2b-delivery-id"]
    assert verify_webhook_signature("s3cret", again.raw, again.headers["e2b-signature"])
    deadline = time.monotonic() + 10  # counted by the delivery thread once the answer is read
    while True:
        after = _deliveries(base, headers)
        gained = {k: after.get(k, 0) - before.get(k, 0) for k in ("retried", "delivered")}
        if gained["delivered"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert gained["retried"] >= 1 and gained["delivered"] >= 1, gained


def test_disabled_deleted_and_unsubscribed_webhooks_get_nothing(
    hooks: tuple[str, dict[str, str]], endpoint: Endpoint
) -> None:
    base, headers = hooks
    loud = _register(base, headers, name="loud", url=endpoint.url + "?who=loud", signatureSecret="a")
    assert loud["events"] == ALL_TYPES  # none named: every type
    quiet = _register(base, headers, name="off", url=endpoint.url + "?who=off", enabled=False, signatureSecret="b")
    deleted = _register(base, headers, name="gone", url=endpoint.url + "?who=gone", signatureSecret="c")
    assert requests.delete(f"{base}/events/webhooks/{deleted['id']}", headers=headers, timeout=30).status_code == 200
    _register(base, headers, name="kills", url=endpoint.url + "?who=kills", events=[KILLED], signatureSecret="d")
    sbx = Sandbox.create(timeout=60)
    endpoint.take(lambda d: d.path.endswith("who=loud") and d.event["sandboxId"] == sbx.sandbox_id)
    sbx.kill()
    endpoint.take(lambda d: d.path.endswith("who=kills") and d.event["sandboxId"] == sbx.sandbox_id)
    # Everything sent for this sandbox has arrived or is in flight beside the kill's; a moment more.
    time.sleep(1)
    mine = [d for d in endpoint.log if d.event["sandboxId"] == sbx.sandbox_id]
    assert {(d.path.rsplit("=", 1)[1], d.event["type"]) for d in mine} == {
        ("loud", CREATED),
        ("loud", KILLED),
        ("kills", KILLED),
    }
    # Enabled again, it gets the next events.
    resp = requests.patch(f"{base}/events/webhooks/{quiet['id']}", headers=headers, json={"enabled": True}, timeout=30)
    assert resp.status_code == 200 and resp.json()["enabled"] is True
    sbx2 = Sandbox.create(timeout=60)
    sbx2.kill()
    endpoint.take(lambda d: d.path.endswith("who=off") and d.event["sandboxId"] == sbx2.sandbox_id)


@pytest.mark.parametrize("first", [(1.0, 200), (0.0, 503)], ids=["handled-slowly", "retried"])
def test_one_sandboxs_events_reach_a_webhook_in_order(
    hooks: tuple[str, dict[str, str]], endpoint: Endpoint, first: tuple[float, int]
) -> None:
    # The sandbox's "created" is still being handled when its later events come (a receiver that
    # takes its time), or fails once and is sent again 1 s later: either way its "updated" and
    # "killed" are handled after it, not by another delivery thread meanwhile (CI54 saw them race).
    base, headers = hooks
    endpoint.by_type[CREATED] = [first]
    _register(base, headers, name="ordered", url=endpoint.url, events=[CREATED, UPDATED, KILLED], signatureSecret="o")
    sbx = Sandbox.create(timeout=60)
    sbx.set_timeout(30)
    sbx.kill()
    endpoint.take(lambda d: d.event["sandboxId"] == sbx.sandbox_id and d.event["type"] == KILLED)
    mine = [d for d in endpoint.log if d.event["sandboxId"] == sbx.sandbox_id]
    assert [d.event["type"] for d in mine if d.status == 200] == [CREATED, UPDATED, KILLED], [
        (d.event["type"], d.status) for d in mine
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://127.0.0.1:1/x", "signatureSecret": "s"}, "'name' is required"),
        ({"name": "n", "signatureSecret": "s"}, "'url' is required"),
        ({"name": "n", "url": "http://127.0.0.1:1/x"}, "'signatureSecret' is required"),
        ({"name": "n", "url": "ftp://host/x", "signatureSecret": "s"}, "http:// or https://"),
        ({"name": "n", "url": "/relative", "signatureSecret": "s"}, "http:// or https://"),
        ({"name": "n", "url": "http://host:99999/", "signatureSecret": "s"}, "invalid port"),
        ({"name": "n", "url": "http://host/a b", "signatureSecret": "s"}, "spaces"),
        ({"name": "n", "url": "http://h/" + "x" * 3000, "signatureSecret": "s"}, "longer than"),
        ({"name": "n", "url": "http://h/", "signatureSecret": "s", "events": []}, "non-empty array"),
        ({"name": "n", "url": "http://h/", "signatureSecret": "s", "events": ["sandbox.born"]}, "not one of"),
        ({"name": "n", "url": "http://h/", "signatureSecret": "s", "events": [1]}, "not one of"),
        ({"name": "n", "url": "http://h/", "signatureSecret": "s", "enabled": "yes"}, "'enabled' must be a boolean"),
        ({"name": "\x01", "url": "http://h/", "signatureSecret": "s"}, "control characters"),
        ({"name": "n", "url": "http://h/", "signatureSecret": "s\x00"}, "NUL"),
    ],
)
def test_bad_registrations_are_refused_with_a_400_that_names_the_field(
    hooks: tuple[str, dict[str, str]], fields: dict[str, Any], message: str
) -> None:
    base, headers = hooks
    resp = requests.post(f"{base}/events/webhooks", headers=headers, json=fields, timeout=30)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["message"]
    assert requests.get(f"{base}/events/webhooks", headers=headers, timeout=30).json() == []


def test_auth_unknown_ids_and_empty_updates(hooks: tuple[str, dict[str, str]]) -> None:
    base, headers = hooks
    assert requests.get(f"{base}/events/webhooks", timeout=30).status_code == 401
    assert requests.get(f"{base}/events/webhooks", headers={"X-API-Key": "wrong"}, timeout=30).status_code == 401
    missing = f"{base}/events/webhooks/{uuid.uuid4()}"
    for method in ("GET", "DELETE"):
        assert requests.request(method, missing, headers=headers, timeout=30).status_code == 404
    assert requests.patch(missing, headers=headers, json={"enabled": False}, timeout=30).status_code == 404
    hook = _register(base, headers, name="n", url="http://127.0.0.1:9/x", signatureSecret="s")
    one = f"{base}/events/webhooks/{hook['id']}"
    empty = requests.patch(one, headers=headers, json={}, timeout=30)
    assert empty.status_code == 400 and "nothing to update" in empty.json()["message"]
    bad = requests.patch(one, headers=headers, json={"url": "gopher://x"}, timeout=30)
    assert bad.status_code == 400
    assert requests.get(one, headers=headers, timeout=30).json()["url"] == "http://127.0.0.1:9/x"
    assert requests.put(one, headers=headers, json={}, timeout=30).status_code == 405


def test_a_lane_goes_on_once_its_event_is_given_up_and_nothing_is_left_of_it(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    # The delivery threads and a runtime's database, without a runtime: the sandbox's "created"
    # fails every attempt (two here) and is given up; its "killed", held meanwhile, goes next; the
    # lane and the pending count are gone once both are done.
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    hook = hooks.create(Body({"name": "lane", "url": endpoint.url, "signatureSecret": "l"}))
    deliveries = Deliveries(store, hooks)
    deliveries.retry_delays_s = (0.2,)
    deliveries.start()
    endpoint.by_type[CREATED] = [(0.0, 500), (0.0, 500)]
    sandbox_id = "lane" + "0" * 16
    now = time.time()
    try:
        store.insert(
            SandboxRow(sandbox_id, "base", None, "running", now, now + 60, "t" * 32, 1, 1024, 10240), ("created", None)
        )
        store.event(sandbox_id, "killed", "killed through the API")
        endpoint.take(lambda d: d.event["type"] == KILLED)
        assert [(d.event["type"], d.status) for d in endpoint.log] == [(CREATED, 500), (CREATED, 500), (KILLED, 200)]
        deadline = time.monotonic() + 10  # the thread is done with it just after the answer
        while deliveries._pending or deliveries._lanes:
            assert time.monotonic() < deadline, (deliveries._pending, deliveries._lanes)
            time.sleep(0.01)
        assert all(d.headers["e2b-webhook-id"] == hook.id for d in endpoint.log)
    finally:
        deliveries.stop()
        store.close()


def test_a_given_up_delivery_is_logged_without_the_urls_token(
    tmp_path: Path, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    # Webhook URLs carry their tokens in the path (Slack's /services/T/B/secret), the query or the
    # user part. The line a given-up delivery logs names the endpoint by scheme, host and port only.
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    url = endpoint.url.replace("http://", "http://user:pw-secret@") + "/services/path-secret?token=query-secret"
    hooks.create(Body({"name": "token", "url": url, "signatureSecret": "s"}))
    deliveries = Deliveries(store, hooks)
    deliveries.retry_delays_s = (0.05,)
    endpoint.by_type[CREATED] = [(0.0, 500), (0.0, 500)]
    deliveries.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sandboxd.runtime"):
            _sandbox(store, "tok" + "0" * 17)
            deadline = time.monotonic() + 10
            while deliveries._pending:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert [d.status for d in endpoint.log] == [500, 500]  # the token's path was used to deliver
        lines = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "secret" not in lines[0], lines[0]
        assert f"to {webhooks.shown_url(url)} after 2 attempts: HTTP 500" in lines[0]
        assert webhooks.shown_url(url).endswith("/…")
    finally:
        deliveries.stop()
        store.close()


def test_shown_url_keeps_scheme_host_and_port() -> None:
    assert webhooks.shown_url("https://hooks.example.com") == "https://hooks.example.com/"
    assert webhooks.shown_url("https://hooks.example.com:8443/") == "https://hooks.example.com:8443/"
    assert webhooks.shown_url("http://[::1]:9/x?y") == "http://[::1]:9/…"
    assert webhooks.shown_url("http://a@h/") == "http://h/…"


def _deliveries_alone(tmp_path: Path) -> tuple[Store, WebhookStore, Deliveries]:
    """The delivery threads and a runtime's database, without a runtime."""
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    return store, hooks, Deliveries(store, hooks)


def _sandbox(store: Store, sandbox_id: str) -> None:
    now = time.time()
    store.insert(
        SandboxRow(sandbox_id, "base", None, "running", now, now + 60, "t" * 32, 1, 1024, 10240), ("created", None)
    )


def test_a_dead_endpoint_does_not_take_every_other_webhooks_deliveries(
    tmp_path: Path, endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sandbox kept alive by a set_timeout every few seconds, and a webhook whose endpoint is down:
    # its lane drains one event per 71 s (the retries), and so it grows past every bound there is.
    # Before review7 it took all of MAX_PENDING, and every other webhook's events were dropped.
    monkeypatch.setattr(webhooks, "MAX_PENDING", 40)
    monkeypatch.setattr(webhooks, "MAX_PENDING_PER_WEBHOOK", 10, raising=False)
    store, hooks, deliveries = _deliveries_alone(tmp_path)
    hooks.create(Body({"name": "dead", "url": "http://127.0.0.1:9/dead", "signatureSecret": "d"}))
    hooks.create(Body({"name": "alive", "url": endpoint.url, "signatureSecret": "a"}))
    deliveries.retry_delays_s = (30.0,)  # the dead one's first event waits for its retry all along
    deliveries.start()
    try:
        busy = "busy" + "0" * 16
        _sandbox(store, busy)
        endpoint.take(lambda d: d.event["type"] == CREATED)
        for n in range(60):  # each delivered to the live endpoint before the next comes
            store.event(busy, "timeout_set", f"keep-alive {n}")
            endpoint.take(lambda d: d.event["type"] == UPDATED)
        other = "other" + "0" * 15
        _sandbox(store, other)
        endpoint.take(lambda d: d.event["sandboxId"] == other)
        assert sum(d.event["sandboxId"] == busy for d in endpoint.log) == 61
        assert deliveries.dropped == 52  # the dead webhook's, past its 10
    finally:
        deliveries.stop()
        store.close()


def test_four_dead_endpoints_do_not_take_a_healthy_webhooks_deliveries_between_them(
    tmp_path: Path, endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four webhooks whose endpoints are dead, on loopback: two that accept the connection and never
    # answer, two that refuse it. Each holds its share of the queue (a quarter of it), so between them
    # they held all of it, and the healthy webhook's every event was dropped (review7's bound kept one
    # dead webhook from that, not four). It keeps its reserve of the queue whatever the others hold.
    monkeypatch.setattr(webhooks, "MAX_PENDING", 40)
    monkeypatch.setattr(webhooks, "MAX_PENDING_PER_WEBHOOK", 10, raising=False)
    monkeypatch.setattr(webhooks, "RESERVED_PER_WEBHOOK", 2, raising=False)
    silent = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(2)]
    refusing = [socket.socket() for _ in range(2)]  # bound, never listening: a connection is refused
    for sock in refusing:
        sock.bind(("127.0.0.1", 0))
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    deliveries = Deliveries(store, hooks, timeout_s=1.0)
    for n, sock in enumerate(silent + refusing):
        port = sock.getsockname()[1]
        hooks.create(Body({"name": f"dead{n}", "url": f"http://127.0.0.1:{port}/dead", "signatureSecret": "d"}))
    hooks.create(Body({"name": "alive", "url": endpoint.url, "signatureSecret": "a"}))
    deliveries.retry_delays_s = (30.0,)  # the dead ones' first events wait for their retry all along
    deliveries.start()
    try:
        busy = "busy" + "0" * 16
        _sandbox(store, busy)
        endpoint.take(lambda d: d.event["type"] == CREATED)
        for n in range(30):  # each delivered to the live endpoint before the next comes
            store.event(busy, "timeout_set", f"keep-alive {n}")
            endpoint.take(lambda d: d.event["type"] == UPDATED)
        assert sum(d.event["sandboxId"] == busy for d in endpoint.log) == 31
        assert deliveries.dropped == 4 * 21  # each dead webhook's, past its 10
    finally:
        deliveries.stop()
        store.close()
        for sock in silent + refusing:
            sock.close()


def test_a_silent_endpoint_with_many_sandboxes_due_does_not_hold_a_healthy_webhooks_deliveries(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    # An endpoint that accepts connections and never answers, and the events of 12 new sandboxes due
    # at once, a lane each. Every delivery thread was free to take one of the silent webhook's, and
    # held it for the whole timeout (30 s here): the healthy webhook's events arrived a few a round.
    # The silent one has WORKERS - 1 attempts under way at most, so a thread is left for the other.
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    deliveries = Deliveries(store, hooks, timeout_s=30.0)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/silent"
    quiet = hooks.create(Body({"name": "silent", "url": url, "signatureSecret": "s"}))
    hooks.create(Body({"name": "alive", "url": endpoint.url, "signatureSecret": "a"}))
    deliveries.start()
    try:
        ids = [f"sbx{n:02d}" + "0" * 15 for n in range(12)]
        for sandbox_id in ids:
            _sandbox(store, sandbox_id)
        for sandbox_id in ids:  # each well before a single silent attempt could time out
            endpoint.take(lambda d, sandbox_id=sandbox_id: d.event["sandboxId"] == sandbox_id, timeout=15)
        with deliveries._cond:
            assert deliveries._in_flight[quiet.id] == webhooks.IN_FLIGHT_PER_WEBHOOK
    finally:
        deliveries.stop()
        store.close()
        silent.close()


def test_a_webhook_whose_attempts_failed_has_one_under_way_at_a_time(tmp_path: Path) -> None:
    # The same silent endpoint, timing out at 0.5 s: its first round has its share under way; once
    # they have failed, it has one at a time (a healthy answer would give it its share back).
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    deliveries = Deliveries(store, hooks, timeout_s=0.5)
    deliveries.retry_delays_s = (0.1, 0.1, 0.1)
    quiet = hooks.create(
        Body({"name": "silent", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/", "signatureSecret": "s"})
    )
    deliveries.start()
    try:
        for n in range(12):
            _sandbox(store, f"sbx{n:02d}" + "0" * 15)
        seen: list[tuple[float, int]] = []  # (seconds since the creates, attempts under way)
        start = time.monotonic()
        while (now := time.monotonic() - start) < 3:
            with deliveries._cond:
                seen.append((now, deliveries._in_flight.get(quiet.id, 0)))
            time.sleep(0.01)
        first = [n for at, n in seen if at < 0.4]  # before any attempt could time out
        later = [n for at, n in seen if at > 1.5]
        assert max(first) > webhooks.IN_FLIGHT_FAILING, first
        assert max(later) == webhooks.IN_FLIGHT_FAILING, later
    finally:
        deliveries.stop()
        store.close()
        silent.close()


def test_webhooks_deleted_and_made_again_do_not_take_the_queue_past_twice_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each webhook may hold its reserve past MAX_PENDING, and there are at most MAX_WEBHOOKS of them:
    # never more than twice MAX_PENDING pending, said the bound. But a deleted webhook's deliveries
    # stay pending until its lane drains (its head in flight to a silent endpoint, then waiting for
    # its retry), and the webhooks made in its place have reserves of their own: three rounds of
    # "make five, fill, delete them" held three times the reserves past MAX_PENDING (review8).
    monkeypatch.setattr(webhooks, "MAX_PENDING", 40)
    monkeypatch.setattr(webhooks, "MAX_PENDING_PER_WEBHOOK", 10)
    monkeypatch.setattr(webhooks, "MAX_WEBHOOKS", 5)
    monkeypatch.setattr(webhooks, "RESERVED_PER_WEBHOOK", 8)
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts, never answers
    store = Store(tmp_path / "sandboxd.db")
    hooks = WebhookStore(store.db)
    deliveries = Deliveries(store, hooks, timeout_s=30.0)
    deliveries.retry_delays_s = (30.0,)
    deliveries.start()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/dead"
    try:
        busy = "busy" + "0" * 16
        _sandbox(store, busy)
        most = 0
        for round_ in range(3):
            made = [
                hooks.create(Body({"name": f"dead{round_}-{n}", "url": url, "signatureSecret": "d"})) for n in range(5)
            ]
            for n in range(20):
                store.event(busy, "timeout_set", f"keep-alive {round_}-{n}")
                most = max(most, deliveries._pending)
            for hook in made:
                hooks.delete(hook.id)
        assert most <= 2 * webhooks.MAX_PENDING, f"{most} deliveries pending at once"
    finally:
        deliveries.stop()
        store.close()
        silent.close()


def test_one_busy_sandbox_keeps_its_last_events_within_its_lanes_bound(
    tmp_path: Path, endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sandbox's "created" is handled slowly; 10 "updated" and its "killed" come meanwhile, past
    # a lane's bound of 3: the oldest waiting are dropped, its "killed" is not, and the order holds.
    monkeypatch.setattr(webhooks, "MAX_LANE", 3, raising=False)
    store, hooks, deliveries = _deliveries_alone(tmp_path)
    hooks.create(Body({"name": "lane", "url": endpoint.url, "signatureSecret": "l"}))
    endpoint.by_type[CREATED] = [(1.0, 200)]
    deliveries.start()
    try:
        busy = "busy" + "0" * 16
        _sandbox(store, busy)
        for n in range(10):
            store.event(busy, "timeout_set", f"update {n}")
        store.event(busy, "killed", "killed through the API")
        endpoint.take(lambda d: d.event["type"] == KILLED)
        assert [d.event["type"] for d in endpoint.log] == [CREATED, UPDATED, UPDATED, KILLED]
        assert deliveries.dropped == 8
    finally:
        deliveries.stop()
        store.close()
