"""The VM tests' guest image: one spec for the ``vm_image`` fixture and for ``make test``.

``make test`` builds it (``python -m tests.e2e.image``) before pytest starts, so the
packages are fetched from the Debian mirror by the set-up, and the tests themselves send
nothing off the machine: the fixture finds the image built, and test_up's variant (another
password) is made from the same package cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from poolnode.image import GuestImage, GuestImageSpec, build_image
from poolnode.image._cli import print_progress
from tests.conftest import IN_CI
from tests.e2e.fleet import GUEST_PASSWORD, GUEST_USER

# Built once per machine and reused: the builder skips work when its stamp matches.
IMAGE_DIR = Path(os.environ.get("HONEYFLEET_TEST_IMAGE_DIR", "/var/tmp/honeyfleet-test-image"))


def image_spec(**changes: str) -> GuestImageSpec:
    """The tests' image, with the tests' backend account (``changes`` override)."""
    settings = {"backend_user": GUEST_USER, "backend_pass": GUEST_PASSWORD, **changes}
    return GuestImageSpec(out_dir=IMAGE_DIR, **settings)


def main() -> int:
    """Build the tests' image; outside CI, a machine that cannot (not root) is skipped."""
    if os.geteuid() != 0 and not IN_CI:
        sys.stderr.write("not root: the VM tests' image is not built (they will skip)\n")
        return 0
    image: GuestImage = build_image(image_spec(), print_progress)
    sys.stderr.write(f"VM tests' image: {image.disk.parent}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
