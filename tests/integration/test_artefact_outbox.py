"""The artefact outbox against a real controller over mTLS: outages, restarts, bounds."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry

from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc
from tests.conftest import ControllerFactory, FleetPki, free_port, until

CAPTURE = artefact_pb2.ARTEFACT_KIND_CAPTURE
RPC_TIMEOUT = 10
DELIVERY_TIMEOUT = 60


class Member:
    """A sensor's outbox in ``directory``, with its metrics."""

    def __init__(self, fleet_pki: FleetPki, directory: Path, address: str, **bounds: int) -> None:
        self.registry = CollectorRegistry()
        self.outbox = Outbox(
            directory,
            address,
            fleet_pki.files(Role.SENSOR, "edge1"),
            OutboxMetrics("test", self.registry),
            max_bytes=bounds.get("max_bytes", 10**9),
            max_files=bounds.get("max_files", 1000),
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"test_outbox_{name}", labels) or 0.0


@asynccontextmanager
async def running(member: Member, *, deliver: bool = True) -> AsyncIterator[Outbox]:
    """The outbox open (and uploading), closed afterwards."""
    await member.outbox.open()
    task = asyncio.create_task(member.outbox.run()) if deliver else None
    try:
        yield member.outbox
    finally:
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await member.outbox.close()


def make_file(directory: Path, content: bytes, name: str) -> tuple[Path, str]:
    path = directory / name
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


async def stored(fleet_pki: FleetPki, address: str, **filters: object) -> list[tuple[str, str]]:
    """(sha256, session) of every reference the controller lists."""
    async with secure_channel(address, fleet_pki.files(Role.ADMIN, "alice")) as channel:
        stub = artefact_pb2_grpc.ArtefactServiceStub(channel)  # type: ignore[misc]
        reply = await stub.ListArtefacts(
            artefact_pb2.ListArtefactsRequest(page_size=1000, **filters), timeout=RPC_TIMEOUT
        )
    return sorted((a.metadata.sha256, a.metadata.session) for a in reply.artefacts)


async def settled(outbox: Outbox) -> None:
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        await outbox.idle()


def blobs(controller_dir: Path) -> list[str]:
    """The content files the controller's store holds."""
    return sorted(p.name for p in (controller_dir / "artefacts").glob("??/*") if len(p.name) == 64)


async def test_outbox_survives_a_controller_outage_and_a_restart_storing_each_once(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    files = tmp_path / "captures"
    files.mkdir()
    a, sha_a = make_file(files, os.urandom(700_000), "a")  # several chunks
    b, sha_b = make_file(files, b"second payload", "b")
    outbox_dir = tmp_path / "outbox"

    # The controller is down: the outbox queues, tries, fails, and keeps everything.
    first = Member(fleet_pki, outbox_dir, address)
    async with running(first) as outbox:
        assert await outbox.put(a, CAPTURE, session="s1", filename="/tmp/a") == sha_a
        assert await outbox.put(b, CAPTURE, session="s1", filename="/tmp/b") == sha_b
        # The same content in another session: one more reference, no more bytes queued.
        assert await outbox.put(a, CAPTURE, session="s2", filename="/tmp/a") == sha_a
        await until(lambda: first.metric("failures_total", reason="retry") >= 2)
        assert first.metric("artefacts") == 3
        assert first.metric("bytes") == 700_000 + len(b"second payload")
    # The sensor's own copies may go (its budget); the outbox has its own links.
    a.unlink()
    b.unlink()

    # The sensor restarts, and the controller comes back: all of it arrives, once.
    second = Member(fleet_pki, outbox_dir, address)
    async with running(second, deliver=False) as outbox:
        assert outbox.backlog == 3
    controller, _ = await start_controller(listen=address)
    third = Member(fleet_pki, outbox_dir, address)
    async with running(third) as outbox:
        await settled(outbox)
        assert third.metric("uploaded_total", result="stored") == 2
        assert third.metric("uploaded_total", result="already_stored") == 1
        assert third.metric("artefacts") == 0 and third.metric("bytes") == 0
    assert await stored(fleet_pki, address) == sorted([(sha_a, "s1"), (sha_a, "s2"), (sha_b, "s1")])
    assert blobs(controller.config.state_dir) == sorted([sha_a, sha_b])
    assert list((outbox_dir / "content").iterdir()) == []

    # A resend (a crash after the upload, before the outbox forgot it) stores nothing twice.
    again, _ = make_file(files, b"second payload", "b-again")
    fourth = Member(fleet_pki, tmp_path / "outbox-2", address)
    async with running(fourth) as outbox:
        await outbox.put(again, CAPTURE, session="s1", filename="/tmp/b")
        await settled(outbox)
    assert fourth.metric("uploaded_total", result="already_stored") == 1
    assert len(await stored(fleet_pki, address)) == 3
    assert blobs(controller.config.state_dir) == sorted([sha_a, sha_b])


async def test_outbox_bounds_refuse_what_does_not_fit_until_there_is_room(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    files = tmp_path / "captures"
    files.mkdir()
    a, sha_a = make_file(files, b"a" * 600, "a")
    b, _ = make_file(files, b"b" * 600, "b")
    c, sha_c = make_file(files, b"c" * 10, "c")
    member = Member(fleet_pki, tmp_path / "outbox", address, max_bytes=1000, max_files=3)
    put: Callable[..., object]
    async with running(member) as outbox:
        put = outbox.put
        assert await put(a, CAPTURE, session="s1", filename="a") == sha_a
        assert await put(b, CAPTURE, session="s1", filename="b") is None  # over the bytes
        assert await put(a, CAPTURE, session="s2", filename="a") == sha_a  # no new bytes
        assert await put(a, CAPTURE, session="s2", filename="a") == sha_a  # queued already
        assert await put(c, CAPTURE, session="s1", filename="c") == sha_c
        assert await put(c, CAPTURE, session="s2", filename="c") is None  # over the count
        assert await put(c, CAPTURE, session="s3", filename="c", sha256="../../x") is None
        assert member.metric("refused_total", reason="over_bytes") == 1
        assert member.metric("refused_total", reason="over_items") == 1
        assert member.metric("refused_total", reason="error") == 1
        assert outbox.backlog == 3 and member.metric("bytes") == 610
        # Once delivered, the room is there again.
        await start_controller(listen=address)
        await settled(outbox)
        assert await put(b, CAPTURE, session="s1", filename="b") is not None
        await settled(outbox)
    assert len(await stored(fleet_pki, address)) == 4


async def test_an_artefact_refused_for_good_is_dropped_and_the_rest_delivered(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, address = await start_controller(artefact_max_upload_bytes=1000)
    files = tmp_path / "captures"
    files.mkdir()
    big, _ = make_file(files, b"x" * 2000, "big")
    small, sha_small = make_file(files, b"small", "small")
    member = Member(fleet_pki, tmp_path / "outbox", address)
    async with running(member) as outbox:
        await outbox.put(big, CAPTURE, session="s1", filename="big")
        await outbox.put(small, CAPTURE, session="s1", filename="small")
        await settled(outbox)
    assert member.metric("failures_total", reason="refused") == 1
    assert member.metric("uploaded_total", result="stored") == 1
    assert await stored(fleet_pki, address) == [(sha_small, "s1")]
