"""The sensor's identity (Cowrie's uuid): configured, or made once and kept."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from honeyfleet.config import ConfigProblems, parse_section
from honeyfleet.instance import instance_uuid
from sensor.config import SensorConfig


def test_a_made_identity_is_kept_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = instance_uuid("", state)
    assert str(uuid.UUID(made)) == made
    assert instance_uuid("", state) == made  # a restart reads it back
    assert (state / "uuid").read_text().strip() == made


def test_a_configured_identity_wins_and_is_checked(tmp_path: Path) -> None:
    assert instance_uuid("edge-3-prod", tmp_path) == "edge-3-prod"
    assert not (tmp_path / "uuid").exists()
    config = parse_section(SensorConfig, "sensor", {"uuid": "edge-3"}, base_dir=tmp_path, env={})
    assert config.uuid == "edge-3"
    with pytest.raises(ConfigProblems) as e:
        parse_section(SensorConfig, "sensor", {"uuid": "two words"}, base_dir=tmp_path, env={})
    assert [p.key for p in e.value.problems] == ["sensor.uuid"]
