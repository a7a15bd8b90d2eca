"""Egress containment on a pool node: the policy, its servers and its redirect rules."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

from honeyfleet.errors import ConfigError
from honeyfleet.pki.errors import PkiError
from poolnode.config import PoolNodeConfig
from poolnode.egress.bounds import EventBounds
from poolnode.egress.dnsserver import RecentNames, serve_dns
from poolnode.egress.fetch import Fetcher
from poolnode.egress.intercept import Leaves, load_or_make_ca
from poolnode.egress.netfilter import Redirects
from poolnode.egress.nflog import Attempt, PacketLog
from poolnode.egress.report import CONNECT, Reporter
from poolnode.egress.sinkhole import Sinkhole, SinkholeLimits
from poolnode.egress.sniff import escaped, tftp_request
from poolnode.egress.tftpserver import Origins, TftpServer
from poolnode.events import NodeEvents
from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

TFTP_PORT = 69


class Egress:
    """Applies ``egress_policy`` to the pool network's guests (``start`` then ``stop``).

    Its DNS server and sinkhole listen on the pool network's own address, so only the
    guests (and the node) can reach them; with ``redirect`` (the default) the node's
    iptables rules bring the guests' traffic there.
    """

    def __init__(
        self,
        config: PoolNodeConfig,
        guest_at: Callable[[str], str | None],
        *,
        redirect: bool = True,
        metrics: PoolMetrics | None = None,
        address_of_mac: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        """``guest_at`` names the guest at an IPv4 address; ``address_of_mac`` gives the
        IPv4 address of the guest with a MAC (None: not this node's guest), for IPv6."""
        self.config = config
        self._address_of_mac = address_of_mac
        self.policy = config.egress_policy
        self.address = str(ipaddress.ip_interface(config.network_address).ip)
        """The sinkhole's address, which DNS answers point at: the guests' gateway."""
        bounds = EventBounds(config.egress_events_per_minute, config.egress_events_burst)
        self.reporter = Reporter(bounds, guest_at, metrics)
        fetcher = None
        if self.policy == "fetch":
            fetcher = Fetcher(
                config.egress_fetch_proxy,
                config.state_dir / "downloads",
                max_bytes=config.egress_fetch_max_bytes,
                timeout=config.egress_fetch_timeout,
                allow=config.egress_fetch_allow,
                deny=config.egress_fetch_deny,
                tftp_source=config.egress_fetch_tftp_source,
                ca_bundle=config.egress_fetch_ca_bundle,
            )
        limits = SinkholeLimits(
            config.egress_capture_bytes, config.egress_read_timeout, config.egress_max_connections
        )
        self.names = RecentNames()
        self.sinkhole = Sinkhole(
            self.reporter, limits, fetcher, metrics, names=self.names, address=self.address
        )
        self.origins = Origins()
        """Where guests' TFTP requests were going (fetch: they are redirected)."""
        self._redirects = (
            Redirects(
                config.guest_tag,
                config.network_bridge,
                config.egress_dns_port,
                None if self.policy == "drop" else config.egress_sinkhole_port,
                config.egress_log_group,
                config.egress_tftp_port if self.policy == "fetch" else None,
            )
            if redirect
            else None
        )
        self.dropped = PacketLog(config.egress_log_group, self._dropped) if redirect else None
        """Reads the attempts the guest filter drops (None: not watched)."""
        self._dns: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tftp: tuple[asyncio.DatagramTransport, TftpServer] | None = None

    @property
    def events(self) -> NodeEvents | None:
        """Where egress events go."""
        return self.reporter.events

    @events.setter
    def events(self, events: NodeEvents | None) -> None:
        self.reporter.events = events

    def _dropped(self, attempt: Attempt) -> None:
        """Report an attempt the guest filter drops (a TFTP request with its URL). An
        IPv6 one is the guest's whose MAC sent it (the source address is the guest's
        choice), reported under its IPv4 address with ``src_ip6``; other nodes' guests'
        are not ours to report."""
        guest_ip = attempt.src_ip
        fields: dict[str, Any] = {}
        if attempt.mac:
            found = self._address_of_mac(attempt.mac)
            if found is None:
                return
            guest_ip = found
            fields["src_ip6"] = attempt.src_ip
        tftp = tftp_request(attempt.payload) if attempt.dst_port == TFTP_PORT else None
        if self.policy == "fetch" and attempt.dst_port == TFTP_PORT and not attempt.mac:
            # Redirected to the TFTP server, which reports it: it needs the destination.
            self.origins.seen(attempt.src_ip, attempt.src_port, attempt.dst_ip)
            return
        if tftp is not None:
            fields["method"] = tftp["method"]
            host = f"[{attempt.dst_ip}]" if ":" in attempt.dst_ip else attempt.dst_ip
            fields["url"] = f"tftp://{host}/{tftp['filename']}"
        elif attempt.payload:
            fields["data"] = escaped(attempt.payload)
        self.reporter.report(
            guest_ip,
            CONNECT,
            "honeyfleet.egress.connect",
            "Guest connection to {dst_ip}:{dst_port}/{transport} dropped",
            dst_ip=attempt.dst_ip,
            dst_port=attempt.dst_port,
            transport=attempt.transport,
            kind="dropped",
            **fields,
        )

    async def start(self) -> None:
        """Listen on the pool network's address, then redirect guests' traffic there
        (call once the network is up: its address must exist)."""
        answer = None if self.policy == "drop" else self.address
        config = self.config
        try:
            with _naming("egress_dns_port"):
                self._dns = await serve_dns(
                    self.reporter, self.address, config.egress_dns_port, answer, self.names
                )
            if self.policy != "drop" and config.egress_intercept_tls:
                try:
                    ca = await asyncio.to_thread(load_or_make_ca, *config.egress_ca)
                except (PkiError, OSError) as e:
                    raise ConfigError("egress_tls_ca_cert", f"interception CA: {e}") from None
                self.sinkhole.leaves = Leaves(*ca)
            if self.policy != "drop":
                with _naming("egress_sinkhole_port"):
                    self._server = await asyncio.start_server(
                        self.sinkhole.handle, self.address, config.egress_sinkhole_port
                    )
            if self.policy == "fetch":
                with _naming("egress_tftp_port"):
                    self._tftp = await asyncio.get_running_loop().create_datagram_endpoint(
                        lambda: TftpServer(
                            self.sinkhole, self.origins, address=self.address, names=self.names
                        ),
                        local_addr=(self.address, config.egress_tftp_port),
                    )
            if self.dropped is not None:
                with _naming("egress_log_group"):
                    self.dropped.start()
            if self._redirects is not None:
                await self._redirects.install()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "egress policy %s: DNS on %s:%d%s",
            self.policy,
            self.address,
            self.config.egress_dns_port,
            f", sinkhole on port {self.config.egress_sinkhole_port}" if self._server else "",
        )

    async def stop(self) -> None:
        """Remove the redirects and close the listeners."""
        if self._redirects is not None:
            await self._redirects.remove()
        if self.dropped is not None:
            self.dropped.stop()
        if self._tftp is not None:
            transport, server = self._tftp
            transport.close()
            await server.close()
            self._tftp = None
        if self._server is not None:
            self._server.close()
            await self.sinkhole.close()
            await self._server.wait_closed()
            self._server = None
        if self._dns is not None:
            self._dns.close()
            self._dns = None
            await asyncio.sleep(0)  # the transport closes its socket on the next loop turn


@contextlib.contextmanager
def _naming(key: str) -> Iterator[None]:
    """Turn a failure to bind into a start-up error that names the setting to change."""
    try:
        yield
    except OSError as e:
        raise ConfigError(
            key,
            f"cannot bind it ({e.strerror or e}): another process (another "
            "pool node on this host?) holds it, or the pool network is down",
        ) from None
