"""The Connect protocol details the SDK relies on, and bad input, over raw HTTP."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import Agent
from sandboxd._proto.filesystem import filesystem_pb2 as fs

CONNECT = {"Connect-Protocol-Version": "1"}


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def frames(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, length = struct.unpack_from(">BI", body)
        out.append((flags, body[5 : 5 + length]))
        body = body[5 + length :]
    return out


def test_unary_json_accepts_snake_case_unknown_fields_and_content_encoding(agent: Agent, workdir: Path) -> None:
    (workdir / "f").write_text("x")
    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/ListDir",
        content=json.dumps({"path": str(workdir), "depth": "1", "someFutureField": True}),
        headers={**CONNECT, "Content-Type": "application/json; charset=utf-8", "Content-Encoding": "identity"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    (entry,) = r.json()["entries"]
    assert entry["name"] == "f"
    assert entry["type"] == "FILE_TYPE_FILE"
    assert entry["size"] == "1"


def test_unary_binary_proto(agent: Agent, workdir: Path) -> None:
    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/Stat",
        content=fs.StatRequest(path=str(workdir)).SerializeToString(),
        headers={**CONNECT, "Content-Type": "application/proto"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/proto"
    reply = fs.StatResponse.FromString(r.content)
    assert reply.entry.type == fs.FILE_TYPE_DIRECTORY
    assert reply.entry.path == str(workdir)


def test_errors_are_connect_json_with_matching_status(agent: Agent, workdir: Path) -> None:
    r = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": str(workdir / "nope")}, headers=CONNECT)
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert str(workdir / "nope") in r.json()["message"]
    r = httpx.post(f"{agent.url}/filesystem.Filesystem/MakeDir", json={"path": str(workdir)}, headers=CONNECT)
    assert r.status_code == 409
    assert r.json()["code"] == "already_exists"


def test_malformed_json_wrong_types_and_content_type(agent: Agent) -> None:
    url = f"{agent.url}/filesystem.Filesystem/Stat"
    r = httpx.post(url, content=b"{not json", headers={**CONNECT, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"
    r = httpx.post(url, json={"path": 42}, headers=CONNECT)
    assert r.status_code == 400
    r = httpx.post(url, content=b"\xff\xff\xff", headers={**CONNECT, "Content-Type": "application/proto"})
    assert r.status_code == 400
    r = httpx.post(url, content=b"{}", headers={**CONNECT, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.get(url)
    assert r.status_code == 405
    assert httpx.get(f"{agent.url}/no/such/thing").status_code == 404


def test_streams_answer_exact_content_type_and_end_stream_errors(agent: Agent, workdir: Path) -> None:
    # An error of a streaming call is HTTP 200 + an end-stream frame carrying it.
    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/WatchDir",
        content=frame(json.dumps({"path": str(workdir / "missing")}).encode()),
        headers={**CONNECT, "Content-Type": "application/connect+json"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/connect+json"
    ((flags, payload),) = frames(r.content)
    assert flags == 2
    assert json.loads(payload)["error"]["code"] == "not_found"


def test_malformed_envelopes_get_an_end_stream_error(agent: Agent) -> None:
    url = f"{agent.url}/process.Process/Connect"
    headers = {**CONNECT, "Content-Type": "application/connect+json"}
    # A body cut inside an envelope or a message that does not decode is invalid_argument; a server
    # stream given no message at all is unimplemented (connect-go's code, checked by the conformance suite).
    cases = [
        (b"\x00\x00\x00", "invalid_argument"),
        (b"\x00\x00\x00\x00\x10{}", "invalid_argument"),
        (frame(b"{broken"), "invalid_argument"),
        (b"", "unimplemented"),
    ]
    for body, code in cases:
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 200
        ((flags, payload),) = frames(r.content)
        assert flags == 2
        error = json.loads(payload)["error"]
        assert error["code"] == code, error
    r = httpx.post(url, content=frame(b"{}"), headers={**CONNECT, "Content-Type": "application/json"})
    assert r.status_code == 415


def test_chunked_request_bodies_are_decoded(agent: Agent, workdir: Path) -> None:
    def body() -> object:
        payload = json.dumps({"path": str(workdir)}).encode()
        yield payload[:3]
        yield payload[3:]

    r = httpx.post(
        f"{agent.url}/filesystem.Filesystem/Stat",
        content=body(),
        headers={**CONNECT, "Content-Type": "application/json"},
    )
    assert r.status_code == 200
    assert r.json()["entry"]["path"] == str(workdir)


def test_bad_timeout_header_and_unknown_basic_user(agent: Agent) -> None:
    url = f"{agent.url}/filesystem.Filesystem/Stat"
    r = httpx.post(url, json={"path": "/"}, headers={**CONNECT, "Connect-Timeout-Ms": "soon"})
    assert r.status_code == 400
    r = httpx.post(url, json={"path": "/"}, auth=("ghost", ""), headers=CONNECT)
    assert r.status_code == 401
    assert r.json() == {"code": "unauthenticated", "message": "invalid username: 'ghost'"}
    r = httpx.post(url, json={"path": "~"}, auth=("nobody", ""), headers=CONNECT)
    assert "/nonexistent" in r.json()["message"]


def _stream(agent: Agent, path: str, message: dict[str, object], headers: dict[str, str] | None = None) -> list[dict]:
    r = httpx.post(
        f"{agent.url}{path}",
        content=frame(json.dumps(message).encode()),
        headers={**CONNECT, "Content-Type": "application/connect+json", **(headers or {})},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/connect+json"
    return [json.loads(payload) for _, payload in frames(r.content)]


def test_exec_failure_names_the_binary(agent: Agent) -> None:
    messages = _stream(agent, "/process.Process/Start", {"process": {"cmd": "/no/such/binary"}})
    error = messages[-1]["error"]
    assert error["code"] == "invalid_argument"
    assert "/no/such/binary" in error["message"]


def test_binary_proto_stream_of_a_command(agent: Agent) -> None:
    from sandboxd._proto.process import process_pb2 as proc

    request = proc.StartRequest(
        process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", "printf abc; exit 4"]), stdin=False
    )
    r = httpx.post(
        f"{agent.url}/process.Process/Start",
        content=frame(request.SerializeToString()),
        headers={**CONNECT, "Content-Type": "application/connect+proto"},
    )
    assert r.headers["content-type"] == "application/connect+proto"
    *events, (end_flags, end_payload) = frames(r.content)
    assert end_flags == 2 and json.loads(end_payload) == {}
    decoded = [proc.StartResponse.FromString(payload).event for _, payload in events]
    assert decoded[0].WhichOneof("event") == "start"
    assert b"".join(e.data.stdout for e in decoded if e.WhichOneof("event") == "data") == b"abc"
    end = decoded[-1].end
    assert (end.exit_code, end.exited, end.status, end.error) == (4, True, "exit status 4", "exit status 4")


def test_unsupported_signal_is_unimplemented_and_unknown_pid_not_found(agent: Agent) -> None:
    url = f"{agent.url}/process.Process/SendSignal"
    r = httpx.post(url, json={"process": {"pid": 1}, "signal": "SIGNAL_UNSPECIFIED"}, headers=CONNECT)
    assert r.status_code == 501
    assert r.json()["code"] == "unimplemented"
    r = httpx.post(url, json={"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}, headers=CONNECT)
    assert r.status_code == 404
    r = httpx.post(f"{agent.url}/process.Process/SendInput", json={"process": {"tag": "nope"}}, headers=CONNECT)
    assert r.json()["code"] == "not_found"


def test_watch_stream_sends_keepalives_at_the_clients_interval(agent: Agent, workdir: Path) -> None:
    import time

    body = frame(json.dumps({"path": str(workdir)}).encode())
    headers = {**CONNECT, "Content-Type": "application/connect+json", "Keepalive-Ping-Interval": "1"}
    started = time.monotonic()
    seen: list[dict] = []
    with httpx.stream("POST", f"{agent.url}/filesystem.Filesystem/WatchDir", content=body, headers=headers) as r:
        buffer = b""
        for chunk in r.iter_raw():
            buffer += chunk
            while len(buffer) >= 5:
                _, length = struct.unpack_from(">BI", buffer)
                if len(buffer) < 5 + length:
                    break
                seen.append(json.loads(buffer[5 : 5 + length]))
                buffer = buffer[5 + length :]
            if sum("keepalive" in m for m in seen) >= 2:
                break
    assert seen[0] == {"start": {}}
    assert seen[1] == {"keepalive": {}}
    assert 1.5 < time.monotonic() - started < 10


def test_user_processes_die_before_the_agent_under_memory_pressure(agent: Agent) -> None:
    import base64

    with open(f"/proc/{agent.process.pid}/oom_score_adj") as f:
        agent_score = int(f.read())  # -900 where CAP_SYS_RESOURCE allows lowering it, else unchanged
    start = {"process": {"cmd": "/bin/sh", "args": ["-c", "cat /proc/self/oom_score_adj"]}}
    messages = _stream(agent, "/process.Process/Start", start)
    out = b"".join(base64.b64decode(m["event"]["data"]["stdout"]) for m in messages if "data" in m.get("event", {}))
    assert int(out) == 100
    assert agent_score < int(out)


def test_process_output_json_matches_protobufs_own() -> None:
    from google.protobuf import json_format
    from sandboxd._proto.process import process_pb2 as proc
    from sandboxd.agent.connect import Codec
    from sandboxd.agent.rpc import NestedBytes

    codec = Codec("json")
    for stream in ("stdout", "stderr", "pty"):
        for data in (b"", b"hi\n", bytes(range(256)) * 10):
            for response_type in (proc.StartResponse, proc.ConnectResponse):
                nested = NestedBytes(response_type, ("event", "data", stream), data)
                expected = json_format.MessageToDict(nested.message())
                assert expected["event"]["data"] or not data
                assert json.loads(codec.encode(nested)) == expected
                assert json.loads(b"".join(codec.frame_parts(nested))[5:]) == expected


def test_process_output_frames_match_protobufs_own() -> None:
    from sandboxd._proto.process import process_pb2 as proc
    from sandboxd.agent.connect import Codec, envelope
    from sandboxd.agent.rpc import NestedBytes

    codec = Codec("proto")
    for stream in ("stdout", "stderr", "pty"):
        for size in (0, 1, 127, 128, 300, 16_383, 16_384, 1 << 20):
            for response_type in (proc.StartResponse, proc.ConnectResponse):
                nested = NestedBytes(response_type, ("event", "data", stream), b"x" * size)
                message = nested.message()
                assert getattr(message.event.data, stream) == b"x" * size
                wire = message.SerializeToString()
                assert nested.SerializeToString() == wire
                assert codec.frame(nested) == envelope(0, wire)
                parts = codec.frame_parts(nested)
                assert b"".join(parts) == envelope(0, wire)
                assert size < 1024 or parts[-1] is nested.data  # the output itself is not copied


def test_a_server_side_deadline_is_deadline_exceeded(agent: Agent) -> None:
    start = {"process": {"cmd": "/bin/sleep", "args": ["5"]}}
    messages = _stream(agent, "/process.Process/Start", start, {"Connect-Timeout-Ms": "300"})
    assert messages[-1]["error"]["code"] == "deadline_exceeded"


def test_a_client_that_leaves_an_idle_stream_is_noticed(start_agent: Callable[..., Agent], workdir: Path) -> None:
    """A WatchDir stream with nothing to send: when its client goes, the agent notices although the
    handler is only waiting for events, and releases the stream's inotify instance. (An agent of its
    own: no other test's watches come and go meanwhile.)"""
    import contextlib
    import os
    import socket
    import time

    agent = start_agent()

    def inotify_instances() -> int:
        fds = f"/proc/{agent.process.pid}/fd"
        count = 0
        for fd in os.listdir(fds):
            with contextlib.suppress(FileNotFoundError):
                count += os.readlink(f"{fds}/{fd}") == "anon_inode:inotify"
        return count

    before = inotify_instances()
    body = frame(json.dumps({"path": str(workdir)}).encode())
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as client:
        client.sendall(
            b"POST /filesystem.Filesystem/WatchDir HTTP/1.1\r\nHost: x\r\nContent-Type: application/connect+json\r\n"
            + f"Connect-Protocol-Version: 1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b" 200 " in client.recv(4096)  # head and start event: the handler waits for events now
        assert inotify_instances() > before
    deadline = time.monotonic() + 10
    while inotify_instances() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inotify_instances() == before


def test_constant_end_events_encode_as_a_fresh_message_in_each_codec() -> None:
    """A process's common end events are built once and declared constants (``rpc.constant``), so the
    transports encode each once per codec: the bytes must be the fresh message's, whichever codec
    asked first, and a message only equal to a constant (not it) is encoded as itself."""
    from sandboxd._proto.process import process_pb2 as pb
    from sandboxd.agent.connect import _CODECS
    from sandboxd.agent.services.process import _end_response

    class End:
        def __init__(self, code: int, exited: bool, status: str) -> None:
            self.exit_code, self.exited, self.status, self.error = code, exited, status, None

    ends = [End(0, True, "exit status 0"), End(1, True, "exit status 1"), End(-1, False, "signal: killed")]
    for order in (("proto", "json"), ("json", "proto")):
        for end in ends:
            for response_type in (pb.StartResponse, pb.ConnectResponse):
                message = _end_response(response_type, end)  # type: ignore[arg-type]
                assert _end_response(response_type, end) is message  # type: ignore[arg-type]  # built once
                fresh = response_type(
                    event=pb.ProcessEvent(
                        end=pb.ProcessEvent.EndEvent(exit_code=end.exit_code, exited=end.exited, status=end.status)
                    )
                )
                for name in (*order, *order):
                    codec = _CODECS[name]
                    assert codec.frame(message) == codec.frame(fresh), (name, end.status)
                changed = response_type()
                changed.CopyFrom(message)
                changed.event.end.exit_code = 42  # equal type, other content, not the constant
                assert _CODECS["json"].encode(changed) != _CODECS["json"].encode(message)
                assert json.loads(_CODECS["json"].encode(changed))["event"]["end"]["exitCode"] == 42
