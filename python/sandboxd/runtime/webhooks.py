"""E2B's sandbox lifecycle webhooks (its documentation's "Sandbox lifecycle webhooks" page): URLs the
runtime POSTs each lifecycle event to, as it happens.

Control plane, with ``X-API-KEY`` like the rest of the API:

* ``POST /events/webhooks`` ``{"name", "url", "enabled"?, "events"?, "signatureSecret"}`` -> 201 ``Webhook``;
* ``GET /events/webhooks`` -> 200 ``[Webhook]``, oldest first;
* ``GET /events/webhooks/{id}`` -> 200 ``Webhook``;
* ``PATCH /events/webhooks/{id}`` (any of the fields above: those given replace the old) -> 200 ``Webhook``;
* ``DELETE /events/webhooks/{id}`` -> 200 ``Webhook`` (the one deleted).

``Webhook`` is ``{id, teamId, name, createdAt, enabled, url, events}``, never the secret (E2B's page
spells the team ``teamID`` in its older revision and ``teamId`` since: both are there). ``events``
are E2B's lifecycle types (:data:`.lifecycle.TYPES`); left out, a webhook gets all of them.

**Delivery.** Each event a webhook subscribes to is POSTed to its URL as the lifecycle events API
answers it (:func:`.lifecycle.answer`; the payload of E2B's page) with the headers E2B sends:
``e2b-webhook-id``, ``e2b-delivery-id`` (new for each attempt), ``e2b-signature-version: v1`` and
``e2b-signature``: SHA-256 of the secret followed by the body, in unpadded URL-safe base64, which the
page's ``verify_webhook_signature`` checks. A 2xx answer delivers it; anything else (another status,
a refused connection, no answer within :data:`TIMEOUT_S`) is tried again after each of
:data:`RETRY_DELAYS_S`, then given up and logged. Redirects are not followed.

**Order.** One sandbox's events reach one webhook in the order they happened: each is sent once the
one before it is delivered or given up (a *lane* per webhook and sandbox). E2B's page promises no
order, but a receiver that keeps a sandbox's state from its events would otherwise record a
``killed`` before its ``created`` whenever two delivery threads race (CI54 saw it), or whenever the
``created`` is retried: without lanes a retry arrives after every later event of its sandbox. A lane
waits for its retries too (1 + 10 + 60 s at most, and a timeout per attempt), which costs only that
sandbox's later events at that webhook: an endpoint that failed one likely fails the next anyway,
and a lane holds at most one delivery thread, so a dead endpoint no longer takes all of them for one
busy sandbox. Nor for many: a webhook has at most :data:`IN_FLIGHT_PER_WEBHOOK` attempts under way,
one once an attempt of it failed (:data:`IN_FLIGHT_FAILING`). Other sandboxes and other webhooks go
on meanwhile.

Nothing of it runs on the event loop but the hand-off: :meth:`Deliveries.offer` (called by the
store for each event it commits) only looks up the event's subscribers in memory and queues a job.
Worker threads read the event through connections of their own and send it. The queue is bounded
(:data:`MAX_PENDING`, past which each webhook still has its :data:`RESERVED_PER_WEBHOOK`; of it one
webhook's :data:`MAX_PENDING_PER_WEBHOOK` and one lane's :data:`MAX_LANE`; past them, deliveries are
dropped and logged), as is what is read of an answer, so a slow or hostile endpoint costs at most a
worker's time until its timeout.

Kept in the runtime's database (table ``webhooks``; its data dir is root's, ``0700``), so a webhook
outlives a restart. With ``--backend kubernetes`` the API is not served (the lifecycle events come from
the cluster's Pod events there, which no delivery watches yet).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import http.client
import itertools
import json
import logging
import re
import sqlite3
import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sandboxd import __version__
from sandboxd.agent.asgi import Receive, Scope, Send, send_json

from . import lifecycle
from .api import Route, iso, serve_routes
from .errors import ApiError
from .inputs import Body, text
from .observe.metrics import RuntimeMetrics
from .store import Store

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id          TEXT PRIMARY KEY,   -- a UUID
    name        TEXT NOT NULL,
    url         TEXT NOT NULL,
    enabled     INTEGER NOT NULL,
    events      TEXT NOT NULL,      -- JSON list of lifecycle event types
    secret      TEXT NOT NULL,
    created_at  REAL NOT NULL
);
"""

MAX_WEBHOOKS = 100
"""Webhooks a runtime keeps at most (each event is a POST to each of its subscribers)."""

MAX_NAME_CHARS = 256
MAX_URL_CHARS = 2048
MAX_SECRET_CHARS = 1024

TIMEOUT_S = 10.0
"""For the connection, and for each read of the answer."""

RETRY_DELAYS_S = (1.0, 10.0, 60.0)
"""Waits before the second, third and fourth attempt: an endpoint down for a restart gets the event."""

MAX_PENDING = 10_000
"""Deliveries queued or waiting for a retry at most, but for each webhook's
:data:`RESERVED_PER_WEBHOOK`."""

MAX_PENDING_PER_WEBHOOK = MAX_PENDING // 4
"""Of which one webhook's at most: a dead endpoint's lanes drain at one delivery a lane per
``sum(RETRY_DELAYS_S)`` and 4 timeouts (71 s or more), so a sandbox kept alive by a ``set_timeout``
every few seconds (an ``updated`` each) would otherwise grow its lane until every webhook of the
runtime lost its events to :data:`MAX_PENDING` (``review7``)."""

RESERVED_PER_WEBHOOK = MAX_PENDING // MAX_WEBHOOKS
"""Deliveries a webhook may have pending whatever the others hold, :data:`MAX_PENDING` reached or
not: four dead endpoints (each up to :data:`MAX_PENDING_PER_WEBHOOK`) held all of
:data:`MAX_PENDING` between them, and a healthy webhook's every event was dropped. A webhook's share
of the queue is so never less than this; a share of whoever holds any at the time would not do: the
webhooks that came while the queue was full would each take a share of their own, and some dozen
dead ones would leave none. All the reserves together are :data:`MAX_PENDING` again, so never more
than twice it are pending: a bound :meth:`Deliveries.offer` enforces as such, as the webhooks deleted
while their deliveries are pending (until their lanes drain, a minute and more for a silent endpoint)
and the ones made in their place would otherwise each hold a reserve (``review8``); a healthy
webhook's reserve holds as long as the webhooks are not deleted and made again faster than that."""

MAX_LANE = 100
"""Deliveries waiting in one lane at most; past it the oldest waiting one is dropped (not the new
one: a receiver keeping a sandbox's state wants its ``killed`` more than its 101st ``updated``), so
one busy sandbox does not take its webhook's share from the others."""

WORKERS = 8
"""Threads sending (started with the first delivery)."""

IN_FLIGHT_PER_WEBHOOK = WORKERS - 1
"""Attempts one webhook has under way at most: every thread was free to take the next due delivery,
so an endpoint that accepts a connection and never answers, with events of a few sandboxes due (a
lane each), held every thread for its :data:`TIMEOUT_S`, and a healthy webhook's deliveries waited
behind it, round after round. A delivery due while its webhook has its share under way waits
aside (``Deliveries._parked``) and is due again as one of them ends."""

IN_FLIGHT_FAILING = 1
"""The same for a webhook whose last attempt failed (refused, timed out, not a 2xx): a dead
endpoint, likely, which so takes one thread at a time; a healthy answer gives it its share back.
Between them, :data:`WORKERS` - 1 dead endpoints leave a thread for the rest."""

MAX_ANSWER_BYTES = 64 << 10
"""What is read of an endpoint's answer (then the connection is closed)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    name: str
    url: str
    enabled: bool
    events: tuple[str, ...]
    secret: str
    created_at: float


def check_url(value: Any) -> str:
    """An absolute ``http``/``https`` URL with a host: 400 otherwise."""
    url = text(value, "url", MAX_URL_CHARS)
    if _CONTROL.search(url) or " " in url:
        raise ApiError(400, "'url' must not contain spaces or control characters")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ApiError(400, f"'url' has an invalid port: {url[:200]}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"'url' must be an absolute http:// or https:// URL, got {url[:200]!r}")
    # What a delivery's request needs (http.client): a host that encodes for DNS, and an ASCII target.
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ApiError(400, f"'url' has a host that is not a DNS name: {parts.hostname[:200]!r}") from None
    if not (parts.path + parts.query + parts.fragment).isascii():
        raise ApiError(400, "'url' must have an ASCII path and query: percent-encode the rest")
    return url


def shown_url(url: str) -> str:
    """``url`` as a log line may show it: its scheme, host and port. A webhook's path, query and user
    part often carry its token (Slack's ``/services/T/B/secret``, ``?token=``), and logs travel further
    than the API key that could read the webhook back."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    rest = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username) else "/"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{rest}"


def check_events(value: Any) -> tuple[str, ...]:
    """A non-empty list of E2B's lifecycle event types, each once."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'events' must be a non-empty array of event types ({', '.join(lifecycle.TYPES)})")
    events: list[str] = []
    for item in value:
        if item not in lifecycle.TYPES:
            shown = json.dumps(item)[:80] if isinstance(item, str | int | float | bool) else "a non-string"
            raise ApiError(400, f"'events': {shown} is not one of {', '.join(lifecycle.TYPES)}")
        if item not in events:
            events.append(item)
    return tuple(events)


def _name(value: Any) -> str:
    name = text(value, "name", MAX_NAME_CHARS).strip()
    if not name or _CONTROL.search(name):
        raise ApiError(400, "'name' must be a non-empty string without control characters")
    return name


def _secret(value: Any) -> str:
    secret = text(value, "signatureSecret", MAX_SECRET_CHARS, allow_nul=False)
    if not secret:
        raise ApiError(400, "'signatureSecret' must be a non-empty string: deliveries are signed with it")
    return secret


def signature(secret: str, body: bytes) -> str:
    """``e2b-signature``: SHA-256 of the secret and the body, unpadded URL-safe base64 (E2B's page)."""
    digest = hashlib.sha256(secret.encode() + body).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def answer(hook: Webhook) -> dict[str, Any]:
    """A webhook as the API answers it: everything but the secret."""
    return {
        "id": hook.id,
        "teamId": lifecycle.TEAM_ID,
        "teamID": lifecycle.TEAM_ID,
        "name": hook.name,
        "createdAt": iso(hook.created_at),
        "enabled": hook.enabled,
        "url": hook.url,
        "events": list(hook.events),
    }


class WebhookStore:
    """The webhooks, in the runtime's database (its connection, on the event loop thread), with the
    enabled ones also in memory by event type, for :meth:`subscribers`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        self._by_type: dict[str, list[Webhook]] = {}
        self._enabled: dict[str, Webhook] = {}
        self._refresh()

    def create(self, body: Body) -> Webhook:
        fields = body.fields
        for required in ("name", "url", "signatureSecret"):
            if fields.get(required) in (None, ""):
                raise ApiError(400, f"'{required}' is required")
        events = check_events(fields["events"]) if fields.get("events") is not None else lifecycle.TYPES
        hook = Webhook(
            id=str(uuid.uuid4()),
            name=_name(fields["name"]),
            url=check_url(fields["url"]),
            enabled=body.boolean("enabled", True),
            events=events,
            secret=_secret(fields["signatureSecret"]),
            created_at=time.time(),
        )
        (count,) = self.db.execute("SELECT COUNT(*) FROM webhooks").fetchone()
        if count >= MAX_WEBHOOKS:
            raise ApiError(409, f"this runtime keeps at most {MAX_WEBHOOKS} webhooks: delete one first")
        self._write(hook, insert=True)
        return hook

    def get(self, hook_id: str) -> Webhook:
        row = self.db.execute(
            "SELECT id, name, url, enabled, events, secret, created_at FROM webhooks WHERE id = ?", (hook_id,)
        ).fetchone()
        if row is None:
            raise ApiError(404, f"webhook '{hook_id[:64]}' not found")
        return _webhook(row)

    def all(self) -> list[Webhook]:
        rows = self.db.execute(
            "SELECT id, name, url, enabled, events, secret, created_at FROM webhooks ORDER BY created_at, id"
        ).fetchall()
        return [_webhook(r) for r in rows]

    def update(self, hook_id: str, body: Body) -> Webhook:
        """The fields given replace the old ones (E2B's page: "replace the previous configuration
        fields with provided fields")."""
        old = self.get(hook_id)
        fields = body.fields
        known = {"name", "url", "enabled", "events", "signatureSecret"}
        if not known & fields.keys():
            raise ApiError(400, f"nothing to update: give any of {', '.join(sorted(known))}")
        hook = Webhook(
            id=old.id,
            name=_name(fields["name"]) if fields.get("name") is not None else old.name,
            url=check_url(fields["url"]) if fields.get("url") is not None else old.url,
            enabled=body.boolean("enabled", old.enabled),
            events=check_events(fields["events"]) if fields.get("events") is not None else old.events,
            secret=_secret(fields["signatureSecret"]) if fields.get("signatureSecret") is not None else old.secret,
            created_at=old.created_at,
        )
        self._write(hook, insert=False)
        return hook

    def delete(self, hook_id: str) -> Webhook:
        hook = self.get(hook_id)
        self.db.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,))
        self._refresh()
        return hook

    def subscribers(self, event_type: str) -> list[Webhook]:
        """The enabled webhooks that subscribe to ``event_type`` (from memory)."""
        return self._by_type.get(event_type, [])

    def enabled(self, hook_id: str) -> Webhook | None:
        """The webhook ``hook_id`` as it is now, if it exists and is enabled (from memory: for the
        delivery threads, which take the dict the loop last put here)."""
        return self._enabled.get(hook_id)

    def _write(self, hook: Webhook, insert: bool) -> None:
        values = (hook.name, hook.url, int(hook.enabled), json.dumps(hook.events), hook.secret, hook.id)
        if insert:
            self.db.execute(
                "INSERT INTO webhooks (name, url, enabled, events, secret, id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*values, hook.created_at),
            )
        else:
            self.db.execute(
                "UPDATE webhooks SET name = ?, url = ?, enabled = ?, events = ?, secret = ? WHERE id = ?", values
            )
        self._refresh()

    def _refresh(self) -> None:
        by_type: dict[str, list[Webhook]] = {}
        enabled = {hook.id: hook for hook in self.all() if hook.enabled}
        for hook in enabled.values():
            for event_type in hook.events:
                by_type.setdefault(event_type, []).append(hook)
        self._by_type, self._enabled = by_type, enabled


def _webhook(row: tuple[Any, ...]) -> Webhook:
    hook_id, name, url, enabled, events, secret, created_at = row
    return Webhook(str(hook_id), str(name), str(url), bool(enabled), tuple(json.loads(events)), str(secret), created_at)


@dataclass(slots=True)
class _Event:
    """One event to deliver, shared by the jobs of every webhook that subscribes to it: its payload
    is read and encoded once, by whichever delivery thread first needs it."""

    seq: int
    """Its ``events.seq``."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    body: bytes | None = None
    read: bool = False
    """Whether ``body`` was read (None then: the event is gone, retention)."""


@dataclass(slots=True)
class _Job:
    event: _Event
    hook_id: str
    """Sent as the webhook is at each attempt: a retry goes to a URL mended meanwhile, and none is
    made once it is deleted or disabled."""
    sandbox_id: str
    """With ``hook_id``, its lane: the jobs sent one after another, in order (:class:`Deliveries`)."""
    attempt: int = 0


class Deliveries:
    """Sends events to their webhooks from :data:`WORKERS` threads."""

    def __init__(
        self, store: Store, hooks: WebhookStore, metrics: RuntimeMetrics | None = None, timeout_s: float = TIMEOUT_S
    ) -> None:
        self.store = store
        self.hooks = hooks
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.retry_delays_s = RETRY_DELAYS_S
        self._due: list[tuple[float, int, _Job]] = []
        """(when, tie-breaker, job): a heap, of at most one job a lane."""
        self._lanes: dict[tuple[str, str], deque[_Job]] = {}
        """(webhook, sandbox) -> the jobs waiting behind the one due or in flight; a lane is here while
        it has one, and gone once its last is done."""
        self._pending = 0
        """Jobs due or waiting in a lane (bounded by :data:`MAX_PENDING` and the reserves)."""
        self._hook_pending: dict[str, int] = {}
        """The same a webhook, while it has any (each bounded by :data:`MAX_PENDING_PER_WEBHOOK`)."""
        self._order = itertools.count()
        self._in_flight: dict[str, int] = {}
        """Attempts under way, by webhook (:data:`IN_FLIGHT_PER_WEBHOOK`)."""
        self._failing: set[str] = set()
        """Webhooks whose last attempt failed (:data:`IN_FLIGHT_FAILING`)."""
        self._parked: dict[str, deque[tuple[float, int, _Job]]] = {}
        """Due entries taken off the heap while their webhook had its share under way: while a
        webhook has any, it has an attempt under way, whose end puts them back."""
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._tls: ssl.SSLContext | None = None
        """Made with the first https delivery (it loads the system's CA certificates)."""
        self.dropped = 0
        """Deliveries not queued because :data:`MAX_PENDING` (or a webhook's or lane's share) were."""

    def start(self) -> None:
        """Listen to the store's events (the threads start with the first delivery)."""
        self.store.listeners.append(self.offer)

    def stop(self) -> None:
        """Stop the workers; what is queued is not sent. A delivery in flight is not waited for past
        a second (the threads are daemons: they end with the process)."""
        if self.offer in self.store.listeners:
            self.store.listeners.remove(self.offer)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + 1
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def offer(self, seq: int, sandbox_id: str, kind: str) -> None:
        """A committed event (the store's listener, on the event loop): queued for each webhook
        that subscribes to its type."""
        event_type = lifecycle.KINDS.get(kind)
        hooks = self.hooks.subscribers(event_type) if event_type is not None else []
        if not hooks:
            return
        event = _Event(seq)
        with self._cond:
            if not self._threads and not self._stopping:
                for n in range(WORKERS):
                    thread = threading.Thread(target=self._work, name=f"webhooks-{n}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            for hook in hooks:
                job = _Job(event, hook.id, sandbox_id)
                lane = self._lanes.get((hook.id, sandbox_id))
                if lane is not None and len(lane) >= MAX_LANE:
                    gone = lane.popleft()  # the oldest waiting: the new one takes its place
                    self._drop(hook.id, gone.event.seq, f"{MAX_LANE} of its sandbox's are waiting")
                    lane.append(job)
                    continue
                held = self._hook_pending.get(hook.id, 0)
                # The last clause is the bound the reserves imply (MAX_WEBHOOKS of them past
                # MAX_PENDING), made a bound of its own: a deleted webhook's deliveries stay pending
                # until its lanes drain, and the webhooks made in its place bring reserves of their
                # own, so without it churn grew the queue a round of reserves at a time (review8).
                if (
                    held >= MAX_PENDING_PER_WEBHOOK
                    or (self._pending >= MAX_PENDING and held >= RESERVED_PER_WEBHOOK)
                    or self._pending >= MAX_PENDING + MAX_WEBHOOKS * RESERVED_PER_WEBHOOK
                ):
                    self._drop(hook.id, seq, f"{held} of its deliveries and {self._pending} in all are pending")
                    continue
                self._pending += 1
                self._hook_pending[hook.id] = held + 1
                if lane is not None:  # an earlier event of the sandbox is still on its way there
                    lane.append(job)
                    continue
                self._lanes[hook.id, sandbox_id] = deque()
                heapq.heappush(self._due, (0.0, next(self._order), job))
            self._cond.notify(len(hooks))

    def _drop(self, hook_id: str, seq: int, why: str) -> None:
        """A delivery not made, counted (the caller holds ``_cond``)."""
        self.dropped += 1
        self._count("dropped")
        if self.dropped % 1000 == 1:  # the first, then one line a thousand
            log.warning("webhook %s: event %d not delivered: %s (%d dropped so far)", hook_id, seq, why, self.dropped)

    def _share(self, hook_id: str) -> int:
        return IN_FLIGHT_FAILING if hook_id in self._failing else IN_FLIGHT_PER_WEBHOOK

    def _next(self) -> _Job | None:
        """The next due job whose webhook is under its share of attempts, counted in flight. (Each
        entry set aside here is put back once, by an attempt's end: a pick stays O(log n).)"""
        with self._cond:
            while not self._stopping:
                while self._due and self._due[0][0] <= time.monotonic():
                    entry = heapq.heappop(self._due)
                    hook_id = entry[2].hook_id
                    under_way = self._in_flight.get(hook_id, 0)
                    if under_way >= self._share(hook_id):
                        self._parked.setdefault(hook_id, deque()).append(entry)
                        continue
                    self._in_flight[hook_id] = under_way + 1
                    return entry[2]
                if self._due:
                    self._cond.wait(self._due[0][0] - time.monotonic())
                else:
                    self._cond.wait()
            return None

    def _ended(self, hook_id: str) -> None:
        """An attempt of ``hook_id``'s is over: as many of its entries set aside as its share now
        has room for are due again."""
        with self._cond:
            under_way = self._in_flight.pop(hook_id) - 1
            if under_way:
                self._in_flight[hook_id] = under_way
            parked = self._parked.get(hook_id)
            if parked is None:
                return
            for _ in range(min(len(parked), self._share(hook_id) - under_way)):
                heapq.heappush(self._due, parked.popleft())
                self._cond.notify()
            if not parked:
                del self._parked[hook_id]

    def _work(self) -> None:
        reader: list[sqlite3.Connection] = []  # this thread's connection to the database, once needed
        try:
            while (job := self._next()) is not None:
                try:
                    again = self._attempt(job, reader)
                finally:
                    self._ended(job.hook_id)
                if not again:
                    self._done(job)
        finally:
            for connection in reader:
                connection.close()

    def _done(self, job: _Job) -> None:
        """``job`` is over (delivered, given up, or not to be sent): the next of its lane is due."""
        with self._cond:
            self._pending -= 1
            held = self._hook_pending.pop(job.hook_id) - 1
            if held:
                self._hook_pending[job.hook_id] = held
            else:  # nothing of it is pending: its state goes (a deleted one's would stay for good)
                self._failing.discard(job.hook_id)
            lane = self._lanes.get((job.hook_id, job.sandbox_id))
            if lane:
                heapq.heappush(self._due, (0.0, next(self._order), lane.popleft()))
                self._cond.notify()
            elif lane is not None:
                del self._lanes[job.hook_id, job.sandbox_id]

    def _attempt(self, job: _Job, reader: list[sqlite3.Connection]) -> bool:
        """One attempt at ``job``; whether it is due again, for a retry (its lane waits for it)."""
        hook = self.hooks.enabled(job.hook_id)
        if hook is None:
            return False  # deleted or disabled since
        event = job.event
        try:
            with event.lock:
                if not event.read:
                    if not reader:
                        reader.append(self.store.reader())
                    event.body = self._payload(reader[0], event.seq)
                    event.read = True
            if event.body is None:
                return False  # the event is gone (retention), nothing to send
            outcome = self._send(hook, event.body)
        except Exception as exc:  # one delivery's failure, not the thread's end
            log.exception("webhook %s: event %d could not be sent", hook.id, event.seq)
            outcome = f"{type(exc).__name__}: {exc}"[:300]
        with self._cond:
            if outcome is None:
                self._failing.discard(hook.id)
            else:
                self._failing.add(hook.id)
        if outcome is None:
            self._count("delivered")
            return False
        if job.attempt >= len(self.retry_delays_s):
            self._count("failed")
            log.warning(
                "webhook %s: event %d not delivered to %s after %d attempts: %s",
                hook.id,
                event.seq,
                shown_url(hook.url),
                job.attempt + 1,
                outcome,
            )
            return False
        self._count("retried")
        delay = self.retry_delays_s[job.attempt]
        job.attempt += 1
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), job))
            self._cond.notify()
        return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(result).inc()

    def _payload(self, reader: sqlite3.Connection, seq: int) -> bytes | None:
        row = Store.stored_event(reader, seq)
        if row is None:
            return None
        build_id = None if row.template_id is None else Store.template_build_id(reader, row.template_id)
        event = lifecycle.answer(lifecycle.from_stored(row, build_id), iso)
        return json.dumps(event, separators=(",", ":")).encode()

    def _send(self, hook: Webhook, body: bytes) -> str | None:
        """One attempt: None when delivered, else what went wrong."""
        parts = urlsplit(hook.url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sandboxd/{__version__}",
            "e2b-webhook-id": hook.id,
            "e2b-delivery-id": str(uuid.uuid4()),
            "e2b-signature-version": "v1",
            "e2b-signature": signature(hook.secret, body),
        }
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self.timeout_s, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self.timeout_s)
        try:
            connection.request("POST", target, body=body, headers=headers)
            response = connection.getresponse()
            response.read(MAX_ANSWER_BYTES)
            if 200 <= response.status < 300:
                return None
            return f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        finally:
            connection.close()


class WebhookApi:
    """Routes ``/events/webhooks…``."""

    def __init__(self, hooks: WebhookStore, api_key: str) -> None:
        self.hooks = hooks
        self.api_key = api_key
        one = r"/events/webhooks/([^/]+)"
        self.routes: list[Route] = [
            ("POST", re.compile(r"/events/webhooks"), self.create),
            ("GET", re.compile(r"/events/webhooks"), self.list),
            ("GET", re.compile(one), self.info),
            ("PATCH", re.compile(one), self.update),
            ("DELETE", re.compile(one), self.delete),
        ]

    def matches(self, path: str) -> bool:
        return path == "/events/webhooks" or path.startswith("/events/webhooks/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_routes(self.routes, self.api_key, scope, receive, send)

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 201, answer(self.hooks.create(await Body.read(receive))))

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, [answer(hook) for hook in self.hooks.all()])

    async def info(self, scope: Scope, receive: Receive, send: Send, hook_id: str) -> None:
        await send_json(send, 200, answer(self.hooks.get(hook_id)))

    async def update(self, scope: Scope, receive: Receive, send: Send, hook_id: str) -> None:
        await send_json(send, 200, answer(self.hooks.update(hook_id, await Body.read(receive))))

    async def delete(self, scope: Scope, receive: Receive, send: Send, hook_id: str) -> None:
        await send_json(send, 200, answer(self.hooks.delete(hook_id)))
