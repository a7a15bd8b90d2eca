"""The netfilter rules that bring guests' traffic to the node's DNS server and sinkhole.

One chain of our own in the ``nat`` table, jumped to from PREROUTING for packets that
come in on the pool bridge: guests' DNS (UDP 53, to any address) goes to the DNS
server, and under ``sinkhole``/``fetch`` every new TCP connection (any address, any
port) to the sinkhole listener, which reads the original destination back from
conntrack (SO_ORIGINAL_DST). Only a connection's first packet meets the nat table, so
replies and the node's own connections into guests (SSH, Telnet) are untouched. The
guest nwfilter then sees the redirected packets addressed to the node's own ports
(see ``render_nwfilter``). Rules are made with iptables (iptables-nft on Debian 12,
the tool libvirt itself uses), replaced whole at start and removed at stop.
"""

from __future__ import annotations

import asyncio
import logging

from honeyfleet.errors import FailedPrecondition

log = logging.getLogger(__name__)

IPTABLES = "iptables"


def chain_name(tag: str) -> str:
    """The node's chain (iptables allows 28 characters; tags have at most 16)."""
    return f"{tag.upper()}-EGRESS"


def rules(dns_port: int, sinkhole_port: int | None) -> list[list[str]]:
    """The chain's rules: DNS to ``dns_port``, and TCP to ``sinkhole_port`` unless None."""
    chain = [["-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", str(dns_port)]]
    if sinkhole_port is not None:
        chain.append(["-p", "tcp", "-j", "REDIRECT", "--to-ports", str(sinkhole_port)])
    return chain


class Redirects:
    """Installs and removes the node's redirect rules for one bridge."""

    def __init__(self, tag: str, bridge: str, dns_port: int, sinkhole_port: int | None) -> None:
        self.chain = chain_name(tag)
        self._jump = ["PREROUTING", "-i", bridge, "-j", self.chain]
        self._rules = rules(dns_port, sinkhole_port)

    async def install(self) -> None:
        """(Re)make the chain with its rules and the jump to it."""
        if not await _iptables("-L", self.chain, check=False):
            await _iptables("-N", self.chain)
        await _iptables("-F", self.chain)
        for rule in self._rules:
            await _iptables("-A", self.chain, *rule)
        if not await _iptables("-C", *self._jump, check=False):
            await _iptables("-I", *self._jump)

    async def remove(self) -> None:
        """Remove the jump and the chain (what is already gone is no error)."""
        while await _iptables("-D", *self._jump, check=False):
            pass
        await _iptables("-F", self.chain, check=False)
        await _iptables("-X", self.chain, check=False)


async def _iptables(*args: str, check: bool = True) -> bool:
    """Run ``iptables -w -t nat ARGS``; whether it succeeded (failure raises if ``check``)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            IPTABLES,
            "-w",
            "-t",
            "nat",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise FailedPrecondition(
            "egress containment needs iptables (Debian: apt-get install iptables)"
        ) from None
    _, err = await proc.communicate()
    if proc.returncode != 0 and check:
        detail = err.decode(errors="replace").strip()
        raise FailedPrecondition(f"iptables -t nat {' '.join(args)}: {detail}")
    return proc.returncode == 0
