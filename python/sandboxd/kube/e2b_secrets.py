"""E2B's secrets on a cluster: every secret of the namespace in one Kubernetes Secret,
:data:`SECRETS_NAME`, which ``serve`` replicas write (``/secrets``) and nodes read.

One Secret rather than one per E2B secret so that RBAC can give nodes exactly it (``resourceNames``)
and never the API key's Secret beside it. Each entry is keyed by the secret's id (``sec_…``, a valid
data key) and holds its record as JSON, value included; the names, checks, limits and answers are
the single machine's (:mod:`sandboxd.runtime.secrets`). Writes replace the Secret guarded by its
``resourceVersion``, so concurrent replicas never lose each other's change.

A node keeps a copy in its own database (:meth:`~sandboxd.runtime.secrets.SecretStore.mirror`),
where its egress proxy finds a secret's current value as on one machine; it follows the Secret with a
watch, and reads it afresh before it starts a sandbox whose rules name a secret its copy lacks. Both
feed one :class:`NodeCopy`, which never goes back to an older version of the Secret: a watch event
the fresh read already passed, or a fresh read that a watch event passed while it was on its way.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.network.policy import NetworkConfig, secret_references
from sandboxd.runtime.secrets import (
    ID_PREFIX,
    MAX_NAME_CHARS,
    MAX_SECRETS,
    Secret,
    SecretStore,
    check_name,
    check_value,
    missing_secrets,
)

from .client import Kube, KubeError, path_of

SECRETS_NAME = "sandboxd-e2b-secrets"

WRITE_ATTEMPTS = 10
"""Guarded writes retried on a conflict: each retry reads again, so only a storm of concurrent
writers to the same Secret runs out."""

T = TypeVar("T")
Records = dict[str, dict[str, Any]]
"""Secret id → its record (``name``, ``value``, ``version``, ``metadata``, ``created_at``, ``updated_at``)."""


def decode(secret: dict[str, Any]) -> Records:
    """The records of the Kubernetes Secret ``secret``. Entries that are not records the single
    machine would have stored are skipped (the Secret is writable by anyone RBAC lets write it), and
    the next write through the API leaves them out: a name not in its stored (lowercased) form, which
    no placeholder finds, and a name an earlier entry (by id) has already, which the node's copy could
    not hold twice (its mirror would fail whole and keep values the cluster no longer has)."""
    records: Records = {}
    names: set[str] = set()
    for key, data in sorted((secret.get("data") or {}).items()):
        try:
            record = json.loads(base64.b64decode(data))
            name, value = record["name"], record["value"]
            if not isinstance(name, str) or not isinstance(value, str) or check_name(name) != name:
                continue
            check_value(value)
            if not isinstance(record["metadata"], dict) or not isinstance(record["version"], int):
                continue
            float(record["created_at"]), float(record["updated_at"])
        except (ValueError, TypeError, KeyError, ApiError):
            continue
        if key.startswith(ID_PREFIX) and name not in names:
            names.add(name)
            records[key] = record
    return records


def as_secret(secret_id: str, record: dict[str, Any]) -> Secret:
    return Secret(
        secret_id,
        record["name"],
        record["version"],
        record["metadata"],
        float(record["created_at"]),
        float(record["updated_at"]),
    )


def _older(version: str | None, than: str | None) -> bool:
    """Whether the Secret at ``version`` is older than at ``than``. Resource versions are compared as
    Kubernetes lets clients compare those of one resource (KEP-5504, stable in 1.35; etcd's revisions
    before that): positive integers without leading zeros. Anything else is never called older."""

    def number(text: str | None) -> int | None:
        return int(text) if text and text.isascii() and text.isdigit() and text[0] != "0" else None

    a, b = number(version), number(than)
    return a is not None and b is not None and a < b


class NodeCopy:
    """A node's copy of the cluster's secrets, in its :class:`~sandboxd.runtime.secrets.SecretStore`,
    from the two ways the node reads the Secret: its watch, and a fresh read before a sandbox whose
    rules name a secret the copy lacks. The two race: the fresh read may land while the watch still
    brings older events (the copy would lose a secret created a moment ago, and the sandbox's first
    requests to its rule's host be refused), or a watch event may land while the fresh read is on its
    way (the copy would keep, until the Secret next changed, a value updated or deleted meanwhile). So
    each version is applied only if it is not older than the one the copy holds."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self.version: str | None = None
        """The Secret's resourceVersion the copy was made from (None: none yet, or no Secret)."""

    def apply(self, secret: dict[str, Any] | None, deleted: bool = False) -> bool:
        """Make the copy hold the records of ``secret`` (none when ``deleted``, as a watch's DELETED
        event says with the deletion's version, or when it is None: a read found no Secret), unless
        the copy was made from a newer version. Whether it was applied."""
        version = str(((secret or {}).get("metadata") or {}).get("resourceVersion") or "") or None
        if _older(version, self.version) or (version is None and self.version is not None):
            # Older; or a read that found no Secret, which has no version to order it by: the watch
            # brings the deletion, with its version, if there was one.
            return False
        records = {} if deleted or secret is None else decode(secret)
        self.store.mirror([(as_secret(k, r), r["value"]) for k, r in records.items()])
        self.version = version
        return True


class KubeSecrets:
    """The ``/secrets`` store of ``serve --backend kubernetes`` (the async side of
    :class:`~sandboxd.runtime.secret_api.SecretApi`)."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    async def _read(self) -> tuple[Records, str | None]:
        """The records and the Secret's resourceVersion (None: it does not exist yet)."""
        found = await self.current()
        if found is None:
            return {}, None
        return decode(found), str(found["metadata"]["resourceVersion"])

    async def _change(self, change: Callable[[Records], T]) -> T:
        """Apply ``change`` to the current records (it edits them in place and returns the answer)
        and write them back, guarded by resourceVersion; read again after a concurrent write."""
        for _attempt in range(WRITE_ATTEMPTS):
            records, version = await self._read()
            answer = change(records)
            body = _body(records)
            try:
                if version is None:
                    await self.kube.create(path_of("secrets", self.namespace), body)
                else:
                    body["metadata"]["resourceVersion"] = version
                    await self.kube.replace(path_of("secrets", self.namespace, SECRETS_NAME), body)
                return answer
            except KubeError as exc:
                if exc.status == 409:
                    continue
                if exc.status in (400, 413, 422):  # past Kubernetes' 1 MiB for a Secret
                    raise ApiError(
                        409,
                        f"the cluster's secrets are full (Kubernetes keeps them in one Secret of at most 1 MiB): "
                        f"delete one first ({exc.body.get('message', exc)})",
                    ) from None
                raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None
        raise ApiError(409, "the secrets kept changing meanwhile; try again")

    async def ensure(self) -> None:
        """Create the Secret, empty, unless it exists (``serve`` at start, before any sandbox runs),
        so that it always exists as ``serve`` made it: RBAC lets nodes read it and create no Secret
        at all (see :mod:`.secrets`), and this keeps it so should a node's role ever grow that verb."""
        try:
            await self.kube.create(path_of("secrets", self.namespace), _body({}))
        except KubeError as exc:
            if exc.status != 409:
                raise

    @staticmethod
    def _find(records: Records, selector: str) -> str:
        if selector.startswith(ID_PREFIX):
            if selector in records:
                return selector
        else:
            name = selector.lower()
            for secret_id, record in records.items():
                if record["name"] == name:
                    return secret_id
        raise ApiError(404, f"secret '{selector[:MAX_NAME_CHARS]}' not found")

    async def create(self, name: str, value: str, metadata: dict[str, str]) -> Secret:
        name = check_name(name)
        check_value(value)

        def change(records: Records) -> Secret:
            if len(records) >= MAX_SECRETS:
                raise ApiError(409, f"the cluster keeps at most {MAX_SECRETS} secrets: delete one first")
            if any(r["name"] == name for r in records.values()):
                raise ApiError(409, f"a secret named '{name}' exists already: update it instead")
            now = time.time()
            secret_id = f"{ID_PREFIX}{uuid.uuid4()}"
            records[secret_id] = {
                "name": name,
                "value": value,
                "version": 1,
                "metadata": metadata,
                "created_at": now,
                "updated_at": now,
            }
            return as_secret(secret_id, records[secret_id])

        return await self._change(change)

    async def find(self, selector: str) -> Secret:
        records, _version = await self._read()
        secret_id = self._find(records, selector)
        return as_secret(secret_id, records[secret_id])

    async def update(self, selector: str, value: str, metadata: dict[str, str] | None) -> Secret:
        check_value(value)

        def change(records: Records) -> Secret:
            secret_id = self._find(records, selector)
            record = records[secret_id]
            record.update(value=value, version=record["version"] + 1, updated_at=time.time())
            if metadata is not None:
                record["metadata"] = metadata
            return as_secret(secret_id, record)

        return await self._change(change)

    async def delete(self, selector: str) -> None:
        def change(records: Records) -> None:
            del records[self._find(records, selector)]

        await self._change(change)

    async def page(self, limit: int, after: str | None) -> tuple[list[Secret], str | None]:
        records, _version = await self._read()
        ordered = sorted((r["name"], k) for k, r in records.items() if r["name"] > (after or ""))
        secrets = [as_secret(k, records[k]) for _name, k in ordered[:limit]]
        return secrets, (secrets[-1].name if len(ordered) > limit else None)

    async def current(self) -> dict[str, Any] | None:
        """The Secret as the API server has it now (None: it does not exist), for a node's copy."""
        try:
            return await self.kube.get(path_of("secrets", self.namespace, SECRETS_NAME))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise ApiError(503, f"the Kubernetes API server failed: {exc}") from None

    async def check_references(self, config: NetworkConfig) -> None:
        """400 when ``config``'s header rules name a secret the cluster does not have."""
        names = secret_references(config)
        if names:
            records, _version = await self._read()
            missing_secrets(names - {r["name"] for r in records.values()})


def _body(records: Records) -> dict[str, Any]:
    """The Secret holding ``records``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRETS_NAME, "labels": {"app.kubernetes.io/managed-by": "sandboxd"}},
        "type": "Opaque",
        "data": {k: base64.b64encode(json.dumps(r).encode()).decode() for k, r in records.items()},
    }
