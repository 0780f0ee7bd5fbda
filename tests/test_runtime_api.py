"""The control plane answers exactly as E2B's API does (issue 12 items 5, 7, 8 and 11) and refuses bad
input with a 400 that names the field (issue 11 item 7). The official SDK and raw HTTP against a real
``sandboxd serve`` with real sandboxes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException


@pytest.fixture
def api(e2b_env: Runtime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key}, timeout=60) as client:
        yield client


# ------------------------------------------------------------------------------ set_timeout(0)


def test_set_timeout_zero_ends_the_sandbox_at_once(api: httpx.Client) -> None:
    sbx = Sandbox.create(timeout=300)
    sbx.set_timeout(0)  # 204, not 400
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert "timed out" in api.get(f"/sandboxes/{sbx.sandbox_id}").json()["message"]
    kinds = [e["kind"] for e in api.get(f"/sandboxes/{sbx.sandbox_id}/events").json()]
    assert kinds[-1] == "killed", kinds


def test_a_negative_timeout_counts_as_zero_and_auto_pause_pauses(api: httpx.Client) -> None:
    sbx = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause"})
    try:
        answer = api.post(f"/sandboxes/{sbx.sandbox_id}/timeout", json={"timeout": -5})
        assert answer.status_code == 204, answer.text
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        assert Sandbox.connect(sbx.sandbox_id).commands.run("echo back").stdout == "back\n"
    finally:
        sbx.kill()


# ---------------------------------------------------------------------------------- list order


def test_list_is_newest_first_across_running_and_paused(e2b_env: Runtime) -> None:
    tag = uuid.uuid4().hex
    made = [Sandbox.create(metadata={"order": tag}) for _ in range(3)]
    try:
        made[1].pause()
        listed = Sandbox.list(query=SandboxQuery(metadata={"order": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [s.sandbox_id for s in reversed(made)]
        assert [s.state for s in listed] == [SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.RUNNING]
        started = [s.started_at for s in listed]
        assert started == sorted(started, reverse=True)
        oldest_first = httpx.get(
            f"{e2b_env.url}/v2/sandboxes",
            params={"order": "asc", "metadata": f"order={tag}"},
            headers={"X-API-KEY": e2b_env.api_key},
        ).json()
        assert [s["sandboxID"] for s in oldest_first] == [s.sandbox_id for s in made]
    finally:
        for sbx in made:
            sbx.kill()


# ------------------------------------------------------------------------------------- metrics


def test_metrics_keep_a_history_and_honour_the_range(api: httpx.Client) -> None:
    created = time.time()
    sbx = Sandbox.create()
    try:
        assert sbx.get_metrics(), "a new sandbox has its create's sample"
        deadline = time.monotonic() + 60
        while len(samples := sbx.get_metrics()) < 3:  # a sample per 5-second bucket since
            assert time.monotonic() < deadline, samples
            time.sleep(1)
        stamps = [s.timestamp.timestamp() for s in samples]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert all(int(created) - 5 <= t <= time.time() for t in stamps)
        assert all(t % 5 == 0 for t in stamps), stamps  # 5-second buckets
        assert all(s.mem_total == 1024 << 20 and s.cpu_count >= 1 for s in samples)
        # Only what lies inside [start, end] (unix seconds; the SDK truncates `end`).
        middle = datetime.fromtimestamp(stamps[1], UTC)
        inside = sbx.get_metrics(start=middle, end=middle)
        assert [s.timestamp.timestamp() for s in inside] == [stamps[1]]
        long_ago = datetime.now(UTC) - timedelta(days=2)
        assert sbx.get_metrics(start=long_ago, end=long_ago + timedelta(hours=1)) == []
        raw = api.get(f"/sandboxes/{sbx.sandbox_id}/metrics", params={"start": int(stamps[0])}).json()
        assert {"timestamp", "timestampUnix", "cpuUsedPct", "memUsed", "memCache", "diskUsed", "diskTotal"} <= set(
            raw[0]
        )
        bad = api.get(f"/sandboxes/{sbx.sandbox_id}/metrics", params={"start": 10, "end": 5})
        assert bad.status_code == 400 and "'start'" in bad.json()["message"]
    finally:
        sbx.kill()
    assert api.get(f"/sandboxes/{sbx.sandbox_id}/metrics").status_code == 404


def test_creates_close_together_each_get_their_create_buckets_sample_unasked(e2b_env: Runtime) -> None:
    """The first sample the runtime takes of each create by itself (creates close together share
    one read and one write, :meth:`SandboxManager._first_sample_soon`) lands in the create's own
    5-second bucket: the periodic sampler writes only later buckets, and nobody asks for metrics
    here. Read from the runtime's own history database."""

    def bucket(t: float) -> int:
        return int(t) // 5 * 5

    for _ in range(3):  # a round whose creates end too late in their bucket (a busy host) is redone
        while time.time() % 5 > 0.5:  # start at a bucket's start
            time.sleep(0.05)
        started = time.time()
        with ThreadPoolExecutor(4) as pool:
            sandboxes = list(pool.map(lambda _: Sandbox.create(), range(4)))
        try:
            if time.time() > bucket(started) + 3.5:
                continue
            ids = {sbx.sandbox_id for sbx in sandboxes}
            db = sqlite3.connect(f"file:{e2b_env.data_dir / 'metrics.db'}?mode=ro", uri=True, timeout=5)
            try:
                while True:
                    marks = ",".join("?" * len(ids))
                    found = set(
                        db.execute(f"SELECT sandbox_id, at FROM samples WHERE sandbox_id IN ({marks})", list(ids))
                    )
                    if {sandbox_id for sandbox_id, _ in found} == ids or time.time() > bucket(started) + 5:
                        break
                    time.sleep(0.05)
            finally:
                db.close()
            assert found == {(sandbox_id, bucket(started)) for sandbox_id in ids}
            return
        finally:
            for sbx in sandboxes:
                sbx.kill()
    pytest.fail("three rounds of creates each ended too late in their bucket to tell")


def test_the_reaper_follows_each_end_as_set_timeout_pause_resume_and_connect_move_it(api: httpx.Client) -> None:
    """The reaper asks the database for running rows whose ``end_at`` has passed (``Store.expired``),
    no longer each live row: every move of a sandbox's end must reach that column, and a paused row
    whose old end has passed is never picked. Shortened, it ends at its new end; lengthened, not at
    its old; paused past its end, it stays paused; resumed by a connect with a short timeout, it
    ends at that; a running one a connect lengthens outlives its old end (review6's drill)."""

    def gone(sbx: Sandbox) -> bool:
        answer = api.get(f"/sandboxes/{sbx.sandbox_id}")
        return answer.status_code == 404 and "timed out" in answer.json()["message"]

    def wait_gone(sbx: Sandbox) -> None:
        deadline = time.monotonic() + 20
        while not gone(sbx):
            assert time.monotonic() < deadline, api.get(f"/sandboxes/{sbx.sandbox_id}").text
            time.sleep(0.1)

    shortened, lengthened, paused, connected = (Sandbox.create(timeout=t) for t in (300, 3, 3, 3))
    try:
        old_end = time.monotonic() + 3
        shortened.set_timeout(1)
        lengthened.set_timeout(300)
        paused.pause()
        Sandbox.connect(connected.sandbox_id, timeout=300)
        wait_gone(shortened)
        time.sleep(max(0.0, old_end - time.monotonic()) + 1.5)  # every old end passed, and a reaper tick
        assert api.get(f"/sandboxes/{lengthened.sandbox_id}").json()["state"] == "running"
        assert api.get(f"/sandboxes/{connected.sandbox_id}").json()["state"] == "running"
        assert api.get(f"/sandboxes/{paused.sandbox_id}").json()["state"] == "paused"
        Sandbox.connect(paused.sandbox_id, timeout=1)
        wait_gone(paused)
    finally:
        for sbx in (shortened, lengthened, paused, connected):
            with contextlib.suppress(Exception):
                sbx.kill()


def test_a_sandbox_killed_before_its_first_sample_has_no_history(e2b_env: Runtime) -> None:
    """Creates close together share a first metrics sample, taken 0.25-0.5 s after (a batch): a
    sandbox killed before its batch is read, or while it is, leaves no row in the history that its
    kill forgot (review6's drill of the batch against a racing kill)."""
    ids = []
    for _ in range(4):
        with ThreadPoolExecutor(3) as pool:
            made = list(pool.map(lambda _: Sandbox.create(), range(3)))
        for sbx in made:
            sbx.kill()
            ids.append(sbx.sandbox_id)
    time.sleep(1.0)  # every batch of theirs due and done
    db = sqlite3.connect(f"file:{e2b_env.data_dir / 'metrics.db'}?mode=ro", uri=True, timeout=5)
    try:
        marks = ",".join("?" * len(ids))
        left = db.execute(f"SELECT sandbox_id, at FROM samples WHERE sandbox_id IN ({marks})", ids).fetchall()
    finally:
        db.close()
    assert left == []


# ---------------------------------------------------------------------------------------- logs


def test_logs_in_e2bs_v1_and_v2_shapes(api: httpx.Client) -> None:
    sbx = Sandbox.create()
    sbx.pause()
    Sandbox.connect(sbx.sandbox_id)
    v1 = api.get(f"/sandboxes/{sbx.sandbox_id}/logs").json()
    assert set(v1) == {"logs", "logEntries"}
    lines = [json.loads(entry["line"]) for entry in v1["logs"]]
    assert all({"level", "logger", "message"} <= set(line) for line in lines)  # what the e2b CLI reads
    runtime = [line for line in lines if line["logger"] == "runtime"]
    assert [line["event"] for line in runtime] == ["created", "paused", "resumed"]
    assert all(line["level"] == "info" for line in runtime)
    assert any(line["logger"] == "agent" and "sandboxd agent" in line["message"] for line in lines)  # its log
    stamps = [e["timestamp"] for e in v1["logEntries"]]
    assert stamps == sorted(stamps)  # oldest first
    created = next(e for e in v1["logEntries"] if e["fields"].get("event") == "created")
    assert set(created) == {"timestamp", "level", "message", "fields"}
    created_ms = int(datetime.fromisoformat(created["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
    # The agent logs its start after the create's answer: the entry after "created" may be its.
    paused = next(e for e in v1["logEntries"] if e["fields"].get("event") == "paused")
    paused_ms = int(datetime.fromisoformat(paused["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
    assert paused_ms > created_ms
    later = api.get(f"/sandboxes/{sbx.sandbox_id}/logs", params={"start": paused_ms, "limit": 1}).json()
    assert [json.loads(e["line"]).get("event") for e in later["logs"]] == ["paused"]

    def events(**params: Any) -> list[str | None]:
        found = api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", params=params).json()["logs"]
        return [e["fields"].get("event") for e in found if e["fields"]["logger"] == "runtime"]

    assert events() == ["resumed", "paused", "created"]  # backward (newest first) by default
    assert events(direction="forward", cursor=created_ms, limit=100) == ["created", "paused", "resumed"]
    assert events(direction="forward", cursor=paused_ms, limit=1) == ["paused"]
    assert events(search="paused") == ["paused"]
    assert api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", params={"level": "error"}).json()["logs"] == []
    sbx.kill()
    # A sandbox's lifecycle stays readable after it ended.
    assert events(limit=1) == ["killed"]
    for bad in ({"direction": "sideways"}, {"level": "loud"}, {"limit": 1001}, {"cursor": "x" * 5000}):
        answer = api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", params=bad)
        assert answer.status_code == 400 and repr(next(iter(bad)))[1:-1] in answer.json()["message"], answer.text


# ------------------------------------------------------------------------------------ bad input

BAD_BODIES: list[tuple[str, str, Any, str]] = [
    ("POST", "/sandboxes", b"[" * 100_000, "nested too deeply"),
    ("POST", "/sandboxes", b'{"templateID": "base", "timeout": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("POST", "/sandboxes", b"\xff\xfe", "not valid JSON"),
    ("POST", "/sandboxes", {"templateID": "base", "envVars": {"A=B": "x"}}, "envVars"),
    ("POST", "/sandboxes", {"templateID": "base", "envVars": {"": "x"}}, "envVars"),
    ("POST", "/sandboxes", {"templateID": "base", "envVars": {"OK": "nul\u0000here"}}, "envVars.OK"),
    ("POST", "/sandboxes", {"templateID": "base", "envVars": {"OK": 1}}, "envVars.OK"),
    ("POST", "/sandboxes", {"templateID": "base", "envVars": ["A"]}, "envVars"),
    ("POST", "/sandboxes", {"templateID": "base", "metadata": {str(i): "v" for i in range(101)}}, "metadata"),
    ("POST", "/sandboxes", {"templateID": "base", "metadata": {"k": "v" * 5000}}, "metadata.k"),
    ("POST", "/sandboxes", {"templateID": "base", "metadata": {"k": "\ud800"}}, "metadata.k"),
    ("POST", "/sandboxes", {"templateID": "base", "timeout": 1.5}, "timeout"),
    ("POST", "/sandboxes", {"templateID": "base", "timeout": 1e300}, "timeout"),
    ("POST", "/sandboxes", {"templateID": "base", "timeout": "60"}, "timeout"),
    ("POST", "/sandboxes", {"templateID": "base", "timeout": True}, "timeout"),
    ("POST", "/sandboxes", {"templateID": "base", "autoPause": "yes"}, "autoPause"),
    ("POST", "/sandboxes", {"templateID": "base", "autoResume": {"enabled": 1}}, "enabled"),
    ("POST", "/sandboxes", {"templateID": "base", "autoResume": []}, "autoResume"),
    ("POST", "/sandboxes", {"templateID": ["base"]}, "templateID"),
    ("POST", "/sandboxes", {"templateID": "x" * 300}, "templateID"),
    ("POST", "/sandboxes", [], "JSON object"),
]


@pytest.mark.parametrize(("method", "path", "body", "names"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_bodies_are_400s_that_name_the_field(
    api: httpx.Client, method: str, path: str, body: Any, names: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = api.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert names in answer.json()["message"], answer.json()


BAD_QUERIES: list[tuple[str, dict[str, str], str]] = [
    ("/v2/sandboxes", {"limit": "9" * 5000}, "'limit'"),
    ("/v2/sandboxes", {"limit": "0"}, "'limit'"),
    ("/v2/sandboxes", {"limit": "²"}, "'limit'"),
    ("/v2/sandboxes", {"order": "sideways"}, "'order'"),
    ("/v2/sandboxes", {"state": "dead"}, "'state'"),
    ("/v2/sandboxes", {"nextToken": "%%%"}, "'nextToken'"),
    ("/v2/sandboxes", {"startedAfter": "0001-01-01T00:00:00"}, "startedAfter"),
    ("/v2/sandboxes", {"startedAfter": "yesterday"}, "startedAfter"),
    ("/v2/sandboxes", {"metadata": "novalue"}, "'metadata'"),
    ("/v2/sandboxes", {"template": "t" * 300}, "'template'"),
    ("/v2/sandboxes", {f"k{i}": "v" for i in range(100)}, "fields"),
    ("/v2/sandboxes", {"q": "x" * 20_000}, "query string"),
    ("/sandboxes/bad$id", {}, "'sandboxID'"),
    ("/sandboxes/" + "a" * 100, {}, "'sandboxID'"),
]


@pytest.mark.parametrize(("path", "params", "names"), BAD_QUERIES, ids=range(len(BAD_QUERIES)))
def test_bad_queries_are_400s_that_name_the_field(
    api: httpx.Client, path: str, params: dict[str, str], names: str
) -> None:
    answer = api.get(path, params=params)
    assert answer.status_code == 400, answer.text
    assert names in answer.json()["message"], answer.json()


def test_a_bad_timeout_on_a_sandbox_is_a_400(api: httpx.Client) -> None:
    sbx = Sandbox.create()
    try:
        for body, names in (({"timeout": "x"}, "timeout"), ({}, "timeout"), ({"timeout": 2**40}, "timeout")):
            answer = api.post(f"/sandboxes/{sbx.sandbox_id}/timeout", json=body)
            assert answer.status_code == 400 and names in answer.json()["message"], answer.text
        answer = api.post(f"/sandboxes/{sbx.sandbox_id}/pause", json={"memory": "no"})
        assert answer.status_code == 400 and "memory" in answer.json()["message"]
        answer = api.get(f"/sandboxes/{sbx.sandbox_id}/metrics", params={"start": "-1"})
        assert answer.status_code == 400 and "'start'" in answer.json()["message"]
    finally:
        sbx.kill()
