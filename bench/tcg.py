"""A real guest for the benchmarks: the pool's guest image booted under QEMU's TCG.

The image is the VM tests' (tests/e2e/image.py: busybox and dropbear, their backend
account), built once per machine and reused. QEMU runs it directly, without libvirt,
as the pool would (direct kernel boot, a throwaway qcow2 overlay, 128 MiB, one vCPU,
software emulation), with user-mode networking restricted to the guest itself
(``restrict=on``: no packet leaves it) and the guest's port 22 forwarded to a port on
127.0.0.1. Nothing else of the pool (libvirtd, bridges, filters) is involved, so the
guest's SSH login is measured and nothing besides.

    apt-get install qemu-system-x86 qemu-utils
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.fleet import Processes
from bench.openssh import require, until_banner
from poolnode.image import GuestImage, build_image
from tests.e2e.image import image_spec

GUEST_MEMORY_MIB = 128
# Boot to dropbear's banner takes 20-40 s under TCG on this machine's kind.
BOOT_TIMEOUT = 300.0


def guest_image() -> GuestImage:
    """The VM tests' image (built if it is not yet: that fetches Debian packages)."""
    return build_image(image_spec(), lambda step, i, n: print(f"  guest image [{i}/{n}] {step}"))


async def start_tcg_guest(procs: Processes, workdir: Path, image: GuestImage, port: int) -> int:
    """Boot ``image`` under TCG with its SSH port on 127.0.0.1:``port``; QEMU's pid once
    the guest's sshd answers."""
    qemu = require("qemu-system-x86_64", "qemu-system-x86")
    qemu_img = require("qemu-img", "qemu-utils")
    await asyncio.to_thread(workdir.mkdir, parents=True)
    overlay = workdir / "guest.qcow2"
    made = await asyncio.create_subprocess_exec(
        qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
        str(overlay),
    )  # fmt: skip
    if await made.wait() != 0:
        raise SystemExit(f"qemu-img could not make an overlay of {image.disk}")
    proc = await procs.start(
        "qemu",
        qemu,
        "-machine", "pc,accel=tcg",
        "-m", str(GUEST_MEMORY_MIB),
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", image.cmdline,
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-serial", f"file:{workdir / 'console.log'}",
    )  # fmt: skip
    # Until the guest listens, QEMU accepts and closes at once: the banner is the sign.
    await until_banner(port, b"SSH-2.0-", within=BOOT_TIMEOUT)
    return proc.pid
