"""honeyfleet: a distributed high-interaction SSH/Telnet honeypot.

Shared code for every role: configuration (``config``), errors (``errors``), the fleet
PKI (``pki``), mutual TLS (``tls``), per-RPC authorization (``authz``), the gRPC
server shape (``grpcserver``), enrolment (``enroll``) and the CLI (``cli``).
Generated API stubs live in ``honeyfleet.v1``.
"""

__version__ = "0.1.0"
