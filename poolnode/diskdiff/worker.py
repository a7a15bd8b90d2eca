"""The disk-diff worker: what a guest's overlay holds that its base image does not.

Run as a program by :mod:`poolnode.diskdiff.runner` with Debian's own interpreter
(``/usr/bin/python3 -I``), whose ``python3-guestfs`` package is built for it; so this
module imports only the standard library and ``guestfs``. Both disks are opened
read-only in one libguestfs appliance: the guest's filesystems are parsed by the
appliance's kernel inside a VM, never mounted on the host.

Input, one JSON object on stdin: ``base``, ``base_format``, ``overlay`` (qcow2),
``out`` (a directory for kept contents), ``max_file_bytes``, ``max_total_bytes``,
``max_files``, ``memsize`` (MiB).

Output, JSON lines on stdout, each flushed as soon as known (a worker killed for time
leaves whole lines behind): one ``{"kind": "file", ...}`` per regular file created or
changed, newest change first, whose content is in ``out/<sha256>`` when ``stored``;
then ``{"kind": "done", ...}`` with the counts. A failure is ``{"kind": "error"}``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Entries walked per filesystem: a hostile disk can hold millions of empty files.
MAX_ENTRIES = 500_000
# Names stat'ed per call into the appliance.
STAT_BATCH = 500
CHUNK = 1024 * 1024
# Filesystem types whose two copies (base and overlay, same UUID) mount side by side.
MOUNT_OPTIONS = {"ext2": "ro", "ext3": "ro", "ext4": "ro", "xfs": "ro,nouuid", "vfat": "ro"}

Stat = tuple[int, int, int, int, int, int, int]  # mode, uid, gid, size, mtime, ctime, ino


def emit(kind: str, **fields: Any) -> None:
    """One output line."""
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def text(name: str) -> str:
    """A path as text that survives UTF-8 (a guest's names are bytes, any bytes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(g: Any, root: str, scratch: Path) -> tuple[dict[str, Stat], bool]:
    """Every entry under ``root`` (lstat, never following links); and whether cut short."""
    listing = scratch / "names"
    g.find0(root, str(listing))
    names: list[str] = []
    cut = False
    with listing.open("rb") as f:
        for raw in _split0(f):
            if len(names) >= MAX_ENTRIES:
                cut = True
                break
            names.append(raw.decode("utf-8", "surrogateescape").lstrip("/"))
    listing.unlink()
    by_dir: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = ("/" + name).rpartition("/")
        by_dir.setdefault(parent, []).append(leaf)
    entries: dict[str, Stat] = {}
    for parent, leaves in by_dir.items():
        for i in range(0, len(leaves), STAT_BATCH):
            batch = leaves[i : i + STAT_BATCH]
            for leaf, st in zip(batch, g.lstatnslist(root + parent, batch), strict=True):
                entries[f"{parent}/{leaf}"] = (
                    st["st_mode"],
                    st["st_uid"],
                    st["st_gid"],
                    st["st_size"],
                    st["st_mtime_sec"] * 10**9 + st["st_mtime_nsec"],
                    st["st_ctime_sec"] * 10**9 + st["st_ctime_nsec"],
                    st["st_ino"],
                )
    return entries, cut


def _split0(f: Any) -> Iterator[bytes]:
    """NUL-separated names from a file, read a chunk at a time."""
    rest = b""
    while chunk := f.read(CHUNK):
        *names, rest = (rest + chunk).split(b"\0")
        yield from (n for n in names if n)
    if rest:
        yield rest


def keep(g: Any, path: str, out: Path) -> str:
    """Copy a file out of the appliance into ``out/<sha256>``; returns the sha256."""
    fd, name = tempfile.mkstemp(dir=out, prefix=".incoming-")
    os.close(fd)
    temp = Path(name)
    try:
        g.download(path, name)
        digest = hashlib.sha256()
        with temp.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        shasum = digest.hexdigest()
        temp.replace(out / shasum)
        return shasum
    finally:
        temp.unlink(missing_ok=True)


def diff(job: dict[str, Any]) -> None:
    """Open both disks, compare each filesystem pair, report and keep changed files."""
    guestfs = importlib.import_module("guestfs")
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_memsize(int(job["memsize"]))
    g.add_drive_opts(job["base"], format=job["base_format"], readonly=1)
    g.add_drive_opts(job["overlay"], format="qcow2", readonly=1)
    g.launch()
    filesystems = g.list_filesystems()
    pairs: list[tuple[int, str]] = []
    for device, fstype in sorted(filesystems.items()):
        if not device.startswith("/dev/sdb") or fstype not in MOUNT_OPTIONS:
            continue
        base_device = "/dev/sda" + device.removeprefix("/dev/sdb")
        if filesystems.get(base_device) != fstype:
            continue
        n = len(pairs)
        g.mkmountpoint(f"/b{n}")
        g.mkmountpoint(f"/o{n}")
        g.mount_options(MOUNT_OPTIONS[fstype], base_device, f"/b{n}")
        g.mount_options(MOUNT_OPTIONS[fstype], device, f"/o{n}")
        pairs.append((n, "vd" + device.removeprefix("/dev/s")))
    changed: list[tuple[int, str, str, Stat, bool]] = []
    counts = {"created": 0, "changed": 0, "deleted": 0, "other": 0}
    cut = False
    with tempfile.TemporaryDirectory() as scratch:
        for n, label in pairs:
            base, base_cut = walk(g, f"/b{n}", Path(scratch))
            over, over_cut = walk(g, f"/o{n}", Path(scratch))
            cut = cut or base_cut or over_cut
            counts["deleted"] += len(base.keys() - over.keys())
            for path, st in over.items():
                before = base.get(path)
                if before == st:
                    continue
                if not stat.S_ISREG(st[0]):
                    counts["other"] += 1
                    continue
                created = before is None or not stat.S_ISREG(before[0])
                counts["created" if created else "changed"] += 1
                changed.append((n, label, path, st, created))
    changed.sort(key=lambda c: c[3][5], reverse=True)  # newest change first
    total = 0
    reported = 0
    labels = {label for _, label, _, _, _ in changed}
    for n, label, path, st, created in changed[: int(job["max_files"])]:
        size = st[3]
        inside = f"/o{n}{path}"
        stored = size <= job["max_file_bytes"] and total + size <= job["max_total_bytes"]
        if stored:
            shasum = keep(g, inside, Path(job["out"]))
            total += size
        else:
            shasum = g.checksum("sha256", inside)
        emit(
            "file",
            path=text(path),
            filesystem=label if len(labels) > 1 else "",
            change="created" if created else "changed",
            size=size,
            mode=st[0],
            uid=st[1],
            gid=st[2],
            mtime_ns=st[4],
            ctime_ns=st[5],
            sha256=shasum,
            stored=stored,
        )
        reported += 1
    g.shutdown()
    g.close()
    emit(
        "done",
        filesystems=len(pairs),
        reported=reported,
        stored_bytes=total,
        walk_cut=cut,
        **counts,
    )


def main() -> int:
    """Read the job, run it, say what failed."""
    try:
        diff(json.load(sys.stdin))
    except Exception as e:  # the parent gets it as a line, not a traceback
        emit("error", message=f"{type(e).__name__}: {e}"[:1000])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
