"""``protojson.message_to_dict`` prints exactly what ``json_format.MessageToDict`` prints, for every
message type the agent's services answer with, filled in every way a field can be."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from sandboxd._proto.filesystem import filesystem_pb2 as fs
from sandboxd._proto.process import process_pb2 as proc
from sandboxd.agent.protojson import message_to_dict

ENTRY = fs.EntryInfo(
    name="a.txt",
    type=fs.FILE_TYPE_FILE,
    path="/home/user/a.txt",
    size=1 << 40,
    mode=0o644,
    permissions="-rw-r--r--",
    owner="user",
    group="user",
    symlink_target="",
    metadata={"k": "v", "ü": "ß"},
)
ENTRY.modified_time.FromSeconds(1_700_000_000)

SAMPLES: list[Message] = [
    proc.StartResponse(event=proc.ProcessEvent(start=proc.ProcessEvent.StartEvent(pid=4242))),
    proc.StartResponse(event=proc.ProcessEvent(start=proc.ProcessEvent.StartEvent(pid=0))),
    proc.StartResponse(event=proc.ProcessEvent(data=proc.ProcessEvent.DataEvent(stdout=b"\x00\xffhi\n"))),
    proc.ConnectResponse(event=proc.ProcessEvent(data=proc.ProcessEvent.DataEvent(pty=b""))),
    proc.StartResponse(
        event=proc.ProcessEvent(end=proc.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="signal: killed"))
    ),
    proc.StartResponse(
        event=proc.ProcessEvent(
            end=proc.ProcessEvent.EndEvent(exit_code=0, exited=True, status="exit status 0", error='boom "x"\n')
        )
    ),
    proc.StartResponse(event=proc.ProcessEvent(keepalive=proc.ProcessEvent.KeepAlive())),
    proc.ListResponse(
        processes=[
            proc.ProcessInfo(
                config=proc.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "true"], envs={"A": "1"}, cwd="/"),
                pid=7,
                tag="t",
            ),
            proc.ProcessInfo(config=proc.ProcessConfig(cmd="sleep"), pid=8),
        ]
    ),
    proc.ListResponse(),
    fs.WatchDirResponse(start=fs.WatchDirResponse.StartEvent()),
    fs.WatchDirResponse(keepalive=fs.WatchDirResponse.KeepAlive()),
    fs.WatchDirResponse(filesystem=fs.FilesystemEvent(name="sub/new file ✓", type=fs.EVENT_TYPE_CREATE)),
    fs.WatchDirResponse(filesystem=fs.FilesystemEvent(name="x", type=fs.EVENT_TYPE_WRITE, entry=ENTRY)),
    fs.GetWatcherEventsResponse(
        events=[fs.FilesystemEvent(name="a", type=fs.EVENT_TYPE_REMOVE), fs.FilesystemEvent(name="b", type=99)]  # type: ignore[arg-type]
    ),
    fs.CreateWatcherResponse(watcher_id="wabc"),
    fs.StatResponse(entry=ENTRY),
    fs.ListDirResponse(entries=[ENTRY, fs.EntryInfo(name="d", type=fs.FILE_TYPE_DIRECTORY)]),
    fs.RemoveResponse(),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{type(m).__name__}:{m.ByteSize()}")
def test_same_object_as_json_format(message: Message) -> None:
    assert message_to_dict(message) == json_format.MessageToDict(message)
    assert message_to_dict(message) == json_format.MessageToDict(message)  # again, from the caches
