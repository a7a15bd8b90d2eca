"""Authentication and authorization of every fleet RPC, in one server interceptor.

TLS has already checked that the client certificate chains to the fleet CA and is
within its validity. This interceptor then reads the caller's fleet identity from the
certificate, refuses revoked serials, and checks the caller's role against one table
of service -> roles before any handler runs (a ``service/Method`` entry overrides its
service's, for services whose methods serve different roles). Streams of a serial revoked later are
cut. HoneyfleetErrors raised by handlers are mapped to their gRPC status here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from honeyfleet.errors import HoneyfleetError
from honeyfleet.pki.errors import IdentityError
from honeyfleet.pki.identity import Identity, Role, identity_from_certificate

log = logging.getLogger(__name__)

ALL_ROLES = frozenset(Role)
# Health and reflection are for anyone holding a fleet certificate (grpcurl, probes).
COMMON_POLICY: Mapping[str, frozenset[Role]] = {
    "grpc.health.v1.Health": ALL_ROLES,
    "grpc.reflection.v1alpha.ServerReflection": ALL_ROLES,
    "grpc.reflection.v1.ServerReflection": ALL_ROLES,
}


@dataclass(frozen=True)
class Caller:
    """The authenticated peer of the current RPC."""

    identity: Identity
    serial: int
    peer: str
    certificate: x509.Certificate
    """The certificate the caller presented (for renewal: its addresses)."""

    def __str__(self) -> str:
        return str(self.identity)


_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("honeyfleet_caller")


def current_caller() -> Caller:
    """The caller of the RPC being handled; only valid inside a handler."""
    return _caller.get()


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates callers by certificate and authorizes them by role per service."""

    def __init__(self, fleet: str, policy: Mapping[str, frozenset[Role]]) -> None:
        self._fleet = fleet
        self._policy = {**COMMON_POLICY, **policy}
        self._revoked: frozenset[int] = frozenset()
        self._active: dict[int, set[asyncio.Task[Any]]] = {}
        # Certificates repeat on every RPC of a connection: parse each once.
        self._parse = functools.lru_cache(maxsize=4096)(_parse_certificate)
        self._chain_serials = functools.lru_cache(maxsize=4096)(_chain_serials)

    def update_revoked(self, serials: Iterable[int]) -> None:
        """Replace the revoked-serial set and cut the open RPCs of newly revoked serials."""
        serials = frozenset(serials)
        newly = serials - self._revoked
        self._revoked = serials
        for serial in newly:
            for task in self._active.get(serial, ()):
                log.warning("cutting RPC of revoked certificate serial %x", serial)
                task.cancel(msg="certificate revoked")

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the method's handler with authentication and authorization."""
        handler = await continuation(handler_call_details)
        if handler is None:
            # Unknown method: let gRPC answer UNIMPLEMENTED (grpcurl relies on it).
            return handler
        method: str = handler_call_details.method
        service = method.split("/")[1] if method.count("/") == 2 else ""
        roles = self._policy.get(method[1:], self._policy.get(service, frozenset()))
        wrapped: grpc.RpcMethodHandler[Any, Any] = _wrap(
            handler, functools.partial(self._guard, method, roles)
        )
        return wrapped

    async def _authenticate(
        self, method: str, roles: frozenset[Role], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Caller:
        """Identify the caller and check its role, aborting the RPC if refused."""
        auth = context.auth_context()
        pem = next(iter(auth.get("x509_pem_cert") or ()), b"")
        peer = context.peer()
        try:
            identity, certificate = self._parse(pem)
            serial = certificate.serial_number
        except (ValueError, IdentityError) as e:
            log.warning("refused %s from %s: no fleet identity (%s)", method, peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid fleet certificate")
        if identity.fleet != self._fleet:
            log.warning("refused %s from %s: fleet %r", method, peer, identity.fleet)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate of another fleet")
        if serial in self._revoked:
            log.warning("refused %s from %s (%s): certificate revoked", method, peer, identity)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate revoked")
        chain = next(iter(auth.get("x509_pem_cert_chain") or ()), b"")
        if self._revoked & self._chain_serials(chain):
            # A revoked issuing CA: everything it signed is refused with it.
            log.warning("refused %s from %s (%s): issuing CA revoked", method, peer, identity)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "issuing CA revoked")
        if identity.role not in roles:
            log.warning("refused %s from %s: role %s not allowed", method, identity, identity.role)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"role {identity.role} may not call {method}"
            )
        return Caller(identity, serial, peer, certificate)

    @contextlib.asynccontextmanager
    async def _guard(
        self, method: str, roles: frozenset[Role], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        """Run a handler as the authenticated caller, mapping errors and revocation cuts."""
        caller = await self._authenticate(method, roles, context)
        # Each RPC runs in a task of its own (a copied context), so the value never
        # leaks into other RPCs and needs no reset; resetting from a stream handler's
        # finalizer would even fail, as it may run in another context.
        _caller.set(caller)
        task = asyncio.current_task()
        assert task is not None
        self._active.setdefault(caller.serial, set()).add(task)
        try:
            yield
        except HoneyfleetError as e:
            await context.abort(e.code, str(e), e.trailing_metadata)
        except asyncio.CancelledError:
            if caller.serial in self._revoked:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate revoked")
            raise
        finally:
            tasks = self._active.get(caller.serial)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._active[caller.serial]


def _parse_certificate(pem: bytes) -> tuple[Identity, x509.Certificate]:
    """The fleet identity of a PEM certificate, and the certificate."""
    if not pem:
        raise ValueError("no client certificate")
    cert = x509.load_pem_x509_certificate(pem)
    return identity_from_certificate(cert), cert


def _chain_serials(pem: bytes) -> frozenset[int]:
    """Serials of every certificate in a PEM chain (empty if there is none or it is bad)."""
    if not pem:
        return frozenset()
    try:
        return frozenset(c.serial_number for c in x509.load_pem_x509_certificates(pem))
    except ValueError:
        return frozenset()


Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Any]


def _wrap(handler: Any, guard: Guard) -> Any:
    """Rebuild a method handler whose behaviour runs inside ``guard``.

    Typed ``Any``: grpc-stubs models only synchronous behaviours, but grpc.aio stores
    coroutine functions and async generators in the same handler type.
    """
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                async for response in inner_us(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with guard(context):
            async for response in inner_ss(requests, context):
                yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
