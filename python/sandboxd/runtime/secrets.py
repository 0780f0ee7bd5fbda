"""E2B's secrets (``Secret`` in the SDKs): named values kept by the runtime and never given to a
sandbox. A sandbox's egress rules name them with ``${e2b.secrets.<name>}`` (what ``Secret.fill``
writes) in a header transform's value, and the egress proxy puts the secret's current value there
on each request it forwards to the rule's host (:mod:`.network.egress`), so the value exists only
in the runtime's database, the network helper and the request on its way to that host.

Stored in the runtime's SQLite database (its data dir is root's, ``0700``), in table ``secrets``
beside the sandboxes' (the network helper reads it, read-only, as it reads their rules). Values are
write-only: no answer of the API carries one.

Names are kept lowercased (as E2B's API keeps them; placeholders are matched the same way); a name
is 1 to 128 characters without ``{``, ``}``, white space or control characters (the SDKs refuse braces
and control characters; white space would make a placeholder that no header value can carry). A
value goes into HTTP header values, so it is 1 to :data:`MAX_VALUE_CHARS` characters, none of them
a control character (a line break would let it write headers of its own).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass

from .errors import ApiError
from .network.policy import MAX_HEADER_VALUE_LEN, SECRET_NAME, NetworkConfig, bad_header_value, secret_references

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    id          TEXT PRIMARY KEY,   -- sec_<uuid>
    name        TEXT UNIQUE NOT NULL,
    value       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    metadata    TEXT NOT NULL,      -- JSON object of strings
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
"""

MAX_NAME_CHARS = 128
MAX_VALUE_CHARS = MAX_HEADER_VALUE_LEN
"""A value is only ever put in a header value: no longer than a rule's header value may be."""

MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_BYTES = 128
MAX_METADATA_VALUE_BYTES = 1024
MAX_METADATA_BYTES = 8 << 10
"""E2B's documented bounds of a secret's metadata (entries, key, value, all of it, in UTF-8)."""

ID_PREFIX = "sec_"
"""Secret ids start with it, and names may not (E2B reserves it): a selector is never both."""

MAX_SECRETS = 1000
"""Secrets a runtime keeps at most: E2B sets no limit we know of; this keeps a list cheap."""

LIST_LIMIT = 100
"""A page of ``GET /secrets`` when the client names no ``limit`` (and the most it may name)."""

_NAME = re.compile(SECRET_NAME)
"""As :data:`~.network.policy.SECRET_PLACEHOLDER` reads a name."""

_COLUMNS = "id, name, version, metadata, created_at, updated_at"
"""A secret's record without its value, as :func:`_secret` reads it."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret's record without its value."""

    id: str
    name: str
    version: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float


def check_name(name: str) -> str:
    """The stored (lowercased) form of a secret's name; 400 when it cannot be one."""
    lowered = name.lower()  # checked as stored: lowercasing may lengthen it ("İ")
    if not _NAME.fullmatch(lowered):
        raise ApiError(
            400,
            f"secret name {name[:MAX_NAME_CHARS]!r} is not usable: 1 to {MAX_NAME_CHARS} characters without "
            "'{', '}', white space or control characters",
        )
    if lowered.startswith(ID_PREFIX):
        raise ApiError(400, f"secret name {name!r} is not usable: '{ID_PREFIX}' starts secret ids, not names")
    return lowered


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """400 unless ``metadata`` is within E2B's bounds."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise ApiError(400, f"'metadata' has {len(metadata)} entries; at most {MAX_METADATA_KEYS} are allowed")
    total = 0
    for key, value in metadata.items():
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if key_bytes > MAX_METADATA_KEY_BYTES or value_bytes > MAX_METADATA_VALUE_BYTES:
            raise ApiError(
                400,
                f"'metadata' key {key[:MAX_METADATA_KEY_BYTES]!r}: keys are at most {MAX_METADATA_KEY_BYTES} bytes "
                f"and values at most {MAX_METADATA_VALUE_BYTES}",
            )
        total += key_bytes + value_bytes
    if total > MAX_METADATA_BYTES:
        raise ApiError(400, f"'metadata' is {total} bytes; at most {MAX_METADATA_BYTES} are allowed")
    return metadata


def check_value(value: str) -> str:
    """400 unless ``value`` can stand in an HTTP header value."""
    if not value:
        raise ApiError(400, "'value' is required and must be a non-empty string")
    if len(value) > MAX_VALUE_CHARS:
        raise ApiError(400, f"'value' is {len(value)} characters long; at most {MAX_VALUE_CHARS} are allowed")
    if bad_header_value(value):
        raise ApiError(
            400, "'value' goes into HTTP header values: it may not contain line breaks or other control characters"
        )
    return value


class SecretStore:
    """The runtime's side (read-write, on the runtime's connection, from its event loop thread)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)

    def create(self, name: str, value: str, metadata: dict[str, str]) -> Secret:
        name = check_name(name)
        check_value(value)
        (count,) = self.db.execute("SELECT COUNT(*) FROM secrets").fetchone()
        if count >= MAX_SECRETS:
            raise ApiError(409, f"this runtime keeps at most {MAX_SECRETS} secrets: delete one first")
        now = time.time()
        secret = Secret(f"{ID_PREFIX}{uuid.uuid4()}", name, 1, metadata, now, now)
        try:
            self.db.execute(
                "INSERT INTO secrets (id, name, value, version, metadata, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (secret.id, name, value, 1, json.dumps(metadata), now, now),
            )
        except sqlite3.IntegrityError:
            raise ApiError(409, f"a secret named '{name}' exists already: update it instead") from None
        return secret

    def find(self, selector: str) -> Secret:
        """A secret by its id or its name; 404 otherwise."""
        column = "id" if selector.startswith(ID_PREFIX) else "name"
        key = selector if column == "id" else selector.lower()
        row = self.db.execute(f"SELECT {_COLUMNS} FROM secrets WHERE {column} = ?", (key,)).fetchone()
        if row is None:
            raise ApiError(404, f"secret '{selector[:MAX_NAME_CHARS]}' not found")
        return _secret(row)

    def update(self, selector: str, value: str, metadata: dict[str, str] | None) -> Secret:
        """A new version of the secret: its value, and its metadata when given."""
        check_value(value)
        current = self.find(selector)
        now = time.time()
        kept = current.metadata if metadata is None else metadata
        self.db.execute(
            "UPDATE secrets SET value = ?, version = version + 1, metadata = ?, updated_at = ? WHERE id = ?",
            (value, json.dumps(kept), now, current.id),
        )
        return Secret(current.id, current.name, current.version + 1, kept, current.created_at, now)

    def delete(self, selector: str) -> None:
        self.db.execute("DELETE FROM secrets WHERE id = ?", (self.find(selector).id,))

    def page(self, limit: int, after: str | None) -> tuple[list[Secret], str | None]:
        """Up to ``limit`` secrets by name, after the name ``after``; and the name to go on from."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM secrets WHERE name > ? ORDER BY name LIMIT ?",
            (after or "", limit + 1),
        ).fetchall()
        secrets = [_secret(r) for r in rows[:limit]]
        return secrets, (secrets[-1].name if len(rows) > limit else None)

    def check_references(self, config: NetworkConfig) -> None:
        """400 when ``config``'s header rules name a secret that does not exist (a request to the
        rule's host could not be sent as written)."""
        names = secret_references(config)
        if not names:
            return
        marks = ",".join("?" * len(names))
        found = {r[0] for r in self.db.execute(f"SELECT name FROM secrets WHERE name IN ({marks})", sorted(names))}
        missing_secrets(names - found)

    def mirror(self, secrets: list[tuple[Secret, str]]) -> None:
        """Make the table hold exactly ``secrets`` (each with its value), in one transaction: a
        ``sandboxd node``'s copy of its cluster's secrets (``sandboxd.kube.e2b_secrets``)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM secrets")
            self.db.executemany(
                "INSERT INTO secrets (id, name, value, version, metadata, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (s.id, s.name, value, s.version, json.dumps(s.metadata), s.created_at, s.updated_at)
                    for s, value in secrets
                ],
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def names(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM secrets")}


def missing_secrets(missing: set[str]) -> None:
    """The 400 for header rules that name secrets that do not exist (a request to the rule's host
    could not be sent as written); nothing when none is missing."""
    if missing:
        raise ApiError(
            400,
            f"network.rules: no secret named {', '.join(repr(n) for n in sorted(missing))}: create it first "
            "(Secret.create) and refer to it as ${e2b.secrets.<name>}",
        )


def _secret(row: tuple[str, str, int, str, float, float]) -> Secret:
    return Secret(row[0], row[1], int(row[2]), json.loads(row[3]), float(row[4]), float(row[5]))
