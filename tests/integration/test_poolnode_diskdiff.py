"""Disk diffs on real qcow2 disks: what is reported, what is kept, and the bounds.

Each diff boots a libguestfs appliance under TCG (no guest VM): run these under
``flock /tmp/hf-vm.lock`` on a shared machine.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.artefactclient import fetch
from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc
from poolnode.config import PoolNodeConfig
from poolnode.diskdiff import DiskDiffer
from poolnode.metrics import PoolMetrics
from tests.conftest import ControllerFactory, FleetPki
from tests.guestdisk import make_base, make_overlay, require_guestfs

pytestmark = pytest.mark.timeout(600)

ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"payload\n"
SESSION = "0a1b2c3d4e5f"
BIG = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(10_000))  # 320,000 bytes


@dataclass
class Emitted:
    guest: str | None
    eventid: str
    template: str
    fields: dict[str, Any]


class RecordedEvents:
    """A GuestEvents that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Emitted] = []

    def emit(
        self, guest_id: str | None, eventid: str, template: str, **fields: Any
    ) -> dict[str, Any]:
        self.events.append(Emitted(guest_id, eventid, template, fields))
        return {"eventid": eventid, "session": SESSION, **fields}

    def files(self) -> dict[str, dict[str, Any]]:
        return {
            e.fields["filename"]: e.fields
            for e in self.events
            if e.eventid == "honeyfleet.guest.file"
        }

    def summary(self) -> dict[str, Any]:
        (diff,) = [e.fields for e in self.events if e.eventid == "honeyfleet.guest.diff"]
        return diff


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A base image and an overlay a "guest" wrote to (built once: each takes an appliance)."""
    require_guestfs()
    root = tmp_path_factory.mktemp("disks")
    tree = root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "tmp").mkdir(mode=0o1777)
    (tree / "etc/hostname").write_text("base\n")
    (tree / "etc/motd").write_text("welcome\n")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    base = make_base(tree, root / "base.qcow2")
    overlay = make_overlay(
        base,
        root / "guest.qcow2",
        write={"/tmp/.x": ELF, "/etc/hostname": b"owned\n", "/tmp/big": BIG, "/tmp/é x": b"u\n"},
        symlink={"/etc/passwd": "/tmp/link"},
        remove=("/etc/motd",),
    )
    yield base, overlay


def differ(
    base: Path, state: Path, events: RecordedEvents, outbox: Outbox | None = None, **limits: Any
) -> DiskDiffer:
    config = PoolNodeConfig(
        state_dir=state,
        backend_pass="pw",
        guest_image=base,
        hypervisor="qemu",
        disk_diff=True,
        disk_diff_max_file_bytes=100_000,
        disk_diff_max_total_bytes=1_000_000,
    )
    return DiskDiffer(replace(config, **limits), PoolMetrics(), events, outbox)


async def run(d: DiskDiffer, overlay: Path, *, delete: bool = False) -> None:
    await d.start()
    try:
        d.submit("hf-test", overlay, delete=delete)
        await d.idle()
    finally:
        await d.stop()


async def test_created_and_changed_files_are_reported_and_kept(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    base, overlay = disks
    events = RecordedEvents()
    d = differ(base, tmp_path, events)
    await run(d, overlay)
    files = events.files()
    assert set(files) == {"/tmp/.x", "/etc/hostname", "/tmp/big", "/tmp/é x"}
    x = files["/tmp/.x"]
    assert x["shasum"] == hashlib.sha256(ELF).hexdigest()
    assert (x["change"], x["size"], x["stored"], x["uid"], x["mode"]) == (
        "created",
        len(ELF),
        True,
        0,
        "0644",
    )
    assert (tmp_path / "downloads" / x["shasum"]).read_bytes() == ELF
    assert files["/etc/hostname"]["change"] == "changed"
    assert (tmp_path / "downloads" / hashlib.sha256(b"owned\n").hexdigest()).exists()
    # Over disk_diff_max_file_bytes: hashed (in the appliance), not kept.
    big = files["/tmp/big"]
    assert (big["shasum"], big["stored"]) == (hashlib.sha256(BIG).hexdigest(), False)
    assert not (tmp_path / "downloads" / big["shasum"]).exists()
    summary = events.summary()
    assert (summary["outcome"], summary["created"], summary["changed"]) == ("done", 3, 1)
    assert summary["deleted"] == 1 and summary["other"] >= 1  # the link (and directories)
    assert summary["truncated"] is False
    assert all(e.guest == "hf-test" for e in events.events)
    assert overlay.exists()  # not asked to delete it (save_snapshots keeps it)
    assert (
        d.metrics.registry.get_sample_value(
            "honeyfleet_poolnode_disk_diffs_total", {"outcome": "done"}
        )
        == 1
    )
    assert not list((tmp_path / "diskdiff").iterdir())  # no job leftovers


async def test_kept_files_reach_the_controllers_store_on_the_guests_session(
    disks: tuple[Path, Path],
    tmp_path: Path,
    start_controller: ControllerFactory,
    fleet_pki: FleetPki,
) -> None:
    base, overlay = disks
    _, address = await start_controller()
    outbox = Outbox(
        tmp_path / "outbox",
        address,
        fleet_pki.files(Role.POOLNODE, "node1"),
        OutboxMetrics("test", PoolMetrics().registry),
        max_bytes=10**8,
        max_files=100,
    )
    await outbox.open()
    uploading = asyncio.create_task(outbox.run())
    try:
        await run(differ(base, tmp_path, RecordedEvents(), outbox), overlay)
        async with asyncio.timeout(60):
            await outbox.idle()
    finally:
        uploading.cancel()
        await asyncio.wait([uploading])
        await outbox.close()
    async with secure_channel(address, fleet_pki.files(Role.ADMIN, "alice")) as channel:
        admin = artefact_pb2_grpc.ArtefactServiceStub(channel)  # type: ignore[misc]
        listed = await admin.ListArtefacts(
            artefact_pb2.ListArtefactsRequest(session=SESSION), timeout=10
        )
        got = {a.metadata.filename: a for a in listed.artefacts}
        # Kept files only: /tmp/big was over disk_diff_max_file_bytes.
        assert set(got) == {"/tmp/.x", "/etc/hostname", "/tmp/é x"}
        x = got["/tmp/.x"]
        assert x.metadata.sha256 == hashlib.sha256(ELF).hexdigest()
        assert x.metadata.kind == artefact_pb2.ARTEFACT_KIND_EXTRACTED_FILE
        assert x.source == "poolnode/node1"
        await fetch(admin, x.metadata.sha256, tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == ELF


async def test_bounds_on_files_and_bytes(disks: tuple[Path, Path], tmp_path: Path) -> None:
    base, overlay = disks
    events = RecordedEvents()
    await run(
        differ(base, tmp_path, events, disk_diff_max_files=1, disk_diff_max_total_bytes=0), overlay
    )
    (only,) = events.files().values()
    assert only["stored"] is False and len(only["shasum"]) == 64
    assert not list((tmp_path / "downloads").iterdir())
    summary = events.summary()
    assert (summary["reported"], summary["truncated"]) == (1, True)


async def test_a_diff_over_its_timeout_is_killed_with_its_appliance(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    base, overlay = disks
    doomed = tmp_path / "doomed.qcow2"
    doomed.write_bytes(overlay.read_bytes())
    events = RecordedEvents()
    await run(differ(base, tmp_path, events, disk_diff_timeout=2.0), doomed, delete=True)
    summary = events.summary()
    assert summary["outcome"] == "failed" and "disk_diff_timeout" in summary["reason"]
    assert not doomed.exists()  # deleted after its (failed) diff
    assert not _holders(doomed), "a process still has the overlay open"


def _holders(path: Path) -> list[int]:
    """Processes with ``path`` open (its appliance's QEMU would be one)."""
    wanted = {str(path), f"{path} (deleted)"}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted & {str(fd.readlink()) for fd in (proc / "fd").iterdir()}:
                found.append(int(proc.name))
        except OSError:
            continue
    return found
