"""The one shape of every fleet gRPC server: options, health, reflection, binding."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from honeyfleet.authz import Authorizer
from honeyfleet.errors import ConfigError
from honeyfleet.tls import KEEPALIVE_OPTIONS, MAX_MESSAGE_BYTES

# Each connection's receive window for what clients send: fixed at 4 MB instead of sized
# by BDP probing. Probing makes the server send an HTTP/2 PING, and read its ACK, for
# nearly every message it receives: on the controller, whose lease and heartbeat streams
# carry one small message after another, that was about half of gRPC's own thread
# wake-ups. gRPC announces 4 MB from the start anyway while memory is plentiful, so
# uploads (events, artefacts, tunnels) run as before: 4 MB a round trip, 40 MB/s at
# 100 ms. (Probing alone off would leave HTTP/2's 64 KB: 0.65 MB/s at 100 ms.) What is
# given up: probing would grow the window past 4 MB on faster links, and shrink it
# under memory pressure of a configured gRPC resource quota (we configure none).
FIXED_WINDOW_BYTES = 4 * 1024 * 1024
FLOW_CONTROL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", FIXED_WINDOW_BYTES),
)


def new_server(
    authorizer: Authorizer | None, *, max_concurrent_streams: int = 1000
) -> grpc.aio.Server:
    """A grpc.aio server with the fleet's options and (unless None) the authorizer."""
    options = [
        # Two processes must never share a port silently (the default on Linux).
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        *KEEPALIVE_OPTIONS,
        *FLOW_CONTROL_OPTIONS,
    ]
    interceptors = [authorizer] if authorizer is not None else []
    return grpc.aio.server(interceptors=interceptors, options=options)


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health_aio.HealthServicer:
    """Serve grpc.health.v1 (all services SERVING) and server reflection."""
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return servicer


async def mark_serving(servicer: health_aio.HealthServicer, service_names: Sequence[str]) -> None:
    """Report the whole server and each service as SERVING."""
    for name in ("", *service_names):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials) -> int:
    """Bind a TLS port; returns the port (useful with port 0). Fails clearly if taken."""
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(
            "listen", f"cannot listen on {listen}: address in use or not local to this host"
        )
    return port
