"""SQL of the PostgreSQL event store: versioned migrations and statements.

``events`` is partitioned by day on ``time``; partitions are created ahead and for any
day a batch needs, and dropped whole for retention. PostgreSQL needs the partition key
in every unique constraint, so the key is ``(hf_event_id, time)``: a resent event carries
the same timestamp (it is part of the verbatim event), so this stores each event once.

The views reproduce Cowrie's SQL output tables (its ``docs/sql/postgres.sql``):
``sessions``, ``auth``, ``input``, ``downloads``, ``ttylog``, ``keyfingerprints``,
``params``, ``ipforwards``, ``ipforwardsdata``, with ``sensors`` and ``clients`` as real
tables; timestamps are UTC ``timestamp`` values as Cowrie writes them.
"""

from __future__ import annotations

from datetime import datetime

from controller.events.query import Dialect
from controller.events.rows import to_micros

# jsonb cannot hold U+0000; such events keep their received text in ``raw``.
NUL = "\x00"
REPLACEMENT = "\ufffd"


def _json_field(key: str) -> str:
    """A top-level field of the event's jsonb, as text."""
    return f"event ->> '{key}'"


def _as_text(expression: str) -> str:
    """An expression cast to text."""
    return f"{expression}::text"


def _time(moment: datetime) -> datetime:
    """timestamptz takes aware datetimes as they are."""
    return moment


def text_in(value: str | None) -> str | None:
    """Attacker-chosen text for a text column, which cannot hold U+0000."""
    return None if value is None else value.replace(NUL, REPLACEMENT)


DIALECT = Dialect(
    param="%s",
    event_time="time",
    session_times=("start_time", "last_time", "end_time"),
    json_field=_json_field,
    address="%s::inet",
    address_text="host(src_ip)",
    as_text=_as_text,
    # jsonb's own text form: the server prints it, the controller never decodes it.
    stored_json="coalesce(raw, event::text)",
    time_in=_time,
    time_out=to_micros,
    text_in=text_in,
)

# Serialises schema changes and partition creation among controllers sharing a store.
SCHEMA_LOCK = 0x686F6E6579  # "honey"

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

# Version n is MIGRATIONS[n - 1]. Never edit one that has shipped; append a new one.
MIGRATIONS = [
    """
    CREATE TABLE events (
        seq bigserial NOT NULL,
        uuid uuid NOT NULL,
        time timestamptz NOT NULL,
        sensor text NOT NULL,
        session text NOT NULL,
        eventid text NOT NULL,
        src_ip inet NOT NULL,
        protocol text NOT NULL,
        event jsonb NOT NULL,
        -- The JSON as received, only when jsonb cannot hold it as is (NUL characters).
        raw text,
        PRIMARY KEY (uuid, time)
    ) PARTITION BY RANGE (time);
    CREATE INDEX events_time ON events (time, seq);
    CREATE INDEX events_session ON events (session, time);
    CREATE INDEX events_src_ip ON events (src_ip, time);
    CREATE INDEX events_eventid ON events (eventid, time);
    CREATE INDEX events_sensor ON events (sensor, time);
    -- Hash: attackers choose usernames, and a B-tree entry has a size limit.
    CREATE INDEX events_username ON events USING hash ((event ->> 'username'))
        WHERE eventid IN ('cowrie.login.success', 'cowrie.login.failed');

    CREATE TABLE event_sessions (
        session text PRIMARY KEY,
        sensor text NOT NULL,
        src_ip inet NOT NULL,
        protocol text NOT NULL,
        start_time timestamptz NOT NULL,
        last_time timestamptz NOT NULL,
        end_time timestamptz,
        pool_node text NOT NULL,
        guest text NOT NULL,
        lease text NOT NULL,
        username text NOT NULL,
        login_attempts integer NOT NULL,
        client_version text,
        terminal_size text,
        event_count bigint NOT NULL
    );
    CREATE INDEX event_sessions_start ON event_sessions (start_time);
    CREATE INDEX event_sessions_sensor ON event_sessions (sensor, start_time);
    CREATE INDEX event_sessions_src_ip ON event_sessions (src_ip, start_time);
    CREATE INDEX event_sessions_last ON event_sessions (last_time);

    CREATE TABLE sensors (id serial PRIMARY KEY, ip text NOT NULL UNIQUE);
    CREATE TABLE clients (id serial PRIMARY KEY, version text NOT NULL);
    CREATE UNIQUE INDEX clients_version ON clients (md5(version));

    CREATE VIEW sessions AS
        SELECT s.session AS id,
               s.start_time AT TIME ZONE 'UTC' AS starttime,
               s.end_time AT TIME ZONE 'UTC' AS endtime,
               se.id AS sensor, host(s.src_ip) AS ip, s.terminal_size AS termsize,
               c.id AS client
        FROM event_sessions s
        JOIN sensors se ON se.ip = s.sensor
        LEFT JOIN clients c ON md5(c.version) = md5(s.client_version);
    CREATE VIEW auth AS
        SELECT seq AS id, session, eventid = 'cowrie.login.success' AS success,
               event ->> 'username' AS username, event ->> 'password' AS password,
               time AT TIME ZONE 'UTC' AS timestamp
        FROM events WHERE eventid IN ('cowrie.login.success', 'cowrie.login.failed');
    CREATE VIEW input AS
        SELECT seq AS id, session, time AT TIME ZONE 'UTC' AS timestamp,
               NULL::varchar(50) AS realm, eventid = 'cowrie.command.input' AS success,
               event ->> 'input' AS input
        FROM events WHERE eventid IN ('cowrie.command.input', 'cowrie.command.failed');
    CREATE VIEW downloads AS
        SELECT seq AS id, session, time AT TIME ZONE 'UTC' AS timestamp,
               coalesce(event ->> 'url', event ->> 'filename') AS url,
               event ->> 'outfile' AS outfile, event ->> 'shasum' AS shasum
        FROM events
        WHERE eventid IN ('cowrie.session.file_download', 'cowrie.session.file_upload');
    CREATE VIEW ttylog AS
        SELECT seq AS id, session, event ->> 'ttylog' AS ttylog,
               CASE WHEN jsonb_typeof(event -> 'size') = 'number'
                    THEN (event -> 'size')::numeric END AS size
        FROM events WHERE eventid = 'cowrie.log.closed';
    CREATE VIEW keyfingerprints AS
        SELECT seq AS id, session, event ->> 'username' AS username,
               event ->> 'fingerprint' AS fingerprint
        FROM events WHERE eventid = 'cowrie.client.fingerprint';
    CREATE VIEW params AS
        SELECT seq AS id, session, event ->> 'arch' AS arch
        FROM events WHERE eventid = 'cowrie.session.params';
    """,
]

MIGRATIONS.append(
    # Events older than the partition window (a long spool backlog, a lying clock) share
    # this one partition: no sensor can make the store create a partition per past day.
    "CREATE TABLE IF NOT EXISTS events_old PARTITION OF events DEFAULT"
)

# The delivery id is ``hf_event_id`` (an event's ``uuid`` is now its sensor's identity, as
# in Cowrie); the primary key follows the column.
MIGRATIONS.append("ALTER TABLE events RENAME COLUMN uuid TO hf_event_id")

# Cowrie's ipforwards and ipforwardsdata tables.
MIGRATIONS.append(
    """
    CREATE VIEW ipforwards AS
        SELECT seq AS id, session, time AT TIME ZONE 'UTC' AS timestamp,
               event ->> 'dst_ip' AS dst_ip,
               CASE WHEN jsonb_typeof(event -> 'dst_port') = 'number'
                    THEN (event -> 'dst_port')::numeric END AS dst_port
        FROM events WHERE eventid = 'cowrie.direct-tcpip.request';
    CREATE VIEW ipforwardsdata AS
        SELECT seq AS id, session, time AT TIME ZONE 'UTC' AS timestamp,
               event ->> 'dst_ip' AS dst_ip,
               CASE WHEN jsonb_typeof(event -> 'dst_port') = 'number'
                    THEN (event -> 'dst_port')::numeric END AS dst_port,
               event ->> 'data' AS data
        FROM events WHERE eventid = 'cowrie.direct-tcpip.data'
    """
)

INSERT_EVENTS = """
INSERT INTO events (hf_event_id, time, sensor, session, eventid, src_ip, protocol, event, raw)
SELECT * FROM unnest(
    %s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::inet[],
    %s::text[], %s::text[]::jsonb[], %s::text[])
ON CONFLICT (hf_event_id, time) DO NOTHING
RETURNING hf_event_id
"""

UPSERT_SESSION = """
INSERT INTO event_sessions AS s (session, sensor, src_ip, protocol, start_time, last_time,
    end_time, pool_node, guest, lease, username, login_attempts, client_version,
    terminal_size, event_count)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (session) DO UPDATE SET
    start_time = least(s.start_time, excluded.start_time),
    last_time = greatest(s.last_time, excluded.last_time),
    end_time = coalesce(excluded.end_time, s.end_time),
    pool_node = CASE WHEN excluded.pool_node <> '' THEN excluded.pool_node ELSE s.pool_node END,
    guest = CASE WHEN excluded.guest <> '' THEN excluded.guest ELSE s.guest END,
    lease = CASE WHEN excluded.lease <> '' THEN excluded.lease ELSE s.lease END,
    username = CASE WHEN excluded.username <> '' THEN excluded.username ELSE s.username END,
    login_attempts = s.login_attempts + excluded.login_attempts,
    client_version = coalesce(excluded.client_version, s.client_version),
    terminal_size = coalesce(excluded.terminal_size, s.terminal_size),
    event_count = s.event_count + excluded.event_count
"""

INSERT_SENSOR = "INSERT INTO sensors (ip) VALUES (%s) ON CONFLICT (ip) DO NOTHING"
INSERT_CLIENT = "INSERT INTO clients (version) VALUES (%s) ON CONFLICT (md5(version)) DO NOTHING"

LIST_PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
"""

# Bytes of every events partition (with indexes and TOAST) and of the sessions table.
SIZE = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)
    + pg_total_relation_size('event_sessions'::regclass)
FROM pg_inherits i WHERE i.inhparent = 'events'::regclass
"""

# Rows of a partition as the planner estimates them (no scan; -1 when never analysed).
ESTIMATED_ROWS = "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass"

CHUNK = 10_000
# Retention in the shared old partition, one chunk per statement: (cutoff, chunk).
EXPIRE_OLD_EVENTS = """
DELETE FROM events_old WHERE ctid IN (SELECT ctid FROM events_old WHERE time < %s LIMIT %s)
"""
# Sessions whose last event is older than a cutoff, one chunk per statement: (cutoff, chunk).
EXPIRE_SESSIONS = """
DELETE FROM event_sessions WHERE session IN
    (SELECT session FROM event_sessions WHERE last_time < %s LIMIT %s)
"""
