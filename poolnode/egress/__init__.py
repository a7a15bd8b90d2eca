"""Egress containment: what a guest's outbound traffic meets, and the events it makes.

Policies (``egress_policy``), after GQ's containment (Kreibich et al., IMC 2011):

* ``drop``: nothing leaves the pool network; DNS queries are answered REFUSED by the
  node's DNS server, each one an event (``honeyfleet.egress.dns``), and each TCP attempt
  the guest filter drops is an event too (read from NFLOG: :mod:`poolnode.egress.nflog`).
* ``sinkhole`` (default): DNS answers point at the node's own address, where the
  sinkhole accepts TCP on any port, records what the guest sends (HTTP request line and
  Host, TLS SNI, an FTP login and RETR, first bytes: ``honeyfleet.egress.connect``) and
  answers a dead end. TLS is answered with a leaf of the deployment's interception CA
  for the name asked (:mod:`poolnode.egress.intercept`), so an HTTPS request is
  recorded with its ``https://`` URL.
* ``fetch``: as ``sinkhole``, but HTTP, HTTPS and FTP downloads are fetched through the
  operator's proxy, and TFTP ones (redirected to the node's TFTP server,
  :mod:`poolnode.egress.tftpserver`) from the operator's egress address, stored by
  sha256 and served to the guest (``cowrie.session.file_download``).

Under every policy, other UDP but DNS and DHCP (and, under ``fetch``, TFTP) is dropped
and reported (a TFTP request with its URL), and so is IPv6.
Every event is on the attacker's session of the guest that caused it and bounded per
guest (:mod:`poolnode.egress.bounds`).
"""

from poolnode.egress.service import Egress

__all__ = ["Egress"]
