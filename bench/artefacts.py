"""Artefact outbox benchmark: what a sensor's uploads cost, against a real controller.

    .venv/bin/python bench/artefacts.py                  # ~1 minute
    .venv/bin/python bench/artefacts.py --files 2000 --big-mib 256

The controller runs as its own process (`honeyfleet controller`); this process is one
sensor's outbox over real mTLS. Three runs, each from the queueing of the first file to
the outbox's empty queue: ``--files`` small captures of 4 KiB (files/second: per-upload
costs), one capture of ``--big-mib`` MiB (MiB/second: the streaming path), and the same
big capture again in another session, which the controller already holds (no content
travels: the cost of a reference). The controller's CPU seconds over each run are
printed too; both processes share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import ControllerProcess, cpu_seconds, issue  # noqa: E402
from honeyfleet.outbox import Outbox, OutboxMetrics  # noqa: E402
from honeyfleet.pki import Role, init_ca  # noqa: E402
from honeyfleet.v1 import artefact_pb2  # noqa: E402

CAPTURE = artefact_pb2.ARTEFACT_KIND_CAPTURE
SMALL = 4096


async def timed(
    outbox: Outbox, controller: ControllerProcess, files: list[Path], session: str
) -> tuple[float, float]:
    """Queue ``files`` and wait until all are delivered; (seconds, controller CPU seconds)."""
    cpu = cpu_seconds(controller.pid)
    started = time.perf_counter()
    for n, path in enumerate(files):
        await outbox.put(path, CAPTURE, session=session, filename=f"capture-{n}")
    await outbox.idle()
    return time.perf_counter() - started, cpu_seconds(controller.pid) - cpu


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hf-bench-artefacts-") as scratch:
        work = Path(scratch)
        ca = init_ca(work / "ca", "bench")
        ctl_tls = issue(ca, work / "tls", Role.CONTROLLER, "ctl")
        sensor_tls = issue(ca, work / "tls", Role.SENSOR, "edge1")
        captures = work / "captures"
        captures.mkdir()
        small = []
        for n in range(args.files):
            path = captures / f"small-{n}"
            path.write_bytes(os.urandom(SMALL))
            small.append(path)
        big = captures / "big"
        with big.open("wb") as f:
            for _ in range(args.big_mib):
                f.write(os.urandom(1024 * 1024))
        (work / "controller").mkdir()
        controller = ControllerProcess(work / "controller", ctl_tls, {})
        async with controller:
            await controller.wait_serving(sensor_tls)
            outbox = Outbox(
                work / "outbox",
                controller.address,
                sensor_tls,
                OutboxMetrics("bench", CollectorRegistry()),
                max_bytes=4 * 1024**3,
                max_files=args.files * 2,
            )
            await outbox.open()
            runner = asyncio.create_task(outbox.run())
            try:
                seconds, cpu = await timed(outbox, controller, small, "s-small")
                print(
                    f"{args.files} captures of {SMALL} B: {seconds:.2f} s, "
                    f"{args.files / seconds:.0f} files/s, controller CPU "
                    f"{cpu / args.files * 1000:.2f} ms/file"
                )
                seconds, cpu = await timed(outbox, controller, [big], "s-big")
                print(
                    f"1 capture of {args.big_mib} MiB: {seconds:.2f} s, "
                    f"{args.big_mib / seconds:.0f} MiB/s, controller CPU {cpu:.2f} s"
                )
                seconds, cpu = await timed(outbox, controller, [big], "s-again")
                print(
                    f"the same {args.big_mib} MiB again (already stored): "
                    f"{seconds * 1000:.0f} ms, controller CPU {cpu * 1000:.0f} ms"
                )
            finally:
                runner.cancel()
                await asyncio.wait([runner])
                await outbox.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="small captures")
    parser.add_argument(
        "--big-mib", type=int, default=100, help="size of the big capture (at most 256)"
    )
    asyncio.run(main(parser.parse_args()))
