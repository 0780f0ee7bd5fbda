"""Sandboxes' network state in the runtime's SQLite database: each sandbox's slot (its addresses),
its settings as the client gave them, and its traffic access token.

One table of its own beside the lifecycle's (``sandbox_networks``), in the same database: the
runtime writes it from its event loop thread; the network helper process reads it (read-only) to
learn a calling sandbox's rules, so an ``update_network`` is in force for the next connection
without any message between the two processes.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .policy import NetworkConfig

log = logging.getLogger("sandboxd.network")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox_networks (
    sandbox_id     TEXT PRIMARY KEY,
    slot           INTEGER UNIQUE,     -- the sandbox's link while it has one (running, or paused in memory)
    config         TEXT NOT NULL,      -- policy.NetworkConfig as JSON
    traffic_token  TEXT                -- required on its URLs when allow_public_traffic is false
);
"""


@dataclass(frozen=True, slots=True)
class NetworkRow:
    sandbox_id: str
    slot: int | None
    config: NetworkConfig
    traffic_token: str | None


class NetworkStore:
    """The runtime's side (read-write, on the runtime's connection).

    Rows read or written are also kept in memory, written through: this object is the table's only
    writer (the helper only reads it), so the copy is the table. A create read its row twice (the
    link, its answer's traffic token) and every proxied request once (the port's TLS), each a query
    and a JSON parse of the settings. Only rows that exist are kept (one per sandbox with
    settings, dropped with them): a request naming a sandbox that has none still asks the table."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        self._rows: dict[str, NetworkRow] = {}

    def put(self, row: NetworkRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO sandbox_networks (sandbox_id, slot, config, traffic_token) VALUES (?, ?, ?, ?)",
            (row.sandbox_id, row.slot, row.config.to_json(), row.traffic_token),
        )
        if row.slot is not None:  # REPLACE also deleted any other sandbox's row on this slot (UNIQUE)
            for other in [k for k, r in self._rows.items() if r.slot == row.slot and k != row.sandbox_id]:
                del self._rows[other]
        self._rows[row.sandbox_id] = row

    def set_slot(self, sandbox_id: str, slot: int | None) -> None:
        self.db.execute("UPDATE sandbox_networks SET slot = ? WHERE sandbox_id = ?", (slot, sandbox_id))
        row = self._rows.get(sandbox_id)
        if row is not None:
            self._rows[sandbox_id] = dataclasses.replace(row, slot=slot)

    def set_config(self, sandbox_id: str, config: NetworkConfig) -> None:
        self.db.execute("UPDATE sandbox_networks SET config = ? WHERE sandbox_id = ?", (config.to_json(), sandbox_id))
        row = self._rows.get(sandbox_id)
        if row is not None:
            self._rows[sandbox_id] = dataclasses.replace(row, config=config)

    def get(self, sandbox_id: str) -> NetworkRow | None:
        kept = self._rows.get(sandbox_id)
        if kept is not None:
            return kept
        row = self.db.execute(
            "SELECT sandbox_id, slot, config, traffic_token FROM sandbox_networks WHERE sandbox_id = ?", (sandbox_id,)
        ).fetchone()
        if row is None:
            return None
        found = self._rows[sandbox_id] = _row(row)
        return found

    def with_slots(self) -> list[NetworkRow]:
        rows = self.db.execute(
            "SELECT sandbox_id, slot, config, traffic_token FROM sandbox_networks WHERE slot IS NOT NULL"
        ).fetchall()
        return [_row(r) for r in rows]

    def delete(self, sandbox_id: str) -> None:
        self.db.execute("DELETE FROM sandbox_networks WHERE sandbox_id = ?", (sandbox_id,))
        self._rows.pop(sandbox_id, None)


def _row(row: tuple[str, int | None, str, str | None]) -> NetworkRow:
    return NetworkRow(row[0], row[1], NetworkConfig.from_json(row[2]), row[3])


class SlotReader:
    """The helper's side: which sandbox holds a slot, and its settings (read-only connection)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def at(self, slot: int) -> tuple[str, str] | None:
        """``(sandbox id, config JSON)`` of the sandbox on ``slot``."""
        row = self.db.execute("SELECT sandbox_id, config FROM sandbox_networks WHERE slot = ?", (slot,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def secret(self, name: str) -> str | None:
        """The current value of the secret ``name`` (lowercased), None when there is none (the
        runtime's :mod:`~sandboxd.runtime.secrets` keeps them in the same database)."""
        try:
            row = self.db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as exc:  # fail closed (the caller drops the connection), and say why
            log.error("could not read secret '%s' from the runtime's database: %s", name, exc)
            return None
        return None if row is None else str(row[0])
