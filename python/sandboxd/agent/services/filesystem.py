"""``filesystem.Filesystem``: stat, list, make, move and remove, as envd does them (spec §4.1)."""

from __future__ import annotations

import asyncio
import errno

from google.protobuf.timestamp_pb2 import Timestamp

from sandboxd import _core
from sandboxd._proto.filesystem import filesystem_pb2 as pb

from ..errors import Code, RpcError, from_os_error
from ..paths import expand_and_resolve
from ..rpc import Context, Kind, Method, Preencoded
from ..state import AgentState

SERVICE = "filesystem.Filesystem"


def entry_to_proto(entry: _core.EntryInfo) -> pb.EntryInfo:
    """The wire form of an entry. ``modifiedTime`` is omitted when zero, as envd does."""
    message = pb.EntryInfo(
        name=entry.name,
        type=entry.type,  # type: ignore[arg-type]
        path=entry.path,
        size=entry.size,
        mode=entry.mode,
        permissions=entry.permissions,
        owner=entry.owner,
        group=entry.group,
        metadata=entry.metadata,
        is_symlink=entry.is_symlink,
    )
    if entry.mtime_sec or entry.mtime_nsec:
        message.modified_time.CopyFrom(Timestamp(seconds=entry.mtime_sec, nanos=entry.mtime_nsec))
    if entry.symlink_target is not None:
        message.symlink_target = entry.symlink_target
    return message


class FilesystemService:
    """Stat, ListDir, MakeDir, Move and Remove. Watching is served by the watch service."""

    def __init__(self, state: AgentState) -> None:
        self.state = state

    def methods(self) -> list[Method]:
        unary = Kind.UNARY
        return [
            Method(SERVICE, "Stat", unary, pb.StatRequest, pb.StatResponse, self.stat),
            Method(SERVICE, "MakeDir", unary, pb.MakeDirRequest, pb.MakeDirResponse, self.make_dir),
            Method(SERVICE, "Move", unary, pb.MoveRequest, pb.MoveResponse, self.move),
            Method(SERVICE, "ListDir", unary, pb.ListDirRequest, pb.ListDirResponse, self.list_dir),
            Method(SERVICE, "Remove", unary, pb.RemoveRequest, pb.RemoveResponse, self.remove),
        ]

    def _resolve(self, path: str, ctx: Context) -> str:
        return expand_and_resolve(path, ctx.user, self.state.default_workdir)

    async def stat(self, request: pb.StatRequest, ctx: Context) -> pb.StatResponse:
        path = self._resolve(request.path, ctx)
        try:
            entry = _core.entry_info(path)
        except FileNotFoundError:
            raise RpcError(Code.NOT_FOUND, f"file not found: '{path}'") from None
        except OSError as exc:
            raise from_os_error(exc, "error getting file info") from None
        return pb.StatResponse(entry=entry_to_proto(entry))

    async def list_dir(self, request: pb.ListDirRequest, ctx: Context) -> Preencoded:
        path = self._resolve(request.path, ctx)
        try:
            # Walked and encoded in a worker thread, GIL released: what grows with a directory's size
            # stays off the event loop (50,000 entries held every other call 1.1 s when the messages
            # were built and encoded in Python on the loop; crates/sandboxd-py/src/listing.rs).
            encoded = await asyncio.to_thread(_core.list_dir_encoded, path, request.depth, ctx.codec == "json")
        except FileNotFoundError:
            raise RpcError(Code.NOT_FOUND, f"directory not found: '{path}'") from None
        except NotADirectoryError:
            raise RpcError(Code.INVALID_ARGUMENT, f"path is not a directory: '{path}'") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RpcError(Code.FAILED_PRECONDITION, f"too many levels of symlinks: '{path}'") from None
            raise from_os_error(exc, "error reading directory") from None
        return Preencoded(encoded, ctx.codec)

    async def make_dir(self, request: pb.MakeDirRequest, ctx: Context) -> pb.MakeDirResponse:
        path = self._resolve(request.path, ctx)
        try:
            entry = _core.make_dir(path, ctx.user.uid, ctx.user.gid)
        except FileExistsError:
            raise RpcError(Code.ALREADY_EXISTS, f"directory already exists: '{path}'") from None
        except NotADirectoryError:
            raise RpcError(Code.INVALID_ARGUMENT, f"path already exists and is not a directory: '{path}'") from None
        except OSError as exc:
            raise from_os_error(exc, "error creating directory") from None
        return pb.MakeDirResponse(entry=entry_to_proto(entry))

    async def move(self, request: pb.MoveRequest, ctx: Context) -> pb.MoveResponse:
        source = self._resolve(request.source, ctx)
        destination = self._resolve(request.destination, ctx)
        try:
            entry = _core.rename(source, destination, ctx.user.uid, ctx.user.gid)
        except FileNotFoundError:
            raise RpcError(Code.NOT_FOUND, f"source file not found: '{source}'") from None
        except OSError as exc:
            raise from_os_error(exc, f"error moving '{source}' to '{destination}'") from None
        return pb.MoveResponse(entry=entry_to_proto(entry))

    async def remove(self, request: pb.RemoveRequest, ctx: Context) -> pb.RemoveResponse:
        path = self._resolve(request.path, ctx)
        try:
            await asyncio.to_thread(_core.remove_all, path)
        except OSError as exc:
            raise from_os_error(exc, "error removing file or directory") from None
        return pb.RemoveResponse()
