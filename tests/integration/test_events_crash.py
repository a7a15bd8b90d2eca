"""A controller process killed with SIGKILL mid-stream loses no event and duplicates none.

The controller runs as `honeyfleet controller --config FILE`, a real separate process.
Four sensors stream concurrently. When one of them has sent its ninth batch and sees it
in the store, the controller is killed before that batch's acknowledgement is read
(committed, never acknowledged) while the other sensors have batches in flight. It is
restarted on the same port and state, and each sensor resends from its first
unacknowledged batch, as a sensor's spool does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import ingest_pb2
from tests.conftest import FleetPki, free_port
from tests.integration.test_events_ingest import (
    ACK_TIMEOUT,
    SensorStream,
    batches,
    bulk_events,
    postgres_counts,
    sqlite_counts,
)
from tests.integration.test_fleet_tools import BIN

pytest_plugins = ["tests.postgres"]
SENSORS = [f"edge{i}" for i in range(4)]
EVENTS_PER_SENSOR = 10_000
KILL_AT_BATCH = 8
INGEST = "honeyfleet.v1.EventIngestService"
PROCESS_TIMEOUT = 30  # for the controller process to exit once signalled


def write_config(
    path: Path, fleet_pki: FleetPki, port: int, state: Path, store: dict[str, str]
) -> None:
    """A controller config file for the test's PKI, port and store."""
    tls = fleet_pki.files(Role.CONTROLLER, "ctl")
    lines = [
        "[controller]",
        f'listen = "127.0.0.1:{port}"',
        'enroll_listen = ""',
        'metrics_listen = ""',
        f'state_dir = "{state}"',
        f'tls_ca = "{tls.ca}"',
        f'tls_cert = "{tls.cert}"',
        f'tls_key = "{tls.key}"',
        *(f'{key} = "{value}"' for key, value in store.items()),
    ]
    path.write_text("\n".join(lines) + "\n")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """End the controller process if it still runs: SIGTERM, then SIGKILL if it lingers."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def start_process(config: Path, log: Path) -> asyncio.subprocess.Process:
    """Start `honeyfleet controller` with its output appended to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            str(BIN / "honeyfleet"), "controller", "--config", str(config), stdout=out, stderr=out
        )


async def wait_ingest_serving(address: str, fleet_pki: FleetPki, log: Path) -> None:
    """Poll health until the ingest service is SERVING (60 s at most)."""
    deadline = time.monotonic() + 60
    async with secure_channel(address, fleet_pki.files(Role.SENSOR, "probe")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=INGEST), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"controller never served; its log:\n{log.read_text()}")
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    store: str, fleet_pki: FleetPki, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings: dict[str, str] = {"store": store}
    if store == "postgres":
        settings["postgres_dsn"] = request.getfixturevalue("postgres_dsn")

    port = free_port()
    address = f"127.0.0.1:{port}"
    config, log, state = tmp_path / "honeyfleet.toml", tmp_path / "controller.log", tmp_path / "st"
    write_config(config, fleet_pki, port, state, settings)
    work = {name: batches(bulk_events(EVENTS_PER_SENSOR, name)) for name in SENSORS}
    next_batch = dict.fromkeys(SENSORS, 0)  # first unacknowledged batch per sensor
    acks: list[ingest_pb2.StreamEventsResponse] = []

    proc = await start_process(config, log)
    try:
        await wait_ingest_serving(address, fleet_pki, log)

        killed = asyncio.Event()

        async def stored(event_uuid: str) -> bool:
            """Whether the store has committed an event."""
            if store == "postgres":
                import psycopg

                async with await psycopg.AsyncConnection.connect(settings["postgres_dsn"]) as conn:
                    cursor = await conn.execute(
                        "SELECT 1 FROM events WHERE hf_event_id = %s", (event_uuid,)
                    )
                    return await cursor.fetchone() is not None
            with contextlib.closing(sqlite3.connect(state / "events.sqlite3")) as db:
                found = db.execute("SELECT 1 FROM events WHERE hf_event_id = ?", (event_uuid,))
                return found.fetchone() is not None

        async def deliver(name: str, killer: bool) -> None:
            """Send the rest of a sensor's batches; stop when the stream breaks."""
            stream = SensorStream(fleet_pki, name, address)
            try:
                for index in range(next_batch[name], len(work[name])):
                    batch = work[name][index]
                    if killer and index == KILL_AT_BATCH:
                        async with asyncio.timeout(ACK_TIMEOUT):
                            await stream.call.write(batch)
                            while not await stored(batch.events[-1].hf_event_id):
                                await asyncio.sleep(0.01)
                        killed.set()
                        proc.send_signal(signal.SIGKILL)  # before the ack is read
                        async with asyncio.timeout(ACK_TIMEOUT):
                            await stream.call.read()
                    acks.append(await stream.send(batch))
                    next_batch[name] = index + 1
            except grpc.aio.AioRpcError as e:
                assert killed.is_set(), e  # only the kill breaks streams
            finally:
                await stream.channel.close()

        await asyncio.gather(*(deliver(name, name == SENSORS[0]) for name in SENSORS))
        async with asyncio.timeout(PROCESS_TIMEOUT):
            assert await proc.wait() == -signal.SIGKILL
        first_run = list(acks)
        assert next_batch[SENSORS[0]] == KILL_AT_BATCH
        assert len(first_run) < sum(len(b) for b in work.values())

        proc = await start_process(config, log)
        await wait_ingest_serving(address, fleet_pki, log)
        await asyncio.gather(*(deliver(name, False) for name in SENSORS))
    finally:
        await stop_process(proc)

    total = len(SENSORS) * EVENTS_PER_SENSOR
    assert all(next_batch[name] == len(work[name]) for name in SENSORS)
    assert all(a.stored + a.duplicates == len(work[SENSORS[0]][0].events) for a in acks)
    resent = acks[len(first_run) :]
    # Committed-but-unacknowledged batches come back as duplicates: never stored twice.
    assert sum(a.stored for a in acks) + sum(a.duplicates for a in resent) == total
    assert sum(a.duplicates for a in resent) >= len(work[SENSORS[0]][KILL_AT_BATCH].events)
    if store == "postgres":
        assert await postgres_counts(settings["postgres_dsn"]) == (total, total)
    else:
        assert sqlite_counts(state) == (total, total)
