"""sntrup761 for asyncssh's hybrid key exchange (sensor.ssh.sntrup)."""

from __future__ import annotations

import pytest
from asyncssh.kex import get_kex_algs

from sensor.ssh import sntrup
from sensor.ssh.sntrup import NAMES, Sntrup761


def test_both_sides_agree_on_the_secret() -> None:
    client, server = Sntrup761(b"sntrup761"), Sntrup761(b"sntrup761")
    secret, ciphertext = server.encaps(client.get_public())
    assert client.decaps(ciphertext) == secret
    assert (len(client.get_public()), len(ciphertext), len(secret)) == (1158, 1039, 32)
    with pytest.raises(ValueError, match="public key"):
        server.encaps(b"short")


def test_asyncssh_offers_openssh_names_once_installed() -> None:
    sntrup.install()
    sntrup.install()  # idempotent
    names = [name for name in get_kex_algs() if name in NAMES]
    assert sorted(names) == sorted(NAMES)


def test_a_server_side_makes_no_key_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    client_public = Sntrup761(b"sntrup761").get_public()

    def keygen() -> tuple[bytes, bytes]:
        raise AssertionError("a server only encapsulates")

    monkeypatch.setattr(sntrup.sntrup_761, "keygen", keygen)
    secret, ciphertext = Sntrup761(b"sntrup761").encaps(client_public)
    assert (len(secret), len(ciphertext)) == (32, 1039)
