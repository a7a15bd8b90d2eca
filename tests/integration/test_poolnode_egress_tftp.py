"""TFTP under ``fetch`` for real: busybox's tftp in a guest namespace asks an address
that is dnsmasq's TFTP server inside the test's node namespace (the "internet"); the
node's redirect, NFLOG and TFTP server take the request, its client fetches the file
from dnsmasq, and the guest gets it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from poolnode.egress import tftp
from tests.conftest import until
from tests.integration import test_poolnode_egress as loopback
from tests.integration import test_poolnode_egress_netns as netns
from tests.integration.test_poolnode_egress import MakeEgress
from tests.prereq import require_tool

pytestmark = pytest.mark.timeout(60)
make_egress = loopback.make_egress
namespaces = netns.namespaces
FAR = netns.FAR
PAYLOAD = os.urandom(3000)  # six blocks, the last one short


@pytest.fixture
def internet(namespaces: tuple[str, str], tmp_path: Path) -> Iterator[Path]:
    """dnsmasq serving TFTP on FAR (an address of the node namespace's loopback) from a
    directory holding bins/x86."""
    require_tool("dnsmasq", "dnsmasq-base")
    root = tmp_path / "tftp"
    (root / "bins").mkdir(parents=True)
    (root / "bins" / "x86").write_bytes(PAYLOAD)
    netns._ip("addr", "add", f"{FAR}/32", "dev", "lo")  # the thread is in the node's namespace
    server = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
         "--no-hosts", "--port=0", "--enable-tftp", f"--tftp-root={root}",
         f"--listen-address={FAR}", "--bind-interfaces", "--user=root", "--pid-file=",
         "--log-facility=-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        for line in server.stdout:  # ready once it says where TFTP serves from
            if b"TFTP root" in line:
                break
        yield root
    finally:
        server.terminate()
        server.wait(10)


async def guest_tftp(guest_ns: str, remote: str, local: Path) -> int:
    """busybox tftp -g in the guest's namespace; its exit status."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", guest_ns, "busybox", "tftp", "-g", "-r", remote, "-l",
        str(local), FAR,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 40)


@pytest.fixture
async def fleet(internet: Path, make_egress: MakeEgress) -> AsyncIterator[loopback.Fleet]:
    require_tool("busybox", "busybox")  # the guest's tftp client
    yield await make_egress(
        **netns.settings(egress_policy="fetch", egress_fetch_proxy="127.0.0.1:9"),
        guest_ip=netns.GUEST_IP,
    )


async def test_a_guests_tftp_get_is_fetched_stored_served_and_reported(
    namespaces: tuple[str, str], fleet: loopback.Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    assert await guest_tftp(namespaces[1], "bins/x86", out) == 0
    assert out.read_bytes() == PAYLOAD

    await until(lambda: len(fleet.of("cowrie.session.file_download")) == 1)
    (connect,) = fleet.of("honeyfleet.egress.connect")
    assert (connect["kind"], connect["method"], connect["url"], connect["dst_ip"]) == (
        "tftp",
        "read",
        f"tftp://{FAR}/bins/x86",
        FAR,
    )
    (download,) = fleet.of("cowrie.session.file_download")
    shasum = hashlib.sha256(PAYLOAD).hexdigest()
    assert (download["url"], download["shasum"], download["size"]) == (
        f"tftp://{FAR}/bins/x86",
        shasum,
        len(PAYLOAD),
    )
    assert Path(download["outfile"]).read_bytes() == PAYLOAD
    assert download["session"] == "s1"


async def test_a_file_the_server_lacks_is_a_failed_download_and_an_error(
    namespaces: tuple[str, str], fleet: loopback.Fleet, tmp_path: Path
) -> None:
    assert await guest_tftp(namespaces[1], "bins/none", tmp_path / "got") != 0
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 1)
    (failed,) = fleet.of("cowrie.session.file_download.failed")
    assert failed["url"] == f"tftp://{FAR}/bins/none"
    assert "TFTP: server error 1" in failed["reason"]
    assert not fleet.of("cowrie.session.file_download")


async def test_the_client_stops_at_its_byte_bound(internet: Path) -> None:
    with pytest.raises(tftp.TftpFailed, match="over 1000 bytes"):
        await tftp.fetch((FAR, 69), "bins/x86", source=netns.NODE_IP, max_bytes=1000)
    body = await tftp.fetch((FAR, 69), "bins/x86", source="", max_bytes=len(PAYLOAD))
    assert body == PAYLOAD
