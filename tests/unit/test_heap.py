"""honeyfleet.heap: freed C heap goes back to the system (issue 15: a sensor's RSS after
a burst of sessions)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from honeyfleet import heap

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: 40 MB of malloc'd blocks, all freed but the last, which keeps
# glibc from shrinking its heap's top by itself; prints RssAnon (kB) before and after.
PROBE = """
from pathlib import Path
from honeyfleet.heap import release_free_heap

def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

blocks = [bytes(4000) for _ in range(10_000)]
last = blocks[-1]
del blocks
before = anon()
assert release_free_heap()
print(before, anon())
"""


def test_freed_heap_is_returned_to_the_system() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    before, after = (int(kb) for kb in result.stdout.split())
    assert before - after > 20_000, (before, after)


async def test_the_first_release_comes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    released = asyncio.Event()
    monkeypatch.setattr(heap, "release_free_heap", released.set)
    task = asyncio.create_task(heap.release_periodically(3600))
    try:
        async with asyncio.timeout(10):  # far below the interval
            await released.wait()
    finally:
        task.cancel()
