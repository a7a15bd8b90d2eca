"""Session recordings: bounded in size, the input's hash complete regardless."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sensor.recording import Recorder


def test_past_its_bound_a_recording_only_hashes_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(tmp_path / "s.cast", width=80, height=24, term="xterm", max_bytes=400)
    typed = b""
    while not recorder.truncated:
        recorder.output(b"o" * 50)
        recorder.input(b"i" * 10)
        typed += b"i" * 10
    size = recorder.size
    encoded: list[Any] = []
    real_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *a, **k: encoded.append(a) or real_dumps(*a, **k))
    for _ in range(100):
        recorder.output(b"more output")
        recorder.input(b"more input")
        recorder.resize(100, 30)
        typed += b"more input"
    monkeypatch.undo()
    assert encoded == []  # nothing is encoded only to be thrown away
    summary = recorder.close()
    assert summary.truncated and summary.size == size == (tmp_path / "s.cast").stat().st_size
    assert summary.shasum == hashlib.sha256(typed).hexdigest()
