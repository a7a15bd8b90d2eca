"""Render the libvirt templates in ``xml/`` (guest domain, pool network, guest filter).

Each template is parsed with ElementTree, the elements its header comment lists are
filled in, and the tree is serialised again: every value is escaped by the
serialiser, never pasted into XML text with string formatting.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from honeyfleet.errors import FailedPrecondition

# Installed wheels carry the templates inside the package; a checkout has them in xml/.
_TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[1] / "_xml",
    Path(__file__).resolve().parents[2] / "xml",
)
DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
#: Namespace of the <metadata> element that marks a domain as a honeyfleet guest.
GUEST_NS = "https://honeyfleet.dev/xmlns/libvirt/guest/1"
ET.register_namespace("dnsmasq", DNSMASQ_NS)
ET.register_namespace("honeyfleet", GUEST_NS)


@dataclass(frozen=True)
class DomainSpec:
    """What varies between guests (and between pool nodes) in the domain XML."""

    name: str
    hypervisor: str
    memory_mib: int
    vcpus: int
    disk: Path
    mac: str
    network: str
    nwfilter: str
    dns_server: str
    console_log: Path
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    tag: str
    cpu_model: str = ""
    """Named QEMU CPU model (guest_cpu_model); empty: the hypervisor's default."""
    tb_cache_mib: int = 32
    """TCG's translation cache (guest_tb_cache); unused under KVM."""


def _template(name: str) -> ET.Element:
    """A fresh copy of a template's tree, to fill in (each guest renders the domain)."""
    return copy.deepcopy(_parsed(name))


@functools.cache
def _parsed(name: str) -> ET.Element:
    """Parse a template once (comments are dropped; they document the template only)."""
    for directory in _TEMPLATE_DIRS:
        path = directory / name
        if path.is_file():
            return ET.parse(path).getroot()  # noqa: S314 - our own templates
    where = " or ".join(str(d) for d in _TEMPLATE_DIRS)
    raise FailedPrecondition(f"libvirt template {name} not found in {where}: reinstall honeyfleet")


def _find(root: ET.Element, path: str) -> ET.Element:
    """The element at ``path``; a template missing it is broken, which is said plainly."""
    element = root.find(path)
    if element is None:
        raise FailedPrecondition(f"libvirt template <{root.tag}> has no {path} element")
    return element


def _text(element: ET.Element) -> str:
    """Serialise without an XML declaration."""
    return ET.tostring(element, encoding="unicode")


def render_domain(spec: DomainSpec) -> str:
    """The guest domain: TCG or KVM, direct kernel boot or the disk's own bootloader."""
    root = _template("domain.xml")
    root.set("type", spec.hypervisor)
    _find(root, "name").text = spec.name
    for tag in ("memory", "currentMemory"):
        memory = _find(root, tag)
        memory.set("unit", "MiB")
        memory.text = str(spec.memory_mib)
    _find(root, "vcpu").text = str(spec.vcpus)
    features = _find(root, "features")
    if spec.hypervisor != "qemu":
        # The translation-cache setting exists only for TCG; KVM refuses it.
        features.remove(_find(features, "tcg"))
    else:
        _find(features, "tcg/tb-cache").text = str(spec.tb_cache_mib)
    if spec.cpu_model:
        # A named model sets what /proc/cpuinfo says (instead of "QEMU Virtual CPU
        # version 2.5+"). check='none': libvirt leaves the features to QEMU, which under
        # TCG drops, with a warning, those it cannot emulate rather than refusing.
        cpu = ET.Element("cpu", mode="custom", match="exact", check="none")
        ET.SubElement(cpu, "model", fallback="forbid").text = spec.cpu_model
        root.insert(list(root).index(features) + 1, cpu)
    os_element = _find(root, "os")
    boot = {"kernel": spec.kernel, "initrd": spec.initrd, "cmdline": spec.cmdline}
    for tag, value in boot.items():
        element = _find(os_element, tag)
        if spec.kernel is None or value is None:
            os_element.remove(element)
        else:
            element.text = str(value)
    if spec.kernel is None:
        # An operator's own image (Ubuntu, OpenWRT...) boots through its bootloader.
        ET.SubElement(os_element, "boot", dev="hd")
    devices = _find(root, "devices")
    _find(devices, "disk/source").set("file", str(spec.disk))
    interface = _find(devices, "interface")
    _find(interface, "mac").set("address", spec.mac)
    _find(interface, "source").set("network", spec.network)
    filterref = _find(interface, "filterref")
    filterref.set("filter", spec.nwfilter)
    _find(filterref, "parameter[@name='DNS_SERVER']").set("value", spec.dns_server)
    _find(devices, "serial/log").set("file", str(spec.console_log))
    # Marks the domain as ours, so start-up only ever removes honeyfleet's leftovers.
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(list(root).index(_find(root, "name")) + 1, metadata)
    ET.SubElement(metadata, f"{{{GUEST_NS}}}guest", {"tag": spec.tag, "overlay": str(spec.disk)})
    return _text(root)


def guest_tag(metadata: str) -> str | None:
    """The ``tag`` in a domain's honeyfleet metadata element, as libvirt returns it.

    libvirt looks the element up by its namespace and returns it without one, so
    only the local name is checked here.
    """
    try:
        element = ET.fromstring(metadata)  # noqa: S314 - libvirt's copy of our own element
    except ET.ParseError:
        return None
    return element.get("tag") if element.tag.rpartition("}")[2] == "guest" else None


def dhcp_range(address: ipaddress.IPv4Interface) -> tuple[str, str]:
    """The largest run of host addresses on one side of the gateway, for DHCP."""
    network = address.network
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.prefixlen < 31:  # as network.hosts(): no network or broadcast address
        first, last = first + 1, last - 1
    # Counted, not listed: a /8 has 16M host addresses.
    gateway = int(address.ip)
    above = (max(first, gateway + 1), last)
    below = (first, min(last, gateway - 1))
    start, end = above if above[1] - above[0] >= below[1] - below[0] else below
    if start > end:
        raise FailedPrecondition(f"network_address {address} leaves no addresses for guests")
    return str(ipaddress.IPv4Address(start)), str(ipaddress.IPv4Address(end))


def render_network(
    name: str, bridge: str, address: ipaddress.IPv4Interface, uuid: str | None
) -> str:
    """The isolated pool network: a bridge with the gateway address and DHCP.

    ``uuid`` keeps an existing network's identity: libvirt redefines an object only
    under its own UUID.
    """
    root = _template("network.xml")
    _find(root, "name").text = name
    _set_uuid(root, uuid)
    _find(root, "bridge").set("name", bridge)
    ip = _find(root, "ip")
    ip.set("address", str(address.ip))
    ip.set("prefix", str(address.network.prefixlen))
    start, end = dhcp_range(address)
    dhcp_range_element = _find(ip, "dhcp/range")
    dhcp_range_element.set("start", start)
    dhcp_range_element.set("end", end)
    # A default route through the gateway (libvirt gives an isolated network's guests
    # none: "dhcp-option=3"; dnsmasq takes this later one). Guests' traffic to any
    # address then reaches the node's egress rules instead of failing in the guest
    # with "Network unreachable", which an attacker would notice.
    options = _find(root, f"{{{DNSMASQ_NS}}}options")
    ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=f"dhcp-option=3,{address.ip}")
    return _text(root)


def render_nwfilter(name: str, uuid: str | None, egress: tuple[tuple[str, int], ...] = ()) -> str:
    """The guest filter under ``name`` (``uuid`` keeps an existing filter's identity).

    ``egress`` lists (protocol, port) of the node's egress servers on the gateway
    address: guests' redirected DNS and TCP arrive there (see poolnode.egress), so the
    filter lets guests send to them, as to the resolver's port 53.
    """
    root = _template("nwfilter.xml")
    root.set("name", name)
    _set_uuid(root, uuid)
    first_drop = next(i for i, rule in enumerate(root) if rule.get("action") == "drop")
    for offset, (protocol, port) in enumerate(egress):
        rule = ET.Element("rule", action="accept", direction="out", priority="500")
        ET.SubElement(rule, protocol, dstipaddr="$DNS_SERVER", dstportstart=str(port))
        root.insert(first_drop + offset, rule)
    return _text(root)


def _set_uuid(root: ET.Element, uuid: str | None) -> None:
    """Put ``uuid`` in the <uuid> child right after <name> (or the first child)."""
    if uuid is None:
        return
    element = root.find("uuid")
    if element is None:
        element = ET.Element("uuid")
        name = root.find("name")
        root.insert(list(root).index(name) + 1 if name is not None else 0, element)
    element.text = uuid


def network_fingerprint(xml: str) -> tuple[str | None, ...]:
    """What must match for a running network to be reused: bridge, address, DHCP range,
    dnsmasq options (the guests' default route)."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own description of the network
    bridge = root.find("bridge")
    ip = root.find("ip")
    dhcp = root.find("ip/dhcp/range")
    return (
        bridge.get("name") if bridge is not None else None,
        ip.get("address") if ip is not None else None,
        ip.get("prefix") if ip is not None else None,
        dhcp.get("start") if dhcp is not None else None,
        dhcp.get("end") if dhcp is not None else None,
        "forward" if root.find("forward") is not None else None,
        *sorted(option.get("value") or "" for option in root.iter(f"{{{DNSMASQ_NS}}}option")),
    )
