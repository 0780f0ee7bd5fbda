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
