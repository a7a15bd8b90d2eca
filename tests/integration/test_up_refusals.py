"""`honeyfleet up` refuses to start when a prerequisite is missing, saying what to do.

Each case runs the real command and checks it stops before touching anything: no
traceback, exit status 2, a message naming the problem and the fix, and no fleet
directory made.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, require_tool, unmet

BIN = Path(sys.executable).parent
EXIT_ERROR = 2


@pytest.fixture(autouse=True)
def as_root() -> None:
    """`up` checks for root before anything else, and setpriv needs root to drop it."""
    if os.geteuid() != 0:
        unmet("the `honeyfleet up` refusal tests run as root")


async def up(directory: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``honeyfleet up`` (bounded in time); its exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        str(BIN / "honeyfleet"),
        "up",
        "--dir",
        str(directory),
        "--hypervisor",
        "qemu",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_up_needs_root(tmp_path: Path) -> None:
    setpriv = require_tool("setpriv", "util-linux")
    nobody = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    code, err = await up(tmp_path / "fleet", prefix=nobody)
    assert code == EXIT_ERROR, err
    assert "Traceback" not in err
    assert "run it as root (sudo)" in err
    assert not (tmp_path / "fleet").exists()


async def test_up_names_a_taken_port_and_how_to_pick_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await up(
            tmp_path / "fleet", "--ssh-port", str(free_port()), "--telnet-port", str(port)
        )
    assert code == EXIT_ERROR, err
    assert "Traceback" not in err
    assert f"port {port} (Telnet) is taken" in err
    assert f"ss -ltnp 'sport = :{port}'" in err and "--telnet-port" in err
    assert not (tmp_path / "fleet").exists()


async def test_up_says_how_to_start_libvirt_when_it_is_not_running(tmp_path: Path) -> None:
    uri = f"qemu:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    code, err = await up(
        tmp_path / "fleet",
        "--ssh-port",
        str(free_port()),
        "--telnet-port",
        str(free_port()),
        "--libvirt-uri",
        uri,
    )
    assert code == EXIT_ERROR, err
    assert "Traceback" not in err
    assert f"cannot reach libvirt at {uri}" in err
    assert "libvirtd -d" in err
    assert not (tmp_path / "fleet").exists()
