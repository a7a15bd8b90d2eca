"""HTTPS from the real Debian guest (TCG) under ``fetch``: the tests' Debian image is
built with ``trust_ca`` as `up` builds it (the interception CA kept with the image, its
certificate in Debian's trust store by update-ca-certificates), so Debian's own wget and
curl, which check certificates, accept the leaf the node mints for the name they asked;
the node fetches the URL through the test's proxy (CONNECT) from an HTTPS origin with a
CA of its own.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from fleetup.up import TB_CACHE, egress_ca_files
from poolnode.image import GuestImage, build_image
from tests.conftest import until
from tests.e2e.conftest import check_prerequisites
from tests.e2e.fleet import VmFleet, run
from tests.e2e.image import DEBIAN_IMAGE_DIR, debian_image_spec
from tests.e2e.test_debian_guest import CPU_MODEL, MEMORY_MIB
from tests.e2e.test_egress import (
    HTTPS_URL,
    PAYLOAD,
    Internet,
    https_origin,
    internet,
    stored,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]
EGRESS_CA = egress_ca_files(DEBIAN_IMAGE_DIR)
log = logging.getLogger(__name__)
__all__ = ["https_origin", "internet"]  # fixtures this module uses


@pytest.fixture(scope="module")
def trusting_image() -> GuestImage:
    """The tests' Debian image, which trusts the interception CA (normally already built
    by `make test`)."""
    check_prerequisites()
    spec = debian_image_spec()
    return build_image(spec, lambda step, i, n: log.info("image [%d/%d] %s", i, n, step))


async def test_debians_wget_and_curl_take_the_nodes_leaf_and_get_the_https_file(
    vm_fleet: VmFleet,
    trusting_image: GuestImage,
    internet: tuple[Internet, str],
    https_origin: Path,
) -> None:
    web, address = internet
    await vm_fleet.ensure_node(
        pristine=1,
        max_vms=1,
        max_parallel_boots=1,
        guest_image=str(trusting_image.disk),
        guest_kernel=str(trusting_image.kernel),
        guest_initrd=str(trusting_image.initrd),
        guest_cmdline=trusting_image.cmdline,
        guest_memory=MEMORY_MIB,
        guest_cpu_model=CPU_MODEL,
        guest_tb_cache=TB_CACHE["debian"],
        egress_policy="fetch",
        egress_fetch_proxy=address,
        egress_fetch_ca_bundle=str(https_origin),
        egress_tls_ca_cert=str(EGRESS_CA[0]),
        egress_tls_ca_key=str(EGRESS_CA[1]),  # as `up` configures its node
    )
    lease = await vm_fleet.lease("203.0.113.78")
    async with vm_fleet.shell(lease.id) as conn:
        wget = await run(conn, f"wget -q -O /tmp/w.sh {HTTPS_URL} && sha256sum /tmp/w.sh", 120)
        curl = await run(conn, f"curl -sS -o /tmp/c.sh {HTTPS_URL} && sha256sum /tmp/c.sh", 120)
        key = await run(conn, "grep -rl 'PRIVATE KEY' /etc/ssl /usr/local/share 2>/dev/null")
    await vm_fleet.sensor().release(lease.id)
    shasum = hashlib.sha256(PAYLOAD).hexdigest()
    assert wget.exit_status == 0, wget
    assert str(wget.stdout).split()[0] == shasum
    assert curl.exit_status == 0, curl
    assert str(curl.stdout).split()[0] == shasum
    assert not str(key.stdout).strip()  # the CA's key stayed on the node
    assert sum(r.startswith(b"CONNECT ") for r in web.requests) == 2

    await until(lambda: len(stored(vm_fleet, "cowrie.session.file_download", lease.id)) == 2, 60)
    downloads = stored(vm_fleet, "cowrie.session.file_download", lease.id)
    assert {(d["url"], d["shasum"]) for d in downloads} == {(HTTPS_URL, shasum)}
