"""What `up` tells its operator while it works: progress bars on a terminal, plain
lines when its output is piped or logged (where rich would print nothing until the end).
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class Report:
    """Progress of named steps (``guest image``, ``guests booting``) and messages."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bars = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
            )
            if console.is_terminal
            else None
        )
        self._tasks: dict[str, TaskID] = {}
        self._lines: dict[str, str] = {}
        self._started = time.monotonic()

    def __enter__(self) -> Report:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def step(self, what: str, done: int, total: int | None, detail: str = "") -> None:
        """Progress of one step: a bar, or a line each time the step's state changes."""
        description = f"{what}: {detail}" if detail else what
        if self._bars is not None:
            if what not in self._tasks:
                self._tasks[what] = self._bars.add_task(description, total=total)
            self._bars.update(
                self._tasks[what], description=description, completed=done, total=total
            )
            return
        line = f"{description} {done}/{total if total is not None else '?'}"
        if self._lines.get(what) != line:
            self._lines[what] = line
            self.say(f"[{time.monotonic() - self._started:5.0f}s] {line}")

    def say(self, text: str) -> None:
        """A message (above the bars on a terminal); printed as it is, not as markup."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """A message that needs the operator's attention."""
        self.console.print(text, style="yellow", markup=False, highlight=False, soft_wrap=True)
