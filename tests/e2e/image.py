"""The VM tests' guest images: specs for the fixtures and for ``make test``.

``make test`` builds it (``python -m tests.e2e.image``) before pytest starts, so the
packages are fetched from the Debian mirror by the set-up, and the tests themselves send
nothing off the machine: the fixture finds the image built, and test_up's variant (another
password) is made from the same package cache. The Debian image (test_debian_guest)
is built here too: about 80 s once, then reused until a package or the builder changes.
It trusts the egress interception CA kept in its directory, as `up` makes it
(test_egress_debian, test_up).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fleetup.up import egress_ca_files
from poolnode.egress.intercept import load_or_make_ca
from poolnode.image import DEBIAN_DISK_MIB, Distro, GuestImage, GuestImageSpec, build_image
from poolnode.image._cli import print_progress
from tests.conftest import IN_CI
from tests.e2e.fleet import GUEST_PASSWORD, GUEST_USER

# Built once per machine and reused: the builder skips work when its stamp matches.
IMAGE_DIR = Path(os.environ.get("HONEYFLEET_TEST_IMAGE_DIR", "/var/tmp/honeyfleet-test-image"))
DEBIAN_IMAGE_DIR = Path(
    os.environ.get("HONEYFLEET_TEST_DEBIAN_IMAGE_DIR", "/var/tmp/honeyfleet-test-debian-image")
)


def image_spec(**changes: str) -> GuestImageSpec:
    """The tests' image, with the tests' backend account (``changes`` override)."""
    settings = {"backend_user": GUEST_USER, "backend_pass": GUEST_PASSWORD, **changes}
    return GuestImageSpec(out_dir=IMAGE_DIR, **settings)


def debian_image_spec() -> GuestImageSpec:
    """The real Debian guest, with the tests' backend account, as `up --distro debian` makes
    it: trusting the egress interception CA `up` keeps with the image (made once)."""
    ca_cert, ca_key = egress_ca_files(DEBIAN_IMAGE_DIR)
    load_or_make_ca(ca_cert, ca_key)
    return GuestImageSpec(
        out_dir=DEBIAN_IMAGE_DIR,
        distro=Distro.DEBIAN,
        disk_size_mib=DEBIAN_DISK_MIB,
        backend_user=GUEST_USER,
        backend_pass=GUEST_PASSWORD,
        trust_ca=ca_cert.read_text(),
    )


def main() -> int:
    """Build the tests' image; outside CI, a machine that cannot (not root) is skipped."""
    if os.geteuid() != 0 and not IN_CI:
        sys.stderr.write("not root: the VM tests' image is not built (they will skip)\n")
        return 0
    for spec in (image_spec(), debian_image_spec()):
        image: GuestImage = build_image(spec, print_progress)
        sys.stderr.write(f"VM tests' {spec.distro} image: {image.disk.parent}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
