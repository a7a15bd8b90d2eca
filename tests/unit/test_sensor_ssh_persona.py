"""SSH personas (sensor.ssh_persona): each one playable by asyncssh, chosen by name."""

from __future__ import annotations

import re
from pathlib import Path

import asyncssh
import pytest
from asyncssh.compression import get_compression_algs
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from asyncssh.public_key import get_public_key_algs

from honeyfleet.config import ConfigProblems, parse_section
from sensor.config import SensorConfig
from sensor.ssh import sntrup
from sensor.ssh_persona import DEBIAN_12, PERSONAS, Persona


def parse(table: dict[str, object]) -> SensorConfig:
    return parse_section(SensorConfig, "sensor", table, base_dir=Path("/"), env={})


def names(algorithms: list[bytes]) -> set[str]:
    return {name.decode() for name in algorithms}


@pytest.mark.parametrize("persona", PERSONAS.values(), ids=PERSONAS)
def test_asyncssh_can_play_every_algorithm_the_persona_offers(persona: Persona) -> None:
    # An algorithm asyncssh lacks would be left out of the KEXINIT, with a warning only.
    sntrup.install()
    assert set(persona.kex_algs) <= names(get_kex_algs())
    assert set(persona.encryption_algs) <= names(get_encryption_algs())
    assert set(persona.mac_algs) <= names(get_mac_algs())
    assert set(persona.compression_algs) <= names(get_compression_algs())
    assert set(persona.signature_algs) <= names(get_public_key_algs())


@pytest.mark.parametrize("persona", PERSONAS.values(), ids=PERSONAS)
def test_each_host_key_algorithm_has_a_host_key_of_the_persona(persona: Persona) -> None:
    signable = set()
    for spec in persona.host_keys:
        key = asyncssh.generate_private_key(
            spec.algorithm, **({"key_size": spec.bits} if spec.bits else {})
        )
        signable |= names(asyncssh.load_keypairs([key])[0].host_key_algorithms)
    assert set(persona.host_key_algs) <= signable


@pytest.mark.parametrize("persona", PERSONAS.values(), ids=PERSONAS)
def test_the_persona_is_what_the_frontend_can_say(persona: Persona) -> None:
    assert persona.banner.startswith("SSH-2.0-")
    assert [m for m in ("publickey", "password") if m in persona.auth_methods] == list(
        persona.auth_methods
    )
    assert persona.protocol_mismatch.endswith(b"\r\n")
    assert persona.invalid_identification.endswith(b"\r\n")


def test_debian_12_is_the_default_and_fixes_the_session_defaults() -> None:
    config = parse({})
    assert config.persona is DEBIAN_12
    assert config.login_grace_time == DEBIAN_12.login_grace_time == 120
    assert config.max_auth_attempts == DEBIAN_12.max_auth_tries == 6
    assert config.max_startups == DEBIAN_12.max_startups == "10:30:100"
    assert config.auth_fail_delay == DEBIAN_12.auth_fail_delay
    assert config.moduli_file == Path("/etc/ssh/moduli")
    assert parse({"ssh_auth_fail_delay": 0.5}).auth_fail_delay == 0.5


def test_an_unknown_persona_names_the_key_and_the_known_ones() -> None:
    known = re.escape("sensor.ssh_persona: unknown persona 'debian-13'; known: debian-12")
    with pytest.raises(ConfigProblems, match=known):
        parse({"ssh_persona": "debian-13"})
