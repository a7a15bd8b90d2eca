"""`honeyfleet up` as an operator runs it: start, attack with OpenSSH, see the event, stop.

It runs inside the run's network namespace (where the tests' libvirtd lives), so its
sensor, guests and every packet stay there. The image is built beforehand in the root
namespace, which is the one that reaches the Debian mirrors; `up` then finds it built.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from honeyfleet.up import NETWORK, TAG
from poolnode.image import GuestImageSpec, build_image
from tests.conftest import require_tool
from tests.e2e.clients import openssh_argv
from tests.e2e.conftest import IMAGE_DIR
from tests.e2e.vmhost import VmHost, namespace_pids
from tests.integration.test_leases import until

pytestmark = pytest.mark.vm

BIN = Path(sys.executable).parent
PASSWORD = "up-test-guest-pw"
COMMAND = "echo hello-from-up; uname -n"
TELNET_COMMAND = "echo hello-from-$((6*7))-telnet"
# Runs inside the namespace: answer telnet options with refusals, then log in and run
# TELNET_COMMAND. Every wait is bounded (socket timeout, buffer size).
TELNET_CLIENT = f"""
import socket, sys
s = socket.create_connection(("127.0.0.1", 2223), 20)
s.settimeout(30)
buf = b""
def until(marker):
    global buf
    while marker not in buf:
        chunk = s.recv(4096)
        assert chunk and len(buf) < 1 << 20, buf
        i = 0
        while i < len(chunk):
            if chunk[i] == 255 and i + 2 < len(chunk) and chunk[i + 1] in (251, 252, 253, 254):
                reply = {{251: 254, 252: 254, 253: 252, 254: 252}}[chunk[i + 1]]
                s.sendall(bytes([255, reply, chunk[i + 2]]))
                i += 3
            else:
                buf += chunk[i:i + 1]
                i += 1
until(b"login:")
s.sendall(b"root\\r\\n")
until(b"assword:")
s.sendall(b"not-root\\r\\n")
until(b"#")
s.sendall(b"{TELNET_COMMAND}\\r\\n")
until(b"hello-from-42-telnet")
sys.stdout.write(buf.decode(errors="replace"))
"""


GRPCURL = re.compile(r"grpcurl -cacert (\S+) -cert (\S+) -key (\S+) \\\s+(\S+) (\S+)")


async def check_grpcurl_hint(vm_host: VmHost, output: str) -> None:
    """The grpcurl command `up` prints works: run the same call with buf curl.

    grpcurl is not installable here; buf curl takes the same certificate files,
    address and method, so it checks everything the printed line names.
    """
    hint = GRPCURL.search(output)
    assert hint is not None, output
    ca, cert, key, address, method = hint.groups()
    buf = await asyncio.create_subprocess_exec(
        *vm_host.ns_argv(
            str(BIN / "buf"), "curl", "--protocol", "grpc",
            "--cacert", ca, "--cert", cert, "--key", key, "-d", "{}",
            f"https://{address}/{method}",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await buf.communicate()
    assert buf.returncode == 0, err.decode()
    nodes = json.loads(out)["poolNodes"]
    assert [(n["name"], n["state"]) for n in nodes] == [("local-pool", "POOL_NODE_STATE_ALIVE")]


async def test_up_serves_an_attacker_and_stops_clean(vm_host: VmHost, tmp_path: Path) -> None:
    require_tool("sshpass", "sshpass")
    directory = tmp_path / "fleet"
    directory.mkdir()
    (directory / "backend_pass").write_text(PASSWORD)
    await asyncio.to_thread(build_image, GuestImageSpec(out_dir=IMAGE_DIR, backend_pass=PASSWORD))
    proc = await asyncio.create_subprocess_exec(
        *vm_host.ns_argv(
            str(BIN / "honeyfleet"),
            "up",
            "--dir",
            str(directory),
            "--image-dir",
            str(IMAGE_DIR),
            "--guests",
            "1",
            "--hypervisor",
            "qemu",
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    output = b""
    try:
        async with asyncio.timeout(300):
            while b"Ctrl-C stops everything" not in output:
                chunk = await proc.stdout.read(4096)
                assert chunk, f"honeyfleet up ended early:\n{output.decode(errors='replace')}"
                output += chunk
        assert b"ssh -p 2222 root@127.0.0.1" in output
        assert b"telnet 127.0.0.1 2223" in output
        await check_grpcurl_hint(vm_host, output.decode(errors="replace"))

        ssh = await asyncio.create_subprocess_exec(
            *vm_host.ns_argv(*openssh_argv("anything-but-root", "127.0.0.1", 2222, COMMAND)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            out, err = await ssh.communicate()
        assert ssh.returncode == 0, err.decode()
        assert out.decode().split() == ["hello-from-up", "srv04"]  # ran in the real guest

        # The command reaches the controller's store (and its Cowrie JSON lines file).
        log = directory / "state" / "controller" / "cowrie.json"

        def stored_commands() -> list[str]:
            if not log.exists():
                return []
            events = [json.loads(line) for line in log.read_text().splitlines()]
            return [e["input"] for e in events if e["eventid"] == "cowrie.command.input"]

        await until(lambda: COMMAND in stored_commands(), timeout=60)

        # Telnet on 2223: log in (the sensor spoofs the guest's own login) and run a
        # command in the real guest, with a plain socket client in the namespace.
        telnet = await asyncio.create_subprocess_exec(
            *vm_host.ns_argv(sys.executable, "-c", TELNET_CLIENT),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            out, err = await telnet.communicate()
        assert telnet.returncode == 0, (out + err).decode(errors="replace")
        assert b"hello-from-42-telnet" in out  # computed by the guest's shell
        await until(lambda: TELNET_COMMAND in stored_commands(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(120):
            rest, _ = await proc.communicate()
        output += rest
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "nothing left behind" in text
    conn = vm_host.libvirt()
    try:
        assert [d.name() for d in conn.listAllDomains() if d.name().startswith(TAG)] == []
        assert NETWORK not in [n.name() for n in conn.listAllNetworks()]
    finally:
        conn.close()
    leftover = [
        pid
        for pid in namespace_pids(vm_host.netns)
        if b"honeyfleet" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert leftover == []
    assert not list((directory / "state" / "poolnode" / "guests").glob("*.qcow2"))
