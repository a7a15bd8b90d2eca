"""The Prometheus endpoint every role serves on ``metrics_listen`` (plain HTTP)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


@dataclass
class MetricsServer:
    """A running metrics HTTP endpoint."""

    server: WSGIServer
    port: int

    async def stop(self) -> None:
        """Stop serving and close the socket."""
        # shutdown() waits for the server thread's next poll: not on the event loop.
        await asyncio.to_thread(self.server.shutdown)
        self.server.server_close()


def serve_metrics(listen: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``host:port``; None when disabled ("") or the port is taken.

    A taken port is logged, not fatal: a role without metrics still does its job, which
    matters more.
    """
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        server, _thread = start_http_server(int(port), addr=host, registry=registry)
    except OSError as e:
        log.error("metrics_listen %s: cannot listen (%s); metrics are not served", listen, e)
        return None
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_port)
    return MetricsServer(server, server.server_port)
