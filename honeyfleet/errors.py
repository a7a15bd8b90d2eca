"""The error hierarchy: one root, and subclasses that carry their gRPC status.

Servicers let these propagate; the authorization interceptor maps them to
``context.abort`` once, at the boundary. Library code never exits the process.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class HoneyfleetError(Exception):
    """Root of every error honeyfleet raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata the server boundary sends with the status (none by default)."""
        return ()


class ConfigError(HoneyfleetError):
    """A configuration value is missing, unknown or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class InvalidArgument(HoneyfleetError):
    """A request field is malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HoneyfleetError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(HoneyfleetError):
    """The caller's identity may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(HoneyfleetError):
    """The caller has no valid fleet identity."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(HoneyfleetError):
    """The object is in a state that does not allow this."""

    code = grpc.StatusCode.FAILED_PRECONDITION


# Trailing metadata a server may add to RESOURCE_EXHAUSTED: milliseconds to wait before
# trying again (clients add jitter).
RETRY_AFTER_TRAILER = "retry-after-ms"


class ResourceExhausted(HoneyfleetError):
    """No capacity is left (guests, connections, spool space).

    With ``retry_after`` (seconds), the answer tells the caller when to try again: the
    server boundary sends it as the RETRY_AFTER_TRAILER trailer.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The retry hint, if any."""
        if self.retry_after is None:
            return ()
        return ((RETRY_AFTER_TRAILER, str(round(self.retry_after * 1000))),)


def retry_after(error: grpc.aio.AioRpcError, *, cap: float) -> float:
    """The seconds a RESOURCE_EXHAUSTED answer asks to wait (0 without a usable hint).

    Capped at ``cap``: a confused (or hostile) server must not park a client for long.
    """
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    # grpc.aio gives (key, value) pairs; grpc-stubs types them as the sync API's objects.
    trailers: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    value = next((v for k, v in trailers if k == RETRY_AFTER_TRAILER), None)
    if not isinstance(value, str) or not value.isdigit():
        return 0.0
    return min(int(value) / 1000, cap)


class Unavailable(HoneyfleetError):
    """A peer or store cannot be reached right now; retrying may work."""

    code = grpc.StatusCode.UNAVAILABLE


class RPCError(HoneyfleetError):
    """A gRPC call to another fleet process failed; wraps the transport error."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.method = method
        self.details = details

    @classmethod
    def wrap(cls, method: str, error: grpc.aio.AioRpcError) -> RPCError:
        """Build from the error grpc.aio raised for a call."""
        return cls(method, error.code(), error.details() or "")
