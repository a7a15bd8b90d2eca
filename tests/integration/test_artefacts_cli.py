"""What attackers leave on a sensor reaches the controller, and operators get it back with
the CLI: real OpenSSH clients -> sensor (outbox) -> controller's artefact store ->
``honeyfleet artefacts list/get`` and ``honeyfleet replay SESSION``, all over mTLS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

from controller.artefacts.index import RefQuery
from honeyfleet.pki.identity import Role
from tests.conftest import FleetPki, require_tool, until
from tests.integration.ssh_fleet import SSH_OPTIONS, Fleet, FleetFactory, run, ssh
from tests.integration.test_fleet_tools import BIN
from tests.integration.test_fleet_tools import run as run_cli

DELIVERY_TIMEOUT = 60


async def sftp_put(fleet: Fleet, local: Path, scratch: Path) -> None:
    """Upload ``local`` as dropper.bin with OpenSSH's sftp through the sensor."""
    batch = scratch / "batch"
    batch.write_text(f"put {local} dropper.bin\n")
    code, _, err = await run(
        require_tool("sftp", "openssh-client"), "-o", "BatchMode=no", *SSH_OPTIONS,
        "-P", str(fleet.port), "-b", str(batch), "root@127.0.0.1", password="toor",
    )  # fmt: skip
    assert code == 0, err


async def test_an_sftp_upload_and_a_recording_fetched_with_the_cli_match(
    make_fleet: FleetFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    fleet = await make_fleet()
    payload = os.urandom(300_000)
    local = tmp_path / "dropper.bin"
    local.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    await sftp_put(fleet, local, tmp_path)
    code, out, err = await ssh(fleet, "-tt", stdin=b"echo hello world\nexit\n")
    assert code == 0 and b"hello world" in out, err
    await until(lambda: len(fleet.closed_reasons()) == 2)
    (upload,) = fleet.events("cowrie.session.file_upload")
    (closed,) = fleet.events("cowrie.log.closed")
    cast = Path(closed["ttylog"])
    # The event names the recording's artefact by the sha256 of the file itself.
    assert closed["ttylog_sha256"] == hashlib.sha256(cast.read_bytes()).hexdigest()
    outbox = fleet.sensor.outbox
    assert outbox is not None
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        await outbox.idle()

    admin = fleet_pki.files(Role.ADMIN, "alice")
    flags = ["--controller", fleet.address, "--ca", str(admin.ca), "--cert", str(admin.cert)]
    flags += ["--key", str(admin.key)]
    honeyfleet = str(BIN / "honeyfleet")

    code, out, err = await run_cli(
        honeyfleet, "artefacts", "list", "--session", upload["session"], "--json", *flags
    )
    assert code == 0, err
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["metadata"]["sha256"] == upload["shasum"] == digest
    assert listed["metadata"]["kind"] == "ARTEFACT_KIND_CAPTURE"
    assert listed["metadata"]["filename"] == upload["url"]
    assert listed["source"] == "sensor/sensor-1"
    code, out, err = await run_cli(honeyfleet, "artefacts", "list", "--kind", "recording", *flags)
    assert code == 0 and closed["ttylog_sha256"] in out, err

    fetched = tmp_path / "fetched.bin"
    code, out, err = await run_cli(
        honeyfleet, "artefacts", "get", digest, "-o", str(fetched), *flags
    )
    assert code == 0, err
    assert fetched.read_bytes() == payload and "checked" in out

    # The session's recording, played from the controller, shows what the attacker saw.
    code, out, err = await run_cli(
        honeyfleet, "replay", closed["session"], "--speed", "1000", *flags
    )
    assert code == 0, err
    shown = "".join(
        text for _, kind, text in map(json.loads, cast.read_text().splitlines()[1:]) if kind == "o"
    )
    assert out == shown and "hello world" in out

    # `sessions show` names the recording (once the session's last events are stored).
    named = f"recording: sha256 {closed['ttylog_sha256']} (honeyfleet replay {closed['session']})"
    for _ in range(60):
        code, out, err = await run_cli(honeyfleet, "sessions", "show", closed["session"], *flags)
        if named in out:
            break
        await asyncio.sleep(0.5)
    assert named in out, (out, err)

    code, out, err = await run_cli(honeyfleet, "replay", "no-such-session", *flags)
    assert code == 2 and "no recording of session 'no-such-session'" in err
    code, out, err = await run_cli(
        honeyfleet, "artefacts", "get", "0" * 64, "-o", str(tmp_path / "none"), *flags
    )
    assert code == 2 and "NOT_FOUND" in err and not (tmp_path / "none").exists()


async def test_without_keep_local_the_sensor_frees_what_the_controller_stored(
    make_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = await make_fleet(artefact_keep_local=False)
    local = tmp_path / "dropper.bin"
    local.write_bytes(os.urandom(50_000))
    await sftp_put(fleet, local, tmp_path)
    code, _, err = await ssh(fleet, "-tt", stdin=b"echo hi\nexit\n")
    assert code == 0, err
    await until(lambda: len(fleet.closed_reasons()) == 2)
    outbox = fleet.sensor.outbox
    assert outbox is not None
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        await outbox.idle()
    (upload,) = fleet.events("cowrie.session.file_upload")
    (closed,) = fleet.events("cowrie.log.closed")
    # The controller has both; the sensor kept neither, and its budget has the bytes back.
    await until(
        lambda: not Path(upload["outfile"]).exists() and not Path(closed["ttylog"]).exists()
    )
    registry = fleet.sensor.metrics.registry
    await until(lambda: registry.get_sample_value("honeyfleet_sensor_artefact_bytes") == 0)
    stored = await fleet.controller.artefacts.references(RefQuery(limit=10))
    assert {r.sha256 for r in stored} == {upload["shasum"], closed["ttylog_sha256"]}
