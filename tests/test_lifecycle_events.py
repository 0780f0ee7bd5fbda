"""E2B's lifecycle events API (its documentation's "Monitor sandbox lifecycle events" page):
``GET /events/sandboxes/{id}`` and ``GET /events/sandboxes``, as the page calls them (plain HTTP with
the API key), against a real ``sandboxd serve`` driven by the official SDK; and the events' retention
on the runtime's real SQLite store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox
from sandboxd.runtime.store import SandboxRow, Store

CREATED = "sandbox.lifecycle.created"
UPDATED = "sandbox.lifecycle.updated"
PAUSED = "sandbox.lifecycle.paused"
RESUMED = "sandbox.lifecycle.resumed"
KILLED = "sandbox.lifecycle.killed"


@pytest.fixture
def api(e2b_env: Runtime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": e2b_env.api_key}, timeout=60) as client:
        yield client


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _lived(api: httpx.Client) -> tuple[str, float]:
    """A sandbox taken through create, set_timeout, pause, resume and kill, as the SDK does them."""
    sbx = Sandbox.create(timeout=300)
    sbx.set_timeout(120)
    asked = time.time()
    sbx.pause()
    Sandbox.connect(sbx.sandbox_id).commands.run("true")
    sbx.kill()
    return sbx.sandbox_id, asked


def test_the_docs_example_one_sandboxs_events_newest_first(api: httpx.Client) -> None:
    sandbox_id, asked = _lived(api)
    answer = api.get(f"/events/sandboxes/{sandbox_id}")
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()
    assert [e["type"] for e in events] == [KILLED, RESUMED, PAUSED, UPDATED, CREATED]
    for event in events:
        assert event["version"] == "v1"
        assert event["sandboxId"] == sandbox_id
        assert event["sandboxTemplateId"] == "base"
        uuid.UUID(event["id"])
        uuid.UUID(event["sandboxBuildId"])
        uuid.UUID(event["sandboxTeamId"])
    assert len({e["id"] for e in events}) == 5
    assert len({e["sandboxTeamId"] for e in events}) == 1
    stamps = [_when(e["timestamp"]) for e in events]
    assert stamps == sorted(stamps, reverse=True)
    killed, resumed, paused, updated, created = events
    assert created["eventData"] is None and paused["eventData"] is None
    assert abs(_when(updated["eventData"]["set_timeout"]).timestamp() - (asked + 120)) < 10
    assert killed["eventData"] == {"kill_reason": "killed through the API"}
    # One execution from the create to the pause, another from the resume.
    assert created["sandboxExecutionId"] == updated["sandboxExecutionId"] == paused["sandboxExecutionId"]
    assert resumed["sandboxExecutionId"] == killed["sandboxExecutionId"] != created["sandboxExecutionId"]
    # The same events read again are the same (ids are stable).
    assert api.get(f"/events/sandboxes/{sandbox_id}").json() == events


def test_a_sandboxs_metadata_is_in_each_events_data(api: httpx.Client) -> None:
    """As E2B's orchestrator adds it (``sandbox_metadata``), beside the kill's reason."""
    sbx = Sandbox.create(timeout=60, metadata={"team": "blue", "run": "7"})
    sbx.kill()
    events = api.get(f"/events/sandboxes/{sbx.sandbox_id}", params={"orderAsc": "true"}).json()
    assert [e["type"] for e in events] == [CREATED, KILLED]
    assert events[0]["eventData"] == {"sandbox_metadata": {"team": "blue", "run": "7"}}
    assert events[1]["eventData"] == {
        "kill_reason": "killed through the API",
        "sandbox_metadata": {"team": "blue", "run": "7"},
    }


def test_offset_limit_order_and_types(api: httpx.Client) -> None:
    sandbox_id, _ = _lived(api)
    path = f"/events/sandboxes/{sandbox_id}"
    newest_first = api.get(path).json()
    oldest_first = api.get(path, params={"orderAsc": "true"}).json()
    assert oldest_first == list(reversed(newest_first))
    assert api.get(path, params={"limit": 2}).json() == newest_first[:2]
    assert api.get(path, params={"offset": 1, "limit": 2}).json() == newest_first[1:3]
    assert api.get(path, params={"offset": 5}).json() == []
    picked = api.get(path, params=[("types", PAUSED), ("types", RESUMED), ("orderAsc", "true")]).json()
    assert [e["type"] for e in picked] == [PAUSED, RESUMED]
    assert [e["type"] for e in api.get(path, params={"types": KILLED}).json()] == [KILLED]


def test_the_teams_events_cover_every_sandbox(api: httpx.Client) -> None:
    first = Sandbox.create()
    second = Sandbox.create()
    try:
        latest = api.get("/events/sandboxes", params={"limit": 10})
        assert latest.status_code == 200, latest.text
        events = latest.json()
        assert 2 <= len(events) <= 10
        stamps = [_when(e["timestamp"]) for e in events]
        assert stamps == sorted(stamps, reverse=True)
        # The two creates are among the newest events, newest first (another test's sandbox may end
        # in between: the runtime is shared).
        ours = [(e["type"], e["sandboxId"]) for e in events if e["sandboxId"] in (first.sandbox_id, second.sandbox_id)]
        assert ours == [(CREATED, second.sandbox_id), (CREATED, first.sandbox_id)]
        created = api.get("/events/sandboxes", params={"types": CREATED, "limit": 100}).json()
        assert {first.sandbox_id, second.sandbox_id} <= {e["sandboxId"] for e in created}
        assert {e["type"] for e in created} == {CREATED}
    finally:
        first.kill()
        second.kill()


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=x", "offset=-1", "offset=1000001", "orderAsc=maybe", "types=sandbox.created"],
)
def test_bad_queries_are_refused_with_400(api: httpx.Client, query: str) -> None:
    for path in ("/events/sandboxes", f"/events/sandboxes/{'i' * 20}"):
        answer = api.get(f"{path}?{query}")
        assert answer.status_code == 400, (path, query, answer.text)
        assert answer.json()["message"]


def test_without_the_key_401_and_an_unknown_sandbox_has_no_events(e2b_env: Runtime, api: httpx.Client) -> None:
    with httpx.Client(base_url=e2b_env.url, timeout=30) as anonymous:
        assert anonymous.get("/events/sandboxes").status_code == 401
        assert anonymous.get(f"/events/sandboxes/{'i' * 20}").status_code == 401
    assert api.get(f"/events/sandboxes/{'i' * 20}").json() == []
    assert api.get("/events/sandboxes/not..an..id").status_code == 400
    assert api.post("/events/sandboxes").status_code == 405


# ------------------------------------------------------------------------------------ retention


def _row(sandbox_id: str, state: str) -> SandboxRow:
    now = time.time()
    return SandboxRow(sandbox_id, "base", None, state, now, now + 60, "token", 1, 512, 1024)


def test_retention_forgets_old_events_and_ended_sandboxes_with_none_left(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.insert(_row("ended-old", "ended"), ("created", "template base"))
        store.insert(_row("ended-mixed", "ended"), ("created", "template base"))
        store.insert(_row("running-old", "running"), ("created", "template base"))
        store.event("ended-old", "killed", "killed through the API")
        store.event("ended-mixed", "killed", "timed out")
        store.event("running-old", "timeout_set", "60s from now")
        cutoff = time.time() + 1  # everything so far is older than the cutoff
        time.sleep(1.1)
        store.insert(_row("ended-new", "ended"), ("created", "template base"))
        store.event("ended-mixed", "died", "recorded after the cutoff")

        assert store.forget_before(cutoff, most=4) == 4  # a long backlog goes over several calls
        assert store.forget_before(cutoff, most=4) == 2
        assert store.forget_before(cutoff, most=4) == 0

        assert store.get("ended-old") is None  # ended, no event left: forgotten
        assert store.get("ended-mixed") is not None  # ended, but an event is still kept
        assert store.get("running-old") is not None  # live sandboxes are never forgotten
        assert store.get("ended-new") is not None
        assert [kind for _, kind, _ in store.events("ended-mixed")] == ["died"]
        assert store.events("running-old") == []
        kept = store.lifecycle(None, ["created", "died"], 0, 100, True)
        assert [(e.sandbox_id, e.kind) for e in kept] == [("ended-new", "created"), ("ended-mixed", "died")]
    finally:
        store.close()
