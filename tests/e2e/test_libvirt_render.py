"""The libvirt backend's XML rendering and settings, checked without libvirt or VMs."""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from honeyfleet.config import ConfigProblems, parse_section
from poolnode.backends.libvirt_xml import (
    DomainSpec,
    dhcp_range,
    guest_tag,
    network_fingerprint,
    render_domain,
    render_network,
    render_nwfilter,
)
from poolnode.config import PoolNodeConfig

NASTY = "x<y>&'\"z"


def parse(xml: str) -> ET.Element:
    """Parse rendered XML (ours, so trusted)."""
    return ET.fromstring(xml)  # noqa: S314


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
    kernel=Path("/img/vmlinuz"),
    initrd=Path("/img/initrd.img"),
    cmdline="console=ttyS0,115200 panic=10",
    tag="hf",
)


def attribute(root: ET.Element, path: str, name: str) -> str | None:
    """An attribute of the element at ``path`` (None if either is missing)."""
    element = root.find(path)
    return element.get(name) if element is not None else None


def test_domain_values_are_escaped_not_pasted() -> None:
    root = parse(render_domain(replace(GUEST, cmdline=NASTY, disk=Path(f"/tmp/{NASTY}.qcow2"))))
    assert root.findtext("os/cmdline") == NASTY
    assert attribute(root, "devices/disk/source", "file") == f"/tmp/{NASTY}.qcow2"


def test_domain_fills_every_guest_field() -> None:
    root = parse(render_domain(GUEST))
    assert root.get("type") == "qemu" and root.find("features/tcg") is not None
    assert root.findtext("name") == "hf-0001" and root.findtext("memory") == "128"
    interface = "devices/interface"
    assert attribute(root, f"{interface}/mac", "address") == "52:54:00:12:34:56"
    assert attribute(root, f"{interface}/source", "network") == "honeyfleet-pool"
    assert attribute(root, f"{interface}/filterref", "filter") == "hf-guest"
    assert attribute(root, f"{interface}/filterref/parameter", "value") == "10.77.0.1"
    (marker,) = root.find("metadata") or []
    assert guest_tag(ET.tostring(marker, encoding="unicode")) == "hf"


def test_kvm_drops_the_tcg_feature_and_images_can_boot_themselves() -> None:
    root = parse(render_domain(replace(GUEST, hypervisor="kvm", kernel=None, initrd=None)))
    assert root.get("type") == "kvm" and root.find("features/tcg") is None
    assert [e.tag for e in root.find("os") or []] == ["type", "boot"]


def test_foreign_metadata_is_not_ours() -> None:
    assert guest_tag("<other tag='hf'/>") is None
    assert guest_tag("not xml") is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.77.0.1/24", ("10.77.0.2", "10.77.0.254")),
        ("10.77.0.254/24", ("10.77.0.1", "10.77.0.253")),
        ("192.168.150.9/29", ("192.168.150.10", "192.168.150.14")),
    ],
)
def test_dhcp_range_avoids_the_gateway(address: str, expected: tuple[str, str]) -> None:
    assert dhcp_range(ipaddress.IPv4Interface(address)) == expected


def test_network_and_filter_keep_an_existing_uuid() -> None:
    uuid = "0b714ba2-9f4e-44a5-bde3-c24717a4a154"
    address = ipaddress.IPv4Interface("10.77.0.1/24")
    network = parse(render_network("pool", "hfpool0", address, uuid))
    assert network.findtext("uuid") == uuid and network.findtext("name") == "pool"
    assert attribute(network, "bridge", "name") == "hfpool0"
    fingerprint = network_fingerprint(render_network("pool", "hfpool0", address, None))
    assert fingerprint == (
        "hfpool0",
        "10.77.0.1",
        "24",
        "10.77.0.2",
        "10.77.0.254",
        None,
        # dnsmasq's options: the guests' default route through the gateway, and no-ping.
        "dhcp-option=3,10.77.0.1",
        "no-ping",
    )
    nwfilter = parse(render_nwfilter("hf-guest", uuid))
    assert nwfilter.get("name") == "hf-guest" and nwfilter.findtext("uuid") == uuid


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("guest_tag", "Has Spaces"),
        ("guest_tag", "x" * 17),
        ("network_bridge", "much-too-long-bridge"),
        ("network_address", "10.77.0.1"),
        ("network_address", "10.77.0.0/24"),
        ("network_address", "fd77::1/64"),
        ("network_address", "10.77.0.1/30"),
    ],
)
def test_libvirt_settings_are_checked(key: str, value: str) -> None:
    with pytest.raises(ConfigProblems) as e:
        parse_section(
            PoolNodeConfig, "poolnode", {key: value, "backend_pass": "x"}, base_dir=Path(), env={}
        )
    assert f"poolnode.{key}" in str(e.value)
