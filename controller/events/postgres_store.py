"""The shared event store: PostgreSQL through psycopg 3 (``pip install honeyfleet[postgres]``).

The controller creates and migrates the schema itself (``schema_migrations`` records
applied versions), keeps events verbatim as ``jsonb`` with typed, indexed columns,
partitions them by day and drops whole partitions for retention. A small connection
pool reconnects by itself, so the store comes back on its own after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from controller.events import postgres_sql as sql
from controller.events.query import QueryBuilder, SqlQueries, Statement
from controller.events.rows import EventRow, client_versions, first_new, summarise_sessions
from controller.events.store import StoreDataError
from honeyfleet.errors import ConfigError, Unavailable
from honeyfleet.events import to_json

log = logging.getLogger(__name__)

POOL_MAX = 4
# Seconds to wait for a connection before reporting the store unavailable.
CONNECT_TIMEOUT = 5
PARTITIONS_AHEAD = 2
PARTITION_NAME = re.compile(r"events_p(\d{8})")


class PostgresEventStore(SqlQueries):
    """Events in PostgreSQL, possibly shared by several controllers."""

    kind = "postgres"
    queries = QueryBuilder(sql.DIALECT)

    def __init__(self, dsn: str, *, retention_days: int = 0, partition_days: int = 30) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            raise ConfigError("postgres_dsn", f"not a valid libpq DSN or URI: {e}") from None
        # Where the store is, for messages; never the password.
        self.where = (
            f"postgresql://{params.get('host', 'localhost')}:{params.get('port', 5432)}"
            f"/{params.get('dbname', '')}"
        )
        self._retention_days = retention_days
        # Events older than this get no daily partition of their own (see events_old);
        # never longer than retention, whose dropped days must not be created again.
        self._partition_days = (
            min(partition_days, retention_days) if retention_days > 0 else partition_days
        )
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=POOL_MAX,
            open=False,
            timeout=CONNECT_TIMEOUT,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            check=AsyncConnectionPool.check_connection,
            name="honeyfleet-events",
        )
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()
        self._partitions: set[date] = set()

    async def open(self) -> None:
        """Start the pool and migrate; an unreachable server only logs (ingest waits)."""
        await self._pool.open(wait=False)
        try:
            await self.ping()
        except Unavailable as e:
            log.warning("event store not reachable yet, will keep trying: %s", e)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection with the schema in place; psycopg errors become ours."""
        try:
            async with self._pool.connection() as conn:
                if not self._schema_ready:
                    await self._migrate(conn)
                yield conn
        except psycopg.errors.CheckViolation as e:
            # No partition for a row: one was dropped (retention elsewhere) since cached.
            self._partitions.clear()
            raise Unavailable(f"event store {self.where}: {e}; retrying") from e
        except psycopg.errors.UndefinedTable as e:
            self._schema_ready = False
            self._partitions.clear()
            raise Unavailable(f"event store {self.where}: {e}; re-creating the schema") from e
        except (psycopg.DataError, psycopg.IntegrityError) as e:
            raise StoreDataError(f"event store {self.where} refused the data: {e}") from e
        except psycopg.Error as e:
            raise Unavailable(f"event store {self.where}: {e}") from e

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Apply migrations not yet recorded in schema_migrations (once per process)."""
        async with self._schema_lock:
            if self._schema_ready:
                return
            cursor = await conn.execute("SHOW server_encoding")
            encoding = await cursor.fetchone()
            if encoding is None or encoding[0] != "UTF8":
                # Attackers send any Unicode; other encodings would refuse some events.
                raise Unavailable(
                    f"event store {self.where}: database encoding is {encoding and encoding[0]}, "
                    "honeyfleet needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
                )
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (sql.SCHEMA_LOCK,))
                await conn.execute(sql.MIGRATIONS_TABLE)
                cursor = await conn.execute(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations"
                )
                row = await cursor.fetchone()
                current = row[0] if row else 0
                for version, script in enumerate(sql.MIGRATIONS[current:], start=current + 1):
                    log.info("event store %s: applying schema version %d", self.where, version)
                    await conn.execute(script)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
            self._schema_ready = True

    async def ping(self) -> None:
        """Check the server answers and the schema is in place."""
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    # Writing

    async def write_batch(self, rows: Sequence[EventRow]) -> set[str]:
        """Store rows and their session summaries in one transaction."""
        oldest = datetime.now(UTC).date() - timedelta(days=self._partition_days)
        days = {day for row in rows if (day := row.time.date()) >= oldest} - self._partitions
        async with self._connection() as conn:
            if days:
                await self._create_partitions(conn, days)
            async with conn.transaction():
                cursor = await conn.execute(sql.INSERT_EVENTS, _columns(rows))
                stored = {str(id_) for (id_,) in await cursor.fetchall()}
                new = first_new(rows, stored)
                async with conn.cursor() as cur:
                    await cur.executemany(
                        sql.UPSERT_SESSION,
                        [self.queries.session_params(d) for d in summarise_sessions(new)],
                    )
                    await cur.executemany(
                        sql.INSERT_SENSOR, [(s,) for s in {r.sensor for r in new}]
                    )
                    await cur.executemany(
                        sql.INSERT_CLIENT, [(sql.text_in(v),) for v in client_versions(new)]
                    )
        return stored

    async def _create_partitions(self, conn: psycopg.AsyncConnection[Any], days: set[date]) -> None:
        """Create the daily partitions for ``days`` unless they exist.

        A day events_old already holds rows of (the window was widened) keeps its rows
        there: PostgreSQL refuses the partition, and the day is not asked for again.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (sql.SCHEMA_LOCK,))
            for day in sorted(days):
                start = datetime.combine(day, time(), UTC)
                try:
                    async with conn.transaction():  # a savepoint: one refusal, not all
                        await conn.execute(
                            pgsql.SQL(
                                "CREATE TABLE IF NOT EXISTS {} PARTITION OF events "
                                "FOR VALUES FROM ({}) TO ({})"
                            ).format(
                                pgsql.Identifier(f"events_p{day:%Y%m%d}"),
                                pgsql.Literal(start),
                                pgsql.Literal(start + timedelta(days=1)),
                            )
                        )
                except psycopg.errors.CheckViolation:
                    log.info(
                        "event store %s: events of %s stay in events_old, which holds some",
                        self.where,
                        day,
                    )
        self._partitions |= days

    async def maintain(self, now: datetime) -> None:
        """Create partitions ahead; drop partitions and sessions older than retention."""
        today = now.astimezone(UTC).date()
        ahead = {today + timedelta(days=n) for n in range(-1, PARTITIONS_AHEAD + 1)}
        async with self._connection() as conn:
            await self._create_partitions(conn, ahead)
            if self._retention_days <= 0:
                return
            cutoff = today - timedelta(days=self._retention_days)
            cursor = await conn.execute(sql.LIST_PARTITIONS)
            for (name,) in await cursor.fetchall():
                match = PARTITION_NAME.fullmatch(name)
                if match is None:
                    continue
                day = datetime.strptime(match[1], "%Y%m%d").date()
                if day < cutoff:
                    log.info("event store %s: dropping partition %s (retention)", self.where, name)
                    await conn.execute(pgsql.SQL("DROP TABLE {}").format(pgsql.Identifier(name)))
                    self._partitions.discard(day)
            expired = datetime.combine(cutoff, time(), UTC)
            for statement in (sql.EXPIRE_OLD_EVENTS, sql.EXPIRE_SESSIONS):
                while await self._delete_chunk(conn, statement, expired) >= sql.CHUNK:
                    pass

    @staticmethod
    async def _delete_chunk(
        conn: psycopg.AsyncConnection[Any], statement: str, cutoff: datetime
    ) -> int:
        """Run one chunked DELETE (its own transaction); rows deleted."""
        cursor = await conn.execute(statement, (cutoff, sql.CHUNK))
        return cursor.rowcount

    async def size(self) -> int:
        """Bytes of the events partitions and the sessions table."""
        async with self._connection() as conn:
            cursor = await conn.execute(sql.SIZE)
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def delete_oldest(self) -> int:
        """Empty the oldest data: the shared old partition, else the oldest past day.

        PostgreSQL returns a table's space only when the table goes, so the budget
        works a partition at a time (today's and later ones are never dropped).
        """
        today = datetime.now(UTC).date()
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM (SELECT 1 FROM events_old LIMIT 1) x")
            row = await cursor.fetchone()
            if row and row[0]:
                return await self._drop(conn, "events_old", truncate=True)
            cursor = await conn.execute(sql.LIST_PARTITIONS)
            days = sorted(
                (datetime.strptime(m[1], "%Y%m%d").date(), name)
                for (name,) in await cursor.fetchall()
                if (m := PARTITION_NAME.fullmatch(name))
            )
            past = [(day, name) for day, name in days if day < today]
            if not past:
                return 0
            day, name = past[0]
            deleted = await self._drop(conn, name, truncate=False)
            self._partitions.discard(day)
            # Sessions whose every event is gone.
            following = datetime.combine(day + timedelta(days=1), time(), UTC)
            while await self._delete_chunk(conn, sql.EXPIRE_SESSIONS, following) >= sql.CHUNK:
                pass
            return deleted

    async def _drop(self, conn: psycopg.AsyncConnection[Any], name: str, *, truncate: bool) -> int:
        """Drop (or empty) one partition for the budget; its estimated rows."""
        cursor = await conn.execute(sql.ESTIMATED_ROWS, (name,))
        row = await cursor.fetchone()
        rows = int(row[0]) if row else 0
        log.warning(
            "event store %s: over store_max_bytes, %s partition %s (~%d events)",
            self.where,
            "emptying" if truncate else "dropping",
            name,
            rows,
        )
        verb = "TRUNCATE {}" if truncate else "DROP TABLE {}"
        await conn.execute(pgsql.SQL(verb).format(pgsql.Identifier(name)))
        # An estimate of 0 (never analysed) still freed space: count it as one.
        return max(rows, 1)

    # Reading

    async def _fetch_all(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run SELECTs on one pooled connection and return each one's rows."""
        async with self._connection() as conn:
            out = []
            for statement in statements:
                cursor = await conn.execute(statement.text, statement.args)
                out.append(await cursor.fetchall())
            return out


def _columns(rows: Sequence[EventRow]) -> tuple[list[Any], ...]:
    """The batch as one array per column, for a single INSERT ... SELECT FROM unnest.

    Events go as the JSON text received (the server parses it into jsonb), so the
    controller does not encode them again; only text with NUL escapes, which jsonb
    cannot hold, is re-encoded with the NULs replaced (the original kept in ``raw``).
    """
    events: list[str] = []
    raws: list[str | None] = []
    for row in rows:
        if "\\u0000" in row.json:
            events.append(to_json(_without_nul(row.event)))
            raws.append(row.json)
        else:
            events.append(row.json)
            raws.append(None)
    return (
        [r.hf_event_id for r in rows],
        [r.time for r in rows],
        [r.sensor for r in rows],
        [r.session for r in rows],
        [r.eventid for r in rows],
        [r.src_ip for r in rows],
        [r.protocol for r in rows],
        events,
        raws,
    )


def _without_nul(value: Any) -> Any:
    """A copy of a JSON value with U+0000 replaced in every string (keys too)."""
    if isinstance(value, str):
        return value.replace(sql.NUL, sql.REPLACEMENT)
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
