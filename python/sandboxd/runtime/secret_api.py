"""E2B's secrets API, as the SDKs' ``Secret`` calls it (the store is :mod:`.secrets`).

Control plane, with ``X-API-KEY`` like the rest of the API; ``{secret}`` is a secret's id
(``sec_…``) or its name:

* ``POST /secrets`` ``{"name", "value", "metadata"?}`` -> 201 ``Secret``; 409 when the name is taken;
* ``GET /secrets?limit=&nextToken=`` -> 200 ``[Secret]`` by name, ``x-next-token`` while more follow;
* ``GET /secrets/{secret}`` -> 200 ``Secret``;
* ``POST /secrets/{secret}`` ``{"value", "metadata"?}`` -> 200 ``Secret``, its ``currentVersion`` one
  more (the metadata is replaced when given);
* ``DELETE /secrets/{secret}`` -> 204.

``Secret`` is ``{secretID, name, currentVersion, metadata, createdAt, updatedAt}``: never the value.
Errors are ``{"code", "message"}``; an unknown secret is a 404 (the SDKs raise ``SecretNotFound``).
"""

from __future__ import annotations

import base64
import re
from typing import Any, Protocol

from sandboxd.agent.asgi import Receive, Scope, Send, send_empty, send_json

from .api import Route, iso, serve_routes
from .errors import ApiError
from .inputs import Body, Query
from .secrets import LIST_LIMIT, MAX_VALUE_CHARS, Secret, SecretStore, check_metadata, check_name


class Secrets(Protocol):
    """Where the secrets are kept: this machine's database (:class:`LocalSecrets`), or a cluster's
    (``sandboxd.kube.e2b_secrets.KubeSecrets``)."""

    async def create(self, name: str, value: str, metadata: dict[str, str]) -> Secret: ...
    async def find(self, selector: str) -> Secret: ...
    async def update(self, selector: str, value: str, metadata: dict[str, str] | None) -> Secret: ...
    async def delete(self, selector: str) -> None: ...
    async def page(self, limit: int, after: str | None) -> tuple[list[Secret], str | None]: ...


class LocalSecrets:
    """:class:`Secrets` over this machine's :class:`~.secrets.SecretStore` (SQLite, microseconds)."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    async def create(self, name: str, value: str, metadata: dict[str, str]) -> Secret:
        return self.store.create(name, value, metadata)

    async def find(self, selector: str) -> Secret:
        return self.store.find(selector)

    async def update(self, selector: str, value: str, metadata: dict[str, str] | None) -> Secret:
        return self.store.update(selector, value, metadata)

    async def delete(self, selector: str) -> None:
        self.store.delete(selector)

    async def page(self, limit: int, after: str | None) -> tuple[list[Secret], str | None]:
        return self.store.page(limit, after)


class SecretApi:
    """Routes ``/secrets…``."""

    def __init__(self, secrets: SecretStore | Secrets, api_key: str) -> None:
        self.secrets: Secrets = LocalSecrets(secrets) if isinstance(secrets, SecretStore) else secrets
        self.api_key = api_key
        one = r"/secrets/([^/]+)"
        self.routes: list[Route] = [
            ("POST", re.compile(r"/secrets"), self.create),
            ("GET", re.compile(r"/secrets"), self.list),
            ("GET", re.compile(one), self.info),
            ("POST", re.compile(one), self.update),
            ("DELETE", re.compile(one), self.delete),
        ]

    def matches(self, path: str) -> bool:
        return path == "/secrets" or path.startswith("/secrets/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_routes(self.routes, self.api_key, scope, receive, send)

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        name = _required(body, "name")
        secret = await self.secrets.create(name, _required(body, "value"), check_metadata(body.metadata()))
        await send_json(send, 201, _answer(secret))

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = Query(scope.get("query_string", b""))
        limit = query.integer("limit", 1, LIST_LIMIT, LIST_LIMIT)
        assert limit is not None
        token = query.get("nextToken", 1024)
        secrets, last = await self.secrets.page(limit, _after(token) if token else None)
        headers = [("x-next-token", base64.urlsafe_b64encode(last.encode()).decode())] if last is not None else []
        await send_json(send, 200, [_answer(s) for s in secrets], headers)

    async def info(self, scope: Scope, receive: Receive, send: Send, selector: str) -> None:
        await send_json(send, 200, _answer(await self.secrets.find(selector)))

    async def update(self, scope: Scope, receive: Receive, send: Send, selector: str) -> None:
        body = await Body.read(receive)
        metadata = check_metadata(body.metadata()) if body.fields.get("metadata") is not None else None
        secret = await self.secrets.update(selector, _required(body, "value"), metadata)
        await send_json(send, 200, _answer(secret))

    async def delete(self, scope: Scope, receive: Receive, send: Send, selector: str) -> None:
        await self.secrets.delete(selector)
        await send_empty(send, 204)


def _required(body: Body, name: str) -> str:
    """A required string field (the store checks what a name and a value may be)."""
    value = body.string(name, MAX_VALUE_CHARS, required=True)
    assert value is not None
    return value


def _after(token: str) -> str:
    """The name a ``nextToken`` this API gave out goes on from."""
    try:
        name = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        return check_name(name)
    except (ValueError, UnicodeError, ApiError):
        raise ApiError(400, "'nextToken' is not a token this API gave out") from None


def _answer(secret: Secret) -> dict[str, Any]:
    return {
        "secretID": secret.id,
        "name": secret.name,
        "currentVersion": secret.version,
        "metadata": secret.metadata,
        "createdAt": iso(secret.created_at),
        "updatedAt": iso(secret.updated_at),
    }
