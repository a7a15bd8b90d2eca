"""The cleartext phase parser (sensor.ssh.cleartext)."""

from __future__ import annotations

from sensor.ssh.cleartext import MSG_NEWKEYS, CleartextParser, KexInit
from sensor.ssh_persona import DEBIAN_12
from tests.sshprobe import CLIENT_VERSION, GEX_KEXINIT, cleartext_packet


class Seen:
    """What the parser reported."""

    def __init__(self) -> None:
        self.versions: list[str] = []
        self.kexinits: list[KexInit] = []

    def client_version(self, version: str) -> None:
        self.versions.append(version)

    def client_kexinit(self, kexinit: KexInit) -> None:
        self.kexinits.append(kexinit)


def test_a_newkeys_before_any_kexinit_does_not_end_the_cleartext() -> None:
    # OpenSSH (and the sensor) answer it UNIMPLEMENTED; the client's KEXINIT still follows.
    seen = Seen()
    parser = CleartextParser(
        seen,
        max_packet=256 * 1024,
        mismatch=DEBIAN_12.protocol_mismatch,
        invalid=DEBIAN_12.invalid_identification,
    )
    early_newkeys = cleartext_packet(bytes([MSG_NEWKEYS]))
    parser.feed(CLIENT_VERSION + early_newkeys + cleartext_packet(GEX_KEXINIT))
    assert not parser.done
    assert [k.kex for k in seen.kexinits] == [["diffie-hellman-group-exchange-sha256"]]
    parser.feed(cleartext_packet(bytes([MSG_NEWKEYS])))
    assert parser.done
