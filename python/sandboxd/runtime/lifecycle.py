"""E2B's sandbox lifecycle events API (its documentation's "Monitor sandbox lifecycle events"):

* ``GET /events/sandboxes/{sandboxID}``: one sandbox's events;
* ``GET /events/sandboxes``: the events of every sandbox of the team (here: of this runtime);

both with ``offset`` (default 0), ``limit`` (1 to 100, default 10), ``orderAsc`` (default false: newest
first) and ``types`` (repeatable: only these types), and the API key. Each event is
``{version: "v1", id, type, eventData, sandboxBuildId, sandboxExecutionId, sandboxId, sandboxTeamId,
sandboxTemplateId, timestamp}``, ``type`` one of E2B's ``sandbox.lifecycle.*``. E2B serves this from its
cloud, not from its open-source API; the types and the ``eventData`` keys are those its orchestrator
publishes (e2b-dev/infra ``packages/shared/pkg/events``): ``set_timeout`` on an update,
``kill_reason`` on a kill (ours is the reason in words, where E2B's is a code), and on every event of
a sandbox with metadata, ``sandbox_metadata``.

The events come from the runtime's own record (``GET /sandboxes/{id}/events``, with reasons), mapped:
``created`` → created; ``killed`` and ``died`` → killed; ``paused``, ``resumed``; ``timeout_set`` and
``network_updated`` → updated; ``snapshot`` → checkpointed. ``adopted`` (a runtime restart) and
``reclaimed`` (host resources freed) are sandboxd's own and not listed here.

Ids are stable across reads (derived from the record); an execution is one run of the sandbox, from
its create or a resume; the team is this runtime's one team. Events are kept :data:`RETENTION_S` (E2B's
default of 7 days), and an ended sandbox's row goes with its last event. An unknown sandbox has no
events (``[]``), as a sandbox whose events have expired.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .inputs import Query
from .store import StoredEvent

RETENTION_S = 7 * 24 * 3600
"""How long events are kept: E2B's default retention."""

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_OFFSET = 1_000_000
"""``offset`` is a row count SQLite steps over: bounded so that one request cannot make it walk far."""

CREATED = "sandbox.lifecycle.created"
KILLED = "sandbox.lifecycle.killed"
PAUSED = "sandbox.lifecycle.paused"
RESUMED = "sandbox.lifecycle.resumed"
UPDATED = "sandbox.lifecycle.updated"
CHECKPOINTED = "sandbox.lifecycle.checkpointed"
TYPES = (CREATED, KILLED, PAUSED, RESUMED, UPDATED, CHECKPOINTED)

KINDS: dict[str, str] = {
    "created": CREATED,
    "killed": KILLED,
    "died": KILLED,
    "paused": PAUSED,
    "resumed": RESUMED,
    "timeout_set": UPDATED,
    "network_updated": UPDATED,
    "snapshot": CHECKPOINTED,
}
"""The runtime's event kinds (the ``events`` table's) that E2B's API lists, and their types."""

TEAM_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "sandboxd-team"))
"""A runtime has one team: every sandbox's ``sandboxTeamId``."""

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "sandboxd-lifecycle-event")
_TIMEOUT_SET = re.compile(r"(\d+)s from now")


@dataclass(frozen=True, slots=True)
class LifecycleQuery:
    """What a request asks for, validated."""

    sandbox_id: str | None
    kinds: list[str]
    """The runtime's kinds that map to the asked-for types."""
    offset: int
    limit: int
    ascending: bool

    @classmethod
    def parse(cls, raw_query: bytes, sandbox_id: str | None) -> LifecycleQuery:
        query = Query(raw_query)
        offset = query.integer("offset", 0, MAX_OFFSET, 0)
        limit = query.integer("limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        ascending = query.choice("orderAsc", ("true", "false"), "false") == "true"
        wanted = set()
        for value in query.all("types"):
            for name in filter(None, value.split(",")):
                if name not in TYPES:
                    raise ApiError(400, f"'types' must be among {', '.join(TYPES)}, got {name[:64]!r}")
                wanted.add(name)
        kinds = [kind for kind, kind_type in KINDS.items() if not wanted or kind_type in wanted]
        assert offset is not None and limit is not None
        return cls(sandbox_id, kinds, offset, limit, ascending)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One event as a backend gives it: what the answer is built from."""

    key: str
    """Unique and stable for this event: its id is derived from it."""
    sandbox_id: str
    at: float
    kind: str
    """One of :data:`KINDS`."""
    reason: str | None
    run_key: str
    """The same for every event of one run (from a create or a resume): the execution id's seed."""
    template_id: str | None
    build_id: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    """The sandbox's metadata (``eventData.sandbox_metadata``, as E2B's orchestrator adds it)."""


def from_stored(row: StoredEvent, build_id: str | None) -> LifecycleEvent:
    """An event of the runtime's record (:meth:`.Store.lifecycle`), with its template's build id."""
    return LifecycleEvent(
        key=f"{row.sandbox_id}/{row.seq}",
        sandbox_id=row.sandbox_id,
        at=row.at,
        kind=row.kind,
        reason=row.reason,
        run_key=f"{row.sandbox_id}/{row.run_seq}",
        template_id=row.template_id,
        build_id=build_id,
        metadata=json.loads(row.metadata) if row.metadata else {},
    )


def answer(event: LifecycleEvent, iso: Any) -> dict[str, Any]:
    """The event as E2B's API answers it (``iso`` formats a unix time as the API does)."""
    return {
        "version": "v1",
        "id": str(uuid.uuid5(_NAMESPACE, event.key)),
        "type": KINDS[event.kind],
        "eventData": _data(event, iso),
        "sandboxBuildId": event.build_id,
        "sandboxExecutionId": str(uuid.uuid5(_NAMESPACE, event.run_key)),
        "sandboxId": event.sandbox_id,
        "sandboxTeamId": TEAM_ID,
        "sandboxTemplateId": event.template_id,
        "timestamp": iso(event.at),
    }


def _data(event: LifecycleEvent, iso: Any) -> dict[str, Any] | None:
    data: dict[str, Any] = {}
    if event.kind == "timeout_set" and event.reason and (match := _TIMEOUT_SET.match(event.reason)):
        data["set_timeout"] = iso(event.at + int(match.group(1)))
    if event.kind in ("killed", "died") and event.reason:
        data["kill_reason"] = event.reason
    if event.metadata:
        data["sandbox_metadata"] = event.metadata
    return data or None
