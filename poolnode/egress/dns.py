"""DNS queries from guests, and the answers a containment policy gives them.

Only what a resolver stub sends is understood: one question, in a query (opcode 0).
``sinkhole`` and ``fetch`` answer every A question with the sinkhole's address (a short
TTL, so nothing lingers in a guest's cache) and every other type with no records;
``drop`` answers REFUSED, as libvirt's dnsmasq without upstream servers did.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 255: "ANY"}  # fmt: skip
TYPE_A = 1
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_REFUSED = 5
ANSWER_TTL = 60
MAX_LABELS = 127


class BadQuery(ValueError):
    """A datagram that is not a DNS query we can answer."""


@dataclass(frozen=True)
class Query:
    """One question from a guest."""

    ident: int
    flags: int
    name: str
    """The name asked for, lower-case, without the final dot."""
    qtype: int
    qclass: int
    question: bytes
    """The question section as sent (answers repeat it)."""

    @property
    def type_name(self) -> str:
        """The query type's mnemonic ("A", "AAAA"...) or its number."""
        return QTYPES.get(self.qtype, str(self.qtype))


def parse_query(data: bytes) -> Query:
    """Parse a guest's query; raises BadQuery for anything else."""
    if len(data) < HEADER.size:
        raise BadQuery("shorter than a DNS header")
    ident, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(data)
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qdcount != 1:
        raise BadQuery("not a standard query with one question")
    offset, labels = HEADER.size, list[str]()
    while True:
        if offset >= len(data) or len(labels) > MAX_LABELS:
            raise BadQuery("question name runs past the datagram")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length > 63:  # compression pointers have no place in a question
            raise BadQuery("bad label length")
        labels.append(data[offset : offset + length].decode("ascii", "backslashreplace"))
        offset += length
    if offset + 4 > len(data):
        raise BadQuery("question has no type and class")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    question = data[HEADER.size : offset + 4]
    return Query(ident, flags, ".".join(labels).lower(), qtype, qclass, question)


def answer(query: Query, address: str | None) -> bytes:
    """The reply to ``query``: ``address`` for an A question (None: REFUSED)."""
    rd = query.flags & 0x0100
    if address is None:
        return _reply(query, rd | RCODE_REFUSED, b"", 0)
    if query.qtype != TYPE_A or query.qclass != CLASS_IN:
        return _reply(query, rd | RCODE_NOERROR, b"", 0)
    rdata = ipaddress.IPv4Address(address).packed
    # A pointer (0xC00C) to the question's name, which starts right after the header.
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ANSWER_TTL, len(rdata)) + rdata
    return _reply(query, rd | RCODE_NOERROR, record, 1)


def _reply(query: Query, flags: int, records: bytes, count: int) -> bytes:
    """A response (QR, and RA so the guest takes us for a recursive resolver)."""
    header = HEADER.pack(query.ident, 0x8000 | 0x0080 | flags, 1, count, 0, 0)
    return header + query.question + records
