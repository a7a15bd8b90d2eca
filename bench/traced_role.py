"""``honeyfleet <role> ...`` under tracemalloc, for bench/sensor_memory.py.

    python -m bench.traced_role sensor --config honeyfleet.toml

Each SIGUSR1 writes a snapshot (after a garbage collection) to
``$HF_TRACEMALLOC_OUT.<n>`` (n = 0, 1, ...) and then appends a line to
``$HF_TRACEMALLOC_OUT.done``, which the caller polls. ``$HF_TRACEMALLOC_FRAMES``
frames are kept per allocation (default 25: enough to reach the project's code from
inside asyncssh or asyncio).
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = int(os.environ.get("HF_TRACEMALLOC_FRAMES", "25"))


def main() -> int:
    """Trace, install the handler, run the role as the `honeyfleet` command would."""
    out = os.environ["HF_TRACEMALLOC_OUT"]
    numbers = itertools.count()
    tracemalloc.start(FRAMES)

    def dump(_signum: int, _frame: FrameType | None) -> None:
        gc.collect()
        tracemalloc.take_snapshot().dump(f"{out}.{next(numbers)}")
        with Path(f"{out}.done").open("a") as done:
            done.write("dumped\n")

    signal.signal(signal.SIGUSR1, dump)
    from honeyfleet.cli import main as honeyfleet

    return honeyfleet(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
