"""The runtime's Prometheus metrics (``GET /metrics``), with the official ``prometheus_client``.

Counters and histograms move at the lifecycle transitions (:mod:`.events`) and per HTTP request
(:mod:`.http`): an increment each, nothing that allocates or walks. Everything that describes the
present (sandboxes by state, the zygote, per-sandbox CPU, memory, disk and network) is read when a
scraper asks, by :class:`RuntimeCollector`, in the scrape's own thread: the event loop only takes a
snapshot of the bookkeeping it already has (:class:`RuntimeView`).

Cardinality is bounded by construction. Every label value of a counter comes from a fixed set
(anything else is counted as ``other``); HTTP statuses are kept for the common codes and folded into
their class (``4xx``) otherwise, so a sandbox answering odd codes cannot grow the series. The only
per-sandbox series are the resource gauges of *running* sandboxes (labels ``sandbox_id`` and
``template``): at most ``--max-sandboxes`` sandboxes, :data:`PER_SANDBOX_SERIES` series each, and a
sandbox's series disappear when it stops running. docs/runtime.md lists every series.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sandboxd import ENVD_VERSION, __version__

CREATE_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Create→first-ready seconds: the target is 50 ms at the median and 150 ms at p99 (benches), so
the buckets are dense there; a loaded host or a slow template lands in the seconds range."""

RESUME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Resume seconds: a thaw takes about a millisecond, a filesystem resume boots an agent (like a create)."""

TEMPLATE_BUILD_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Template builds: from a refresh of the ``host`` template (milliseconds) to a Debian ``base`` build (minutes)."""

DISK_WALK_BUDGET_S = 1.0
"""Time one scrape may spend measuring writable layers whose cached size is stale; the rest report
their last figure. A walk of a big layer takes seconds, and a scrape must answer well inside
Prometheus's default 10 s timeout."""

PER_SANDBOX_SERIES = 6
"""cpu, memory, pids, disk, network receive and transmit: the per-sandbox series of one running sandbox."""

CREATE_RESULTS = ("ok", "bad_request", "not_found", "limit", "unavailable", "error")
KILL_REASONS = ("api", "timeout")
PAUSE_REASONS = ("api", "timeout")
RESUME_REASONS = ("api", "connect", "auto_resume")
PAUSE_MODES = ("full", "filesystem")
TIMEOUT_ACTIONS = ("kill", "pause")
DEATH_REASONS = ("agent_exited", "gone_after_restart", "not_adoptable", "start_failed")
STATES = ("running", "paused", "starting")
COMMON_STATUSES = frozenset(
    {200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 416, 429, 500, 502, 503, 504}
)
"""HTTP statuses kept as they are in labels; others are folded into their class."""


def bounded(value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else ``other``: label values never come from outside."""
    return value if value in allowed else "other"


def status_label(status: int) -> str:
    """The label of an HTTP status: the code for common ones, ``4xx`` for the rest of a class,
    ``aborted`` when no response started (the client left, or the upstream broke first)."""
    if status in COMMON_STATUSES:
        return str(status)
    if 100 <= status < 600:
        return f"{status // 100}xx"
    return "aborted"


@dataclass(slots=True)
class SandboxView:
    """One running sandbox, as a scrape needs it."""

    id: str
    template: str
    init_pid: int | None
    stats: Callable[[], Any] | None
    """The handle's ``stats`` (cgroup counters), called in the scrape's thread."""


@dataclass(slots=True)
class RuntimeView:
    """What the event loop knows when a scrape starts (no I/O was needed to gather it)."""

    states: dict[str, int] = field(default_factory=dict)
    running: list[SandboxView] = field(default_factory=list)
    zygote_up: bool = False
    zygote_restarts: int = 0
    warm_ready: int = 0
    """Warm sandboxes booted and waiting in the pool (``--warm-sandboxes``)."""
    warm_target: int = 0
    """How many the pool keeps now (the default pool's grows after bursts, :mod:`..warm`)."""
    disk_used: Callable[[str, bool], int | None] | None = None
    """``(sandbox_id, may_walk)`` → bytes used by the writable layer, or None when unknown."""


class RuntimeMetrics:
    """The registry and every series the runtime exports."""

    def __init__(self) -> None:
        # A `_created` timestamp beside every counter and histogram doubles the series for a figure
        # Prometheus does not use (it detects resets itself). Process-wide, as the library offers it.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info(
            "sandboxd_build", "sandboxd's version and the envd protocol version its agent speaks", registry=registry
        ).info({"version": __version__, "envd_version": ENVD_VERSION})
        self.max_sandboxes = Gauge(
            "sandboxd_max_sandboxes", "The --max-sandboxes limit (running sandboxes at most)", registry=registry
        )
        self.creates = Counter(
            "sandboxd_sandbox_creates", "Sandbox create requests by result", ["result"], registry=registry
        )
        self.create_seconds = Histogram(
            "sandboxd_sandbox_create_duration_seconds",
            "Time from a create request to the sandbox's agent answering (successful creates)",
            buckets=CREATE_BUCKETS,
            registry=registry,
        )
        self.kills = Counter("sandboxd_sandbox_kills", "Sandboxes killed, by reason", ["reason"], registry=registry)
        self.webhook_deliveries = Counter(
            "sandboxd_webhook_deliveries",
            "Lifecycle webhook deliveries by result: delivered, retried (an attempt failed, another follows), "
            "failed (the last attempt failed), dropped (the queue was full)",
            ["result"],
            registry=registry,
        )
        self.pauses = Counter(
            "sandboxd_sandbox_pauses", "Sandboxes paused, by reason and mode", ["reason", "mode"], registry=registry
        )
        self.resumes = Counter(
            "sandboxd_sandbox_resumes", "Sandboxes resumed, by reason and mode", ["reason", "mode"], registry=registry
        )
        self.resume_seconds = Histogram(
            "sandboxd_sandbox_resume_duration_seconds",
            "Time to resume a paused sandbox, by pause mode",
            ["mode"],
            buckets=RESUME_BUCKETS,
            registry=registry,
        )
        self.timeouts = Counter(
            "sandboxd_sandbox_timeouts",
            "Sandboxes that reached their timeout, by action",
            ["action"],
            registry=registry,
        )
        self.deaths = Counter(
            "sandboxd_sandbox_deaths",
            "Sandboxes that ended without being asked to (their agent or init died), by reason",
            ["reason"],
            registry=registry,
        )
        self.template_builds = Counter(
            "sandboxd_template_builds", "Template builds, by result", ["result"], registry=registry
        )
        self.template_build_seconds = Histogram(
            "sandboxd_template_build_duration_seconds",
            "Time to build a template (successful builds)",
            buckets=TEMPLATE_BUILD_BUCKETS,
            registry=registry,
        )
        for result in CREATE_RESULTS:
            self.creates.labels(result)
        for reason in KILL_REASONS:
            self.kills.labels(reason)
        for reason in DEATH_REASONS:
            self.deaths.labels(reason)
        for action in TIMEOUT_ACTIONS:
            self.timeouts.labels(action)
        for mode in PAUSE_MODES:
            self.resume_seconds.labels(mode)
            for reason in PAUSE_REASONS:
                self.pauses.labels(reason, mode)
            for reason in RESUME_REASONS:
                self.resumes.labels(reason, mode)
        for result in ("ok", "error"):
            self.template_builds.labels(result)
        self.requests = RequestCounts()
        registry.register(self.requests)
        self.collector = RuntimeCollector()
        registry.register(self.collector)

    @contextlib.contextmanager
    def template_build(self) -> Iterator[None]:
        """Count and time one template build: ``with metrics.template_build(): build()``."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.template_builds.labels("error").inc()
            raise
        self.template_builds.labels("ok").inc()
        self.template_build_seconds.observe(time.monotonic() - started)

    def render(self, view: RuntimeView, accept: str) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when the scraper asks for it) and its
        content type. Blocking: run it in a thread."""
        encoder, content_type = choose_encoder(accept)
        self.collector.view = view
        try:
            return encoder(self.registry), content_type
        finally:
            self.collector.view = None


class RequestCounts(Collector):
    """The counters on the request path, kept as plain integers and exported by this collector.

    A prometheus_client ``Counter.inc`` takes a lock and checks its state on every call, and
    ``labels()`` validates and locks again; per proxied request that was three of each, several
    microseconds on a loaded host, for figures nobody reads until a scrape. Here a request adds to
    a dict entry keyed by its status code (the event loop's thread is the only writer), and a scrape
    copies the dicts (one C call under the GIL) and folds the codes into their labels.
    """

    def __init__(self) -> None:
        self.api: dict[int, int] = {}
        """Requests the runtime answered itself, by status code (0: no response)."""
        self.proxy: dict[int, int] = {}
        """Proxied requests by status code (0: aborted before a response)."""
        self.request_bytes = 0
        self.response_bytes = 0

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        api, proxy = dict(self.api), dict(self.proxy)
        yield _by_status(
            "sandboxd_api_requests",
            "Requests answered by the runtime itself (control plane, probes, metrics), by status",
            api,
        )
        yield _by_status("sandboxd_proxy_requests", "Requests proxied into sandboxes, by status", proxy)
        yield _by_status(
            "sandboxd_proxy_errors",
            "Proxied requests that failed (status >= 400, or aborted before a response), by status",
            {status: n for status, n in proxy.items() if status >= 400 or status == 0},
        )
        yield CounterMetricFamily(
            "sandboxd_proxy_request_bytes", "Body bytes proxied from clients into sandboxes", value=self.request_bytes
        )
        yield CounterMetricFamily(
            "sandboxd_proxy_response_bytes", "Body bytes proxied from sandboxes to clients", value=self.response_bytes
        )


def _by_status(name: str, documentation: str, counts: dict[int, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["status"])
    folded: dict[str, int] = {}
    for status, n in counts.items():
        label = status_label(status)
        folded[label] = folded.get(label, 0) + n
    for label, n in sorted(folded.items()):
        family.add_metric([label], n)
    return family


class RuntimeCollector(Collector):
    """The series that describe the present, read at scrape time from a :class:`RuntimeView`."""

    def __init__(self) -> None:
        self.view: RuntimeView | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names are checked at collect time; the view exists only during a scrape

    def collect(self) -> Iterable[Metric]:
        view = self.view
        if view is None:
            return
        states = GaugeMetricFamily(
            "sandboxd_sandboxes",
            "Sandboxes by state (starting: being created or resumed)",
            labels=["state"],
        )
        for state in STATES:
            states.add_metric([state], view.states.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "sandboxd_zygote_up", "1 while a zygote is up to fork sandboxes", value=int(view.zygote_up)
        )
        yield CounterMetricFamily(
            "sandboxd_zygote_restarts", "Zygotes started after the first one (it died)", value=view.zygote_restarts
        )
        yield GaugeMetricFamily(
            "sandboxd_warm_sandboxes",
            "Warm sandboxes booted and waiting to be claimed by a create (serve --warm-sandboxes)",
            value=view.warm_ready,
        )
        yield GaugeMetricFamily(
            "sandboxd_warm_target",
            "Warm sandboxes the pool keeps now: --warm-sandboxes, or the default pool's size after the bursts it saw",
            value=view.warm_target,
        )
        labels = ["sandbox_id", "template"]
        cpu = CounterMetricFamily("sandboxd_sandbox_cpu_seconds", "CPU time used by a running sandbox", labels=labels)
        memory = GaugeMetricFamily(
            "sandboxd_sandbox_memory_bytes", "Memory charged to a running sandbox", labels=labels
        )
        pids = GaugeMetricFamily("sandboxd_sandbox_pids", "Processes and threads in a running sandbox", labels=labels)
        disk = GaugeMetricFamily(
            "sandboxd_sandbox_disk_bytes",
            "Bytes in a running sandbox's writable layer (last measurement)",
            labels=labels,
        )
        rx = CounterMetricFamily(
            "sandboxd_sandbox_network_receive_bytes", "Bytes received by a running sandbox's interfaces", labels=labels
        )
        tx = CounterMetricFamily(
            "sandboxd_sandbox_network_transmit_bytes", "Bytes sent by a running sandbox's interfaces", labels=labels
        )
        walk_until = time.monotonic() + DISK_WALK_BUDGET_S
        for sandbox in view.running:
            values = [sandbox.id, sandbox.template]
            stats = None
            if sandbox.stats is not None:
                with contextlib.suppress(OSError):
                    stats = sandbox.stats()
            if stats is not None:
                if stats.cpu_usage_ns is not None:
                    cpu.add_metric(values, stats.cpu_usage_ns / 1e9)
                if stats.memory_bytes is not None:
                    memory.add_metric(values, stats.memory_bytes)
                if stats.pids_current is not None:
                    pids.add_metric(values, stats.pids_current)
            if view.disk_used is not None:
                used = view.disk_used(sandbox.id, time.monotonic() < walk_until)
                if used is not None:
                    disk.add_metric(values, used)
            if sandbox.init_pid is not None:
                traffic = network_bytes(sandbox.init_pid)
                if traffic is not None:
                    rx.add_metric(values, traffic[0])
                    tx.add_metric(values, traffic[1])
        yield from (cpu, memory, pids, disk, rx, tx)


def network_bytes(pid: int) -> tuple[int, int] | None:
    """Bytes received and sent by every interface but ``lo`` in ``pid``'s network namespace, from
    the kernel's counters (``/proc/<pid>/net/dev``); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/net/dev", "rb") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return None
    received = sent = 0
    for line in lines:
        name, _, counters = line.partition(b":")
        fields = counters.split()
        if name.strip() == b"lo" or len(fields) < 9:
            continue
        with contextlib.suppress(ValueError):
            received += int(fields[0])
            sent += int(fields[8])
    return received, sent
