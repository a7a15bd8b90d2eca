"""``python -m poolnode.image build``: the builder as a command (and for the main CLI)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._build import build_image
from ._errors import ImageBuildError
from ._spec import DEBIAN_DISK_MIB, Distro, GuestImageSpec

DEFAULT_OUT = Path("/var/lib/honeyfleet/image")


def print_progress(step: str, index: int, total: int) -> None:
    """Progress callback that prints ``[i/n] step`` lines to stderr."""
    sys.stderr.write(f"[{index}/{total}] {step}\n")
    sys.stderr.flush()


def default_disk_mib(distro: Distro) -> int:
    """Root file system size for ``distro``: a small cloud VM's disk for Debian."""
    return DEBIAN_DISK_MIB if distro is Distro.DEBIAN else GuestImageSpec.disk_size_mib


def _read_ca(path: Path) -> str:
    """The certificate file's text (ImageBuildError naming it if unreadable)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageBuildError(f"--trust-ca {path}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``build [--out DIR] ...``, build the image and print its paths."""
    parser = argparse.ArgumentParser(prog="honeyfleet image", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the guest image")
    build.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    build.add_argument("--hostname", default="srv04")
    build.add_argument("--backend-user", default="root")
    build.add_argument("--backend-pass", default="root")
    build.add_argument(
        "--distro",
        choices=[d.value for d in Distro],
        default=Distro.BUSYBOX.value,
        help="busybox: tiny, boots fastest; debian: a real Debian 12 server (mmdebstrap)",
    )
    build.add_argument(
        "--disk-size-mib",
        type=int,
        default=None,
        help=f"root file system size (default 2048, {DEBIAN_DISK_MIB} for debian; sparse)",
    )
    build.add_argument(
        "--trust-ca",
        type=Path,
        default=None,
        help="PEM certificate the guest trusts: the pool node's egress interception CA "
        "(state_dir/egress-ca.pem), so guests' HTTPS meets the node's leaves",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    distro = Distro(args.distro)
    try:
        trust_ca = _read_ca(args.trust_ca) if args.trust_ca is not None else ""
        spec = GuestImageSpec(
            out_dir=args.out,
            distro=distro,
            disk_size_mib=args.disk_size_mib or default_disk_mib(distro),
            hostname=args.hostname,
            backend_user=args.backend_user,
            backend_pass=args.backend_pass,
            trust_ca=trust_ca,
        )
        image = build_image(spec, print_progress)
    except ImageBuildError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(
        f"disk    {image.disk}\nkernel  {image.kernel}\ninitrd  {image.initrd}\n"
        f"cmdline {image.cmdline}\nrelease {image.kernel_version}\n"
        f"({time.monotonic() - started:.1f}s)\n"
    )
    return 0
