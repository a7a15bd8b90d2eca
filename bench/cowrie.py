"""Cowrie in proxy mode for the benchmarks: the baseline honeyfleet generalises.

Cowrie is installed from PyPI (its pinned release) into a throwaway virtualenv by the
benchmark itself, so nothing of it lingers in the project's environment. It runs with
its simple backend: every attacker session is relayed to one SSH server given by host
and port, logged into with fixed credentials. Cowrie refuses to run as root, so it runs
as ``nobody`` in a directory of its own (config, state, logs, tty logs) owned by that
user.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from bench.fleet import Processes
from bench.openssh import require, until_banner

COWRIE_VERSION = "3.1.4"
# Debian's interpreter, not this one: Cowrie's user must be able to run it (an interpreter
# under root's home is out of its reach).
SYSTEM_PYTHON = "/usr/bin/python3"
# nobody:nogroup on Debian.
UNPRIVILEGED = 65534
INSTALL_TIMEOUT = 300.0


@dataclass(frozen=True)
class CowrieBackend:
    """The SSH server Cowrie relays sessions to."""

    host: str
    """Its address."""
    port: int
    """Its SSH port."""
    user: str
    """The account Cowrie logs into (Cowrie's ``backend_user``)."""
    password: str
    """That account's password (Cowrie's ``backend_pass``)."""


async def install_cowrie(venv: Path) -> Path:
    """A virtualenv at ``venv`` with Cowrie installed from PyPI; returns its ``twistd``."""
    if not await asyncio.to_thread(Path(SYSTEM_PYTHON).exists):
        raise SystemExit(f"{SYSTEM_PYTHON} not found: apt-get install python3-venv")
    steps = (
        [SYSTEM_PYTHON, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", f"cowrie=={COWRIE_VERSION}"],
    )
    async with asyncio.timeout(INSTALL_TIMEOUT):
        for argv in steps:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode(errors='replace')}")
    return venv / "bin" / "twistd"


def _config(workdir: Path, port: int, backend: CowrieBackend, ttylog: bool) -> str:
    """Cowrie's ``etc/cowrie.cfg``: proxy mode, simple backend, SSH only, on loopback."""
    return (
        "[honeypot]\n"
        f"log_path = {workdir}/log\n"
        f"state_path = {workdir}/state\n"
        f"download_path = {workdir}/downloads\n"
        f"ttylog = {str(ttylog).lower()}\n"
        f"ttylog_path = {workdir}/tty\n"
        "backend = proxy\n"
        "[proxy]\n"
        "backend = simple\n"
        f"backend_ssh_host = {backend.host}\n"
        f"backend_ssh_port = {backend.port}\n"
        f"backend_user = {backend.user}\n"
        f"backend_pass = {backend.password}\n"
        "[ssh]\n"
        f"listen_endpoints = tcp:{port}:interface=127.0.0.1\n"
        "[telnet]\n"
        "enabled = false\n"
    )


def _prepare(workdir: Path, port: int, backend: CowrieBackend, ttylog: bool) -> None:
    """Cowrie's directory tree, owned by the unprivileged user it runs as."""
    for sub in ("etc", "log", "state", "downloads", "tty"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "etc" / "cowrie.cfg").write_text(_config(workdir, port, backend, ttylog))
    for path in [workdir, *workdir.rglob("*")]:
        os.chown(path, UNPRIVILEGED, UNPRIVILEGED)


async def start_cowrie(
    procs: Processes,
    twistd: Path,
    workdir: Path,
    port: int,
    backend: CowrieBackend,
    *,
    ttylog: bool,
) -> int:
    """Start Cowrie on 127.0.0.1:``port`` relaying to ``backend``; its pid once it answers.

    ``workdir``'s parents must be searchable by ``nobody``.
    """
    setpriv = require("setpriv", "util-linux")
    await asyncio.to_thread(_prepare, workdir, port, backend, ttylog)
    # Cowrie reads ./etc/cowrie.cfg; setpriv execs sh, which execs twistd: the pid is
    # Cowrie's own.
    script = 'cd "$1" && exec "$2" -n --umask=0022 --pidfile= cowrie'
    proc = await procs.start(
        f"cowrie-{port}",
        setpriv,
        f"--reuid={UNPRIVILEGED}",
        f"--regid={UNPRIVILEGED}",
        "--clear-groups",
        "--",
        "env",
        f"HOME={workdir}",
        "sh",
        "-c",
        script,
        "sh",
        str(workdir),
        str(twistd),
    )
    await until_banner(port, b"SSH-2.0-")
    return proc.pid
