"""Pruning the pool node's downloads/ on a real directory, with a real artefact outbox:
age first, then the budget oldest first, never a file held, queued or new."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.tls import TlsFiles
from honeyfleet.v1 import artefact_pb2
from poolnode import downloads as downloads_module
from poolnode.downloads import Downloads
from poolnode.metrics import PoolMetrics

pytestmark = pytest.mark.timeout(30)

NOW = 1_000_000_000.0
DAY = 86400.0


def put(directory: Path, content: bytes, age: float) -> str:
    """A file named by its sha256, last written ``age`` seconds before NOW."""
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(content).hexdigest()
    path = directory / name
    path.write_bytes(content)
    os.utime(path, (NOW - age, NOW - age))
    return name


@pytest.fixture
async def outbox(tmp_path: Path) -> Outbox:
    box = Outbox(
        tmp_path / "outbox",
        "127.0.0.1:1",  # never reached: nothing runs the upload
        TlsFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"),
        OutboxMetrics("t", CollectorRegistry()),
        max_bytes=10_000_000,
        max_files=10,
    )
    await box.open()
    return box


def pruner(directory: Path, metrics: PoolMetrics, outbox: Outbox, **bounds: float) -> Downloads:
    return Downloads(
        directory,
        max_bytes=int(bounds.get("max_bytes", 10_000)),
        max_age=bounds.get("max_age", 0),
        queued=outbox.queued,
        metrics=metrics,
        clock=lambda: NOW,
    )


async def test_the_oldest_go_until_the_rest_fit(tmp_path: Path, outbox: Outbox) -> None:
    folder = tmp_path / "downloads"
    oldest = put(folder, b"a" * 400, age=3 * DAY)
    older = put(folder, b"b" * 400, age=2 * DAY)
    newer = put(folder, b"c" * 400, age=1 * DAY)
    (folder / "x.part").write_bytes(b"d" * 5000)  # a write in progress: not counted
    metrics = PoolMetrics()

    pruned = await pruner(folder, metrics, outbox, max_bytes=500).prune()

    assert sorted(p.name for p in folder.iterdir()) == sorted([newer, "x.part"])
    assert (pruned.files, pruned.bytes, pruned.left_bytes) == (2, 800, 400)
    assert not (folder / oldest).exists() and not (folder / older).exists()
    sample = metrics.registry.get_sample_value
    assert sample("honeyfleet_poolnode_downloads_pruned_files_total", {"reason": "budget"}) == 2
    assert sample("honeyfleet_poolnode_downloads_pruned_bytes_total", {"reason": "budget"}) == 800
    assert sample("honeyfleet_poolnode_downloads_bytes", {}) == 400


async def test_files_past_the_age_go_even_within_the_budget(tmp_path: Path, outbox: Outbox) -> None:
    folder = tmp_path / "downloads"
    put(folder, b"old", age=8 * DAY)
    young = put(folder, b"young", age=6 * DAY)
    metrics = PoolMetrics()

    pruned = await pruner(folder, metrics, outbox, max_age=7 * DAY).prune()

    assert [p.name for p in folder.iterdir()] == [young]
    assert pruned.files == 1
    sample = metrics.registry.get_sample_value
    assert sample("honeyfleet_poolnode_downloads_pruned_files_total", {"reason": "age"}) == 1


async def test_held_queued_and_new_files_stay_whatever_the_budget(
    tmp_path: Path, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "downloads"
    served = put(folder, b"served" * 50, age=5 * DAY)
    waiting = put(folder, b"waiting" * 50, age=4 * DAY)
    fresh = put(folder, b"fresh" * 50, age=downloads_module.GRACE / 2)
    plain = put(folder, b"plain" * 50, age=3 * DAY)
    await outbox.put(
        folder / waiting, artefact_pb2.ARTEFACT_KIND_DOWNLOAD, session="s1", filename="u"
    )
    downloads = pruner(folder, PoolMetrics(), outbox, max_bytes=0, max_age=DAY)

    with downloads.hold(served):
        pruned = await downloads.prune()

    assert sorted(p.name for p in folder.iterdir()) == sorted([served, waiting, fresh])
    assert (pruned.files, pruned.protected_bytes) == (1, 300 + 350 + 250)
    assert plain not in {p.name for p in folder.iterdir()}
    assert "waiting for upload" in caplog.text
    # Released and uploaded (the outbox forgets it), the old ones go; the new one stays.
    (outbox_content,) = (tmp_path / "outbox").rglob(waiting)
    outbox_content.unlink()
    await downloads.prune()
    assert [p.name for p in folder.iterdir()] == [fresh]


async def test_a_missing_directory_is_empty(tmp_path: Path, outbox: Outbox) -> None:
    pruned = await pruner(tmp_path / "nowhere", PoolMetrics(), outbox).prune()
    assert (pruned.files, pruned.left_bytes) == (0, 0)


def test_a_download_fetched_again_is_young_again(tmp_path: Path) -> None:
    from poolnode.egress.fetch import _store

    name = put(tmp_path, b"payload", age=5 * DAY)
    _store(tmp_path / name, b"payload")
    assert (tmp_path / name).stat().st_mtime > NOW
