"""E2B's volume API, as the SDKs call it (``Volume`` in ``e2b``; the store is :mod:`.volumes`).

Control plane, with ``X-API-KEY`` like the rest of the API:

* ``POST /volumes`` ``{"name"}`` -> 201 ``{volumeID, name, token}``; 409 when the name is taken;
* ``GET /volumes`` -> 200 ``[{volumeID, name}]``; ``GET /volumes/{id}`` -> 200 ``{volumeID, name, token}``;
* ``DELETE /volumes/{id}`` -> 204; 409 while a live sandbox mounts it.

Content, with ``Authorization: Bearer <the volume's token>`` (the SDK sends it to
``$E2B_VOLUME_API_URL``, which ``sandboxd serve`` prints as its own address):

* ``GET /volumecontent/{id}/dir?path=&depth=`` -> 200 ``[VolumeEntryStat]``;
* ``POST /volumecontent/{id}/dir?path=&uid=&gid=&mode=&force=`` -> 201 ``VolumeEntryStat``;
* ``GET /volumecontent/{id}/file?path=`` -> 200 the bytes; ``PUT`` (same query as ``POST .../dir``,
  the body is the content) -> 201 ``VolumeEntryStat``;
* ``GET /volumecontent/{id}/path?path=`` -> 200 ``VolumeEntryStat``; ``PATCH`` ``{"uid"?, "gid"?,
  "mode"?}`` -> 200; ``DELETE`` -> 204 (a directory with what it holds).

Every file operation runs in a worker thread; errors are ``{"code", "message"}``.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from sandboxd.agent.asgi import (
    Receive,
    Scope,
    Send,
    header_map,
    raw_headers,
    send_empty,
    send_json,
)

from .api import Route, api_errors, check_api_key, find_route
from .errors import ApiError
from .inputs import Body, Query, write_body
from .volumes import Volume, Volumes

READ_CHUNK = 1 << 20
"""Bytes read (in a worker thread) and sent per body message of a download."""


class VolumeApi:
    """Routes ``/volumes…`` and ``/volumecontent…``."""

    def __init__(self, volumes: Volumes, api_key: str, mounted_by: Any) -> None:
        self.volumes = volumes
        self.api_key = api_key
        self.mounted_by = mounted_by
        """``(volume name) -> [sandbox ids]``: the live sandboxes that mount it."""
        part = r"([^/]+)"
        self.control: list[Route] = [
            ("POST", re.compile(r"/volumes"), self.create),
            ("GET", re.compile(r"/volumes"), self.list),
            ("GET", re.compile(r"/volumes/" + part), self.info),
            ("DELETE", re.compile(r"/volumes/" + part), self.destroy),
        ]
        content = r"/volumecontent/" + part
        self.content: list[Route] = [
            ("GET", re.compile(content + "/dir"), self.list_dir),
            ("POST", re.compile(content + "/dir"), self.make_dir),
            ("GET", re.compile(content + "/file"), self.read_file),
            ("PUT", re.compile(content + "/file"), self.write_file),
            ("GET", re.compile(content + "/path"), self.stat),
            ("PATCH", re.compile(content + "/path"), self.set_metadata),
            ("DELETE", re.compile(content + "/path"), self.remove),
        ]

    def matches(self, path: str) -> bool:
        return path == "/volumes" or path.startswith(("/volumes/", "/volumecontent/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        async with api_errors(send):
            if scope["path"].startswith("/volumecontent/"):
                handler, groups = find_route(self.content, scope)
                volume = self.volumes.check_token(groups[0], headers.get("authorization"))
                await handler(scope, receive, send, volume, Query(scope.get("query_string", b"")))
            else:
                check_api_key(headers, self.api_key)
                handler, groups = find_route(self.control, scope)
                await handler(scope, receive, send, *groups)

    # ---------------------------------------------------------------------------- control

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Body.read(receive)
        name = body.string("name", required=True)
        assert name is not None
        volume = await asyncio.to_thread(self.volumes.create, name)
        await send_json(send, 201, _with_token(volume))

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        volumes = self.volumes.all()  # in memory
        await send_json(send, 200, [{"volumeID": v.id, "name": v.name} for v in volumes])

    async def info(self, scope: Scope, receive: Receive, send: Send, volume_id: str) -> None:
        await send_json(send, 200, _with_token(self.volumes.get(volume_id)))

    async def destroy(self, scope: Scope, receive: Receive, send: Send, volume_id: str) -> None:
        volume = self.volumes.get(volume_id)
        await asyncio.to_thread(self.volumes.destroy, volume.id, self.mounted_by(volume.name))
        await send_empty(send, 204)

    # ---------------------------------------------------------------------------- content

    async def list_dir(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        depth = query.integer("depth", 0, 1 << 16, 1)
        assert depth is not None
        found = await asyncio.to_thread(self.volumes.listdir, volume, _path(query), depth)
        await send_json(send, 200, found)

    async def make_dir(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        uid, gid, mode = _owner(query)
        force = query.choice("force", ("true", "false"), "false") == "true"
        entry = await asyncio.to_thread(self.volumes.mkdir, volume, _path(query), uid, gid, mode, force)
        await send_json(send, 201, entry)

    async def read_file(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        fd, size = await asyncio.to_thread(self.volumes.read, volume, _path(query))
        try:
            headers = [("content-length", str(size)), ("content-type", "application/octet-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers(headers)})
            left = size
            while left > 0:
                chunk = await asyncio.to_thread(os.read, fd, min(READ_CHUNK, left))
                if not chunk:
                    break  # shortened meanwhile (a sandbox writes it): the client sees a short body
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if left > 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)

    async def write_file(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        uid, gid, mode = _owner(query)
        query.choice("force", ("true", "false"), "false")  # files are always replaced whole
        upload = await asyncio.to_thread(self.volumes.begin_write, volume, _path(query), uid, gid, mode)
        try:
            await write_body(receive, upload.write)
            entry = await asyncio.to_thread(upload.commit)
        finally:
            await asyncio.to_thread(upload.abort)  # after a commit, nothing is left to drop
        await send_json(send, 201, entry)

    async def stat(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        await send_json(send, 200, await asyncio.to_thread(self.volumes.stat, volume, _path(query)))

    async def set_metadata(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        path = _path(query)
        body = await Body.read(receive)
        uid = body.integer("uid", -(1 << 31), 1 << 32)
        gid = body.integer("gid", -(1 << 31), 1 << 32)
        mode = body.integer("mode", -(1 << 31), 1 << 32)
        entry = await asyncio.to_thread(self.volumes.set_metadata, volume, path, uid, gid, mode)
        await send_json(send, 200, entry)

    async def remove(self, scope: Scope, receive: Receive, send: Send, volume: Volume, query: Query) -> None:
        await asyncio.to_thread(self.volumes.remove, volume, _path(query))
        await send_empty(send, 204)


def _with_token(volume: Volume) -> dict[str, Any]:
    return {"volumeID": volume.id, "name": volume.name, "token": volume.token}


def _path(query: Query) -> str:
    path = query.get("path", 4096)
    if path is None:
        raise ApiError(400, "'path' is required")
    return path


def _owner(query: Query) -> tuple[int | None, int | None, int | None]:
    return (
        query.integer("uid", -(1 << 31), 1 << 32),
        query.integer("gid", -(1 << 31), 1 << 32),
        query.integer("mode", -(1 << 31), 1 << 32),
    )
