"""Small real guest disks for the disk-diff tests: a qcow2 base and an overlay written to.

The base is an ext4 filesystem made by ``mke2fs -d`` from a directory (no VM), converted
to qcow2; the overlay is a qcow2 on top of it, changed through libguestfs (its
appliance, under Debian's python3, as the pool node's worker uses it): so what a test
diffs is exactly what a guest's writes would have left.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.prereq import require_tool, unmet

GUESTFS_PYTHON = "/usr/bin/python3"
# Run by GUESTFS_PYTHON: apply the changes given as JSON on stdin to the overlay.
WRITE_SCRIPT = """
import json, sys, guestfs
job = json.load(sys.stdin)
g = guestfs.GuestFS(python_return_dict=True)
g.add_drive_opts(job["disk"], format="qcow2", readonly=0)
g.launch()
g.mount("/dev/sda", "/")
for path, content in job["write"].items():
    g.write(path, bytes.fromhex(content))
for target, link in job["symlink"].items():
    g.ln_s(target, link)
for path in job["remove"]:
    g.rm(path)
g.shutdown()
g.close()
"""
TIMEOUT = 300


def guestfs_env() -> dict[str, str]:
    """libguestfs without libvirtd, in TCG (nested KVM may hang here)."""
    return dict(os.environ, LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg")


def require_guestfs() -> None:
    """Skip (fail in CI) unless Debian's python3 can import guestfs."""
    if not Path(GUESTFS_PYTHON).exists():
        unmet(f"{GUESTFS_PYTHON} not found: install python3 (make system-deps)")
    done = subprocess.run(
        [GUESTFS_PYTHON, "-I", "-c", "import guestfs"], capture_output=True, check=False
    )
    if done.returncode != 0:
        unmet("python3-guestfs not installed (make system-deps installs it)")


def make_base(tree: Path, out: Path, size_mib: int = 64) -> Path:
    """An ext4 qcow2 image holding ``tree`` (256-byte inodes: nanosecond times)."""
    mke2fs = require_tool("mke2fs", "e2fsprogs")
    qemu_img = require_tool("qemu-img", "qemu-utils")
    raw = out.with_suffix(".raw")
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-I", "256", "-d", str(tree), str(raw), f"{size_mib}M"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True
    )
    raw.unlink()
    return out


def make_overlay(
    base: Path,
    out: Path,
    *,
    write: dict[str, bytes],
    symlink: dict[str, str] | None = None,
    remove: tuple[str, ...] = (),
) -> Path:
    """A qcow2 overlay of ``base`` with files written, links made and files removed."""
    qemu_img = require_tool("qemu-img", "qemu-utils")
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(out)],
        check=True,
    )
    job = {
        "disk": str(out),
        "write": {path: content.hex() for path, content in write.items()},
        "symlink": symlink or {},
        "remove": list(remove),
    }
    subprocess.run(
        [GUESTFS_PYTHON, "-I", "-c", WRITE_SCRIPT],
        input=json.dumps(job).encode(),
        env=guestfs_env(),
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return out
