"""Errors: every failed call raises a ShoalError carrying the gRPC status code and the
server's message (which names the problem and the limit), as a subclass per code."""

from __future__ import annotations

from typing import Dict, Type

import grpc


class ShoalError(Exception):
    """A call the cluster refused or could not answer."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({method})" if method else ""))
        self.code = code
        self.message = message
        self.method = method


class InvalidArgument(ShoalError):
    """A bad request: fix it (the message names the field and the limit)."""


class NotFound(ShoalError):
    pass


class AlreadyExists(ShoalError):
    pass


class PermissionDenied(ShoalError):
    """The API key may not do this (a read key writing, another collection's key)."""


class Unauthenticated(ShoalError):
    """No API key, or one the cluster does not know."""


class ResourceExhausted(ShoalError):
    """Over a limit, overloaded, or the disk is full; retry later or ask for less."""


class FailedPrecondition(ShoalError):
    """The cluster's state refuses it now (a re-embed running, a stale cursor)."""


class Aborted(ShoalError):
    """A conditional write lost to a write in between (if_version): read again."""


class Unavailable(ShoalError):
    """No node or shard could answer; retried by the client before it is raised."""


class DeadlineExceeded(ShoalError):
    pass


class Internal(ShoalError):
    pass


_BY_CODE: Dict[grpc.StatusCode, Type[ShoalError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def from_rpc_error(e: grpc.RpcError, method: str = "") -> ShoalError:
    """The ShoalError subclass for a failed call's status."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _BY_CODE.get(code, ShoalError)(code, details or "", method)
