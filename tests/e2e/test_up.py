"""`honeyfleet up` as an operator runs it, on a terminal: start, attack with OpenSSH and
telnet, see the events, stop with Ctrl-C, and find nothing left behind.

It runs inside the run's network namespace (where the tests' libvirtd lives), so its
sensor, guests and every packet stay there. The image is built beforehand in the root
namespace, which is the one that reaches the Debian mirrors; `up` then finds it built.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

from fleetup.up import NETWORK, TAG
from poolnode.image import GuestImageSpec, build_image
from tests.conftest import require_tool, until
from tests.e2e.clients import openssh_argv, telnet_login
from tests.e2e.image import DEBIAN_IMAGE_DIR, IMAGE_DIR, debian_image_spec, image_spec
from tests.e2e.vmhost import VmHost, namespace_pids
from tests.terminal import Terminal

# Bounded within: the image build, `up` starting and stopping (each with its own timeout).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
PASSWORD = "up-test-guest-pw"
COMMAND = "echo hello-from-up; uname -n; command -v dpkg-query >/dev/null && echo dpkg || echo no"
TELNET_COMMAND = "echo hello-from-$((6*7))-telnet"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
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
            require_tool("buf", "buf-bin (pip, dev extra)"), "curl", "--protocol", "grpc",
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


def image_for(distro: str) -> tuple[GuestImageSpec, Path]:
    """The image `up --distro` will find built, and where: busybox's with a password of
    its own (a variant of the VM tests' image), Debian's the VM tests' own (its build
    takes minutes: `up` must find it as `make test` left it)."""
    if distro == "debian":
        return debian_image_spec(), DEBIAN_IMAGE_DIR
    return image_spec(backend_pass=PASSWORD), IMAGE_DIR


@pytest.mark.parametrize("distro", ["busybox", "debian"])
async def test_up_serves_an_attacker_and_stops_clean(
    vm_host: VmHost, tmp_path: Path, distro: str
) -> None:
    require_tool("sshpass", "sshpass")
    require_tool("telnet", "telnet")
    directory = tmp_path / "fleet"
    directory.mkdir()
    spec, image_dir = image_for(distro)
    (directory / "backend_pass").write_text(spec.backend_pass)
    await asyncio.to_thread(build_image, spec)
    # On a terminal, as an operator runs it: progress bars, then Ctrl-C to stop.
    up = await Terminal.spawn(
        *vm_host.ns_argv(
            str(BIN / "honeyfleet"),
            "up",
            "--dir",
            str(directory),
            "--image-dir",
            str(image_dir),
            "--guests",
            "1",
            "--hypervisor",
            "qemu",
            "--distro",
            distro,
        )
    )
    try:
        await up.expect(rb"Ctrl-C stops everything", timeout=300)
        shown = ANSI.sub("", up.output.decode(errors="replace"))
        assert "guests booting" in shown  # the progress bar
        assert "ssh -p 2222 root@127.0.0.1" in shown
        assert "telnet 127.0.0.1 2223" in shown
        await check_grpcurl_hint(vm_host, shown)

        ssh = await asyncio.create_subprocess_exec(
            *vm_host.ns_argv(*openssh_argv("anything-but-root", "127.0.0.1", 2222, COMMAND)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            out, err = await ssh.communicate()
        assert ssh.returncode == 0, err.decode()
        # Ran in the real guest: only the Debian one has dpkg.
        packaging = "dpkg" if distro == "debian" else "no"
        assert out.decode().split() == ["hello-from-up", "srv04", packaging]

        # The command reaches the controller's store (and its Cowrie JSON lines file).
        log = directory / "state" / "controller" / "cowrie.json"

        def stored_commands() -> list[str]:
            if not log.exists():
                return []
            events = [json.loads(line) for line in log.read_text().splitlines()]
            return [e["input"] for e in events if e["eventid"] == "cowrie.command.input"]

        await until(lambda: COMMAND in stored_commands(), timeout=60)

        # Debian's telnet on 2223: the sensor spoofs the guest's own login, then the
        # guest's shell does the sum.
        async with telnet_login(vm_host, "127.0.0.1", 2223, "not-root") as telnet:
            telnet.send(TELNET_COMMAND.encode() + b"\r")
            await telnet.expect(rb"hello-from-42-telnet", timeout=60)
            telnet.send(b"exit\r")
            await telnet.ended(timeout=60)
        await until(lambda: TELNET_COMMAND in stored_commands(), timeout=60)
    finally:
        if up.proc.returncode is None:
            up.send(b"\x03")  # Ctrl-C
            async with asyncio.timeout(120):
                await up.proc.wait()
        await up.close()
    shown = ANSI.sub("", up.output.decode(errors="replace"))
    assert up.proc.returncode == 0, shown
    assert "nothing left behind" in shown
    conn = vm_host.libvirt()
    try:
        assert [d.name() for d in conn.listAllDomains() if d.name().startswith(TAG)] == []
        assert NETWORK not in [n.name() for n in conn.listAllNetworks()]
        assert f"{TAG}-guest" not in [f.name() for f in conn.listAllNWFilters()]
    finally:
        conn.close()
    # up's own processes (its roles, their QEMU guests) all name its directory; other VM
    # tests' pool node may share the namespace for the whole package, and is not up's.
    mine = str(directory).encode()
    leftover = [
        cmdline for pid in namespace_pids(vm_host.netns) if mine in (cmdline := _cmdline(pid))
    ]
    assert leftover == []
    assert not list((directory / "state" / "poolnode" / "guests").glob("*.qcow2"))


def _cmdline(pid: int) -> bytes:
    """A process's command line (empty if it has just ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
