"""The agent's services over gRPC (grpcio): reflection lists them, health answers, Stat works."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import Agent
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sandboxd._proto.filesystem import filesystem_pb2 as fs
from sandboxd._proto.filesystem import filesystem_pb2_grpc as fs_grpc


@pytest.fixture(scope="module")
def grpc_agent(start_agent: Callable[..., Agent]) -> Agent:
    return start_agent(token="grpc-token", grpc=True)


@pytest.fixture
def channel(grpc_agent: Agent) -> grpc.Channel:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_agent.grpc_port}") as ch:
        yield ch


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"filesystem.Filesystem", "process.Process", "grpc.health.v1.Health"} <= names


def test_health_is_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="filesystem.Filesystem"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stat_needs_the_token_and_works_with_it(channel: grpc.Channel, tmp_path: Path) -> None:
    stub = fs_grpc.FilesystemStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Stat(fs.StatRequest(path=str(tmp_path)))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.Stat(fs.StatRequest(path=str(tmp_path)), metadata=[("x-access-token", "grpc-token")])
    assert reply.entry.type == fs.FILE_TYPE_DIRECTORY
    with pytest.raises(grpc.RpcError) as caught:
        stub.Stat(fs.StatRequest(path=str(tmp_path / "nope")), metadata=[("x-access-token", "grpc-token")])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_start_streams_the_output_and_the_end(channel: grpc.Channel) -> None:
    from sandboxd._proto.process import process_pb2 as proc
    from sandboxd._proto.process import process_pb2_grpc as proc_grpc

    stub = proc_grpc.ProcessStub(channel)
    request = proc.StartRequest(process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", "printf out; printf err >&2"]))
    replies = list(stub.Start(request, metadata=[("x-access-token", "grpc-token")], timeout=30))
    kinds = [reply.event.WhichOneof("event") for reply in replies]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert b"".join(r.event.data.stdout for r in replies if r.event.HasField("data")) == b"out"
    assert b"".join(r.event.data.stderr for r in replies if r.event.HasField("data")) == b"err"
    assert replies[-1].event.end.exit_code == 0


def test_list_dir_and_a_watchs_backlog_over_grpc(channel: grpc.Channel, grpc_agent: Agent, tmp_path: Path) -> None:
    """The responses the Connect transport sends pre-encoded or batched (a ListDir encoded in Rust for
    the call's codec, a watch's backlog as one write) come over gRPC as protobuf messages, one by one."""
    import os
    import signal

    token = [("x-access-token", "grpc-token")]
    stub = fs_grpc.FilesystemStub(channel)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep").write_text("d")
    listed = stub.ListDir(fs.ListDirRequest(path=str(tmp_path), depth=2), metadata=token)
    assert [e.name for e in listed.entries] == ["sub", "deep"]
    assert listed.entries[1].path == str(tmp_path / "sub" / "deep") and listed.entries[1].size == 1

    watched = tmp_path / "watched"
    watched.mkdir()
    stream = stub.WatchDir(fs.WatchDirRequest(path=str(watched)), metadata=token, timeout=30)
    assert next(stream).WhichOneof("event") == "start"
    os.kill(grpc_agent.process.pid, signal.SIGSTOP)  # the events wait in the kernel: one backlog
    try:
        for i in range(50):
            os.close(os.open(watched / f"b-{i:02d}", os.O_CREAT | os.O_WRONLY, 0o644))
    finally:
        os.kill(grpc_agent.process.pid, signal.SIGCONT)
    names = []
    for reply in stream:
        if reply.WhichOneof("event") == "filesystem" and reply.filesystem.type == fs.EVENT_TYPE_CREATE:
            names.append(reply.filesystem.name)
            if len(names) == 50:
                break
    stream.cancel()
    assert names == [f"b-{i:02d}" for i in range(50)]
