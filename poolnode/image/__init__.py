"""Guest image builder for the libvirt pool backend.

Builds, from Debian packages only, one of two guests (:class:`Distro`): by default a
small Debian-looking busybox system with dropbear on port 22 and a telnet login on
port 23, a DHCP client, and the backend account that sensors log in with; or a real
Debian 12 server installed by mmdebstrap (systemd, OpenSSH, apt and dpkg with their
databases), dressed with the same persona and account. The result is a read-only base qcow2
(ext4 root file system), the Debian kernel and a tiny busybox initramfs, meant for
direct kernel boot with one qcow2 overlay per guest::

    from poolnode.image import GuestImageSpec, build_image
    image = build_image(GuestImageSpec(out_dir=Path("/var/lib/honeyfleet/image")))
    # image.disk, image.kernel, image.initrd, image.cmdline

Building needs root and the programs in :data:`HOST_PACKAGES`; a missing one raises
:class:`MissingHostToolError` naming the package to install.
"""

from __future__ import annotations

from ._build import BUILDER_VERSION, Progress, build_image
from ._cli import main
from ._errors import ImageBuildError, MissingHostToolError
from ._host import HOST_PACKAGES
from ._spec import DEBIAN_DISK_MIB, DEFAULT_CMDLINE, Distro, GuestImage, GuestImageSpec

__all__ = [
    "BUILDER_VERSION",
    "DEBIAN_DISK_MIB",
    "DEFAULT_CMDLINE",
    "HOST_PACKAGES",
    "Distro",
    "GuestImage",
    "GuestImageSpec",
    "ImageBuildError",
    "MissingHostToolError",
    "Progress",
    "build_image",
    "main",
]
