"""The controller's artefact store through its fleet API: real controller, real certs."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from honeyfleet.artefactclient import fetch, upload
from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc
from tests.conftest import ControllerFactory, FleetPki

RPC_TIMEOUT = 10


@asynccontextmanager
async def stub(
    target: str, fleet_pki: FleetPki, role: Role, name: str
) -> AsyncIterator[artefact_pb2_grpc.ArtefactServiceAsyncStub]:
    """An ArtefactService stub with the given identity."""
    async with secure_channel(target, fleet_pki.files(role, name)) as channel:
        yield artefact_pb2_grpc.ArtefactServiceStub(channel)  # type: ignore[misc]


def artefact(tmp_path: Path, content: bytes, name: str = "x") -> tuple[Path, str]:
    """A file with this content, and its sha256."""
    path = tmp_path / f"{name}.bin"
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def metadata(
    sha: str, size: int, session: str = "s1", kind: int = artefact_pb2.ARTEFACT_KIND_CAPTURE
) -> artefact_pb2.ArtefactMetadata:
    return artefact_pb2.ArtefactMetadata(
        sha256=sha, size=size, kind=kind, session=session, filename="/tmp/x"
    )


async def listed(admin: artefact_pb2_grpc.ArtefactServiceAsyncStub, **filters: object) -> list:
    response = await admin.ListArtefacts(
        artefact_pb2.ListArtefactsRequest(**filters), timeout=RPC_TIMEOUT
    )
    return list(response.artefacts)


async def test_upload_is_stored_once_and_fetched_whole(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, target = await start_controller()
    content = bytes(range(256)) * 4000  # several chunks
    path, sha = artefact(tmp_path, content)
    async with (
        stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor,
        stub(target, fleet_pki, Role.POOLNODE, "node1") as node,
        stub(target, fleet_pki, Role.ADMIN, "alice") as admin,
    ):
        first = await upload(sensor, metadata(sha, len(content)), path)
        again = await upload(sensor, metadata(sha, len(content)), path)
        # The same content from another session and member: one more reference, no bytes.
        other = await upload(node, metadata(sha, len(content), session="s2"), path)
        assert (first, again, other) == (
            artefact_pb2.UPLOAD_STATUS_STORED,
            artefact_pb2.UPLOAD_STATUS_ALREADY_STORED,
            artefact_pb2.UPLOAD_STATUS_ALREADY_STORED,
        )
        refs = await listed(admin)
        assert [(r.metadata.session, r.source) for r in refs] == [
            ("s2", "poolnode/node1"),
            ("s1", "sensor/edge1"),
        ]
        assert [r.metadata.sha256 for r in await listed(admin, session="s1")] == [sha]
        out = tmp_path / "fetched"
        got = await fetch(admin, sha, out)
        assert out.read_bytes() == content
        assert got.size == len(content)


async def test_mismatched_content_is_refused_and_not_stored(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, target = await start_controller()
    path, sha = artefact(tmp_path, b"the real bytes")
    wrong = hashlib.sha256(b"something else").hexdigest()
    async with (
        stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor,
        stub(target, fleet_pki, Role.ADMIN, "alice") as admin,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(sensor, metadata(wrong, path.stat().st_size), path)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(sensor, metadata(sha, path.stat().st_size + 1), path)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await listed(admin) == []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await fetch(admin, wrong, tmp_path / "nothing")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (tmp_path / "nothing").exists()


async def test_budget_evicts_the_oldest_and_refuses_what_cannot_fit(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, target = await start_controller(artefact_store_max_bytes=100)
    old, old_sha = artefact(tmp_path, b"o" * 60, "old")
    new, new_sha = artefact(tmp_path, b"n" * 60, "new")
    huge, huge_sha = artefact(tmp_path, b"h" * 101, "huge")
    async with (
        stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor,
        stub(target, fleet_pki, Role.ADMIN, "alice") as admin,
    ):
        await upload(sensor, metadata(old_sha, 60), old)
        await upload(sensor, metadata(new_sha, 60), new)
        assert [r.metadata.sha256 for r in await listed(admin)] == [new_sha]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(sensor, metadata(huge_sha, 101), huge)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [r.metadata.sha256 for r in await listed(admin)] == [new_sha]
    metrics = controller.artefacts.metrics.registry
    assert metrics.get_sample_value("honeyfleet_artefact_store_bytes") == 60
    assert metrics.get_sample_value("honeyfleet_artefacts_removed_total", {"reason": "budget"}) == 1
    assert metrics.get_sample_value("honeyfleet_artefact_uploads_total", {"result": "stored"}) == 2
    assert metrics.get_sample_value("honeyfleet_artefact_uploads_total", {"result": "refused"}) == 1


async def test_retention_forgets_what_was_not_uploaded_within_it(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, target = await start_controller(artefact_retention_days=1)
    old, old_sha = artefact(tmp_path, b"uploaded long ago", "old")
    new, new_sha = artefact(tmp_path, b"uploaded lately", "new")
    async with (
        stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor,
        stub(target, fleet_pki, Role.ADMIN, "alice") as admin,
    ):
        await upload(sensor, metadata(old_sha, old.stat().st_size), old)
        between = time.time_ns() // 1000 + 1
        await asyncio.sleep(0.01)
        await upload(sensor, metadata(new_sha, new.stat().st_size), new)
        # The controller's hourly upkeep, a day after ``between``.
        assert await controller.artefacts.expire(between + 86_400 * 1_000_000) == 1
        assert [r.metadata.sha256 for r in await listed(admin)] == [new_sha]
        assert not controller.artefacts.path(old_sha).exists()
        # Uploaded again, it is stored again (its content is asked for).
        assert (
            await upload(sensor, metadata(old_sha, old.stat().st_size), old)
            == artefact_pb2.UPLOAD_STATUS_STORED
        )
    metrics = controller.artefacts.metrics.registry
    assert (
        metrics.get_sample_value("honeyfleet_artefacts_removed_total", {"reason": "retention"}) == 1
    )


async def test_uploads_beyond_the_bound_are_refused_with_a_retry_hint(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, target = await start_controller(artefact_max_uploads=1)
    path, sha = artefact(tmp_path, b"second")
    async with stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor:
        held = sensor.Upload(None)
        await held.write(artefact_pb2.UploadRequest(metadata=metadata("a" * 64, 10)))
        assert (await held.read()).status == artefact_pb2.UPLOAD_STATUS_SEND_CONTENT
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(sensor, metadata(sha, 6), path)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert RETRY_AFTER_TRAILER in dict(e.value.trailing_metadata() or ())
        held.cancel()


async def test_listing_pages_newest_first(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, target = await start_controller()
    shas = []
    async with (
        stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor,
        stub(target, fleet_pki, Role.ADMIN, "alice") as admin,
    ):
        for n in range(3):
            path, sha = artefact(tmp_path, f"file {n}".encode(), str(n))
            await upload(sensor, metadata(sha, path.stat().st_size), path)
            shas.append(sha)
        recording = await listed(admin, kind=artefact_pb2.ARTEFACT_KIND_RECORDING)
        assert recording == []
        page = await admin.ListArtefacts(artefact_pb2.ListArtefactsRequest(page_size=2))
        rest = await admin.ListArtefacts(
            artefact_pb2.ListArtefactsRequest(page_size=2, page_token=page.next_page_token)
        )
        assert not rest.next_page_token
        got = [r.metadata.sha256 for r in [*page.artefacts, *rest.artefacts]]
        assert got == shas[::-1]


@pytest.mark.parametrize("role", [Role.SENSOR, Role.POOLNODE])
async def test_members_may_not_read_artefacts(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path, role: Role
) -> None:
    _, target = await start_controller()
    async with stub(target, fleet_pki, role, "m1") as member:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await listed(member)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await fetch(member, "a" * 64, tmp_path / "out")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admins_may_not_upload(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, target = await start_controller()
    path, sha = artefact(tmp_path, b"planted")
    async with stub(target, fleet_pki, Role.ADMIN, "alice") as admin:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(admin, metadata(sha, 7), path)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stored_artefacts_outlive_a_restart(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, target = await start_controller()
    path, sha = artefact(tmp_path, b"kept across restarts")
    async with stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor:
        await upload(sensor, metadata(sha, path.stat().st_size), path)
    await controller.stop(0)
    _, target = await start_controller()
    async with stub(target, fleet_pki, Role.SENSOR, "edge1") as sensor:
        status = await upload(sensor, metadata(sha, path.stat().st_size), path)
        assert status == artefact_pb2.UPLOAD_STATUS_ALREADY_STORED
