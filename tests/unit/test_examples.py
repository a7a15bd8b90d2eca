"""The shipped example configs and systemd units stay valid as the code changes."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from honeyfleet.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name
)
def test_example_config_is_valid(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(example)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "unit", sorted((ROOT / "contrib" / "systemd").glob("*.service")), ids=lambda p: p.name
)
def test_systemd_unit_runs_its_role_with_notify(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    role = unit.stem.removeprefix("honeyfleet-")
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[1:3] == [role, "--config"]
    assert "HUP" in service["ExecReload"]
    assert service["StateDirectory"] == f"honeyfleet/{role}"
