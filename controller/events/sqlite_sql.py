"""SQL of the SQLite event store: schema migrations and statements.

Times are integer microseconds since the epoch (``*_us``); ``seq`` is the rowid, so it
grows in arrival order. The views reproduce Cowrie's SQL output tables (its
``docs/sql/sqlite3.sql``, ``ipforwards`` and ``ipforwardsdata`` included): timestamps as
the ISO text Cowrie's sqlite output stores (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, UTC),
``sessions.sensor`` and ``sessions.client`` as ids into the ``sensors`` and ``clients``
tables.
"""

from __future__ import annotations

from controller.events.query import Dialect
from controller.events.rows import to_micros


def _json_field(key: str) -> str:
    """A top-level field of the event's JSON text."""
    return f"json_extract(json, '$.{key}')"


def _same(value: str) -> str:
    """SQLite compares any value with text as is."""
    return value


def _keep(value: str | None) -> str | None:
    """SQLite text columns hold any text, U+0000 included."""
    return value


DIALECT = Dialect(
    param="?",
    event_time="time_us",
    session_times=("start_us", "last_us", "end_us"),
    json_field=_json_field,
    address="?",
    address_text="src_ip",
    as_text=_same,
    stored_json="json",
    time_in=to_micros,
    time_out=int,
    text_in=_keep,
)

# Each entry upgrades the schema by one version (PRAGMA user_version); never edit one
# that has shipped, append a new one.
MIGRATIONS = [
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        time_us INTEGER NOT NULL,
        sensor TEXT NOT NULL,
        session TEXT NOT NULL,
        eventid TEXT NOT NULL,
        src_ip TEXT NOT NULL,
        protocol TEXT NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX events_time ON events (time_us);
    CREATE INDEX events_session ON events (session, time_us);
    CREATE INDEX events_src_ip ON events (src_ip, time_us);
    CREATE INDEX events_eventid ON events (eventid, time_us);
    CREATE INDEX events_sensor ON events (sensor, time_us);
    CREATE INDEX events_username ON events (json_extract(json, '$.username'))
        WHERE eventid IN ('cowrie.login.success', 'cowrie.login.failed');

    CREATE TABLE event_sessions (
        session TEXT PRIMARY KEY,
        sensor TEXT NOT NULL,
        src_ip TEXT NOT NULL,
        protocol TEXT NOT NULL,
        start_us INTEGER NOT NULL,
        last_us INTEGER NOT NULL,
        end_us INTEGER,
        pool_node TEXT NOT NULL,
        guest TEXT NOT NULL,
        lease TEXT NOT NULL,
        username TEXT NOT NULL,
        login_attempts INTEGER NOT NULL,
        client_version TEXT,
        terminal_size TEXT,
        event_count INTEGER NOT NULL
    );
    CREATE INDEX event_sessions_start ON event_sessions (start_us);
    CREATE INDEX event_sessions_sensor ON event_sessions (sensor, start_us);
    CREATE INDEX event_sessions_src_ip ON event_sessions (src_ip, start_us);
    CREATE INDEX event_sessions_last ON event_sessions (last_us);

    -- Cowrie's own tables: sensor names and client versions by integer id.
    CREATE TABLE sensors (id INTEGER PRIMARY KEY, ip TEXT NOT NULL UNIQUE);
    CREATE TABLE clients (id INTEGER PRIMARY KEY, version TEXT NOT NULL UNIQUE);

    CREATE VIEW sessions AS
        SELECT s.session AS id,
               datetime(s.start_us / 1000000, 'unixepoch') AS starttime,
               datetime(s.end_us / 1000000, 'unixepoch') AS endtime,
               se.id AS sensor, s.src_ip AS ip, s.terminal_size AS termsize, c.id AS client
        FROM event_sessions s
        JOIN sensors se ON se.ip = s.sensor
        LEFT JOIN clients c ON c.version = s.client_version;
    CREATE VIEW auth AS
        SELECT seq AS id, session, eventid = 'cowrie.login.success' AS success,
               json_extract(json, '$.username') AS username,
               json_extract(json, '$.password') AS password,
               datetime(time_us / 1000000, 'unixepoch') AS timestamp
        FROM events WHERE eventid IN ('cowrie.login.success', 'cowrie.login.failed');
    CREATE VIEW input AS
        SELECT seq AS id, session, datetime(time_us / 1000000, 'unixepoch') AS timestamp,
               NULL AS realm, eventid = 'cowrie.command.input' AS success,
               json_extract(json, '$.input') AS input
        FROM events WHERE eventid IN ('cowrie.command.input', 'cowrie.command.failed');
    CREATE VIEW downloads AS
        SELECT seq AS id, session, datetime(time_us / 1000000, 'unixepoch') AS timestamp,
               coalesce(json_extract(json, '$.url'), json_extract(json, '$.filename')) AS url,
               json_extract(json, '$.outfile') AS outfile,
               json_extract(json, '$.shasum') AS shasum
        FROM events
        WHERE eventid IN ('cowrie.session.file_download', 'cowrie.session.file_upload');
    CREATE VIEW ttylog AS
        SELECT seq AS id, session, json_extract(json, '$.ttylog') AS ttylog,
               json_extract(json, '$.size') AS size
        FROM events WHERE eventid = 'cowrie.log.closed';
    CREATE VIEW keyfingerprints AS
        SELECT seq AS id, session, json_extract(json, '$.username') AS username,
               json_extract(json, '$.fingerprint') AS fingerprint
        FROM events WHERE eventid = 'cowrie.client.fingerprint';
    CREATE VIEW params AS
        SELECT seq AS id, session, json_extract(json, '$.arch') AS arch
        FROM events WHERE eventid = 'cowrie.session.params';
    """,
]

# Version 2: the delivery id is ``hf_event_id`` (an event's ``uuid`` is now its sensor's
# identity, as in Cowrie); the uniqueness constraint follows the column.
MIGRATIONS.append("ALTER TABLE events RENAME COLUMN uuid TO hf_event_id;")

# Version 3: timestamps as Cowrie's sqlite output keeps them (the events' ISO text, to the
# microsecond), and Cowrie's ipforwards and ipforwardsdata tables.
MIGRATIONS.append(
    """
    DROP VIEW sessions;
    DROP VIEW auth;
    DROP VIEW input;
    DROP VIEW downloads;
    CREATE VIEW sessions AS
        SELECT s.session AS id,
               strftime('%Y-%m-%dT%H:%M:%S', s.start_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', s.start_us % 1000000) AS starttime,
               strftime('%Y-%m-%dT%H:%M:%S', s.end_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', s.end_us % 1000000) AS endtime,
               se.id AS sensor, s.src_ip AS ip, s.terminal_size AS termsize, c.id AS client
        FROM event_sessions s
        JOIN sensors se ON se.ip = s.sensor
        LEFT JOIN clients c ON c.version = s.client_version;
    CREATE VIEW auth AS
        SELECT seq AS id, session, eventid = 'cowrie.login.success' AS success,
               json_extract(json, '$.username') AS username,
               json_extract(json, '$.password') AS password,
               strftime('%Y-%m-%dT%H:%M:%S', time_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', time_us % 1000000) AS timestamp
        FROM events WHERE eventid IN ('cowrie.login.success', 'cowrie.login.failed');
    CREATE VIEW input AS
        SELECT seq AS id, session,
               strftime('%Y-%m-%dT%H:%M:%S', time_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', time_us % 1000000) AS timestamp,
               NULL AS realm, eventid = 'cowrie.command.input' AS success,
               json_extract(json, '$.input') AS input
        FROM events WHERE eventid IN ('cowrie.command.input', 'cowrie.command.failed');
    CREATE VIEW downloads AS
        SELECT seq AS id, session,
               strftime('%Y-%m-%dT%H:%M:%S', time_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', time_us % 1000000) AS timestamp,
               coalesce(json_extract(json, '$.url'), json_extract(json, '$.filename')) AS url,
               json_extract(json, '$.outfile') AS outfile,
               json_extract(json, '$.shasum') AS shasum
        FROM events
        WHERE eventid IN ('cowrie.session.file_download', 'cowrie.session.file_upload');
    CREATE VIEW ipforwards AS
        SELECT seq AS id, session,
               strftime('%Y-%m-%dT%H:%M:%S', time_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', time_us % 1000000) AS timestamp,
               json_extract(json, '$.dst_ip') AS dst_ip,
               json_extract(json, '$.dst_port') AS dst_port
        FROM events WHERE eventid = 'cowrie.direct-tcpip.request';
    CREATE VIEW ipforwardsdata AS
        SELECT seq AS id, session,
               strftime('%Y-%m-%dT%H:%M:%S', time_us / 1000000, 'unixepoch')
                   || printf('.%06dZ', time_us % 1000000) AS timestamp,
               json_extract(json, '$.dst_ip') AS dst_ip,
               json_extract(json, '$.dst_port') AS dst_port,
               json_extract(json, '$.data') AS data
        FROM events WHERE eventid = 'cowrie.direct-tcpip.data';
    """
)

INSERT_EVENT = (
    "INSERT INTO events (hf_event_id, time_us, sensor, session, eventid, src_ip, protocol, json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hf_event_id) DO NOTHING"
)

# Bare column names on the right of SET are the stored row's (SQLite's upsert rules).
# start_us is not among them: SQLite rewrites the entries of every index holding a column
# the SET assigns, changed or not, and three of the four session indexes hold start_us.
# A session's events mostly arrive in order, so EARLIER_SESSION_START (run for each
# session after this) seldom finds a start to move.
UPSERT_SESSION = """
INSERT INTO event_sessions (session, sensor, src_ip, protocol, start_us, last_us, end_us,
    pool_node, guest, lease, username, login_attempts, client_version, terminal_size,
    event_count)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session) DO UPDATE SET
    last_us = max(last_us, excluded.last_us),
    end_us = coalesce(excluded.end_us, end_us),
    pool_node = CASE WHEN excluded.pool_node <> '' THEN excluded.pool_node ELSE pool_node END,
    guest = CASE WHEN excluded.guest <> '' THEN excluded.guest ELSE guest END,
    lease = CASE WHEN excluded.lease <> '' THEN excluded.lease ELSE lease END,
    username = CASE WHEN excluded.username <> '' THEN excluded.username ELSE username END,
    login_attempts = login_attempts + excluded.login_attempts,
    client_version = coalesce(excluded.client_version, client_version),
    terminal_size = coalesce(excluded.terminal_size, terminal_size),
    event_count = event_count + excluded.event_count
"""

# An event older than its session's stored start moves it.
EARLIER_SESSION_START = (
    "UPDATE event_sessions SET start_us = :start WHERE session = :session AND start_us > :start"
)

INSERT_SENSOR = "INSERT INTO sensors (ip) VALUES (?) ON CONFLICT (ip) DO NOTHING"
INSERT_CLIENT = "INSERT INTO clients (version) VALUES (?) ON CONFLICT (version) DO NOTHING"

# Delivery ids looked up per statement (SQLite allows 32766 parameters).
LOOKUP_CHUNK = 5000
RETENTION_CHUNK = 10_000
# Retention, one chunk of at most RETENTION_CHUNK rows per statement: (cutoff, chunk).
EXPIRE_EVENTS = "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE time_us < ? LIMIT ?)"
EXPIRE_SESSIONS = (
    "DELETE FROM event_sessions WHERE rowid IN "
    "(SELECT rowid FROM event_sessions WHERE last_us < ? LIMIT ?)"
)
# The store budget: the oldest events first, one chunk per transaction: (chunk,).
DELETE_OLDEST_EVENTS = (
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY time_us LIMIT ?)"
)
