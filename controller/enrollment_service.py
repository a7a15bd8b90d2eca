"""EnrollmentService: new members trade a one-time join token and a CSR for a certificate."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from controller.statestore import StateStore
from honeyfleet.pki import (
    CertificateAuthority,
    Identity,
    PkiError,
    Role,
    TokenExpired,
    verify_token,
)
from honeyfleet.pki.identity import validate_label
from honeyfleet.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

# Roles a token may enrol; admins and controllers are issued by hand with `pki issue`.
ENROLLABLE = frozenset({Role.SENSOR, Role.POOLNODE})
MAX_SANS = 16


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    """Signs CSRs for holders of valid, unused join tokens."""

    def __init__(self, ca: CertificateAuthority, store: StateStore) -> None:
        self._ca = ca
        self._store = store

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        """Verify the token, burn it, and sign the CSR for the token's role."""
        peer = context.peer()
        try:
            claims = verify_token(request.token, self._ca.token_key)
        except TokenExpired as e:
            log.warning("enrolment from %s refused: %s", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PkiError as e:
            log.warning("enrolment from %s refused: bad token (%s)", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token is not valid")
        if claims.role not in ENROLLABLE:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"tokens cannot enrol role {claims.role}"
            )
        name = claims.name or request.name
        try:
            validate_label(name, "name")
        except PkiError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if claims.name and request.name and request.name != claims.name:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"this token only enrols {claims.name!r}"
            )
        if len(request.dns_names) + len(request.ip_addresses) > MAX_SANS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_SANS} SANs")
        identity = Identity(self._ca.fleet, claims.role, name)
        try:
            cert = self._ca.sign_csr(
                request.csr_pem.encode(),
                identity,
                dns=list(request.dns_names),
                ips=list(request.ip_addresses),
            )
        except PkiError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Burn the token only once everything else checked out, so a typo in the CSR or
        # a SAN does not cost the operator a token.
        if not await self._store.use_token(claims.jti, identity.uri, time.time()):
            log.warning("enrolment from %s refused: token %s reused", peer, claims.jti)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token was already used")
        log.info("enrolled %s from %s", identity, peer)
        return enrollment_pb2.EnrollResponse(
            certificate_pem=cert.decode(),
            ca_certificate_pem=self._ca.cert_pem.decode(),
            identity=identity.uri,
        )
