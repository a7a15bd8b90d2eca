"""EnrollmentService: new members trade a one-time join token and a CSR for a certificate.

The token decides everything the certificate says (role, name, addresses); the request can
only agree with it. Order matters: the token is burned before anything is signed, so a
replayed token never reaches the CA, and signing and its fsyncs run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from controller.ratelimit import RateLimiter, peer_address
from controller.statestore import StateStore
from honeyfleet.pki import (
    CertificateAuthority,
    Identity,
    PkiError,
    RevocationList,
    TokenClaims,
    TokenExpired,
    verify_token,
)
from honeyfleet.pki.certs import load_csr
from honeyfleet.pki.tokens import ENROLLABLE_ROLES
from honeyfleet.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

#: Each enrolment finishes within this many seconds or is abandoned.
DEADLINE = 10.0


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    """Signs CSRs for holders of valid, unused join tokens."""

    def __init__(
        self,
        ca: CertificateAuthority,
        store: StateStore,
        limiter: RateLimiter,
        *,
        validity_days: int,
    ) -> None:
        self._ca = ca
        self._store = store
        # Its own view of revoked.json: the controller's poller then sees our writes as a
        # change of the file and cuts the replaced certificate's connections.
        self._revocations = RevocationList(ca.revoked_path)
        self._limiter = limiter
        self._validity_days = validity_days
        # One enrolment at a time decides "does this name exist" and signs; without it two
        # tokens for one name could both see it free.
        self._issuing = asyncio.Lock()

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        """Check the request against its token, burn the token, then sign the CSR."""
        peer = context.peer()
        if not self._limiter.allow(peer_address(peer)):
            log.warning("enrolment from %s refused: rate limit", peer)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many enrolment attempts; retry later"
            )
        try:
            async with asyncio.timeout(DEADLINE):
                return await self._enroll(request, context, peer)
        except TimeoutError:
            log.warning("enrolment from %s abandoned after %.0fs", peer, DEADLINE)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "enrolment took too long")

    async def _enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        peer: str,
    ) -> enrollment_pb2.EnrollResponse:
        claims = await self._claims(request.token, context, peer)
        await self._check_request(request, claims, context)
        identity = Identity(self._ca.fleet, claims.role, claims.name)
        # Burned first: whatever happens next, this token never enrols anything again.
        if not await self._store.use_token(claims.jti, identity.uri, time.time()):
            log.warning("enrolment from %s refused: token %s reused", peer, claims.jti)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token was already used")
        async with self._issuing:
            current = await asyncio.to_thread(self._live_serials, identity)
            if current and not claims.reenrol:
                log.warning("enrolment from %s refused: %s already enrolled", peer, identity)
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{identity} is already enrolled; to replace it, create a token with "
                    "--reenrol (which revokes its current certificate)",
                )
            try:
                cert = await asyncio.to_thread(
                    self._ca.sign_csr,
                    request.csr_pem.encode(),
                    identity,
                    dns=claims.dns,
                    ips=claims.ips,
                    validity_days=self._validity_days,
                )
            except PkiError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            for serial in current:
                await asyncio.to_thread(self._revocations.revoke, serial, f"re-enrolled {identity}")
        log.info("enrolled %s from %s (revoked %d old certificates)", identity, peer, len(current))
        return enrollment_pb2.EnrollResponse(
            certificate_pem=cert.decode(),
            ca_certificate_pem=self._ca.cert_pem.decode(),
            identity=identity.uri,
        )

    def _live_serials(self, identity: Identity) -> list[int]:
        """``identity``'s usable certificates (blocking: runs in a worker thread)."""
        self._revocations.refresh()
        return self._ca.live_serials(identity, self._revocations.serials())

    async def _claims(
        self, token: str, context: grpc.aio.ServicerContext[Any, Any], peer: str
    ) -> TokenClaims:
        """The verified claims of ``token``, or the RPC is refused."""
        try:
            claims = verify_token(token, self._ca.token_key)
        except TokenExpired as e:
            log.warning("enrolment from %s refused: %s", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PkiError as e:
            log.warning("enrolment from %s refused: bad token (%s)", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token is not valid")
        if claims.role not in ENROLLABLE_ROLES:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"tokens cannot enrol {claims.role}"
            )
        return claims

    @staticmethod
    async def _check_request(
        request: enrollment_pb2.EnrollRequest,
        claims: TokenClaims,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Refuse a request that asks for more than its token grants, or a bad CSR.

        Runs before the token is burned, so a typo does not cost the operator a token.
        """
        if request.name and request.name != claims.name:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token only enrols {claims.role}/{claims.name}",
            )
        extra = sorted(
            {n.strip().lower().rstrip(".") for n in request.dns_names} - set(claims.dns)
            | {a.strip() for a in request.ip_addresses} - set(claims.ips)
        )
        if extra:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"addresses {', '.join(extra)} are not in the token; the operator names a "
                "member's addresses with `pki token create --dns/--ip`",
            )
        try:
            load_csr(request.csr_pem.encode())
        except PkiError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
