"""Runtime state in SQLite (WAL): sandboxes, their metadata, lifecycle events with reasons, and templates.

One connection, used from the event loop thread only; every write is a short transaction committed
before the call returns (a new sandbox's row and its first event are one), so a ``kill -9`` of the
runtime loses nothing that was acknowledged to a client.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id            TEXT PRIMARY KEY,
    template_id   TEXT NOT NULL,
    alias         TEXT,
    state         TEXT NOT NULL,          -- running | paused | ended
    started_at    REAL NOT NULL,          -- unix seconds
    end_at        REAL NOT NULL,          -- unix seconds; while paused, remaining_s holds the time left
    remaining_s   REAL,                   -- seconds left when paused (paused time does not count)
    pause_mode    TEXT,                   -- full | filesystem, while paused
    on_timeout    TEXT NOT NULL DEFAULT 'kill',
    auto_resume   INTEGER NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL DEFAULT '{}',
    env_vars      TEXT NOT NULL DEFAULT '{}',
    access_token  TEXT NOT NULL,
    cpu_count     INTEGER NOT NULL,
    memory_mb     INTEGER NOT NULL,
    disk_mb       INTEGER NOT NULL,
    init_pid      INTEGER,
    init_start    INTEGER,                -- /proc/<pid>/stat starttime, to tell a reused pid apart
    ended_reason  TEXT,
    id_base       INTEGER,                -- first host uid/gid of its user namespace's range
    volume_mounts TEXT NOT NULL DEFAULT '{}',  -- {path inside: volume name}
    booting       INTEGER NOT NULL DEFAULT 0   -- 1 from a create's early answer until its boot is done
);
CREATE INDEX IF NOT EXISTS sandboxes_listing ON sandboxes (state, started_at, id);
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id  TEXT NOT NULL,
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,            -- created, paused, resumed, timeout_set, killed, died, adopted
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS events_by_sandbox ON events (sandbox_id, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    name        TEXT PRIMARY KEY,
    layers      TEXT NOT NULL,            -- JSON list of layer digests in the template store, topmost first
    config      TEXT NOT NULL DEFAULT '{}',  -- JSON: env, user, workdir, start_cmd, ready_cmd, ...
    source      TEXT NOT NULL,            -- where it came from (an image reference, an archive, a recipe)
    created_at  REAL NOT NULL
);
"""


@dataclass(slots=True)
class TemplateRow:
    """One template as stored: its layers (digests, topmost first) and its config."""

    name: str
    layers: list[str]
    config: dict[str, Any]
    source: str
    created_at: float

    def build_id(self) -> str:
        """The build that made this template, else (an import, a built-in) a stable id derived from
        its name."""
        build_id = self.config.get("build_id")
        if isinstance(build_id, str):
            return build_id
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandboxd-template:{self.name}"))


@dataclass(slots=True)
class SandboxRow:
    """One sandbox as stored."""

    id: str
    template_id: str
    alias: str | None
    state: str
    started_at: float
    end_at: float
    access_token: str
    cpu_count: int
    memory_mb: int
    disk_mb: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    remaining_s: float | None = None
    pause_mode: str | None = None
    on_timeout: str = "kill"
    auto_resume: bool = False
    init_pid: int | None = None
    init_start: int | None = None
    ended_reason: str | None = None
    id_base: int | None = None
    volume_mounts: dict[str, str] = field(default_factory=dict)
    """Where volumes are mounted: path inside the sandbox -> volume name (E2B's ``volumeMounts``)."""
    booting: bool = False
    """Stored from a create answered early (``manager.answers_early``) until its link and ``/init``
    are done: a runtime that finds it still set never finished the boot (it was killed meanwhile), so
    the sandbox's agent has no token and no env, and nobody adopts it."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One lifecycle event as :meth:`Store.lifecycle` reads it."""

    seq: int
    sandbox_id: str
    at: float
    kind: str
    reason: str | None
    template_id: str | None
    """The sandbox's template, while its row exists."""
    run_seq: int | None
    """The ``created`` or ``resumed`` event that began the run this event belongs to."""
    metadata: str | None
    """The sandbox's metadata (JSON), while its row exists."""


_STORED_EVENT = (
    "SELECT e.seq, e.sandbox_id, e.at, e.kind, e.reason, s.template_id,"
    " (SELECT MAX(r.seq) FROM events r WHERE r.sandbox_id = e.sandbox_id"
    "  AND r.kind IN ('created', 'resumed') AND r.seq <= e.seq), s.metadata"
    " FROM events e LEFT JOIN sandboxes s ON s.id = e.sandbox_id"
)
"""What :class:`StoredEvent` is read with (a ``WHERE`` follows)."""


DATABASE = "sandboxd.db"
"""The database's name in a data dir."""


def live_ids(path: Path) -> set[str]:
    """The ids of the running and paused sandboxes a runtime starting on the database at ``path``
    would adopt (:meth:`Store.live`'s, less those whose boot never finished: ``SandboxRow.booting``),
    read without changing it (no checkpoint, no migration): for another runtime's data dir
    (:mod:`.leftovers`), whose owner may start on it at any moment. Raises ``sqlite3.Error`` when it
    cannot be read."""
    reader = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=1)
    try:
        columns = {r[1] for r in reader.execute("PRAGMA table_info(sandboxes)")}
        booted = " AND booting = 0" if "booting" in columns else ""  # an older runtime's: none boots
        query = f"SELECT id FROM sandboxes WHERE state IN ('running', 'paused'){booted}"
        return {str(r[0]) for r in reader.execute(query)}
    finally:
        reader.close()


_COLUMNS = [f for f in SandboxRow.__dataclass_fields__]
_INSERT = f"INSERT INTO sandboxes ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"


class Store:
    """The runtime's SQLite database in the data dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(sandboxes)")}
        if "id_base" not in columns:  # a data dir from before user namespaces
            self.db.execute("ALTER TABLE sandboxes ADD COLUMN id_base INTEGER")
        if "volume_mounts" not in columns:  # a data dir from before volumes
            self.db.execute("ALTER TABLE sandboxes ADD COLUMN volume_mounts TEXT NOT NULL DEFAULT '{}'")
        if "booting" not in columns:  # a data dir from before creates answered early
            self.db.execute("ALTER TABLE sandboxes ADD COLUMN booting INTEGER NOT NULL DEFAULT 0")
        self.listeners: list[Callable[[int, str, str], None]] = []
        """Told of each event once it is committed (its ``seq``, sandbox and kind), on the writer's thread:
        they must be quick (the webhooks' hand-off to their delivery threads)."""

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------------------------- settings

    def setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------------------- sandboxes

    def insert(self, row: SandboxRow, event: tuple[str, str | None] | None = None) -> None:
        """A new sandbox's row, and with it its first ``event`` (kind, reason): one transaction, one
        commit, where two cost a create twice the WAL writes and locking."""
        values = [self._encode(name, getattr(row, name)) for name in _COLUMNS]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(_INSERT, values)
            seq = None if event is None else self._event(row.id, *event)
        if event is not None:
            self._announce(seq, row.id, event[0])

    def update(self, sandbox_id: str, **changes: Any) -> None:
        assignments = ",".join(f"{name} = ?" for name in changes)
        values = [self._encode(name, value) for name, value in changes.items()]
        self.db.execute(f"UPDATE sandboxes SET {assignments} WHERE id = ?", [*values, sandbox_id])

    def get(self, sandbox_id: str) -> SandboxRow | None:
        cur = self.db.execute(f"SELECT {','.join(_COLUMNS)} FROM sandboxes WHERE id = ?", (sandbox_id,))
        row = cur.fetchone()
        return None if row is None else self._decode(row)

    def reach(self, sandbox_id: str) -> tuple[str, str | None, bool] | None:
        """``(state, ended_reason, auto_resume)`` of a sandbox, or None: what the proxy asks of every
        request (:meth:`.manager.SandboxManager.ensure_reachable`), without :meth:`get`'s whole row
        (three JSON columns decoded, a dataclass built: ~4x the cost of this query alone)."""
        row = self.db.execute(
            "SELECT state, ended_reason, auto_resume FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))

    def live(self) -> list[SandboxRow]:
        """Running and paused sandboxes, oldest first."""
        cur = self.db.execute(
            f"SELECT {','.join(_COLUMNS)} FROM sandboxes WHERE state IN ('running', 'paused') ORDER BY started_at, id"
        )
        return [self._decode(r) for r in cur.fetchall()]

    def expired(self, now: float) -> list[str]:
        """The running sandboxes whose end is at or before ``now``, oldest first: what the reaper
        looks for every tick. Only their ids: :meth:`live` decodes every live row (three JSON
        columns, a dataclass: ~14 us a row, so 1.4 ms a tick with 100 sandboxes live and four ticks a
        second), this is one query on the ``sandboxes_listing`` index (~15 us at 100)."""
        cur = self.db.execute(
            "SELECT id FROM sandboxes WHERE state = 'running' AND end_at <= ? ORDER BY started_at, id", (now,)
        )
        return [str(r[0]) for r in cur.fetchall()]

    def page(
        self, states: list[str], after: tuple[float, str] | None, descending: bool, limit: int
    ) -> list[SandboxRow]:
        """Up to ``limit`` sandboxes in ``states`` ordered by (started_at, id), strictly after the
        cursor ``after`` in that order: a stable keyset, so pages neither repeat nor skip while
        sandboxes come and go."""
        marks = ",".join("?" * len(states))
        sql = f"SELECT {','.join(_COLUMNS)} FROM sandboxes WHERE state IN ({marks})"
        params: list[Any] = list(states)
        if after is not None:
            op = "<" if descending else ">"
            sql += f" AND (started_at, id) {op} (?, ?)"
            params += [after[0], after[1]]
        order = "DESC" if descending else "ASC"
        sql += f" ORDER BY started_at {order}, id {order} LIMIT ?"
        params.append(limit)
        return [self._decode(r) for r in self.db.execute(sql, params).fetchall()]

    # ------------------------------------------------------------------------------- templates

    def put_template(self, row: TemplateRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO templates (name, layers, config, source, created_at) VALUES (?, ?, ?, ?, ?)",
            (row.name, json.dumps(row.layers), json.dumps(row.config, sort_keys=True), row.source, row.created_at),
        )

    def template(self, name: str) -> TemplateRow | None:
        cur = self.db.execute("SELECT name, layers, config, source, created_at FROM templates WHERE name = ?", (name,))
        row = cur.fetchone()
        return None if row is None else self._template(row)

    def templates(self) -> list[TemplateRow]:
        cur = self.db.execute("SELECT name, layers, config, source, created_at FROM templates ORDER BY name")
        return [self._template(r) for r in cur.fetchall()]

    def delete_template(self, name: str) -> None:
        self.db.execute("DELETE FROM templates WHERE name = ?", (name,))

    @staticmethod
    def _template(row: tuple[Any, ...]) -> TemplateRow:
        name, layers, config, source, created_at = row
        return TemplateRow(str(name), json.loads(layers), json.loads(config), str(source), float(created_at))

    # ---------------------------------------------------------------------------------- events

    def event(self, sandbox_id: str, kind: str, reason: str | None = None) -> None:
        self._announce(self._event(sandbox_id, kind, reason), sandbox_id, kind)

    def _event(self, sandbox_id: str, kind: str, reason: str | None) -> int | None:
        cursor = self.db.execute(
            "INSERT INTO events (sandbox_id, at, kind, reason) VALUES (?, ?, ?, ?)",
            (sandbox_id, time.time(), kind, reason),
        )
        return cursor.lastrowid

    def _announce(self, seq: int | None, sandbox_id: str, kind: str) -> None:
        if seq is not None:
            for listener in self.listeners:
                listener(seq, sandbox_id, kind)

    def events(self, sandbox_id: str) -> list[tuple[float, str, str | None]]:
        cur = self.db.execute("SELECT at, kind, reason FROM events WHERE sandbox_id = ? ORDER BY seq", (sandbox_id,))
        return [(float(at), str(kind), reason) for at, kind, reason in cur.fetchall()]

    def lifecycle(
        self, sandbox_id: str | None, kinds: list[str], offset: int, limit: int, ascending: bool
    ) -> list[StoredEvent]:
        """One page of events of ``kinds``, of one sandbox or all, in the order they were recorded
        (``ascending``) or newest first; each with its sandbox's template (while its row exists) and
        the event that began the run it belongs to (its last ``created`` or ``resumed``).

        For a worker thread: it reads through a connection of its own (WAL lets it read beside the
        event loop's writes), since a page far in (``offset``) or of a rare type walks the events
        kept (~0.2 µs a row here: 100 ms past 500,000), which the loop must not wait for."""
        reader = self.reader()
        try:
            return self._lifecycle(reader, sandbox_id, kinds, offset, limit, ascending)
        finally:
            reader.close()

    def reader(self) -> sqlite3.Connection:
        """A read-only connection of its own, for a thread other than the event loop's (WAL lets it
        read beside the loop's writes)."""
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    @staticmethod
    def stored_event(db: sqlite3.Connection, seq: int) -> StoredEvent | None:
        """One event by its ``seq``, as :meth:`lifecycle` reads each (``db``: a :meth:`reader`)."""
        row = db.execute(f"{_STORED_EVENT} WHERE e.seq = ?", (seq,)).fetchone()
        return None if row is None else StoredEvent(*row)

    @staticmethod
    def template_build_id(db: sqlite3.Connection, name: str) -> str | None:
        """The build id of template ``name`` (see :meth:`TemplateRow.build_id`); None when it is gone."""
        cur = db.execute("SELECT name, layers, config, source, created_at FROM templates WHERE name = ?", (name,))
        row = cur.fetchone()
        return None if row is None else Store._template(row).build_id()

    @staticmethod
    def _lifecycle(
        db: sqlite3.Connection, sandbox_id: str | None, kinds: list[str], offset: int, limit: int, ascending: bool
    ) -> list[StoredEvent]:
        marks = ",".join("?" * len(kinds))
        sql = f"{_STORED_EVENT} WHERE e.kind IN ({marks})"
        params: list[Any] = list(kinds)
        if sandbox_id is not None:
            sql += " AND e.sandbox_id = ?"
            params.append(sandbox_id)
        sql += f" ORDER BY e.seq {'ASC' if ascending else 'DESC'} LIMIT ? OFFSET ?"
        params += [limit, offset]
        return [StoredEvent(*row) for row in db.execute(sql, params).fetchall()]

    def forget_before(self, cutoff: float, most: int = 10_000) -> int:
        """Retention: drop up to ``most`` events recorded before ``cutoff`` (oldest first: a long
        backlog goes over several calls, each short), and the ended sandboxes among theirs that have
        no event left. Returns the number of events dropped."""
        with self.db:
            self.db.execute("BEGIN")
            old = self.db.execute(
                "SELECT seq, sandbox_id FROM events WHERE at < ? ORDER BY at LIMIT ?", (cutoff, most)
            ).fetchall()
            if not old:
                return 0
            self.db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq, _ in old])
            self.db.executemany(
                "DELETE FROM sandboxes WHERE id = ? AND state = 'ended'"
                " AND NOT EXISTS (SELECT 1 FROM events WHERE events.sandbox_id = sandboxes.id)",
                [(sandbox_id,) for sandbox_id in {sandbox_id for _, sandbox_id in old}],
            )
            return len(old)

    # ---------------------------------------------------------------------------------- coding

    @staticmethod
    def _encode(name: str, value: Any) -> Any:
        if name in ("metadata", "env_vars", "volume_mounts"):
            return json.dumps(value, separators=(",", ":"))
        if name in ("auto_resume", "booting"):
            return int(bool(value))
        return value

    @staticmethod
    def _decode(row: tuple[Any, ...]) -> SandboxRow:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["metadata"] = json.loads(values["metadata"])
        values["env_vars"] = json.loads(values["env_vars"])
        values["volume_mounts"] = json.loads(values["volume_mounts"])
        values["auto_resume"] = bool(values["auto_resume"])
        values["booting"] = bool(values["booting"])
        return SandboxRow(**values)
