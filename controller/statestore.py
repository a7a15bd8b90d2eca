"""The controller's durable state (registry, sensors, leases, used join tokens) in SQLite.

All access goes through one dedicated thread holding the only connection, so the
event loop never blocks on disk and SQLite never sees two writers. Lease changes and
counters are group-committed: every change queued while one transaction is being
written goes into the next, so a burst of leases costs one fsync, not one each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from controller.models import LeaseRecord, LeaseState, PoolNodeRecord, SensorRecord

T = TypeVar("T")
Statements = list[tuple[str, tuple[Any, ...]]]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pool_nodes (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    labels TEXT NOT NULL,
    share_guests INTEGER NOT NULL,
    version TEXT NOT NULL,
    backend TEXT NOT NULL,
    draining INTEGER NOT NULL,
    register_time REAL NOT NULL,
    last_heartbeat_time REAL
);
CREATE TABLE IF NOT EXISTS sensors (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    listen_addresses TEXT NOT NULL,
    hostname TEXT NOT NULL,
    first_seen_time REAL NOT NULL,
    last_seen_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    pool_node TEXT NOT NULL,
    pool_node_address TEXT NOT NULL,
    guest TEXT NOT NULL,
    sensor TEXT NOT NULL,
    src_ip TEXT NOT NULL,
    protocol INTEGER NOT NULL,
    session TEXT NOT NULL,
    shared INTEGER NOT NULL,
    state INTEGER NOT NULL,
    create_time REAL NOT NULL,
    expire_time REAL NOT NULL,
    end_time REAL,
    end_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_state ON leases (state);
CREATE TABLE IF NOT EXISTS used_tokens (
    jti TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    used_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

LEASE_COLUMNS = (
    "id, pool_node, pool_node_address, guest, sensor, src_ip, protocol, session, shared, "
    "state, create_time, expire_time, end_time, end_reason"
)

LEASE_FILTERS = frozenset({"pool_node", "sensor", "src_ip", "state"})

SAVE_NODE = "INSERT OR REPLACE INTO pool_nodes VALUES (?,?,?,?,?,?,?,?,?,?)"
SAVE_SENSOR = "INSERT OR REPLACE INTO sensors VALUES (?,?,?,?,?,?)"
SAVE_LEASE = (
    f"INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (id) DO UPDATE SET state=excluded.state, "
    "expire_time=excluded.expire_time, end_time=excluded.end_time, "
    "end_reason=excluded.end_reason"
)
ADD_COUNTER = (
    "INSERT INTO counters VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


class StateStore:
    """Durable controller state. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-db")
        self._db: sqlite3.Connection | None = None
        self._group: list[tuple[Statements, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Create the database file and schema if needed."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        """Commit queued writes, close the database and its thread."""
        await self.flush()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def flush(self) -> None:
        """Wait until every queued write is committed."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    def _queue(self, statements: Statements) -> asyncio.Future[None]:
        """Queue statements for the next group commit; the future resolves once committed.

        Failures are logged here; a caller that awaits the future sees them too.
        """
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_failure)
        self._group.append((statements, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="state group commit")
        return future

    async def _flush(self) -> None:
        """Commit queued groups, one transaction each, until the queue is empty."""
        while self._group:
            group, self._group = self._group, []
            try:
                await self._run(self._transaction, [st for sts, _ in group for st in sts])
            except Exception as e:  # every waiter learns of it; the queue goes on
                for _, future in group:
                    if not future.done():
                        future.set_exception(e)
            else:
                for _, future in group:
                    if not future.done():
                        future.set_result(None)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "StateStore used before open()"
        return self._db

    # Pool nodes

    async def save_node(self, node: PoolNodeRecord) -> None:
        """Insert or replace a pool node's registration."""
        await self._run(self._execute, SAVE_NODE, _node_row(node))

    async def save_nodes_and_sensors(
        self, nodes: list[PoolNodeRecord], sensors: list[SensorRecord]
    ) -> None:
        """Insert or replace several nodes and sensors in one transaction."""
        statements = [(SAVE_NODE, _node_row(node)) for node in nodes]
        statements += [(SAVE_SENSOR, _sensor_row(sensor)) for sensor in sensors]
        await self._run(self._transaction, statements)

    async def delete_node(self, name: str) -> None:
        """Forget a pool node's registration."""
        await self._run(self._execute, "DELETE FROM pool_nodes WHERE name = ?", (name,))

    async def load_nodes(self) -> list[PoolNodeRecord]:
        """Every registered pool node."""
        rows = await self._run(self._query, "SELECT * FROM pool_nodes ORDER BY name", ())
        return [
            PoolNodeRecord(
                name=r[0],
                address=r[1],
                capacity=r[2],
                labels=json.loads(r[3]),
                share_guests=bool(r[4]),
                version=r[5],
                backend=r[6],
                draining=bool(r[7]),
                register_time=r[8],
                last_heartbeat_time=r[9],
            )
            for r in rows
        ]

    # Sensors

    async def save_sensor(self, sensor: SensorRecord) -> None:
        """Insert or replace a sensor."""
        await self._run(self._execute, SAVE_SENSOR, _sensor_row(sensor))

    async def load_sensors(self) -> list[SensorRecord]:
        """Every sensor ever seen."""
        rows = await self._run(self._query, "SELECT * FROM sensors ORDER BY name", ())
        return [
            SensorRecord(
                name=r[0],
                version=r[1],
                listen_addresses=json.loads(r[2]),
                hostname=r[3],
                first_seen_time=r[4],
                last_seen_time=r[5],
            )
            for r in rows
        ]

    # Leases

    def save_lease(self, lease: LeaseRecord, *, counter: str | None = None) -> asyncio.Future[None]:
        """Queue the insert or update of a lease as it is now; resolves once committed.

        With ``counter``, that persistent counter goes up by one in the same transaction.
        Callers that need the lease durable before they answer await the result.
        """
        statements: Statements = [(SAVE_LEASE, _lease_row(lease))]
        if counter is not None:
            statements.append((ADD_COUNTER, (counter, 1)))
        return self._queue(statements)

    async def load_active_leases(self) -> list[LeaseRecord]:
        """Leases still active (after a restart)."""
        rows = await self._run(
            self._query,
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE state=? ORDER BY seq",
            (LeaseState.ACTIVE.value,),
        )
        return [_lease_from_row(r) for r in rows]

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        """One lease by id, active or ended."""
        rows = await self._run(
            self._query, f"SELECT {LEASE_COLUMNS} FROM leases WHERE id=?", (lease_id,)
        )
        return _lease_from_row(rows[0]) if rows else None

    async def list_leases(
        self, *, before_seq: int | None, limit: int, filters: dict[str, Any]
    ) -> list[tuple[int, LeaseRecord]]:
        """A page of leases, newest first, with their sequence numbers for paging."""
        where = ["1=1"]
        args: list[Any] = []
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        for column, value in filters.items():
            if column not in LEASE_FILTERS:
                raise ValueError(f"cannot filter leases by {column!r}")
            where.append(f"{column} = ?")
            args.append(value)
        rows = await self._run(
            self._query,
            f"SELECT seq, {LEASE_COLUMNS} FROM leases WHERE {' AND '.join(where)} "
            "ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        )
        return [(r[0], _lease_from_row(r[1:])) for r in rows]

    # Join tokens and counters

    async def use_token(self, jti: str, identity: str, now: float) -> bool:
        """Record a join token as used; False if it was used before."""
        try:
            await self._run(
                self._execute, "INSERT INTO used_tokens VALUES (?,?,?)", (jti, identity, now)
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def add_counter(self, name: str, delta: int = 1) -> asyncio.Future[None]:
        """Queue an addition to a persistent counter; resolves once committed."""
        return self._queue([(ADD_COUNTER, (name, delta))])

    async def counters(self) -> dict[str, int]:
        """Every persistent counter."""
        rows = await self._run(self._query, "SELECT name, value FROM counters", ())
        return {r[0]: r[1] for r in rows}

    def _execute(self, sql: str, args: tuple[Any, ...]) -> None:
        self._conn().execute(sql, args)

    def _transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run statements in one transaction (all or none)."""
        db = self._conn()
        with db:
            db.execute("BEGIN")
            for sql, args in statements:
                db.execute(sql, args)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._conn().execute(sql, args).fetchall()


def _node_row(node: PoolNodeRecord) -> tuple[Any, ...]:
    return (
        node.name,
        node.address,
        node.capacity,
        json.dumps(node.labels, sort_keys=True),
        int(node.share_guests),
        node.version,
        node.backend,
        int(node.draining),
        node.register_time,
        node.last_heartbeat_time,
    )


def _sensor_row(sensor: SensorRecord) -> tuple[Any, ...]:
    return (
        sensor.name,
        sensor.version,
        json.dumps(sensor.listen_addresses),
        sensor.hostname,
        sensor.first_seen_time,
        sensor.last_seen_time,
    )


def _log_failure(future: asyncio.Future[None]) -> None:
    """Log a failed group commit (and mark the error retrieved)."""
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error("controller state not saved: %r", error)


def _lease_row(lease: LeaseRecord) -> tuple[Any, ...]:
    return (
        lease.id,
        lease.pool_node,
        lease.pool_node_address,
        lease.guest,
        lease.sensor,
        lease.src_ip,
        lease.protocol,
        lease.session,
        int(lease.shared),
        lease.state.value,
        lease.create_time,
        lease.expire_time,
        lease.end_time,
        lease.end_reason,
    )


def _lease_from_row(r: tuple[Any, ...]) -> LeaseRecord:
    return LeaseRecord(
        id=r[0],
        pool_node=r[1],
        pool_node_address=r[2],
        guest=r[3],
        sensor=r[4],
        src_ip=r[5],
        protocol=r[6],
        session=r[7],
        shared=bool(r[8]),
        state=LeaseState(r[9]),
        create_time=r[10],
        expire_time=r[11],
        end_time=r[12],
        end_reason=r[13],
    )
