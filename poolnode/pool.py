"""The generic guest pool: allocation rules and upkeep, independent of the backend.

Upkeep runs every ``health_interval`` (and whenever something changes), in this order:
time out idle guests, health-check live ones, recycle old ones, replenish to
``max_vms``. Booting happens in tasks of its own, at most ``max_parallel_boots`` at
once; a guest becomes pristine only once the node has logged into it over SSH
(:mod:`poolnode.guest_login`). That warm login lasts as long as the guest and is its
health check: a guest whose login is lost is destroyed and replaced.
All guest state changes happen on the event loop, so allocation needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import asyncssh

from honeyfleet.errors import NotFound, PermissionDenied, ResourceExhausted, Unavailable
from honeyfleet.v1 import common_pb2, registry_pb2
from poolnode.backend import Backend
from poolnode.config import PoolNodeConfig
from poolnode.diskdiff import DiskDiffer
from poolnode.egress import Egress
from poolnode.events import NodeEvents
from poolnode.guest import Guest, GuestState, LeaseHold
from poolnode.guest_login import LoginRefused, LoginSettings, WarmLogin, log_in
from poolnode.metrics import PoolMetrics
from poolnode.service import Allocation

log = logging.getLogger(__name__)


class Closable(Protocol):
    """What a lease's tunnels and sessions are cut with."""

    def close(self) -> None:
        """Close it now."""


# A login into a guest that has just started its SSH server (~2.5 s under TCG).
LOGIN_TIMEOUT = 20.0
BOOT_POLL = 1.0


class GuestPool:
    """Keeps ``max_vms`` guests and leases them by the fleet's rules."""

    def __init__(self, config: PoolNodeConfig, backend: Backend) -> None:
        self.config = config
        self._backend = backend
        self.metrics = PoolMetrics()
        self._on_change: Callable[[], None] = lambda: None
        # Goes up with every change of guests or leases; heartbeats carry it (see
        # HeartbeatRequest.table_version) so the controller can order them against
        # the answers to its own allocations and releases.
        self.table_version = 1
        self.guests: dict[str, Guest] = {}
        self._login = LoginSettings(
            config.backend_user, config.backend_pass, keepalive_interval=config.health_interval
        )
        self._leases: dict[str, Guest] = {}
        self._boots: set[asyncio.Task[None]] = set()
        self._destroying: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._upkeep: asyncio.Task[None] | None = None
        # Tunnels and sessions are cut when their lease ends or their guest goes.
        self._tunnels: dict[str, set[Closable]] = {}
        self.events: NodeEvents | None = None
        """Where the node's events go (set by the node before start; None: not reported)."""
        self.disk_diff: DiskDiffer | None = None
        """Diffs used guests' disks when they are destroyed (set before start; None: off)."""
        self.egress: Egress | None = None
        """Applies the egress policy to guests' traffic (set before start; None: the
        backend's network alone decides)."""

    @property
    def capacity(self) -> int:
        """Guests kept alive."""
        limit = self._backend.max_guests
        return min(self.config.max_vms, limit) if limit is not None else self.config.max_vms

    @property
    def backend(self) -> str:
        """The backend's name."""
        return self._backend.name

    def set_on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when guests change in ways the controller cannot know of.

        Allocations and releases are the controller's own doing: it learns their effect
        from the answer, so they never trigger an early heartbeat.
        """
        self._on_change = callback

    async def start(self) -> None:
        """Prepare the backend and start upkeep."""
        await self._backend.start()
        try:
            # Before the first guest boots: its first DNS query is already contained.
            if self.egress is not None:
                await self.egress.start()
            if self.disk_diff is not None:
                await self.disk_diff.start()
        except BaseException:
            await self._stop_services()
            raise
        self._upkeep = asyncio.create_task(self._upkeep_loop())

    async def stop(self) -> None:
        """Stop upkeep and destroy every guest."""
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        for task in list(self._boots):
            task.cancel()
        await asyncio.gather(*self._boots, return_exceptions=True)
        await asyncio.gather(
            *(self._destroy(g, "pool node stopping") for g in list(self.guests.values()))
        )
        await asyncio.gather(*self._destroying, return_exceptions=True)
        await self._stop_services()

    async def _stop_services(self) -> None:
        """Stop what runs beside the guests, then the backend."""
        if self.disk_diff is not None:
            await self.disk_diff.stop()
        if self.egress is not None:
            await self.egress.stop()
        await self._backend.stop()

    def guest_at(self, address: str) -> str | None:
        """The id of the guest with this network address, if any."""
        for guest in self.guests.values():
            if guest.address == address:
                return guest.id
        return None

    def address_of_mac(self, mac: str) -> str | None:
        """The network address of the guest with this MAC (the libvirt backend's), if any."""
        for guest in self.guests.values():
            if getattr(guest.handle, "mac", None) == mac:
                return guest.address
        return None

    # Leases

    async def allocate(
        self,
        lease_id: str,
        src_ip: str,
        sensor: str,
        *,
        allow_shared: bool,
        session: str = "-",
        protocol: str = "-",
    ) -> Allocation:
        """Lease the attacker's own guest, else a pristine one, else (if allowed) a shared one."""
        if lease_id in self._leases:
            raise ResourceExhausted(f"lease {lease_id} already allocated")
        live = [g for g in self.guests.values() if g.state in (GuestState.LEASED, GuestState.IDLE)]
        guest = next((g for g in live if src_ip in g.src_ips), None)
        if guest is None:
            pristine = [g for g in self.guests.values() if g.state is GuestState.PRISTINE]
            # The oldest first: it is the next one recycling would replace anyway.
            guest = min(pristine, key=lambda g: g.created, default=None)
        if guest is None and allow_shared and self.config.share_guests:
            guest = min(live, key=lambda g: (len(g.leases), g.created), default=None)
        if guest is None:
            raise ResourceExhausted("no pristine guest left on this node")
        hold = LeaseHold(lease_id, sensor, src_ip, time.time(), session, protocol)
        guest.hold(hold)
        self._leases[lease_id] = guest
        if self.events is not None:
            self.events.leased(guest.id, hold)
        log.info("lease %s: %s from %s on guest %s", lease_id, sensor, src_ip, guest.id)
        self._changed(tell_controller=False)
        # SSH runs on the node's own login: only a Telnet client needs the credentials.
        credentials = (
            common_pb2.GuestCredentials(
                username=self.config.backend_user, password=self.config.backend_pass
            )
            if protocol == "telnet"
            else common_pb2.GuestCredentials()
        )
        return Allocation(
            guest=guest.to_proto(),
            credentials=credentials,
            shared=len(guest.src_ips) > 1,
            table_version=self.table_version,
        )

    async def release(self, lease_id: str, reason: str) -> int:
        """End a lease and cut its tunnels; unknown leases are ignored.

        Returns the table version once released.
        """
        guest = self._leases.pop(lease_id, None)
        if guest is None:
            return self.table_version
        guest.drop(lease_id)
        self._cut_tunnels(lease_id)
        if self.events is not None:
            self.events.released(guest.id, lease_id, reason)
        log.info("lease %s released from guest %s: %s", lease_id, guest.id, reason)
        self._changed(tell_controller=False)
        return self.table_version

    def lease_sensor(self, lease_id: str) -> str | None:
        """The sensor a live lease was issued to."""
        guest = self._leases.get(lease_id)
        hold = guest.leases.get(lease_id) if guest else None
        return hold.sensor if hold else None

    def _held_guest(self, lease_id: str, sensor: str) -> Guest:
        """The guest of ``lease_id``, if ``sensor`` holds that lease."""
        guest = self._leases.get(lease_id)
        hold = guest.leases.get(lease_id) if guest else None
        if guest is None or hold is None:
            raise NotFound(f"no lease {lease_id[:64]!r} on this node")
        if hold.sensor != sensor:
            log.warning("%s tried to reach lease %s of %s", sensor, lease_id, hold.sensor)
            raise PermissionDenied(f"lease {lease_id} was not issued to {sensor}")
        return guest

    def tunnel_target(self, lease_id: str, sensor: str, port: int) -> tuple[str, int]:
        """Where a tunnel for ``lease_id`` goes, if ``sensor`` holds that lease."""
        guest = self._held_guest(lease_id, sensor)
        if guest.address is None:
            raise Unavailable(f"guest {guest.id} has no address")
        ssh, telnet = self._backend.ports(guest.handle)
        return guest.address, ssh if port == common_pb2.GUEST_PORT_SSH else telnet

    def session_login(self, lease_id: str, sensor: str) -> WarmLogin:
        """The warm login SSH sessions of ``lease_id`` run on, if ``sensor`` holds it."""
        guest = self._held_guest(lease_id, sensor)
        if guest.login is None or guest.login.lost is not None:
            raise Unavailable(f"guest {guest.id} has lost its SSH login")
        return guest.login

    def track_tunnel(self, lease_id: str, tunnel: Closable) -> Callable[[], None]:
        """Register a tunnel's guest connection or session channel; returns the function
        that unregisters it.

        The lease may have ended while it was being opened: then nothing would ever cut
        it, so it is closed here and refused.
        """
        if lease_id not in self._leases:
            tunnel.close()
            raise NotFound(f"lease {lease_id[:64]!r} ended while its tunnel was opening")
        self._tunnels.setdefault(lease_id, set()).add(tunnel)
        self.metrics.tunnels.inc()

        def untrack() -> None:
            tunnels = self._tunnels.get(lease_id)
            if tunnels is not None and tunnel in tunnels:
                tunnels.discard(tunnel)
                self.metrics.tunnels.dec()
                if not tunnels:
                    del self._tunnels[lease_id]

        return untrack

    def snapshot(self) -> registry_pb2.HeartbeatRequest:
        """The guest table for heartbeats."""
        counts = common_pb2.GuestCounts()
        for guest in self.guests.values():
            match guest.state:
                case GuestState.BOOTING:
                    counts.booting += 1
                case GuestState.PRISTINE:
                    counts.pristine += 1
                case GuestState.LEASED:
                    counts.leased += 1
                case GuestState.IDLE:
                    counts.idle += 1
                case GuestState.DESTROYED:
                    pass
        return registry_pb2.HeartbeatRequest(
            guest_counts=counts,
            guests=[g.to_proto() for g in self.guests.values()],
            lease_ids=sorted(self._leases),
            table_version=self.table_version,
        )

    # Upkeep

    def _changed(self, *, tell_controller: bool = True) -> None:
        """Bump the table version, refresh metrics, wake upkeep; heartbeat soon if asked."""
        self.table_version += 1
        for state in GuestState:
            if state is not GuestState.DESTROYED:
                count = sum(g.state is state for g in self.guests.values())
                self.metrics.guests.labels(state.name.lower()).set(count)
        self.metrics.leases.set(len(self._leases))
        self._wake.set()
        if tell_controller:
            self._on_change()

    async def _upkeep_loop(self) -> None:
        while True:
            try:
                await self.upkeep()
            except Exception:
                log.exception("pool upkeep failed; retrying in %.0fs", self.config.health_interval)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that races with the event, and stop() would hang.
                async with asyncio.timeout(self.config.health_interval):
                    await self._wake.wait()

    async def upkeep(self) -> None:
        """One pass: time out, health-check, recycle, replenish."""
        now = time.time()
        timeout = self.config.unused_timeout
        for guest in list(self.guests.values()):
            if guest.state is GuestState.IDLE and now - guest.changed > timeout:
                await self._destroy(guest, f"unused for {timeout:.0f}s (unused_timeout)")
        await self._health_check()
        self._recycle(now)
        await self._retire_one()
        self._replenish()

    async def _health_check(self) -> None:
        """Destroy guests whose VM died or whose warm login was lost."""
        checked = [
            g
            for g in self.guests.values()
            if g.state in (GuestState.PRISTINE, GuestState.LEASED, GuestState.IDLE)
        ]

        async def check(guest: Guest) -> None:
            if not await self._backend.alive(guest.handle):
                self.metrics.health_failures.labels("domain").inc()
                await self._destroy(guest, "health check: its VM is no longer running")
                return
            # Keepalives run on the login, so a guest that hangs loses it too.
            if guest.login is None or guest.login.lost is not None:
                why = guest.login.lost if guest.login is not None else "never logged in"
                self.metrics.health_failures.labels("ssh").inc()
                await self._destroy(guest, f"health check: its SSH login was lost ({why})")

        await asyncio.gather(*(check(g) for g in checked))

    def _recycle(self, now: float) -> None:
        """Replace one old pristine or idle guest at a time, never a leased one.

        The old guest is only marked here; it is destroyed once its replacement is
        ready (see _retire_one), so pristine capacity never drops because of a recycle.
        """
        period = self.config.recycle_period
        if not period or any(g.retiring for g in self.guests.values()):
            return
        due = [
            g
            for g in self.guests.values()
            if g.state in (GuestState.PRISTINE, GuestState.IDLE) and now - g.created > period
        ]
        if due:
            oldest = min(due, key=lambda g: g.created)
            oldest.retiring = True
            log.info("guest %s is older than recycle_period: booting its replacement", oldest.id)

    def _replenish(self) -> None:
        """Boot guests until max_vms live ones (plus a replacement for a retiring one)."""
        live = [g for g in self.guests.values() if g.state is not GuestState.DESTROYED]
        target = self.capacity + sum(g.retiring for g in live)
        if self._backend.max_guests is not None:
            target = min(target, self._backend.max_guests)
        missing = target - len(live)
        room = self.config.max_parallel_boots - len(self._boots)
        for _ in range(max(0, min(missing, room))):
            guest_id = f"{self.config.guest_tag}-{secrets.token_hex(4)}"
            task = asyncio.create_task(self._boot(guest_id), name=f"boot {guest_id}")
            self._boots.add(task)
            task.add_done_callback(self._boots.discard)

    async def _boot(self, guest_id: str) -> None:
        """Create a guest and wait for its SSH banner, within boot_timeout."""
        started = time.monotonic()
        try:
            handle = await self._backend.create(guest_id)
        except Exception as e:
            log.warning("guest %s could not be created: %s", guest_id, e)
            await asyncio.sleep(self.config.health_interval)  # don't spin on a broken backend
            return
        guest = Guest(guest_id, handle)
        self.guests[guest_id] = guest
        self._changed()
        try:
            failure = await self._wait_ready(guest, started)
        except Exception as e:
            # The backend failed (libvirt went away...): a guest left booting would
            # count as live forever, so it goes and upkeep boots another.
            log.warning("guest %s: the backend failed while it booted: %r", guest_id, e)
            if guest.state is GuestState.BOOTING:
                await self._destroy(guest, f"boot failed: {e}")
            await asyncio.sleep(self.config.health_interval)  # don't spin on a broken backend
            return
        if failure is not None:
            await self._destroy(guest, failure)
            return
        guest.move(GuestState.PRISTINE)
        self.metrics.boot_seconds.observe(time.monotonic() - started)
        log.info(
            "guest %s pristine at %s after %.1fs",
            guest_id,
            guest.address,
            time.monotonic() - started,
        )
        self._changed()
        await self._retire_one()

    async def _wait_ready(self, guest: Guest, started: float) -> str | None:
        """None once the node is logged into the guest within boot_timeout; else why not.

        A guest with no address boot_silence_timeout after its start is asked about once:
        if the backend sees no sign of life at all, waiting out boot_timeout is pointless.
        Refused credentials end the wait at once: they will not change.
        """
        ssh, _ = self._backend.ports(guest.handle)
        config = self.config
        deadline = started + config.boot_timeout
        silence = started + (config.boot_silence_timeout or config.boot_timeout)
        asked = False
        last = "no address"
        while (left := deadline - time.monotonic()) > 0:
            guest.address = guest.address or await self._backend.address(guest.handle)
            if guest.address:
                try:
                    async with asyncio.timeout(min(left, LOGIN_TIMEOUT)):
                        guest.login = await log_in(
                            guest.id, guest.address, ssh, self._login, self._wake.set
                        )
                    return None
                except LoginRefused as e:
                    return f"login refused: {e}"
                except (asyncssh.Error, OSError, TimeoutError) as e:
                    last = f"no SSH login at {guest.address}:{ssh} ({str(e) or type(e).__name__})"
            if not await self._backend.alive(guest.handle):
                break
            if not asked and not guest.address and time.monotonic() >= silence:
                asked = True
                if (why := await self._backend.hung(guest.handle)) is not None:
                    log.error(
                        "guest %s is hung: %.0fs after its start, %s",
                        guest.id,
                        time.monotonic() - started,
                        why,
                    )
                    return f"hung: {why}"
            await asyncio.sleep(BOOT_POLL)
        return f"{last} within {config.boot_timeout:.0f}s"

    async def _retire_one(self) -> None:
        """Once more guests are ready than kept, destroy one being recycled, if unused.

        Nothing is awaited between the check and _destroy marking the guest destroyed,
        so no allocation can lease it in between.
        """
        ready = [g for g in self.guests.values() if g.state is not GuestState.BOOTING]
        if len(ready) <= self.capacity:
            return
        for guest in ready:
            if guest.retiring and guest.state in (GuestState.PRISTINE, GuestState.IDLE):
                await self._destroy(guest, "recycled (recycle_period)")
                return

    async def _destroy(self, guest: Guest, reason: str) -> None:
        """Take a guest out of the pool, fail its leases, cut its tunnels, free its VM."""
        if guest.state is GuestState.DESTROYED:
            return
        guest.move(GuestState.DESTROYED)
        self.guests.pop(guest.id, None)
        if guest.login is not None:
            guest.login.close()
        for lease_id in list(guest.leases):
            self._leases.pop(lease_id, None)
            self._cut_tunnels(lease_id)
            if self.events is not None:
                self.events.released(guest.id, lease_id, reason)
        if self.events is not None:
            self.events.destroyed(guest.id, reason, used=bool(guest.history))
        log.info("guest %s destroyed: %s", guest.id, reason)
        self.metrics.destroyed.labels(reason.split(":")[0].split(" (")[0][:40]).inc()
        self._changed()
        keep = self._snapshot_dir(guest, reason) if self.config.save_snapshots else None
        diff = self.disk_diff if guest.history else None
        if diff is not None and keep is None:
            keep = diff.scratch(guest.id)
        # The guest is out of the table already: a cancelled caller (upkeep or a boot,
        # when the node stops) must not stop its VM being freed; stop() awaits the task.
        task = asyncio.create_task(self._free(guest, keep, diff), name=f"destroy {guest.id}")
        self._destroying.add(task)
        task.add_done_callback(self._destroying.discard)
        await asyncio.shield(task)

    async def _free(self, guest: Guest, keep: Path | None, diff: DiskDiffer | None) -> None:
        """Free the guest's VM; hand its disk to the diff, which deletes it unless kept."""
        try:
            await self._backend.destroy(guest.handle, keep)
        except Exception:
            log.exception("guest %s: backend failed to destroy it", guest.id)
            return
        if diff is not None and keep is not None:
            diff.submit(guest.id, keep, delete=not self.config.save_snapshots)

    def _snapshot_dir(self, guest: Guest, reason: str) -> Path | None:
        """Write the snapshot's metadata; returns where the backend should keep the disk."""
        if not guest.history:
            return None  # never used by an attacker: nothing worth keeping
        directory = self.config.snapshots
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = directory / f"{guest.id}-{stamp}"
        meta = {
            "guest": guest.id,
            "created": guest.created,
            "destroyed": time.time(),
            "reason": reason,
            "src_ips": guest.src_ips,
            "leases": [
                {"lease": h.lease_id, "sensor": h.sensor, "src_ip": h.src_ip, "since": h.since}
                for h in guest.history
            ],
        }
        base.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return base.with_suffix(".qcow2")

    def _cut_tunnels(self, lease_id: str) -> None:
        for tunnel in self._tunnels.pop(lease_id, set()):
            tunnel.close()
            self.metrics.tunnels.dec()
