"""The libvirt backend's XML helpers: cheap on large networks, templates parsed once."""

from __future__ import annotations

import ipaddress
import tracemalloc
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from poolnode.backends import libvirt_xml
from poolnode.backends.libvirt_xml import DomainSpec, dhcp_range, render_domain

GUEST = DomainSpec(
    name="hf-0001",
    hypervisor="qemu",
    memory_mib=128,
    vcpus=1,
    disk=Path("/var/lib/hf/guests/hf-0001.qcow2"),
    mac="52:54:00:12:34:56",
    network="honeyfleet-pool",
    nwfilter="hf-guest",
    dns_server="10.77.0.1",
    console_log=Path("/var/lib/hf/guests/hf-0001.console.log"),
    kernel=None,
    initrd=None,
    cmdline="",
    tag="hf",
)


def test_dhcp_range_of_a_large_network_lists_no_addresses() -> None:
    # A /8 has 16M host addresses; listing them would take gigabytes.
    tracemalloc.start()
    try:
        below = dhcp_range(ipaddress.IPv4Interface("10.200.0.1/8"))
        above = dhcp_range(ipaddress.IPv4Interface("10.0.0.1/8"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert below == ("10.0.0.1", "10.200.0.0")
    assert above == ("10.0.0.2", "10.255.255.254")
    assert peak < 1_000_000


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.77.0.1/24", ("10.77.0.2", "10.77.0.254")),
        ("10.77.0.127/24", ("10.77.0.128", "10.77.0.254")),
        ("10.77.0.128/24", ("10.77.0.1", "10.77.0.127")),
        ("10.77.0.2/30", ("10.77.0.1", "10.77.0.1")),
        ("10.77.0.0/31", ("10.77.0.1", "10.77.0.1")),
    ],
)
def test_dhcp_range_takes_the_larger_side(address: str, expected: tuple[str, str]) -> None:
    assert dhcp_range(ipaddress.IPv4Interface(address)) == expected


def test_templates_are_parsed_once_and_rendered_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[object] = []
    real_parse = ET.parse

    def parse(source: object) -> ET.ElementTree:
        parsed.append(source)
        return real_parse(source)

    libvirt_xml._parsed.cache_clear()
    monkeypatch.setattr(ET, "parse", parse)
    try:
        kvm = ET.fromstring(render_domain(replace(GUEST, hypervisor="kvm")))  # noqa: S314
        qemu = ET.fromstring(render_domain(GUEST))  # noqa: S314
    finally:
        libvirt_xml._parsed.cache_clear()
    assert len(parsed) == 1
    # Each render starts from the template, not from the previous guest's tree.
    assert kvm.find("features/tcg") is None and qemu.find("features/tcg") is not None
    assert len(qemu.find("metadata") or []) == 1


def test_a_cpu_model_is_rendered_only_when_configured() -> None:
    assert ET.fromstring(render_domain(GUEST)).find("cpu") is None  # noqa: S314
    root = ET.fromstring(render_domain(replace(GUEST, cpu_model="Skylake-Server-IBRS")))  # noqa: S314
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "custom" and cpu.get("check") == "none"
    assert root.findtext("cpu/model") == "Skylake-Server-IBRS"
    # libvirt's schema puts <cpu> after <features>.
    tags = [child.tag for child in root]
    assert tags.index("cpu") == tags.index("features") + 1


def test_the_tcg_translation_cache_is_the_configured_size() -> None:
    assert ET.fromstring(render_domain(GUEST)).findtext("features/tcg/tb-cache") == "32"  # noqa: S314
    root = ET.fromstring(render_domain(replace(GUEST, tb_cache_mib=128)))  # noqa: S314
    assert root.findtext("features/tcg/tb-cache") == "128"
    assert root.find("features/tcg/tb-cache").get("unit") == "MiB"  # type: ignore[union-attr]
