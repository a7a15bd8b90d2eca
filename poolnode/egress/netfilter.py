"""The netfilter rules that bring guests' traffic to the node's DNS server and sinkhole.

One chain of our own in the ``nat`` table, jumped to from PREROUTING for packets that
come in on the pool bridge: guests' DNS (UDP 53, to any address) goes to the DNS
server, under ``fetch`` TFTP (UDP 69) to the node's TFTP server, and under
``sinkhole``/``fetch`` every new TCP connection (any address, any
port) to the sinkhole listener, which reads the original destination back from
conntrack (SO_ORIGINAL_DST). Only a connection's first packet meets the nat table, so
replies and the node's own connections into guests (SSH, Telnet) are untouched. The
guest nwfilter then sees the redirected packets addressed to the node's own ports
(see ``render_nwfilter``). Rules are made with iptables (iptables-nft on Debian 12,
the tool libvirt itself uses), replaced whole at start and removed at stop.

IPv6 never reaches iptables: libvirt's clean-traffic filter drops every frame but IPv4
and ARP on the bridge, in ebtables' nat PREROUTING, which it appends to. The node's
ebtables rules go first in that chain and copy guests' IPv6 TCP and UDP (and neighbour
solicitations: see :mod:`poolnode.egress.nflog`) to the same NFLOG group (a watcher:
the frame goes on to libvirt's drop). They match libvirt's tap devices (``vnet+``)
rather than one bridge (this kernel's ebtables cannot match the bridge name), so each
node keeps only what its own guests' MACs sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from honeyfleet.errors import FailedPrecondition

log = logging.getLogger(__name__)

IPTABLES = "iptables"
EBTABLES = "ebtables"
GUEST_TAPS = "vnet+"
"""libvirt's names for guests' tap devices."""


def chain_name(tag: str) -> str:
    """The node's chain (iptables allows 28 characters; tags have at most 16)."""
    return f"{tag.upper()}-EGRESS"


def redirects(
    dns_port: int, sinkhole_port: int | None, tftp_port: int | None = None
) -> list[list[str]]:
    """The nat chain's rules: DNS to ``dns_port``, TCP to ``sinkhole_port`` and TFTP to
    ``tftp_port`` unless None."""
    chain = [["-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", str(dns_port)]]
    if tftp_port is not None:
        chain.append(["-p", "udp", "--dport", "69", "-j", "REDIRECT", "--to-ports", str(tftp_port)])
    if sinkhole_port is not None:
        chain.append(["-p", "tcp", "-j", "REDIRECT", "--to-ports", str(sinkhole_port)])
    return chain


def logged(group: int, *, tcp: bool) -> list[list[str]]:
    """The mangle chain's rules: what is copied to NFLOG ``group`` (new flows only):
    UDP but DNS (redirected) and DHCP (dnsmasq's), and TCP when ``tcp`` (under drop)."""
    nflog = ["-j", "NFLOG", "--nflog-group", str(group)]
    chain = [["-p", "udp", "-m", "multiport", "!", "--dports", "53,67", *nflog]]
    if tcp:
        chain.append(["-p", "tcp", "--syn", *nflog])
    return chain


def logged_ipv6(group: int) -> list[list[str]]:
    """The ebtables nat PREROUTING rules copying guests' IPv6 TCP and UDP, and neighbour
    solicitations (how a guest's try to reach an on-link address starts), to ``group``."""
    ipv6 = ["-i", GUEST_TAPS, "-p", "IPv6"]
    nflog = ["--nflog-group", str(group)]
    return [
        *([*ipv6, "--ip6-proto", proto, *nflog] for proto in ("tcp", "udp")),
        [*ipv6, "--ip6-proto", "ipv6-icmp", "--ip6-icmp-type", "neighbour-solicitation", *nflog],
    ]


@dataclass(frozen=True)
class _Chain:
    """A chain of ours in one table, jumped to from PREROUTING."""

    table: str
    name: str
    jump: tuple[str, ...]
    rules: list[list[str]]


class Redirects:
    """Installs and removes the node's rules for one bridge."""

    def __init__(
        self,
        tag: str,
        bridge: str,
        dns_port: int,
        sinkhole_port: int | None,
        log_group: int,
        tftp_port: int | None = None,
    ) -> None:
        name = chain_name(tag)
        new = ("-m", "conntrack", "--ctstate", "NEW")
        self._chains = (
            _Chain("nat", name, ("-i", bridge), redirects(dns_port, sinkhole_port, tftp_port)),
            _Chain(
                "mangle", name, ("-i", bridge, *new), logged(log_group, tcp=sinkhole_port is None)
            ),
        )
        self._ipv6 = logged_ipv6(log_group)

    async def install(self) -> None:
        """(Re)make the chains with their rules and the jumps to them."""
        for chain in self._chains:
            if not await _iptables(chain.table, "-L", chain.name, check=False):
                await _iptables(chain.table, "-N", chain.name)
            await _iptables(chain.table, "-F", chain.name)
            for rule in chain.rules:
                await _iptables(chain.table, "-A", chain.name, *rule)
            jump = ("PREROUTING", *chain.jump, "-j", chain.name)
            if not await _iptables(chain.table, "-C", *jump, check=False):
                await _iptables(chain.table, "-I", *jump)
        for rule in self._ipv6:
            if not await _ebtables("--check", "PREROUTING", *rule, check=False):
                await _ebtables("-I", "PREROUTING", *rule)

    async def remove(self) -> None:
        """Remove the jumps and the chains (what is already gone is no error)."""
        for chain in self._chains:
            jump = ("PREROUTING", *chain.jump, "-j", chain.name)
            while await _iptables(chain.table, "-D", *jump, check=False):
                pass
            await _iptables(chain.table, "-F", chain.name, check=False)
            await _iptables(chain.table, "-X", chain.name, check=False)
        for rule in self._ipv6:
            while await _ebtables("-D", "PREROUTING", *rule, check=False):
                pass


async def _iptables(table: str, *args: str, check: bool = True) -> bool:
    """Run ``iptables -w -t TABLE ARGS``; whether it succeeded (failure raises if ``check``)."""
    return await _run(IPTABLES, "iptables", "-w", "-t", table, *args, check=check)


async def _ebtables(*args: str, check: bool = True) -> bool:
    """Run ``ebtables --concurrent -t nat ARGS``; whether it succeeded."""
    return await _run(EBTABLES, "ebtables", "--concurrent", "-t", "nat", *args, check=check)


async def _run(tool: str, package: str, *args: str, check: bool) -> bool:
    """Run a netfilter tool; whether it succeeded (failure raises if ``check``)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            tool, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise FailedPrecondition(
            f"egress containment needs {tool} (Debian: apt-get install {package})"
        ) from None
    _, err = await proc.communicate()
    if proc.returncode != 0 and check:
        detail = err.decode(errors="replace").strip()
        raise FailedPrecondition(f"{tool} {' '.join(args)}: {detail}")
    return proc.returncode == 0
