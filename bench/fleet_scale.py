"""Fleet scale benchmark: one real controller, N simulated pool nodes and M sensors.

    .venv/bin/python bench/fleet_scale.py --scale 0.1 --duration 20   # a quick look
    .venv/bin/python bench/fleet_scale.py                             # 1x, ~4 minutes
    .venv/bin/python bench/fleet_scale.py --scale 4 --phases idle,mixed

1x is 100 pool nodes, 1,000 sensors, 200 leases/s and 2,000 events/s (issue 12); each
flag overrides its part of the scale. The controller runs as `honeyfleet controller
--config` with a fresh state directory and CA (made here with the project's PKI code);
worker processes (multiprocessing) play the fleet over mTLS on loopback, every member
with its own certificate: see bench/fleet_sim.py for what a node and a sensor do.

Load comes in phases of ``--duration`` seconds, each followed by a bounded drain:
``idle`` (heartbeats only: the baseline), ``events`` (events only), ``leases`` (sessions
only: acquire, hold ``--hold`` s, release) and ``mixed`` (both). Events still spooled
after the drain are abandoned and counted, so one phase's backlog is not paid for in
the next. Controller CPU comes
from /proc/<pid>/stat; CPU per lease and per event subtract the idle phase's rate.
FleetService is asked which nodes are alive and which sensors were seen lately as the
last phase's load ends. The latencies are measured in the workers, so a saturated
simulator inflates them: its CPU and event-loop lag are printed alongside. At 4x the
simulator needs more CPU than the controller; on a small machine the kernel's fair share
then starves the one controller process among the simulator's many, which measures the
machine, not the controller: ``--sim-nice 10`` makes the simulator yield. The machine's
load average is printed too (other work on it takes CPU from the controller). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import ControllerProcess, cpu_seconds, issue, rss_bytes  # noqa: E402
from bench.fleet_sim import Member, Phase, Stats, WorkerPlan, worker_main  # noqa: E402
from honeyfleet.pki import CertificateAuthority, Role, init_ca  # noqa: E402
from honeyfleet.tls import TlsFiles, secure_channel  # noqa: E402
from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc  # noqa: E402
from sensor.config import SensorConfig  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BASE = {"nodes": 100, "sensors": 1000, "lease_rate": 200.0, "event_rate": 2000.0}
PHASES = ("idle", "events", "leases", "mixed")
FLEET = "bench"
SENSORS_PER_WORKER = 500
READY_TIMEOUT = 300.0
DRAIN_MARGIN = 15.0
SEEN_WINDOW = 15.0
# Controller metrics worth a line at the end (overload, liveness, events stored twice).
METRICS = re.compile(r"^honeyfleet_\w*(shed|overload|exhaust|reject|dead|refused|duplicate)\w*")


@dataclasses.dataclass
class PhaseResult:
    """One phase as measured: controller CPU over its wall time, and the merged figures."""

    name: str
    wall: float
    cpu: float
    stats: Stats


def sensor_default(name: str) -> Any:
    """A sensor setting's default, so the simulated sensors behave as deployed ones."""
    return next(f.default for f in dataclasses.fields(SensorConfig) if f.name == name)


def uptime() -> str:
    """The machine's load averages (other helpers share it)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def merge(parts: list[Stats]) -> Stats:
    """The figures of all workers as one."""
    total = Stats()
    for part in parts:
        for what, samples in part.latency.items():
            total.latency.setdefault(what, []).extend(samples)
        total.codes.update(part.codes)
        total.counts.update(part.counts)
        total.details = part.details | total.details
        total.cpu += part.cpu
    return total


def percentiles(samples: list[float]) -> str:
    """p50/p99 in milliseconds, or a dash."""
    if not samples:
        return "-"
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000

    return f"{at(0.5):,.0f} / {at(0.99):,.0f}"


def per_batch(stats: Stats) -> str:
    """Mean events per acknowledged batch (batches fill when acks are slow)."""
    batches = stats.counts["sensor: batches acked"]
    return f"{stats.counts['sensor: events acked'] / batches:.1f}" if batches else "-"


class Workers:
    """The simulator's processes (spawned: gRPC does not survive fork), always cleaned up."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for n, plan in enumerate(plans):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=worker_main, args=(plan, theirs), name=f"fleetbench-{n}", daemon=True
            )
            proc.start()
            theirs.close()
            self._pipes.append(ours)
            self._procs.append(proc)

    async def collect(self, expect: str, within: float) -> list[Any]:
        """One reply of kind ``expect`` from every worker, within ``within`` seconds."""

        def receive(pipe: Connection) -> Any:
            if not pipe.poll(within):
                raise SystemExit(f"a simulator worker sent no {expect!r} within {within:.0f}s")
            kind, body = pipe.recv()
            if kind != expect:
                raise SystemExit(f"a simulator worker sent {kind!r}, expected {expect!r}")
            return body

        return list(await asyncio.gather(*(asyncio.to_thread(receive, p) for p in self._pipes)))

    def send(self, messages: list[tuple[str, object]]) -> None:
        """One command to each worker."""
        for pipe, message in zip(self._pipes, messages, strict=True):
            pipe.send(message)

    def stop(self) -> None:
        """Ask every worker to stop; terminate those that do not within 30 s."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # already gone
                pipe.send(("stop", None))
        deadline = time.monotonic() + 30
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self._pipes:
            pipe.close()


async def fleet_state(address: str, admin: TlsFiles) -> dict[str, Any]:
    """Nodes and sensors as FleetService reports them, plus the fleet's lease counters.

    A controller too swamped to answer is a result too, not the end of the run.
    """
    started = time.monotonic()
    try:
        return await _fleet_state(address, admin)
    except grpc.aio.AioRpcError as e:
        waited = time.monotonic() - started
        return {"FleetService": f"no answer: {e.code().name} after {waited:.0f} s"}


async def _fleet_state(address: str, admin: TlsFiles) -> dict[str, Any]:
    async with secure_channel(address, admin) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        nodes: Counter[str] = Counter()
        token = ""
        for _ in range(1000):
            reply = await stub.ListPoolNodes(
                fleet_pb2.ListPoolNodesRequest(page_size=1000, page_token=token), timeout=30
            )
            nodes.update(fleet_pb2.PoolNodeState.Name(n.state) for n in reply.pool_nodes)
            token = reply.next_page_token
            if not token:
                break
        seen = total = 0
        recent = time.time() - SEEN_WINDOW
        for _ in range(1000):
            sensors = await stub.ListSensors(
                fleet_pb2.ListSensorsRequest(page_size=1000, page_token=token), timeout=30
            )
            total += len(sensors.sensors)
            seen += sum(s.last_seen_time.ToSeconds() >= recent for s in sensors.sensors)
            token = sensors.next_page_token
            if not token:
                break
        stats = await stub.GetFleetStats(fleet_pb2.GetFleetStatsRequest(), timeout=30)
    return {
        "pool nodes alive": nodes["POOL_NODE_STATE_ALIVE"],
        "pool nodes dead": nodes["POOL_NODE_STATE_DEAD"],
        f"sensors seen in the last {SEEN_WINDOW:.0f} s": seen,
        "sensors registered": total,
        "leases issued (store counter)": stats.leases_issued,
        "leases refused (store counter)": stats.leases_refused,
    }


def scrape_metrics(port: int) -> list[str]:
    """The controller's overload and liveness metrics, if it exports any."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError as e:
        return [f"(metrics unavailable: {e})"]
    return [
        line
        for line in text.splitlines()
        if METRICS.match(line) and not re.split(r"[{ ]", line)[0].endswith("_created")
    ]


def git_revision() -> str:
    """The checkout's commit, to tell runs apart."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plans(
    args: argparse.Namespace, address: str, root: Path, ca: CertificateAuthority
) -> list[WorkerPlan]:
    """Certificates for every simulated member, dealt out to the workers."""
    nodes = [
        Member(f"n{i:04d}", issue(ca, root, Role.POOLNODE, f"n{i:04d}")) for i in range(args.nodes)
    ]
    sensors = [
        Member(f"s{i:05d}", issue(ca, root, Role.SENSOR, f"s{i:05d}")) for i in range(args.sensors)
    ]
    count = args.workers or max(1, math.ceil(args.sensors / SENSORS_PER_WORKER))
    return [
        WorkerPlan(
            controller=address,
            fleet=FLEET,
            nodes=tuple(nodes[n::count]),
            sensors=tuple(sensors[n::count]),
            guests=args.guests,
            hold=args.hold,
            idle=args.idle,
            boot=args.boot,
            lease_timeout=float(sensor_default("lease_timeout")),
            upload_batch=int(sensor_default("upload_batch")),
            upload_linger=float(sensor_default("upload_linger")),
            upload_max_linger=float(sensor_default("upload_max_linger")),
            nice=args.sim_nice,
        )
        for n in range(count)
    ]


async def run_phases(
    args: argparse.Namespace,
    workers: Workers,
    worker_plans: list[WorkerPlan],
    pid: int,
    observe: Callable[[], Awaitable[dict[str, Any]]],
) -> tuple[list[PhaseResult], dict[str, Any]]:
    """Every requested phase, one after the other; controller CPU over each.

    ``observe`` runs as the last phase's load ends (before its drain), so liveness is
    judged while the fleet is still busy.
    """
    results = []
    observed: asyncio.Task[dict[str, Any]] | None = None
    drain = worker_plans[0].lease_timeout + args.hold + DRAIN_MARGIN
    for name in args.phases.split(","):
        leases = name in ("leases", "mixed")
        events = name in ("events", "mixed")
        seconds = min(args.duration, 10.0) if name == "idle" else args.duration
        start = time.time() + 1.0
        messages: list[tuple[str, object]] = []
        for plan in worker_plans:
            share = len(plan.sensors) / max(1, args.sensors)
            phase = Phase(
                name=name,
                start=start,
                seconds=seconds,
                lease_rate=args.lease_rate * share if leases else 0.0,
                event_rate=args.event_rate * share if events else 0.0,
                drain=drain,
            )
            messages.append(("phase", phase))
        workers.send(messages)
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu = cpu_seconds(pid)
        print(f"phase {name}: {seconds:.0f} s from {time.strftime('%H:%M:%S')}", flush=True)
        if name == args.phases.split(",")[-1]:
            observed = asyncio.create_task(_after(start + seconds - time.time(), observe))
        parts = await workers.collect("done", seconds + drain + 60)
        result = PhaseResult(name, time.time() - start, cpu_seconds(pid) - cpu, merge(parts))
        results.append(result)
        print(
            f"  {result.wall:.0f} s, controller {result.cpu:.1f} CPU s, "
            f"{result.stats.counts['sensor: leases granted']} leases, "
            f"{result.stats.counts['sensor: events acked']} events",
            flush=True,
        )
    assert observed is not None
    return results, await observed


async def _after(delay: float, job: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, delay))
    return await job()


def report(
    args: argparse.Namespace,
    results: list[PhaseResult],
    end: dict[str, Any],
    memory: int,
    metrics: list[str],
    loads: tuple[str, str],
    workers: int,
) -> None:
    """Print the figures as Markdown tables."""
    print(
        f"\n## fleet_scale: {args.nodes} nodes, {args.sensors} sensors, "
        f"{args.lease_rate:g} leases/s, {args.event_rate:g} events/s "
        f"({args.scale:g}x), {args.duration:g} s a phase, {workers} simulator processes"
        f"{f' (nice +{args.sim_nice})' if args.sim_nice else ''}\n"
    )
    print(f"main: {git_revision()}  \nload average before: {loads[0]}, after: {loads[1]}\n")
    rows: list[tuple[str, list[str]]] = [
        ("wall s (with drain)", [f"{r.wall:.0f}" for r in results]),
        ("controller CPU s", [f"{r.cpu:.1f}" for r in results]),
        ("controller % of a core", [f"{100 * r.cpu / r.wall:.0f}" for r in results]),
        ("simulator CPU s", [f"{r.stats.cpu:.1f}" for r in results]),
        (
            "leases granted / failed",
            [
                f"{r.stats.counts['sensor: leases granted']} / "
                f"{r.stats.counts['sensor: leases failed']}"
                for r in results
            ],
        ),
        ("events acked", [str(r.stats.counts["sensor: events acked"]) for r in results]),
        ("events per acked batch", [per_batch(r.stats) for r in results]),
    ]
    for what, label in (
        ("AcquireLease", "acquire p50 / p99 ms"),
        ("ReleaseLease", "release p50 / p99 ms"),
        ("heartbeat", "heartbeat p50 / p99 ms"),
        ("event ack", "event ack p50 / p99 ms"),
        ("event delivery", "event append to ack p50 / p99 ms"),
        ("sim loop lag", "simulator loop lag p50 / p99 ms"),
    ):
        rows.append((label, [percentiles(r.stats.latency.get(what, [])) for r in results]))
    print("| figure | " + " | ".join(r.name for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")

    idle = next((r for r in results if r.name == "idle"), None)
    base = idle.cpu / idle.wall if idle else 0.0
    print(f"\ncontroller CPU at idle: {100 * base:.1f} % of a core (baseline subtracted below)")
    for name, count_key, unit in (
        ("leases", "sensor: leases granted", "lease"),
        ("events", "sensor: events acked", "event"),
        ("mixed", None, None),
    ):
        phase = next((r for r in results if r.name == name), None)
        if phase is None or count_key is None:
            continue
        done = phase.stats.counts[count_key]
        net = phase.cpu - base * phase.wall
        per = f"{1000 * net / done:.2f} ms" if done else "n/a (none completed)"
        print(f"controller CPU per {unit}: {per} ({net:.1f} s over {done} in the {name} phase)")
    print(f"controller RSS at the end: {memory / 2**20:.0f} MiB")

    print("\n| as the last phase's load ends (FleetService) | |\n|---|---:|")
    for key, value in end.items():
        print(f"| {key} | {value} |")

    keys = sorted({k for r in results for k in (*r.stats.codes, *r.stats.counts)})
    print("\n| calls, errors and counts | " + " | ".join(r.name for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for key in keys:
        cells = [str(r.stats.codes.get(key) or r.stats.counts.get(key) or "") for r in results]
        print(f"| {key} | " + " | ".join(cells) + " |")
    details = {k: v for r in results for k, v in r.stats.details.items()}
    if details:
        print(
            "\nfirst failure of each kind:\n"
            + "\n".join(f"    {k}: {v[:200]}" for k, v in sorted(details.items()))
        )
    if metrics:
        print("\ncontroller metrics at the end:\n" + "\n".join(f"    {m}" for m in metrics))


async def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1x: 100 nodes, 1000 sensors...")
    parser.add_argument("--nodes", type=int, help="pool nodes (default 100 x scale)")
    parser.add_argument("--sensors", type=int, help="sensors (default 1000 x scale)")
    parser.add_argument("--lease-rate", type=float, help="sessions/s (default 200 x scale)")
    parser.add_argument("--event-rate", type=float, help="events/s (default 2000 x scale)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load a phase")
    parser.add_argument("--phases", default=",".join(PHASES), help="among " + ",".join(PHASES))
    parser.add_argument("--guests", type=int, default=20, help="guests per pool node")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds a session holds a lease")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds a released guest idles")
    parser.add_argument("--boot", type=float, default=1.0, help="seconds a new guest boots")
    parser.add_argument("--workers", type=int, default=0, help="simulator processes (0: auto)")
    parser.add_argument(
        "--sim-nice",
        type=int,
        default=0,
        help="niceness added to the simulator's processes (10: the controller gets the CPU "
        "its own host would give it; the simulator's loop lag shows what that costs it)",
    )
    args = parser.parse_args()
    for key, base in BASE.items():
        if getattr(args, key) is None:
            value = base * args.scale
            setattr(args, key, max(1, round(value)) if isinstance(base, int) else value)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    if args.duration > 600:
        parser.error("--duration is at most 600 seconds")

    load_before = uptime()
    with tempfile.TemporaryDirectory(prefix="honeyfleet-fleetbench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        ca = init_ca(root / "ca", FLEET)
        ctl = issue(ca, root, Role.CONTROLLER, "ctl")
        admin = issue(ca, root, Role.ADMIN, "bench")
        metrics_port = free_port()
        settings = {"metrics_listen": f"127.0.0.1:{metrics_port}"}
        async with ControllerProcess(root, ctl, settings) as controller:
            worker_plans = plans(args, controller.address, root, ca)
            print(
                f"{args.nodes + args.sensors + 2} certificates in "
                f"{time.perf_counter() - started:.1f} s; controller pid {controller.pid}",
                flush=True,
            )
            await controller.wait_serving(admin)
            workers = Workers(worker_plans)
            try:
                ready = await workers.collect("ready", READY_TIMEOUT)
                counts: Counter[str] = Counter()
                for part in ready:
                    counts.update(part)
                print(f"fleet up: {dict(counts)}", flush=True)
                results, end = await run_phases(
                    args,
                    workers,
                    worker_plans,
                    controller.pid,
                    lambda: fleet_state(controller.address, admin),
                )
                memory = rss_bytes(controller.pid)
                metrics = await asyncio.to_thread(scrape_metrics, metrics_port)
            finally:
                await asyncio.to_thread(workers.stop)
    report(args, results, end, memory, metrics, (load_before, uptime()), len(worker_plans))


if __name__ == "__main__":
    asyncio.run(main())
