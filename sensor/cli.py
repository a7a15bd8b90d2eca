"""Sensor commands: ``honeyfleet replay FILE`` plays a session recording back."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any


def positive_float(text: str) -> float:
    """argparse type: a number above zero."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_parsers(commands: Any) -> None:
    """Add ``replay`` to the top-level command parser."""
    p = commands.add_parser("replay", help="play a session recording (asciicast) back")
    p.add_argument("file", type=Path, help="a recording from the sensor's state_dir/tty")
    p.add_argument("--speed", type=positive_float, default=1.0, help="play faster (2 = twice)")
    p.add_argument(
        "--max-idle", type=positive_float, default=None, help="shorten pauses to this many seconds"
    )
    p.set_defaults(func=replay)


def replay(args: argparse.Namespace) -> int:
    """Play a recording to stdout with its original timing."""
    from sensor.replay import play

    with contextlib.suppress(BrokenPipeError):  # e.g. piped into `head`
        play(args.file, sys.stdout, speed=args.speed, max_idle=args.max_idle)
    return 0
