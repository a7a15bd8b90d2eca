"""Captures what an attacker pipes into a command run without a terminal (exec, no pty).

Such input is a payload, not typing: a binary for ``cat >.x``, a script for ``sh``,
base64 for ``base64 -d``. As Cowrie does ("stdin is saved as a file in dl/ when using
exec commands"), it is kept raw with the uploads, once by sha256 (:mod:`sensor.capture`:
bounded by ``capture_max_bytes`` and the artefact budget, written off the loop), and
reported when the channel ends; the session's recording keeps the command's output.
That is what an analyst wants of a dropper (the file itself, hashable and sent to the
controller's artefact store), and it costs a copy per chunk where an asciicast input
event costs a UTF-8 decode and a JSON escape of every byte. A command that reads no
input captures nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from sensor.capture import Capture, SessionFiles

# The ``how`` of a stdin capture (``file_captured``), and its name in the artefact store.
STDIN = "stdin"


class StdinObserver:
    """Captures the client's side of one exec channel; hands the capture to ``on_file``
    when the channel ends."""

    def __init__(self, files: SessionFiles, on_file: Callable[[Capture], None]) -> None:
        self._files = files
        self._on_file = on_file
        self._capture: Capture | None = None
        self._refused = False

    def feed(self, data: bytes) -> None:
        """Bytes the client sent (the capture starts with the first)."""
        if self._capture is None:
            if self._refused or not data:
                return
            self._capture = self._files.begin()
            if self._capture is None:  # too many open, or no budget: said by begin()
                self._refused = True
                return
        self._capture.append(data)

    def close(self) -> None:
        """The channel ended: what came is complete (unless the capture was dropped)."""
        capture, self._capture = self._capture, None
        if capture is not None and capture.active:
            self._on_file(capture)
