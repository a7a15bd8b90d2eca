"""What a client sends before encryption starts: its version line and its KEXINIT.

asyncssh keeps both to itself, so the connection's byte pump feeds a copy of the
client's first bytes here. This parser reads the identification line, then cleartext
binary packets until the client's NEWKEYS, refusing any packet that declares a length
over the bound (before buffering it). From the first KEXINIT it derives the hassh
fingerprint: md5 of "kex;encryption;mac;compression" (client to server lists).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

MAX_VERSION_LINE = 255
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
KEXINIT_LISTS = 10
# Protocol versions OpenSSH takes as SSH 2.
SSH2_VERSIONS = (b"2.0", b"1.99")


class CleartextViolation(Exception):
    """The client broke a bound in the cleartext phase; the connection must end."""


class BadIdentification(CleartextViolation):
    """The client's first line is no SSH 2 identification; ``reply`` is OpenSSH's answer."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True)
class KexInit:
    """The client's algorithm lists and its hassh."""

    kex: list[str]
    host_key: list[str]
    encryption: list[str]
    mac: list[str]
    compression: list[str]
    languages: list[str]

    @property
    def hassh_algorithms(self) -> str:
        """The string hassh hashes."""
        return ";".join(
            ",".join(names) for names in (self.kex, self.encryption, self.mac, self.compression)
        )

    @property
    def hassh(self) -> str:
        """md5 of :attr:`hassh_algorithms`, as Cowrie and the hassh project compute it."""
        return hashlib.md5(self.hassh_algorithms.encode(), usedforsecurity=False).hexdigest()


class CleartextObserver(Protocol):
    """Told what the parser found."""

    def client_version(self, version: str) -> None:
        """The client's identification line (without CR LF)."""

    def client_kexinit(self, kexinit: KexInit) -> None:
        """The client's first KEXINIT."""


class CleartextParser:
    """Incremental parser of a client's cleartext phase; :meth:`feed` every byte received.

    A refused first line carries the server's reply (the persona's): ``mismatch`` for
    another SSH version, ``invalid`` for anything else.
    """

    __slots__ = (
        "_buffer",
        "_invalid",
        "_max_packet",
        "_mismatch",
        "_observer",
        "_seen_kexinit",
        "_stage",
        "done",
    )

    def __init__(
        self, observer: CleartextObserver, *, max_packet: int, mismatch: bytes, invalid: bytes
    ) -> None:
        self._observer = observer
        self._max_packet = max_packet
        self._mismatch = mismatch
        self._invalid = invalid
        self._buffer = bytearray()
        self._stage = self._version
        self.done = False
        self._seen_kexinit = False

    def feed(self, data: bytes) -> None:
        """Parse more bytes; raises CleartextViolation when a bound is broken."""
        if self.done:
            return
        self._buffer += data
        while not self.done and self._stage():
            pass

    def _version(self) -> bool:
        """The identification line."""
        end = self._buffer.find(b"\n", 0, MAX_VERSION_LINE + 2)
        if end < 0:
            if len(self._buffer) > MAX_VERSION_LINE + 1:
                self.done = True
                raise BadIdentification("identification line too long", self._invalid)
            return False
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        self._observer.client_version(line.decode("ascii", "backslashreplace"))
        if not line.startswith(b"SSH-"):
            self.done = True
            raise BadIdentification("not an SSH identification", self._invalid)
        if line[4:].split(b"-", 1)[0] not in SSH2_VERSIONS:
            self.done = True
            raise BadIdentification("not SSH protocol 2", self._mismatch)
        self._stage = self._packet
        return True

    def _packet(self) -> bool:
        """One cleartext binary packet (no MAC before the first NEWKEYS)."""
        if len(self._buffer) < 5:
            return False
        length = int.from_bytes(self._buffer[:4], "big")
        if length > self._max_packet:
            raise CleartextViolation(f"packet of {length} bytes declared")
        if len(self._buffer) < 4 + length:
            return False
        padding = self._buffer[4]
        payload = bytes(self._buffer[5 : 4 + length - padding])
        del self._buffer[: 4 + length]
        if payload[:1] == bytes([MSG_KEXINIT]) and not self._seen_kexinit:
            self._seen_kexinit = True
            kexinit = parse_kexinit(payload)
            if kexinit is not None:
                self._observer.client_kexinit(kexinit)
        elif payload[:1] == bytes([MSG_NEWKEYS]) and self._seen_kexinit:
            # Everything after this is encrypted (a NEWKEYS before any KEXINIT is
            # answered UNIMPLEMENTED, as OpenSSH does, and the cleartext goes on).
            self.done = True
            self._buffer.clear()
        return True


def parse_kexinit(payload: bytes) -> KexInit | None:
    """The client's name-lists of a KEXINIT payload, or None if malformed (asyncssh will
    say so)."""
    lists = kexinit_lists(payload)
    if lists is None:
        return None
    kex, host_key, enc, _, mac, _, comp, _, lang, _ = lists
    return KexInit(kex, host_key, enc, mac, comp, lang)


def kexinit_lists(payload: bytes) -> list[list[str]] | None:
    """All ten name-lists of a KEXINIT payload in their order, or None if malformed."""
    offset = 17  # message number and 16-byte cookie
    lists: list[list[str]] = []
    for _ in range(KEXINIT_LISTS):
        if offset + 4 > len(payload):
            return None
        size = int.from_bytes(payload[offset : offset + 4], "big")
        offset += 4
        if offset + size > len(payload):
            return None
        text = payload[offset : offset + size].decode("ascii", "backslashreplace")
        lists.append(text.split(",") if text else [])
        offset += size
    return lists
