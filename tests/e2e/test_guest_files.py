"""A file an attacker leaves on a real guest (TCG) reaches the controller after the lease:
as a ``honeyfleet.guest.file`` event and as an artefact with the right sha256.

The pool node runs as operators run it (its disk diff in a libguestfs appliance, its
outbox uploading to the controller over mTLS); everything is read back from the
controller. The busybox test image keeps ``/tmp`` on a tmpfs (never on the disk), so the
file is written where bots also drop them and the disk keeps it: ``/var/tmp``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.artefactclient import fetch
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc
from tests.conftest import until
from tests.e2e.fleet import VmFleet, run

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

# The diff boots an appliance under TCG after the guest is destroyed.
ARRIVAL_TIMEOUT = 420.0


def stored_events(fleet: VmFleet, eventid: str, lease: str) -> list[dict[str, Any]]:
    """The controller's stored events with ``eventid`` on ``lease``."""
    assert fleet.controller is not None
    with sqlite3.connect(fleet.controller.config.state_dir / "events.sqlite3") as db:
        rows = db.execute("SELECT json FROM events").fetchall()
    events = [json.loads(row[0]) for row in rows]
    return [e for e in events if e["eventid"] == eventid and e.get("lease") == lease]


async def test_a_file_left_on_the_guest_becomes_an_event_and_an_artefact(
    vm_fleet: VmFleet, tmp_path: Path
) -> None:
    await vm_fleet.ensure_node(pristine=1, disk_diff=True, save_snapshots=False)
    payload = f"#!/bin/sh\n# dropped {secrets.token_hex(8)}\n".encode()
    digest = hashlib.sha256(payload).hexdigest()
    lease = await vm_fleet.lease("203.0.113.77")
    async with vm_fleet.shell(lease.id) as conn:
        wrote = await run(conn, f"printf '%s' '{payload.decode()}' > /var/tmp/.x && sync")
    assert wrote.exit_status == 0, wrote.stderr
    await vm_fleet.sensor().release(lease.id)

    await until(
        lambda: bool(stored_events(vm_fleet, "honeyfleet.guest.diff", lease.id)),
        timeout=ARRIVAL_TIMEOUT,
    )
    files = {e["filename"]: e for e in stored_events(vm_fleet, "honeyfleet.guest.file", lease.id)}
    assert "/var/tmp/.x" in files, (sorted(files), vm_fleet.log_tail())
    event = files["/var/tmp/.x"]
    assert (event["shasum"], event["size"], event["stored"]) == (digest, len(payload), True)

    admin = vm_fleet.pki.files(Role.ADMIN, "alice")
    async with secure_channel(vm_fleet.controller_address, admin) as channel:
        stub = artefact_pb2_grpc.ArtefactServiceStub(channel)  # type: ignore[misc]

        async def listed() -> list[artefact_pb2.Artefact]:
            reply = await stub.ListArtefacts(
                artefact_pb2.ListArtefactsRequest(sha256=digest), timeout=10
            )
            return list(reply.artefacts)

        found: list[artefact_pb2.Artefact] = []
        for _ in range(60):  # the outbox uploads right after the diff's last event
            found = await listed()
            if found:
                break
            await asyncio.sleep(1)
        assert found, f"no artefact {digest}\n{vm_fleet.log_tail()}"
        (artefact,) = found
        assert artefact.metadata.kind == artefact_pb2.ARTEFACT_KIND_EXTRACTED_FILE
        assert artefact.metadata.session == event["session"]
        assert artefact.metadata.filename == "/var/tmp/.x"
        assert artefact.source == "poolnode/vm1"
        await fetch(stub, digest, tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == payload
