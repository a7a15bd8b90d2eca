"""What a connection's source is, for every table kept per source.

Per-source bounds (the share of unauthenticated slots, connections per address,
penalties, the guest budget, the event budget) are only as good as the key they count
by. Two keys would let an attacker out of them:

* a dual-stack listener (``[::]:2222``) sees an IPv4 client as ``::ffff:192.0.2.1``,
  while an IPv4 listener sees ``192.0.2.1``: one client, two sources, and an
  IPv4-mapped address is in no IPv4 network of ``penalty_exempt``;
* every IPv6 end host is given a /64, so counting per IPv6 address gives one attacker
  2**64 sources. IPv6 sources are counted per /64 (OpenSSH's ``PerSourceNetBlockSize``
  allows the same; its default of 128 is the weakness its documentation warns of).
"""

from __future__ import annotations

import ipaddress

# The IPv6 prefix one end host (one attacker) is given.
IPV6_SOURCE_PREFIX = 64


def source_of(address: str) -> str:
    """The key per-source tables count ``address`` under: the IPv4 address, or its /64."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        # The scope (fe80::1%eth0) names an interface, not a host: not part of the key.
        network = ipaddress.IPv6Network((int(parsed), IPV6_SOURCE_PREFIX), strict=False)
        return str(network)
    return str(parsed)
