"""Tests for honeyfleet.pki.revocation: revoke, cheap refresh, and corrupt-file tolerance."""

from __future__ import annotations

import json
import logging
import stat
import threading
from pathlib import Path

import pytest

from honeyfleet.pki import RevocationError, RevocationList, revocation, write_private


def test_missing_file_is_empty(tmp_path: Path) -> None:
    """No file means nothing is revoked, and refresh stays quiet."""
    rl = RevocationList(tmp_path / "revoked.json")
    assert rl.serials() == frozenset()
    assert not rl.is_revoked(1)
    assert rl.refresh() is False


def test_revoke_persists_atomically(tmp_path: Path) -> None:
    """revoke writes the documented JSON (0600) and another reader sees it."""
    path = tmp_path / "revoked.json"
    rl = RevocationList(path)
    assert rl.revoke(0xABC, "  host\n decommissioned ") is True
    assert rl.is_revoked(0xABC)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert list(data) == ["abc"]
    assert data["abc"]["reason"] == "host decommissioned"
    assert data["abc"]["revoked_at"].endswith("+00:00")
    other = RevocationList(path)
    assert other.serials() == frozenset({0xABC})
    assert other.entries()[0xABC].reason == "host decommissioned"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_revoke_twice_keeps_first_record(tmp_path: Path) -> None:
    """Revoking an already revoked serial returns False and keeps the original reason."""
    rl = RevocationList(tmp_path / "revoked.json")
    assert rl.revoke(5, "first")
    assert rl.revoke(5, "second") is False
    assert rl.entries()[5].reason == "first"


def test_revoke_merges_with_other_writers(tmp_path: Path) -> None:
    """A stale instance re-reads before writing, so no one else's revocation is lost."""
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    a.revoke(1, "a")
    b.revoke(2, "b")  # b never refreshed, but must keep serial 1
    assert RevocationList(path).serials() == frozenset({1, 2})


def test_concurrent_revokes_all_kept(tmp_path: Path) -> None:
    """Concurrent writers are serialised by the lock file."""
    path = tmp_path / "revoked.json"

    def worker(start: int) -> None:
        """Revoke ten serials through a private instance."""
        rl = RevocationList(path)
        for serial in range(start, start + 10):
            rl.revoke(serial, "bulk")

    threads = [threading.Thread(target=worker, args=(n * 100 + 1,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(RevocationList(path).serials()) == 40


@pytest.mark.parametrize("serial", [0, -1, True])
def test_revoke_rejects_bad_serial(tmp_path: Path, serial: int) -> None:
    """Serials are positive integers."""
    with pytest.raises(RevocationError, match="positive integer"):
        RevocationList(tmp_path / "r.json").revoke(serial, "x")


def test_refresh_detects_change(tmp_path: Path) -> None:
    """refresh returns True only when the set of serials changed."""
    path = tmp_path / "revoked.json"
    server = RevocationList(path)
    assert server.refresh() is False
    RevocationList(path).revoke(7, "compromised")
    assert server.refresh() is True
    assert server.is_revoked(7)
    assert server.refresh() is False  # unchanged file: no re-read, no change


def test_refresh_sees_deletion(tmp_path: Path) -> None:
    """A removed file is an empty list (as documented)."""
    path = tmp_path / "revoked.json"
    RevocationList(path).revoke(9, "x")
    server = RevocationList(path)
    path.unlink()
    assert server.refresh() is True
    assert server.serials() == frozenset()


def test_refresh_is_cheap_when_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the file's stamp is unchanged, refresh does not read it again."""
    path = tmp_path / "revoked.json"
    RevocationList(path).revoke(3, "x")
    server = RevocationList(path)

    def must_not_read(path: Path) -> None:
        raise AssertionError(f"{path} was re-read although unchanged")

    monkeypatch.setattr(revocation, "_read_file", must_not_read)
    assert server.refresh() is False
    assert server.is_revoked(3)


def test_corrupt_file_keeps_previous_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bad hand edit is logged once, naming the file, and old revocations stay in force."""
    path = tmp_path / "revoked.json"
    server = RevocationList(path)
    RevocationList(path).revoke(0x42, "x")
    assert server.refresh() is True
    write_private(path, b"{not json", overwrite=True)
    with caplog.at_level(logging.WARNING, logger="honeyfleet.pki.revocation"):
        assert server.refresh() is False
        assert server.refresh() is False  # same bad file: no second warning
    assert server.is_revoked(0x42)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    # Once fixed, refresh picks it up again.
    write_private(
        path, b'{"43": {"reason": "y", "revoked_at": "2025-01-01T00:00:00"}}', overwrite=True
    )
    assert server.refresh() is True
    assert server.serials() == frozenset({0x43})


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"zz": {"reason": "x", "revoked_at": "2025-01-01T00:00:00+00:00"}}',
        b'{"0x1": {"reason": "x", "revoked_at": "2025-01-01T00:00:00+00:00"}}',
        b'{"1": "revoked"}',
        b'{"1": {"reason": 5, "revoked_at": "2025-01-01T00:00:00+00:00"}}',
        b'{"1": {"reason": "x", "revoked_at": "yesterday"}}',
    ],
)
def test_corrupt_file_fails_construction_and_revoke(tmp_path: Path, content: bytes) -> None:
    """At start-up a corrupt list is an error (fail closed); revoke never overwrites it."""
    path = tmp_path / "revoked.json"
    running = RevocationList(path)  # loaded while the file was still absent
    path.write_bytes(content)
    with pytest.raises(RevocationError, match=str(path)):
        RevocationList(path)
    with pytest.raises(RevocationError):
        running.revoke(1, "x")
    assert path.read_bytes() == content
