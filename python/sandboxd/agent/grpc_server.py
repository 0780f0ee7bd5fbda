"""The same services over gRPC (grpcio, HTTP/2) on ``--grpc-port``, with reflection and health.

grpcio serves on its own port rather than sharing the Connect port: the ASGI servers we use speak
HTTP/1.1 only, and gRPC needs HTTP/2 with trailers. Handlers are the very ``Method`` objects the
Connect transport serves; only the framing differs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import TOKEN_ERROR, rpc_user
from .errors import GRPC_NUMBER, Code, RpcError, to_rpc_error
from .keepalive import with_keepalives
from .rpc import Batch, Context, Kind, Method
from .state import AgentState

_STATUS = {
    code: status for status in grpc.StatusCode for code, number in GRPC_NUMBER.items() if status.value[0] == number
}


def _context(state: AgentState, grpc_ctx: grpc.aio.ServicerContext) -> Context:
    headers = {k.lower(): v for k, v in grpc_ctx.invocation_metadata() or () if isinstance(v, str)}
    if not state.token_matches(headers.get("x-access-token")):
        raise RpcError(Code.UNAUTHENTICATED, TOKEN_ERROR)
    remaining = grpc_ctx.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return Context(user=rpc_user(state, headers.get("authorization")), headers=headers, deadline=deadline)


async def _abort(grpc_ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
    error = to_rpc_error(exc)
    await grpc_ctx.abort(_STATUS[error.code], error.message)


def _handler(state: AgentState, method: Method) -> grpc.RpcMethodHandler:
    des = method.request_type.FromString

    # Each message serializes itself: a stream may yield a NestedBytes (process output) in place of
    # a protobuf message, which the unbound ``response_type.SerializeToString`` would refuse.
    def ser(message: Any) -> bytes:
        data: bytes = message.SerializeToString()
        return data

    if method.kind is Kind.UNARY:

        async def unary(request: Any, grpc_ctx: grpc.aio.ServicerContext) -> Any:
            try:
                return await method.handler(request, _context(state, grpc_ctx))
            except Exception as exc:
                await _abort(grpc_ctx, exc)

        return grpc.unary_unary_rpc_method_handler(unary, des, ser)

    if method.kind is Kind.SERVER_STREAM:

        async def stream(request: Any, grpc_ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                ctx = _context(state, grpc_ctx)
                messages: AsyncIterator[Any] = method.handler(request, ctx)
                if method.keepalive is not None:
                    messages = with_keepalives(messages, ctx.keepalive_interval, method.keepalive)
                async for message in messages:
                    if isinstance(message, Batch):
                        for each in message.messages:
                            yield each
                    else:
                        yield message
            except Exception as exc:
                await _abort(grpc_ctx, exc)

        return grpc.unary_stream_rpc_method_handler(stream, des, ser)

    async def client_stream(requests: AsyncIterator[Any], grpc_ctx: grpc.aio.ServicerContext) -> Any:
        try:
            return await method.handler(requests, _context(state, grpc_ctx))
        except Exception as exc:
            await _abort(grpc_ctx, exc)

    return grpc.stream_unary_rpc_method_handler(client_stream, des, ser)


async def start_grpc(state: AgentState, methods: list[Method], host: str, port: int) -> grpc.aio.Server:
    """Start a grpc.aio server for ``methods`` (plus reflection and health) on ``host:port``."""
    server = grpc.aio.server()
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for method in methods:
        by_service.setdefault(method.service, {})[method.name] = _handler(state, method)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*by_service, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    for service in [*by_service, ""]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server
