"""Play an asciicast v2 recording back in a terminal with its original timing.

Recordings are made by sensors (:mod:`sensor.recording`) and fetched from the
controller's artefact store by ``honeyfleet replay SESSION`` (:mod:`honeyfleet.artefactscli`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from honeyfleet.errors import InvalidArgument


def read_cast(path: Path) -> tuple[dict[str, Any], Iterator[tuple[float, str, str]]]:
    """The header and the events of an asciicast v2 file; InvalidArgument if it is not one."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"cannot open {path}: {e.strerror}") from None
    first = handle.readline()
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("version") != 2:
        handle.close()
        raise InvalidArgument(f"{path} is not an asciicast v2 recording")

    def events() -> Iterator[tuple[float, str, str]]:
        with handle:
            for number, line in enumerate(handle, start=2):
                try:
                    at, kind, text = json.loads(line)
                except ValueError:
                    raise InvalidArgument(f"{path}:{number}: not an asciicast event") from None
                yield float(at), str(kind), str(text)

    return header, events()


def play(
    path: Path,
    out: IO[str],
    *,
    speed: float = 1.0,
    max_idle: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write a recording's output to ``out``, pausing as recorded (scaled by ``speed``).

    Pauses longer than ``max_idle`` seconds (after scaling) are shortened to it.
    """
    _, events = read_cast(path)
    last = 0.0
    for at, kind, text in events:
        if kind != "o":  # input is echoed by the guest, so output already shows it
            continue
        delay = max(at - last, 0.0) / speed
        if max_idle is not None:
            delay = min(delay, max_idle)
        if delay > 0:
            sleep(delay)
        out.write(text)
        out.flush()
        last = at
