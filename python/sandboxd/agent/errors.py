"""One table from failures to Connect codes, gRPC status codes and HTTP statuses.

Services raise :class:`RpcError` (or let an ``OSError`` from the Rust core escape); every transport
turns it into its own wire shape through :func:`to_rpc_error` and the tables here.
"""

from __future__ import annotations

import enum
import errno


class Code(enum.StrEnum):
    """Connect error codes (their gRPC numbers are in :data:`GRPC_NUMBER`)."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


HTTP_STATUS: dict[Code, int] = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
"""Connect code → HTTP status (the Connect protocol's table, spec §1.4)."""

GRPC_NUMBER: dict[Code, int] = {
    Code.CANCELED: 1,
    Code.UNKNOWN: 2,
    Code.INVALID_ARGUMENT: 3,
    Code.DEADLINE_EXCEEDED: 4,
    Code.NOT_FOUND: 5,
    Code.ALREADY_EXISTS: 6,
    Code.PERMISSION_DENIED: 7,
    Code.RESOURCE_EXHAUSTED: 8,
    Code.FAILED_PRECONDITION: 9,
    Code.ABORTED: 10,
    Code.OUT_OF_RANGE: 11,
    Code.UNIMPLEMENTED: 12,
    Code.INTERNAL: 13,
    Code.UNAVAILABLE: 14,
    Code.DATA_LOSS: 15,
    Code.UNAUTHENTICATED: 16,
}

# errno → (Connect code, HTTP status for the REST endpoints). Anything else is internal/500.
_ERRNO: dict[int, tuple[Code, int]] = {
    errno.ENOENT: (Code.NOT_FOUND, 404),
    errno.ENOTDIR: (Code.INVALID_ARGUMENT, 400),
    errno.EISDIR: (Code.INVALID_ARGUMENT, 400),
    errno.EEXIST: (Code.ALREADY_EXISTS, 409),
    errno.ENOTEMPTY: (Code.FAILED_PRECONDITION, 400),
    errno.EACCES: (Code.PERMISSION_DENIED, 403),
    errno.EPERM: (Code.PERMISSION_DENIED, 403),
    errno.EROFS: (Code.PERMISSION_DENIED, 403),
    errno.ELOOP: (Code.FAILED_PRECONDITION, 400),
    errno.ENAMETOOLONG: (Code.INVALID_ARGUMENT, 400),
    errno.EINVAL: (Code.INVALID_ARGUMENT, 400),
    errno.EXDEV: (Code.INTERNAL, 500),
    errno.ENOSPC: (Code.RESOURCE_EXHAUSTED, 507),
    errno.EDQUOT: (Code.RESOURCE_EXHAUSTED, 507),
    errno.EMFILE: (Code.RESOURCE_EXHAUSTED, 503),
    errno.ENFILE: (Code.RESOURCE_EXHAUSTED, 503),
}


class RpcError(Exception):
    """A failure with a Connect code and a message a person can act on.

    ``details`` are error details as ``(full message type name, serialized message)`` pairs (Connect's
    ``details``, gRPC's ``google.rpc.Status.details``)."""

    def __init__(
        self,
        code: Code,
        message: str,
        http_status: int | None = None,
        details: list[tuple[str, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status if http_status is not None else HTTP_STATUS[code]
        self.details = details or []


def describe_os_error(exc: OSError) -> str:
    """``"<strerror>: '<path>'"`` — what failed and where, without a traceback."""
    what = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{what.lower()}: '{exc.filename}'"
    return what.lower()


def from_os_error(exc: OSError, context: str = "") -> RpcError:
    """Map an ``OSError`` (from the Rust core or the stdlib) to an :class:`RpcError`."""
    code, status = _ERRNO.get(exc.errno or 0, (Code.INTERNAL, 500))
    message = describe_os_error(exc)
    if context:
        message = f"{context}: {message}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (the sandbox's disk is full)"
    return RpcError(code, message, status)


def to_rpc_error(exc: BaseException) -> RpcError:
    """Any exception a handler raised, as the error a client should see."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one of its subclasses
        return RpcError(Code.DEADLINE_EXCEEDED, "the request's deadline (connect-timeout-ms) passed")
    if isinstance(exc, OSError):
        return from_os_error(exc)
    return RpcError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
