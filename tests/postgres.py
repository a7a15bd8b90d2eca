"""A real, throwaway PostgreSQL server for tests, from Debian's binaries.

The session-scoped ``postgres_server`` fixture runs its own cluster in a temporary
directory, listening on 127.0.0.1 on a free port (TCP only), as the ``postgres`` OS user
when the tests run as root (initdb refuses root). Tests may stop and start it (an
outage). ``postgres_dsn`` gives each test a database of its own, and ``store_overrides``
runs a test once per event store (controller settings for SQLite, then PostgreSQL).
Test modules load these fixtures with ``pytest_plugins = ["tests.postgres"]``. Without the binaries,
tests fail in CI (they must be installed: ``scripts/install-system-deps.sh``) and are
skipped, saying why, elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, unmet

INITDB_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def find_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory; fails in CI, skips elsewhere."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        unmet(f"no PostgreSQL server binaries ({INITDB_GLOB}): apt-get install postgresql")
    return candidates[-1].parent


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of the test run's own."""

    bindir: Path
    root: Path
    port: int
    user: str | None
    """OS user to run the server as (None: the current user)."""

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for a database of this server."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def _argv(self, tool: str, *args: str) -> list[str]:
        """A server tool's command line, run as the server's user.

        runuser rather than subprocess's ``user=``: that forces a fork() whose gRPC
        fork handlers crash the child while the test's gRPC threads are busy.
        """
        command = [str(self.bindir / tool), *args]
        return command if self.user is None else ["runuser", "-u", self.user, "--", *command]

    def _kw(self) -> dict[str, Any]:
        """subprocess keywords: a working directory the server's user may enter."""
        return {"cwd": self.root}

    def init(self) -> None:
        """Create the cluster (trust authentication: it only listens on loopback)."""
        subprocess.run(
            self._argv(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
            **self._kw(),
        )

    def _start_argv(self) -> list[str]:
        """pg_ctl start, TCP on loopback only, waiting until ready."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            "-c unix_socket_directories='' -c max_connections=200"
        )
        log = str(self.root / "server.log")
        return self._argv(
            "pg_ctl", "-D", str(self.datadir), "-l", log, "-w", "-o", options, "start"
        )

    def _stop_argv(self, mode: str) -> list[str]:
        """pg_ctl stop in ``mode``, waiting until stopped."""
        return self._argv("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def start_blocking(self) -> None:
        """Start the server and wait until it accepts connections."""
        subprocess.run(self._start_argv(), check=True, capture_output=True, **self._kw())

    def stop_blocking(self, mode: str = "fast") -> None:
        """Stop the server (fast: disconnect clients, roll back open transactions)."""
        subprocess.run(self._stop_argv(mode), check=True, capture_output=True, **self._kw())

    async def start(self) -> None:
        """Start the server without blocking the event loop."""
        await _run(self._start_argv(), self._kw())

    async def stop(self) -> None:
        """Stop the server (fast mode) without blocking the event loop."""
        await _run(self._stop_argv("fast"), self._kw())

    def create_database(self) -> str:
        """A new, empty database; returns its DSN."""
        import psycopg

        name = f"hf_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        """Drop a database made by create_database, cutting its connections."""
        import psycopg

        name = dsn.rpartition("dbname=")[2]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _run(argv: list[str], kw: dict[str, Any]) -> None:
    """Run a command to completion; RuntimeError with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, **kw
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {out.decode()}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole run, stopped and deleted afterwards."""
    bindir = find_bindir()
    if importlib.util.find_spec("psycopg") is None:
        unmet("psycopg missing: pip install -e '.[postgres]' (make test does)")
    root = Path(tempfile.mkdtemp(prefix="honeyfleet-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir=bindir, root=root, port=free_port(), user=user)
    try:
        server.init()
        server.start_blocking()
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        output = (e.stdout or b"").decode() + (e.stderr or b"").decode()
        pytest.fail(f"cannot start PostgreSQL from {bindir}: {output}")
    yield server
    # It may already be stopped, by a test that failed half-way through an outage.
    with contextlib.suppress(subprocess.CalledProcessError):
        server.stop_blocking("immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh database for one test."""
    dsn = postgres_server.create_database()
    yield dsn
    postgres_server.drop_database(dsn)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_overrides(request: pytest.FixtureRequest) -> dict[str, str]:
    """Controller settings for each event store (PostgreSQL: a fresh database)."""
    if request.param == "sqlite":
        return {"store": "sqlite"}
    return {"store": "postgres", "postgres_dsn": request.getfixturevalue("postgres_dsn")}
