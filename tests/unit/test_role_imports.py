"""A role's long-running process imports only what it runs: each module stays in its
memory for good (issue 15: a sensor's idle memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from honeyfleet.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
# What only the operator tools (and Telnet) need.
TOOLS = ("rich", "fleetup.up", "honeyfleet.eventscli", "honeyfleet.artefactscli")
TELNET = ("telnetlib3", "wcwidth", "sensor.telnet")
# The other roles' modules: loading every role's plugin imported their configs.
OTHER_ROLES = ("poolnode.role", "poolnode.config", "controller.role", "controller.config")


def imported_after(code: str) -> set[str]:
    """Which of TOOLS, TELNET and OTHER_ROLES a fresh interpreter has imported after ``code``."""
    names = TOOLS + TELNET + OTHER_ROLES
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {names!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_a_role_command_parses_without_the_operator_tools() -> None:
    code = (
        "from honeyfleet.cli import build_parser, _command\n"
        "argv = ['-v', 'sensor', '--config', 'honeyfleet.toml']\n"
        "args = build_parser(_command(argv)).parse_args(argv)\n"
        "assert args.command == 'sensor' and args.verbose == 1, args\n"
        "import sensor.service"
    )
    assert imported_after(code) == set()


def test_the_full_parser_still_has_every_command() -> None:
    assert imported_after("from honeyfleet.cli import build_parser; build_parser()") >= set(TOOLS)
    usage = build_parser().format_help()
    for command in ("sensor", "poolnode", "controller", "events", "artefacts", "replay", "up"):
        assert f"    {command} " in usage


def test_a_role_command_keeps_its_join_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sensor", "join", "--help"])
    assert exited.value.code == 0
    assert "--token-file" in capsys.readouterr().out
