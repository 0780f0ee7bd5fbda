"""E2B's template build API (what the SDKs' ``Template.build`` calls), as ASGI routes over the builder
(:mod:`.template_builder`). Wire shapes are E2B's (e2b-dev/infra ``spec/openapi.yml``, the SDKs'
``template_sync/build_api.py``):

* ``POST /v3/templates`` ``{name, tags?, cpuCount?, memoryMB?}`` -> 202 ``{templateID, buildID, public,
  names, tags, aliases}``: a build is requested (the template's id is its name here); ``cpuCount`` and
  ``memoryMB`` size every sandbox of the build (E2B's rules, :func:`requested_size`);
* ``GET /templates/{id}/files/{hash}`` -> 201 ``{present, url?}``: whether a ``copy`` step's files
  (named by the SDK's hash of them) are here already, else where to ``PUT`` them: a URL of this
  runtime carrying a token derived from the API key (the SDK uploads without its API key, as to a
  presigned object-store URL);
* ``POST /v2/templates/{id}/builds/{build}`` ``{fromTemplate|fromImage, steps, force, startCmd?,
  readyCmd?}`` -> 202: the build starts;
* ``GET /templates/{id}/builds/{build}/status?logsOffset=&limit=`` -> 200 ``{templateID, buildID,
  status, logs, logEntries, reason?}``: status and the log from ``logsOffset`` on, as it runs;
* ``GET /templates/aliases/{alias}`` -> 200 ``{templateID, public}`` or 404 (``Template.exists``);
* ``GET /templates`` -> 200 ``[Template]`` (``e2b template list``); ``DELETE /templates/{id}`` -> 204;
* tags (``name:tag`` names a build; ``name`` is ``name:default``): ``POST /templates/tags`` ``{target,
  tags}`` -> 201 ``{tags, buildID}``, ``DELETE /templates/tags`` ``{name, tags}`` -> 204,
  ``GET /templates/{id}/tags`` -> 200 ``[{tag, buildID, createdAt}]``.

Every request but the upload needs ``X-API-KEY``; bad input is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import secrets

from sandboxd import ENVD_VERSION
from sandboxd.agent.asgi import (
    Receive,
    Scope,
    Send,
    header_map,
    send_bytes,
    send_empty,
    send_json,
)

from .api import Route, api_errors, check_api_key, find_route, iso
from .errors import ApiError
from .host import cpus_and_memory
from .inputs import INT32_MAX, Body, Query, write_body
from .template_builder import STATUS_PAGE, TemplateBuilder, parse_spec, status_answer
from .templates import HIDDEN_PREFIX, check_tags, sizes, split_tag

MAX_UPLOAD = 8 << 30
"""Bytes one ``copy`` step's archive may have: a build context, not a disk image; past it the upload
is refused (413) and nothing is kept."""

MAX_TAGS = 32

MIN_TEMPLATE_MEMORY_MB = 128
"""E2B's least memory for a template's sandboxes (e2b-dev/infra ``packages/api/internal/constants``):
below it the agent and a shell leave a sandbox no room to work."""


E2B_MAX_VCPU = 8
"""The CPU count E2B's default team may ask for (e2b-dev/infra ``team.LimitResources``' ``MaxVcpu``)."""


def requested_size(body: Body, host_cpus: int, host_memory_mb: int) -> tuple[int | None, int | None]:
    """A build request's ``cpuCount`` and ``memoryMB`` (None: the runtime's ``--sandbox-cpus`` /
    ``--sandbox-memory-mb``), by E2B's rules (``team.LimitResources``: at least 1 CPU, 1 or an even
    count; at least 128 MiB, an even count of MiB). The most CPUs is E2B's default team's
    (:data:`E2B_MAX_VCPU`) or this host's count if larger: a CPU count is a quota over all CPUs, not
    cores set aside, so on a smaller host it is only not reached (E2B's documentation builds with
    ``cpu_count=2``, which a 1-CPU machine must not refuse). The most memory is this host's: a
    sandbox's memory limit above what the machine has would be no limit at all."""
    cpus = body.integer("cpuCount", -INT32_MAX, INT32_MAX)
    memory_mb = body.integer("memoryMB", -INT32_MAX, INT32_MAX)
    if cpus is not None:
        if cpus < 1:
            raise ApiError(400, "CPU count must be at least 1")
        if cpus != 1 and cpus % 2:
            raise ApiError(400, "CPU count must be 1 or an even number")
        if cpus > max(host_cpus, E2B_MAX_VCPU):
            most = max(host_cpus, E2B_MAX_VCPU)
            raise ApiError(400, f"CPU count can't be higher than {most} (E2B's limit, or this host's CPUs if more)")
    if memory_mb is not None:
        if memory_mb < MIN_TEMPLATE_MEMORY_MB:
            raise ApiError(400, f"Memory must be at least {MIN_TEMPLATE_MEMORY_MB} MiB")
        if memory_mb % 2:
            raise ApiError(400, "Memory must be divisible by 2")
        if memory_mb > host_memory_mb:
            raise ApiError(400, f"Memory can't be higher than {host_memory_mb} MiB (the memory of this host)")
    return cpus, memory_mb


def _tags(body: Body, required: bool = False) -> list[str]:
    tags = body.fields.get("tags") or []
    if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(isinstance(t, str) for t in tags):
        raise ApiError(400, f"'tags' must be an array of at most {MAX_TAGS} strings")
    if required and not tags:
        raise ApiError(400, "'tags' must name at least one tag")
    return tags


class TemplateApi:
    """Routes ``/templates…``, ``/v2/templates…`` and ``/v3/templates…`` to the builder."""

    def __init__(self, builder: TemplateBuilder, api_key: str) -> None:
        self.builder = builder
        self.api_key = api_key
        cpus, memory_bytes = cpus_and_memory()
        self.host_cpus, self.host_memory_mb = cpus, memory_bytes >> 20
        part = r"([^/]+)"
        self.routes: list[Route] = [
            ("POST", re.compile(r"/v3/templates"), self.request_build),
            ("GET", re.compile(r"/templates"), self.list),
            ("POST", re.compile(r"/templates/tags"), self.assign_tags),
            ("DELETE", re.compile(r"/templates/tags"), self.remove_tags),
            ("GET", re.compile(rf"/templates/{part}/tags"), self.tags),
            ("DELETE", re.compile(r"/templates/" + part), self.delete),
            ("GET", re.compile(r"/templates/aliases/" + part), self.alias),
            ("GET", re.compile(rf"/templates/{part}/files/{part}"), self.file_link),
            ("PUT", re.compile(rf"/templates/{part}/files/{part}/upload"), self.upload),
            ("POST", re.compile(rf"/v2/templates/{part}/builds/{part}"), self.trigger),
            ("GET", re.compile(rf"/templates/{part}/builds/{part}/status"), self.status),
        ]

    def matches(self, path: str) -> bool:
        return path.startswith(("/templates", "/v2/templates", "/v3/templates"))

    def _upload_token(self, files_hash: str) -> str:
        return hmac.new(self.api_key.encode(), f"upload:{files_hash}".encode(), hashlib.sha256).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        async with api_errors(send):
            try:
                handler, groups = find_route(self.routes, scope)
            except ApiError:
                check_api_key(headers, self.api_key)
                raise
            if handler != self.upload:  # the upload URL carries a token of its own (see file_link)
                check_api_key(headers, self.api_key)
            await handler(scope, receive, send, *(g[:256] for g in groups))

    async def request_build(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        name = body.string("name", required=True)
        assert name is not None
        tags = _tags(body)
        cpus, memory_mb = requested_size(body, self.host_cpus, self.host_memory_mb)
        body.integer("minFreeDiskMB", 0, INT32_MAX)
        build = self.builder.request(name, tags, cpus, memory_mb)
        await send_json(
            send,
            202,
            {
                "templateID": build.template_id,
                "buildID": build.build_id,
                "public": False,
                "names": [build.name],
                "tags": build.tags,
                "aliases": [build.name],
            },
        )

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        """E2B's ``GET /templates``: every template a sandbox can be created from."""
        limits = self.builder.manager.limits
        answer = []
        for row in self.builder.rows():
            created = iso(row.created_at)
            cpus, memory_mb = sizes(row.config)
            answer.append(
                {
                    "templateID": row.name,
                    "buildID": self.builder.build_id_of(row),
                    "cpuCount": cpus or limits.cpu_count,
                    "memoryMB": memory_mb or limits.memory_mb,
                    "diskSizeMB": limits.disk_mb,
                    "public": False,
                    "aliases": [row.name],
                    "names": [row.name],
                    "createdAt": created,
                    "updatedAt": created,
                    "createdBy": None,
                    "lastSpawnedAt": None,
                    "spawnCount": 0,
                    "buildCount": 1,
                    "envdVersion": ENVD_VERSION,
                    "buildStatus": "ready",
                }
            )
        await send_json(send, 200, answer)

    async def assign_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        target = body.string("target", required=True)
        assert target is not None
        tags = check_tags(_tags(body, required=True))
        row = self.builder.templates.assign_tags(target, tags)
        await send_json(send, 201, {"tags": tags, "buildID": self.builder.build_id_of(row)})

    async def remove_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        name = body.string("name", required=True)
        assert name is not None
        self.builder.templates.remove_tags(name, check_tags(_tags(body, required=True)))
        await send_empty(send, 204)

    async def tags(self, scope: Scope, receive: Receive, send: Send, template_id: str) -> None:
        tags = [] if template_id.startswith(HIDDEN_PREFIX) else self.builder.templates.tags(template_id)
        if not tags:
            raise ApiError(404, f"template '{template_id}' not found among the templates built here")
        answer = [
            {"tag": tag, "buildID": self.builder.build_id_of(row), "createdAt": iso(row.created_at)}
            for tag, row in tags
        ]
        await send_json(send, 200, answer)

    async def delete(self, scope: Scope, receive: Receive, send: Send, template_id: str) -> None:
        await self.builder.remove(template_id)
        await send_empty(send, 204)

    async def alias(self, scope: Scope, receive: Receive, send: Send, alias: str) -> None:
        templates = self.builder.templates
        template_id = None
        if not alias.startswith(HIDDEN_PREFIX):
            with contextlib.suppress(ApiError):
                template_id = split_tag(templates.resolve(alias).id)[0]
            if template_id is None and templates.tags(alias):  # built with tags only, none the default
                template_id = alias
        if template_id is None:
            raise ApiError(404, f"template '{alias}' not found")
        await send_json(send, 200, {"templateID": template_id, "public": False})

    async def file_link(self, scope: Scope, receive: Receive, send: Send, template_id: str, files_hash: str) -> None:
        if await asyncio.to_thread(self.builder.uploads.refresh, files_hash):
            await send_json(send, 201, {"present": True})
            return
        headers = header_map(scope)
        host = headers.get("host") or "localhost"
        url = (
            f"{scope.get('scheme', 'http')}://{host}/templates/{template_id}/files/{files_hash}/upload"
            f"?token={self._upload_token(files_hash)}"
        )
        await send_json(send, 201, {"present": False, "url": url})

    async def upload(self, scope: Scope, receive: Receive, send: Send, template_id: str, files_hash: str) -> None:
        token = Query(scope.get("query_string", b"")).get("token", 128) or ""
        if not hmac.compare_digest(token.encode(), self._upload_token(files_hash).encode()):
            raise ApiError(401, "this upload URL's token is not valid: ask GET /templates/{id}/files/{hash} for one")
        final = self.builder.uploads.path(files_hash)
        partial = final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        handle = await asyncio.to_thread(partial.open, "wb")
        try:
            await write_body(receive, handle.write, MAX_UPLOAD, f"the upload exceeds {MAX_UPLOAD >> 30} GiB")
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(partial.rename, final)
        finally:
            handle.close()
            partial.unlink(missing_ok=True)
        await send_bytes(send, 200, b"", None)

    async def trigger(self, scope: Scope, receive: Receive, send: Send, template_id: str, build_id: str) -> None:
        build = self.builder.get(template_id, build_id)
        body = await Body.read(receive)
        self.builder.trigger(build, parse_spec(body.fields))
        await send_bytes(send, 202, b"", None)  # Content-Length: 0, which the JS SDK reads as no body

    async def status(self, scope: Scope, receive: Receive, send: Send, template_id: str, build_id: str) -> None:
        build = self.builder.get(template_id, build_id)
        query = Query(scope.get("query_string", b""))
        offset = query.integer("logsOffset", 0, INT32_MAX, 0)
        limit = query.integer("limit", 0, STATUS_PAGE, STATUS_PAGE)
        assert offset is not None and limit is not None
        await send_json(send, 200, status_answer(build, offset, limit))
