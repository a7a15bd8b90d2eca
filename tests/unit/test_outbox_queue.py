"""The outbox's on-disk queue: links or copies, crash leftovers, content kept once."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from honeyfleet.outboxqueue import Item, OutboxQueue, Queued
from tests.tinydisk import TinyDisks


def item(content: bytes, session: str = "s1", name: str = "f") -> Item:
    return Item(hashlib.sha256(content).hexdigest(), len(content), 1, session, name, 0)


def queue(directory: Path) -> OutboxQueue:
    q = OutboxQueue(directory, max_bytes=10**6, max_items=100)
    q.open()
    return q


def test_content_is_linked_kept_once_and_removed_with_its_last_row(tmp_path: Path) -> None:
    source = tmp_path / "capture"
    source.write_bytes(b"payload")
    q = queue(tmp_path / "outbox")
    first, second = item(b"payload"), item(b"payload", session="s2")
    assert q.put(source, first) is Queued.QUEUED
    assert q.put(source, second) is Queued.QUEUED
    kept = q.path(first.sha256)
    assert kept.stat().st_ino == source.stat().st_ino  # a link, not a second copy
    assert (q.items, q.bytes) == (2, len(b"payload"))
    oldest = q.oldest()
    assert oldest is not None and oldest.session == "s1"
    q.remove(oldest)
    assert kept.exists()  # still named by s2's row
    rest = q.oldest()
    assert rest is not None
    q.remove(rest)
    assert not kept.exists() and (q.items, q.bytes) == (0, 0)
    assert source.read_bytes() == b"payload"  # the role's own copy is untouched


def test_a_crash_leftover_is_removed_and_rows_survive_a_reopen(tmp_path: Path) -> None:
    source = tmp_path / "capture"
    source.write_bytes(b"kept")
    q = queue(tmp_path / "outbox")
    q.put(source, item(b"kept"))
    # Content placed but its row never committed (a crash in between).
    orphan = q.path(hashlib.sha256(b"lost").hexdigest())
    orphan.write_bytes(b"lost")
    q.close()
    again = OutboxQueue(tmp_path / "outbox", max_bytes=10**6, max_items=100)
    assert again.open() == [orphan]
    assert not orphan.exists()
    assert (again.items, again.bytes) == (1, len(b"kept"))
    assert again.oldest() == replace(item(b"kept"), id=1)


def test_content_on_another_file_system_is_copied(tiny_disks: TinyDisks, tmp_path: Path) -> None:
    other = tiny_disks.mount(tmp_path / "other", 1024 * 1024)
    source = other / "capture"
    source.write_bytes(b"across")
    q = queue(tmp_path / "outbox")
    assert q.put(source, item(b"across")) is Queued.QUEUED
    kept = q.path(item(b"across").sha256)
    assert kept.read_bytes() == b"across" and kept.stat().st_dev != source.stat().st_dev
    assert not list(q.content.glob(".*"))  # no partial copy left behind
