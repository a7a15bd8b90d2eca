"""Build a guest image: the orchestration, the stamp and the atomic hand-over."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import _debian, _debs, _logins, _rootfs
from ._cpio import write_gzip_cpio
from ._errors import ImageBuildError
from ._host import check_host_tools, run
from ._modules import ModuleIndex, run_depmod
from ._spec import DEFAULT_CMDLINE, Distro, GuestImage, GuestImageSpec

#: progress(step_name, step_index (1-based), step_count)
Progress = Callable[[str, int, int], None]

# Bump when the builder's output changes for the same spec and packages.
BUILDER_VERSION = 1
STAMP = "stamp.json"
CURRENT = "current"
INITRAMFS_DIR = Path(__file__).resolve().parent / "initramfs"
_STEPS = (
    "check host tools",
    "resolve packages",
    "download packages",
    "unpack packages",
    "assemble root file system",
    "install kernel modules",
    "build initramfs",
    "make ext4 file system",
    "convert to qcow2",
    "publish image",
)


def _data_digest(distro: Distro) -> str:
    """Digest of the data files the builder ships for ``distro``, so editing one rebuilds."""
    h = hashlib.sha256()
    data = _debian.DATA_DIR if distro is Distro.DEBIAN else _rootfs.DATA_DIR
    if distro is Distro.DEBIAN:
        # Code dresses the Debian image as much as data does: editing it rebuilds too.
        for module in (_debian, _logins):
            h.update(Path(str(module.__file__)).read_bytes() + b"\0")
    for base in (data, INITRAMFS_DIR):
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(base.parent).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _fingerprint(spec: GuestImageSpec, packages: dict[str, str]) -> str:
    """Digest of everything that determines the image's content."""
    fields = dataclasses.asdict(spec)
    if spec.distro is Distro.BUSYBOX:
        del fields["distro"]  # busybox images built before there was a choice stay valid
    if not spec.trust_ca:
        del fields["trust_ca"]  # nor does an image without one change its fingerprint
    for where in ("out_dir", "cache_dir"):
        fields.pop(where)  # where the files go does not change what is in them
    doc = {
        "builder": BUILDER_VERSION,
        "spec": fields,
        "packages": packages,
        "data": _data_digest(spec.distro),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _image_at(directory: Path, fingerprint: str) -> GuestImage | None:
    """The image in ``directory`` if its stamp says it is complete and matches."""
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fingerprint:
        return None
    image = GuestImage(
        directory=directory,
        disk=directory / "base.qcow2",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline=str(stamp.get("cmdline", DEFAULT_CMDLINE)),
        kernel_version=str(stamp.get("kernel_version", "")),
        fingerprint=fingerprint,
    )
    if not all(p.is_file() for p in (image.disk, image.kernel, image.initrd)):
        return None
    return image


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialize builders sharing an out_dir (two pool nodes, or a CLI and a node)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _point_current(out_dir: Path, directory: Path) -> None:
    """Atomically repoint ``out_dir/current`` at ``directory``."""
    tmp = out_dir / f".{CURRENT}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(directory.name)
    tmp.replace(out_dir / CURRENT)


def build_image(spec: GuestImageSpec, progress: Progress | None = None) -> GuestImage:
    """Build the guest image described by ``spec`` unless an identical one exists.

    Output goes to ``spec.out_dir/image-<fingerprint>/`` (base.qcow2, vmlinuz,
    initrd.img, stamp.json), built in a temporary directory beside it and renamed
    into place, so readers never see a half-built image. Each image directory is
    immutable: overlays made from one keep a valid backing file however often the
    image is rebuilt, and ``out_dir/current`` points at the newest. Needs root and
    the tools in HOST_PACKAGES; apt must have package lists (``apt-get update``).
    """

    def step(i: int) -> None:
        if progress is not None:
            progress(_STEPS[i], i + 1, len(_STEPS))

    out_dir = spec.out_dir.resolve()
    debian = spec.distro is Distro.DEBIAN
    step(0)
    check_host_tools(debian=debian)
    with _locked(out_dir):
        step(1)
        packages = _debs.resolve_packages(spec.kernel_package)
        versions = dict(packages)
        if debian:
            # mmdebstrap installs the system itself; from single .debs come only the
            # kernel and the initramfs' busybox. The installed packages' candidate
            # versions decide, with the rest, whether an existing image is current.
            packages = {
                n: v
                for n, v in packages.items()
                if n.startswith("linux-image") or n == _debs.BUSYBOX_PACKAGE
            }
            versions = packages | _debs.versions(_debian.PACKAGES)
        fingerprint = _fingerprint(spec, versions)
        final = out_dir / f"image-{fingerprint[:16]}"
        existing = _image_at(final, fingerprint)
        if existing is not None:
            _point_current(out_dir, final)
            return existing
        step(2)
        debs = _debs.download(packages, spec.package_cache)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            image = _build(spec, Path(tmp), debs, versions, fingerprint, step)
            if final.exists():
                # A leftover without a matching stamp (interrupted publish): replace it.
                for p in final.iterdir():
                    p.chmod(0o644)
                shutil.rmtree(final)
            image.rename(final)
        _point_current(out_dir, final)
    built = _image_at(final, fingerprint)
    if built is None:
        raise ImageBuildError(f"image in {final} is incomplete after publishing")
    return built


def _build(
    spec: GuestImageSpec,
    work: Path,
    debs: dict[str, Path],
    packages: dict[str, str],
    fingerprint: str,
    step: Callable[[int], None],
) -> Path:
    """Do the actual build inside ``work``; return the finished image directory."""
    step(3)
    unpacked: dict[str, Path] = {}
    for name, deb in sorted(debs.items()):
        unpacked[name] = work / "pkgs" / name
        _debs.extract(deb, unpacked[name])
    kernel_pkg = next(
        (d for n, d in unpacked.items() if (d / "boot").is_dir() and n.startswith("linux-image")),
        None,
    )
    if kernel_pkg is None:
        raise ImageBuildError(f"{spec.kernel_package} did not provide a kernel in /boot")
    vmlinuz = sorted((kernel_pkg / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageBuildError("no vmlinuz-* in the kernel package")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")

    step(4)
    root = work / "rootfs"
    busybox = unpacked[_debs.BUSYBOX_PACKAGE] / "bin/busybox"
    if spec.distro is Distro.DEBIAN:
        kernel_debs = [deb for name, deb in sorted(debs.items()) if name.startswith("linux-image")]
        _debian.install(root, spec, release, kernel_debs)
    else:
        _busybox_root(root, spec, unpacked)

    step(5)
    # depmod over the full tree gives complete modules.dep/softdep/alias to choose from;
    # only the chosen modules are then copied into the guest and the initramfs.
    kmods = kernel_pkg / "lib/modules" / release
    run_depmod(kernel_pkg, release)
    order = ModuleIndex(kmods).load_order(spec.modules)
    guest_mods = root / "usr/lib/modules" / release
    for rel in order:
        (guest_mods / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kmods / rel, guest_mods / rel)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copy2(kmods / meta, guest_mods / meta)
    run_depmod(root, release)
    shutil.copy2(kernel_pkg / "boot" / f"config-{release}", root / "boot")
    if spec.distro is Distro.DEBIAN:
        shutil.copy2(vmlinuz[0], root / "boot")  # where a Debian system keeps its kernel

    step(6)
    initfs = work / "initramfs"
    for d in ("bin", "etc", "proc", "sys", "newroot"):
        (initfs / d).mkdir(parents=True)
    shutil.copy2(INITRAMFS_DIR / "init", initfs / "init")
    (initfs / "init").chmod(0o755)
    shutil.copy2(busybox, initfs / "bin/busybox")
    (initfs / "bin/busybox").chmod(0o755)
    for rel in order:
        (initfs / "lib/modules" / release / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kmods / rel, initfs / "lib/modules" / release / rel)
    (initfs / "etc/modules.load").write_text(
        "".join(f"/lib/modules/{release}/{rel}\n" for rel in order)
    )
    image = work / "image"
    image.mkdir()
    write_gzip_cpio(image / "initrd.img", initfs)

    step(7)
    raw = work / "root.img"
    with raw.open("wb") as fh:
        fh.truncate(spec.disk_size_mib * 1024 * 1024)
    # lazy_itable_init=0: zero the inode tables now, where qemu-img convert turns
    # the zeros into holes, instead of letting every guest's ext4lazyinit thread
    # write them into its overlay after boot.
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "root",
            "-d",
            root,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            raw,
            f"{spec.disk_size_mib}M",
        ],
        timeout=900.0,
    )

    step(8)
    run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image / "base.qcow2"],
        timeout=900.0,
    )
    raw.unlink()
    shutil.copy2(vmlinuz[0], image / "vmlinuz")

    step(9)
    stamp = {
        "fingerprint": fingerprint,
        "packages": packages,
        "kernel_version": release,
        "cmdline": DEFAULT_CMDLINE,
        "builder": BUILDER_VERSION,
    }
    # The stamp is written last: its presence is what marks the image complete.
    (image / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    for p in image.iterdir():
        p.chmod(0o444)  # guests only ever write to their own overlays
    return image


def _busybox_root(root: Path, spec: GuestImageSpec, unpacked: dict[str, Path]) -> None:
    """Assemble the busybox guest's root file system from the unpacked packages."""
    _rootfs.make_layout(root)
    values = {
        "hostname": spec.hostname,
        "domain": spec.domain,
        "admin_user": _rootfs.admin_user(spec),
    }
    _rootfs.copy_data_tree(root, values)
    _rootfs.write_accounts(root, spec)  # after the data tree: homes are made from etc/skel
    _rootfs.install_busybox(root, unpacked[_debs.BUSYBOX_PACKAGE] / "bin/busybox")
    dropbear = unpacked[_debs.DROPBEAR_PACKAGE]
    _rootfs.install_dynamic(
        root,
        {
            dropbear / "usr/sbin/dropbear": "usr/sbin/dropbear",
            dropbear / "usr/bin/dropbearkey": "usr/bin/dropbearkey",
            dropbear / "usr/bin/dbclient": "usr/bin/dbclient",
            unpacked[_debs.BASH_PACKAGE] / "bin/bash": "usr/bin/bash",
        },
        [d for n, d in unpacked.items() if n not in _debs.DYNAMIC_PACKAGES],
    )
    _rootfs.install_terminfo(root, unpacked[_debs.TERMINFO_PACKAGE])
    if spec.trust_ca:
        _rootfs.trust_bundle(root, spec.trust_ca)
    _rootfs.finish(root)
