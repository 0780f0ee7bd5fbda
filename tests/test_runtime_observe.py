"""What an operator sees of a real ``sandboxd serve``: /metrics scraped across a lifecycle driven by
the official SDK, the JSON logs of that lifecycle and of failed requests (with the secrets absent),
/ready following the zygote and the default template, and ``sandboxd status``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Runtime, free_port, zygote_pid
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(runtime: Runtime) -> tuple[str, Samples]:
    """The text of /metrics (with the key as a Prometheus scrape config sends it) and its samples,
    parsed by prometheus_client's own parser."""
    answer = httpx.get(f"{runtime.url}/metrics", headers={"Authorization": f"Bearer {runtime.api_key}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return answer.text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _per_sandbox(samples: Samples, name: str, sandbox_id: str) -> float | None:
    for (sample, labels), value in samples.items():
        if sample == name and ("sandbox_id", sandbox_id) in labels:
            return value
    return None


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _init_pid(runtime: Runtime, sandbox_id: str) -> int:
    with sqlite3.connect(runtime.data_dir / "sandboxd.db") as db:
        (pid,) = db.execute("SELECT init_pid FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    return int(pid)


@pytest.fixture
def sdk(start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Runtime]]:
    """Start a runtime of this test's own and point the official SDK at it."""

    def start(*flags: str) -> Runtime:
        runtime = start_runtime(*flags)
        for name, value in runtime.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        return runtime

    yield start


def test_metrics_follow_a_lifecycle(sdk: Callable[..., Runtime]) -> None:
    from e2b import Sandbox

    runtime = sdk()
    assert httpx.get(f"{runtime.url}/metrics").status_code == 401
    assert httpx.get(f"{runtime.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{runtime.url}/metrics", headers={"X-API-KEY": runtime.api_key}).status_code == 200
    _, start = _scrape(runtime)
    assert _value(start, "sandboxd_sandboxes", state="running") == 0
    assert _value(start, "sandboxd_zygote_up") == 1
    assert _value(start, "sandboxd_max_sandboxes") == 256
    assert _value(start, "sandboxd_template_builds_total", result="ok") == 1
    assert _value(start, "process_resident_memory_bytes") > 0

    kept = Sandbox.create(timeout=120)
    other = Sandbox.create(timeout=120)
    assert kept.commands.run("head -c 300000 /dev/zero | tr '\\0' x").stdout == "x" * 300_000
    kept.files.write("/home/user/big", b"y" * 200_000)
    _, created = _scrape(runtime)
    assert _delta(start, created, "sandboxd_sandbox_creates_total", result="ok") == 2
    assert _delta(start, created, "sandboxd_sandbox_create_duration_seconds_count") == 2
    assert 0 < _delta(start, created, "sandboxd_sandbox_create_duration_seconds_sum") < 20
    assert _value(created, "sandboxd_sandbox_create_duration_seconds_bucket", le="+Inf") == 2
    assert _value(created, "sandboxd_sandboxes", state="running") == 2
    # The command's output and the upload went through the proxy.
    assert _delta(start, created, "sandboxd_proxy_requests_total", status="200") >= 2
    assert _delta(start, created, "sandboxd_proxy_response_bytes_total") >= 300_000
    assert _delta(start, created, "sandboxd_proxy_request_bytes_total") >= 200_000
    # Bodies of megabytes, which the proxy splices between the sockets, are counted too.
    bigger = os.urandom(3 << 20)  # random: the agent sends it as it is (no gzip), with a Content-Length
    kept.files.write("/home/user/bigger", bigger)
    assert kept.files.read("/home/user/bigger", format="bytes") == bigger
    deadline = time.monotonic() + 10  # a request is counted once its handler is done, just after the client
    while True:
        _, moved = _scrape(runtime)
        up = _delta(created, moved, "sandboxd_proxy_request_bytes_total")
        down = _delta(created, moved, "sandboxd_proxy_response_bytes_total")
        if (up >= 3 << 20 and down >= 3 << 20) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert up >= 3 << 20 and down >= 3 << 20, (up, down)
    # Per-sandbox resources of running sandboxes.
    assert (_per_sandbox(created, "sandboxd_sandbox_cpu_seconds_total", kept.sandbox_id) or 0) > 0
    assert (_per_sandbox(created, "sandboxd_sandbox_memory_bytes", kept.sandbox_id) or 0) > 0
    assert (_per_sandbox(created, "sandboxd_sandbox_pids", kept.sandbox_id) or 0) >= 2
    assert (_per_sandbox(created, "sandboxd_sandbox_disk_bytes", kept.sandbox_id) or 0) >= 200_000
    assert _per_sandbox(created, "sandboxd_sandbox_network_receive_bytes_total", kept.sandbox_id) is not None

    kept.pause()
    _, paused = _scrape(runtime)
    assert _delta(created, paused, "sandboxd_sandbox_pauses_total", reason="api", mode="full") == 1
    assert _value(paused, "sandboxd_sandboxes", state="running") == 1
    assert _value(paused, "sandboxd_sandboxes", state="paused") == 1
    assert _per_sandbox(paused, "sandboxd_sandbox_memory_bytes", kept.sandbox_id) is None

    resumed_sbx = Sandbox.connect(kept.sandbox_id)
    assert resumed_sbx.commands.run("cat /home/user/big | wc -c").stdout.strip() == "200000"
    _, resumed = _scrape(runtime)
    assert _delta(paused, resumed, "sandboxd_sandbox_resumes_total", reason="connect", mode="full") == 1
    assert _delta(paused, resumed, "sandboxd_sandbox_resume_duration_seconds_count", mode="full") == 1
    assert _value(resumed, "sandboxd_sandboxes", state="running") == 2

    kept.kill()
    # A sandbox whose agent dies: killed from the host, as the OOM killer would.
    _kill_agent(runtime, other.sandbox_id)
    _wait_for(lambda: _gone(runtime, other.sandbox_id), "the death")
    short = Sandbox.create(timeout=1)
    _wait_for(lambda: _gone(runtime, short.sandbox_id), "the timeout")
    # A kill is counted once the sandbox's processes, disk and id range are freed, a moment after
    # the sandbox reads as gone.
    _wait_for(
        lambda: _delta(resumed, _scrape(runtime)[1], "sandboxd_sandbox_timeouts_total", action="kill") == 1,
        "the timeout's count",
    )
    text, ended = _scrape(runtime)
    assert _delta(resumed, ended, "sandboxd_sandbox_kills_total", reason="api") == 1
    assert _delta(resumed, ended, "sandboxd_sandbox_deaths_total", reason="agent_exited") == 1
    assert _delta(resumed, ended, "sandboxd_sandbox_timeouts_total", action="kill") == 1
    assert _delta(resumed, ended, "sandboxd_sandbox_kills_total", reason="timeout") == 1
    assert _delta(start, ended, "sandboxd_sandbox_creates_total", result="ok") == 3
    assert _value(ended, "sandboxd_sandboxes", state="running") == 0
    assert _per_sandbox(ended, "sandboxd_sandbox_cpu_seconds_total", other.sandbox_id) is None
    # Failed creates are counted by result, and a proxied request to a gone sandbox by status.
    assert httpx.post(f"{runtime.url}/sandboxes", json={"templateID": "nope"}, headers=_key(runtime)).status_code == 404
    gone = httpx.get(f"{runtime.url}/health", headers={"E2b-Sandbox-Id": kept.sandbox_id})
    assert gone.status_code == 502
    _, failed = _scrape(runtime)
    assert _delta(ended, failed, "sandboxd_sandbox_creates_total", result="not_found") == 1
    assert _delta(ended, failed, "sandboxd_proxy_errors_total", status="502") == 1
    assert _delta(ended, failed, "sandboxd_api_requests_total", status="404") == 1
    # Every series is declared once, with help and type: promtool's lint, when it is installed.
    _promtool_check(text)


def _key(runtime: Runtime) -> dict[str, str]:
    return {"X-API-KEY": runtime.api_key}


def _kill_agent(runtime: Runtime, sandbox_id: str) -> None:
    """Kill a sandbox's agent from the host, as the OOM killer would: its init then ends the sandbox.
    Once the agent has served (a create is answered before its ``/init``, which the proxy waits for):
    else it dies as it starts, a failed start rather than a death."""
    runtime.booted(sandbox_id)
    init = _init_pid(runtime, sandbox_id)
    with open(f"/proc/{init}/task/{init}/children") as f:
        os.kill(int(f.read().split()[0]), signal.SIGKILL)


def _gone(runtime: Runtime, sandbox_id: str) -> bool:
    return httpx.get(f"{runtime.url}/sandboxes/{sandbox_id}", headers=_key(runtime)).status_code == 404


def _promtool() -> str | None:
    """Prometheus's linter: $SANDBOXD_PROMTOOL, on PATH, or beside this Python (`make promtool`)."""
    beside = Path(sys.executable).parent / "promtool"
    return os.environ.get("SANDBOXD_PROMTOOL") or shutil.which("promtool") or (str(beside) if beside.exists() else None)


def _promtool_check(text: str) -> None:
    promtool = _promtool()
    if promtool is None:
        return
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


@pytest.mark.skipif(_promtool() is None, reason="promtool is not installed (`make promtool` installs it; CI does)")
def test_promtool_accepts_the_metrics(sdk: Callable[..., Runtime]) -> None:
    from e2b import Sandbox

    runtime = sdk()
    sbx = Sandbox.create()
    sbx.commands.run("true")
    text, _ = _scrape(runtime)
    sbx.kill()
    assert "sandboxd_sandbox_cpu_seconds_total{" in text
    _promtool_check(text)


def _log_lines(runtime: Runtime) -> list[dict[str, object]]:
    lines = runtime.log.read_text().splitlines()
    records = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object: a log pipeline parses all of them
        assert isinstance(record, dict), line
        records.append(record)
    return records


def test_json_logs_of_a_lifecycle_and_failed_requests(sdk: Callable[..., Runtime]) -> None:
    from e2b import Sandbox

    runtime = sdk("--log-format", "json")
    sbx = Sandbox.create(timeout=60)
    token = sbx._envd_access_token
    assert token and len(token) >= 16
    assert sbx.commands.run("echo hi").stdout == "hi\n"
    sbx.pause()
    Sandbox.connect(sbx.sandbox_id)
    # Failed requests, some carrying the secrets where a careless log line would print them.
    with httpx.Client(base_url=runtime.url) as client:
        missing = client.get(f"/sandboxes/{token}", headers=_key(runtime))
        assert missing.status_code == 404
        wrong_key = client.get("/sandboxes", headers={"X-API-KEY": runtime.api_key + "x"})
        assert wrong_key.status_code == 401
        assert client.get(f"/v2/sandboxes/{runtime.api_key}/nope", headers=_key(runtime)).status_code == 404
        signed = client.get(
            f"/files?path=/etc/passwd&signature=v1_{token}&signature_expiration=1",
            headers={"E2b-Sandbox-Id": "nosuchsandbox", "X-Access-Token": token},
        )
        assert signed.status_code == 502
    sbx.kill()
    # uvicorn's own lines (here: a request that is not HTTP) come through the same formatter.
    with socket.create_connection(("127.0.0.1", runtime.port)) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw.recv(1000)
    _wait_for(lambda: "uvicorn.error" in runtime.log.read_text(), "uvicorn's warning")

    records = _log_lines(runtime)
    for record in records:
        assert {"time", "level", "event", "message", "sandbox_id", "request_id"} <= record.keys(), record
        assert str(record["time"]).endswith("Z")
    by_event: dict[str, list[dict[str, object]]] = {}
    for record in records:
        by_event.setdefault(str(record["event"]), []).append(record)
    mine = [r for r in records if r["sandbox_id"] == sbx.sandbox_id]
    assert [r["event"] for r in mine] == ["sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed"]
    created = mine[0]
    assert created["level"] == "INFO" and created["template"] == "base" and created["request_id"]
    assert mine[2]["reason"] == "connect" and mine[3]["reason"] == "api"
    assert len({r["request_id"] for r in mine}) == 4  # each transition was its own request
    failed = by_event["request.failed"]
    statuses = sorted(int(str(r["status"])) for r in failed)
    assert statuses == [401, 404, 404, 502], failed
    # The X-Request-Id a client gets back names the log line of its request.
    assert missing.headers["x-request-id"] in {r["request_id"] for r in failed}
    text = runtime.log.read_text()
    assert runtime.api_key not in text
    assert token not in text
    assert "[redacted]" in text  # the lines that carried them are there, scrubbed
    assert by_event["uvicorn.error"][0]["level"] == "WARNING"


def test_ready_follows_the_zygote_and_the_template(start_runtime: Callable[..., Runtime], tmp_path: Path) -> None:
    # A template store of its own, and no archive: `base` resolves to `host`, whose root is moved below.
    store = tmp_path / "store"
    runtime = start_runtime("--template-store", str(store), "--debian-mirror", f"http://127.0.0.1:{free_port()}/")
    ready = httpx.get(f"{runtime.url}/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    # Kill the zygote until a probe catches it down: its restart is immediate the first time and
    # backs off when it keeps dying, so the window widens with each kill.
    seen_down: dict[str, object] = {}
    for _ in range(4):
        old = zygote_pid(runtime)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = httpx.get(f"{runtime.url}/ready")
            if answer.status_code == 503:
                seen_down = answer.json()
                break
            if _zygote_up_again(runtime, old):
                break
            time.sleep(0.01)
        if seen_down:
            break
    assert seen_down["status"] == "not ready", seen_down
    assert "zygote" in str(seen_down["checks"]["zygote"])  # type: ignore[index]
    assert set(seen_down["checks"]) == {"zygote"}  # type: ignore[arg-type]
    _wait_for(lambda: httpx.get(f"{runtime.url}/ready").status_code == 200, "ready again", timeout=60)
    assert httpx.post(f"{runtime.url}/sandboxes", json={"templateID": "base"}, headers=_key(runtime)).status_code == 201
    # /health stayed 200 throughout: alive, even while not ready.
    assert httpx.get(f"{runtime.url}/health").status_code == 200

    template = store / "host"
    moved = template.with_name("host.moved")
    template.rename(moved)
    try:
        _wait_for(lambda: httpx.get(f"{runtime.url}/ready").status_code == 503, "not ready without the template")
        assert "template" in httpx.get(f"{runtime.url}/ready").json()["checks"]
    finally:
        moved.rename(template)
    _wait_for(lambda: httpx.get(f"{runtime.url}/ready").status_code == 200, "ready with the template back")


def _zygote_up_again(runtime: Runtime, old: int) -> bool:
    try:
        return zygote_pid(runtime) != old
    except AssertionError:
        return False


def test_status_command(start_runtime: Callable[..., Runtime]) -> None:
    runtime = start_runtime()
    created, dying = (
        httpx.post(f"{runtime.url}/sandboxes", json={"templateID": "base"}, headers=_key(runtime)) for _ in range(2)
    )
    assert created.status_code == dying.status_code == 201
    dying_id = dying.json()["sandboxID"]
    _kill_agent(runtime, dying_id)
    _wait_for(lambda: _gone(runtime, dying_id), "the death")
    env = {**os.environ, "E2B_API_KEY": runtime.api_key}
    command = [sys.executable, "-m", "sandboxd", "status", "--data-dir", str(runtime.data_dir)]
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    screen = shown.stdout
    assert runtime.url in screen and "ready, up " in screen
    assert "1 running, 0 paused, 0 starting" in screen
    assert "slots 1/256" in screen and "zygote       up, 0 restarts" in screen
    assert len(screen.splitlines()) <= 24  # one screen
    # The last errors: the sandbox whose agent died.
    assert f"WARNING sandbox.died [{dying_id}] its agent died" in screen
    as_json = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=30)
    status = json.loads(as_json.stdout)
    assert status["sandboxes"]["running"] == 1 and status["budget"]["memoryCommittedBytes"] == 1024 << 20
    assert runtime.api_key not in as_json.stdout
    assert httpx.get(f"{runtime.url}/status").status_code == 401
    wrong = subprocess.run([*command, "--api-key", "wrong"], env=env, capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "401" in wrong.stderr
    nobody = subprocess.run(
        [*command, "--url", f"http://127.0.0.1:{free_port()}"], env=env, capture_output=True, text=True, timeout=30
    )
    assert nobody.returncode == 2 and "no runtime answers" in nobody.stderr
    httpx.delete(f"{runtime.url}/sandboxes/{created.json()['sandboxID']}", headers=_key(runtime))


def test_an_unexpected_failure_is_a_json_500_with_its_cause() -> None:
    """A handler that raises something no ApiError describes (the runtime's bug, or the host's) still
    answers E2B's JSON error shape, for the runtime's own answers and the proxy's alike; a failure
    after the answer started cannot be turned into one and is left to the server."""
    import asyncio

    from sandboxd.runtime.observe.http import RequestObserver
    from sandboxd.runtime.observe.metrics import RuntimeMetrics

    observer = RequestObserver(RuntimeMetrics())
    scope = {"type": "http", "method": "POST", "path": "/sandboxes", "headers": [], "query_string": b""}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def failing(*_args: object) -> None:
        raise FileExistsError(17, "creating veth pair sdabcdefh3: File exists")

    async def serve(call: Callable[..., object]) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await call(send)  # type: ignore[misc]
        return sent

    for sent in (
        asyncio.run(serve(lambda send: observer.runtime(failing, scope, receive, send))),
        asyncio.run(serve(lambda send: observer.proxied(failing, scope, receive, send, "sbx", 8080))),
    ):
        start, body = sent[0], sent[-1]
        assert start["status"] == 500
        assert (b"content-type", b"application/json") in start["headers"]  # type: ignore[operator]
        answer = json.loads(body["body"])  # type: ignore[arg-type]
        assert answer["code"] == 500
        assert "creating veth pair sdabcdefh3: File exists" in answer["message"]

    async def fails_mid_answer(_scope: object, _receive: object, send: Callable[..., object]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        raise RuntimeError("after the head")

    with pytest.raises(RuntimeError):
        asyncio.run(serve(lambda send: observer.runtime(fails_mid_answer, scope, receive, send)))
