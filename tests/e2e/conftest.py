"""Fixtures for the VM tests: the guest image, the namespaced libvirt host, a fleet.

Everything is made once for this package's tests and shared (booting guests under
TCG is the slow part), and removed after its last test, also when a test fails. A
missing prerequisite fails the run in CI and skips the VM tests, saying why, elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from poolnode.image import GuestImage, build_image
from tests.conftest import FleetPki, require_tool, unmet
from tests.e2e.fleet import VmFleet
from tests.e2e.image import image_spec
from tests.e2e.vmhost import HostProblem, VmHost

log = logging.getLogger(__name__)

TOOLS = {
    "ip": "iproute2",
    "sysctl": "procps",
    "libvirtd": "libvirt-daemon",
    "virtlogd": "libvirt-daemon",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "dnsmasq": "dnsmasq-base",
    "iptables": "iptables",
    "ebtables": "ebtables",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}


def unmet_vm(reason: str) -> NoReturn:
    """A VM-test prerequisite is missing: fail in CI (it must be there), skip elsewhere."""
    unmet(f"VM tests: {reason}")


def check_prerequisites() -> None:
    """Everything the VM tests need before they touch the machine."""
    if os.geteuid() != 0:
        unmet_vm("need root (network namespaces, libvirtd)")
    for tool, package in TOOLS.items():
        require_tool(tool, package)
    if importlib.util.find_spec("libvirt") is None:
        unmet_vm("libvirt-python is missing: pip install -e '.[poolnode]' (make test does)")
    if not Path("/etc/libvirt/nwfilter/clean-traffic.xml").exists():
        unmet_vm(
            "libvirt's stock filters are missing: apt-get install libvirt-daemon-config-nwfilter"
        )
    if not Path("/dev/net/tun").exists():
        unmet_vm("/dev/net/tun is missing (QEMU needs it for the guests' network)")


@pytest.fixture(scope="session")
def vm_image() -> GuestImage:
    """The tiny guest image (busybox + dropbear), with the tests' backend account."""
    check_prerequisites()
    # Normally already built by `make test` (tests/e2e/image.py); then this only checks.
    return build_image(image_spec(), lambda step, i, n: log.info("image [%d/%d] %s", i, n, step))


@pytest.fixture(scope="package")
def vm_host(vm_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmHost]:
    """libvirtd and virtlogd inside a network namespace of this run's own."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised, not printed
    try:
        host = VmHost.start(tmp_path_factory.mktemp("vmhost"))
    except HostProblem as e:
        unmet_vm(str(e))
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="package")
async def vm_fleet(
    vm_host: VmHost,
    vm_image: GuestImage,
    fleet_pki: FleetPki,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[VmFleet]:
    """A controller and relays; tests start the pool node with the config they need."""
    fleet = VmFleet(vm_host, fleet_pki, vm_image, tmp_path_factory.mktemp("vmfleet"))
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.close()
        times = fleet.boot_times()
        if times:
            log.warning(
                "VM guests booted: %d, create-to-SSH-banner %.1f-%.1fs (mean %.1fs)",
                len(times),
                min(times),
                max(times),
                sum(times) / len(times),
            )
