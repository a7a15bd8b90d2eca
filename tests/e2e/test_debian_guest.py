"""The real Debian guest (``honeyfleet image build --distro debian``) under TCG.

The image is built by ``make test`` (tests/e2e/image.py) and booted here through the
pool node's libvirt backend with what `up --distro debian` gives it (memory, CPU model);
the checks are what a visitor sees first: dpkg's and apt's databases, GNU coreutils,
procps' ``ps``, the CPU and memory the domain XML gives, a small cloud VM's disk, the
persona (host name, users, MOTD, history, earlier logins). One guest serves every check
(a TCG boot is the slow part).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time

import pytest

from fleetup.up import DEBIAN_CPU_MODEL, DEFAULT_MEMORY, TB_CACHE
from poolnode.image import DEBIAN_DISK_MIB, GuestImage, build_image
from poolnode.image._logins import ADMIN_HOSTS
from tests.e2e.conftest import check_prerequisites
from tests.e2e.fleet import VmFleet, run
from tests.e2e.image import debian_image_spec

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
log = logging.getLogger(__name__)

# What `up --distro debian` runs its guests with.
CPU_MODEL = DEBIAN_CPU_MODEL
MEMORY_MIB = DEFAULT_MEMORY["debian"]


@pytest.fixture(scope="module")
def debian_image() -> GuestImage:
    """The tests' Debian image (normally already built by `make test`)."""
    check_prerequisites()
    return build_image(
        debian_image_spec(), lambda step, i, n: log.info("debian image [%d/%d] %s", i, n, step)
    )


def qemu_model_name(model: str) -> str:
    """The model name QEMU gives ``model`` (following aliases), from ``-cpu help``."""
    out = subprocess.run(
        ["qemu-system-x86_64", "-cpu", "help"], capture_output=True, text=True, check=True
    ).stdout
    names = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^x86 +(\S+) +(.*)$", out, flags=re.MULTILINE)
    }
    description = names[model]
    while alias := re.fullmatch(r"\(alias of (\S+)\)", description):
        description = names[alias.group(1)]
    return description


async def test_a_debian_guest_is_a_real_debian_server(
    vm_fleet: VmFleet, debian_image: GuestImage
) -> None:
    started = time.monotonic()
    await vm_fleet.ensure_node(
        pristine=1,
        max_vms=1,
        max_parallel_boots=1,
        guest_image=str(debian_image.disk),
        guest_kernel=str(debian_image.kernel),
        guest_initrd=str(debian_image.initrd),
        guest_cmdline=debian_image.cmdline,
        guest_memory=MEMORY_MIB,
        guest_cpu_model=CPU_MODEL,
        guest_tb_cache=TB_CACHE["debian"],
    )
    log.info("pool node started, Debian guest pristine in %.1f s", time.monotonic() - started)
    lease = await vm_fleet.lease("203.0.113.77")
    async with vm_fleet.shell(lease.id) as conn:
        dpkg = await run(conn, "dpkg -l openssh-server coreutils apt systemd")
        ps = await run(conn, "ps aux")
        init = await run(conn, "readlink -f /proc/1/exe; ps --version")
        cpuinfo = await run(conn, "cat /proc/cpuinfo")
        meminfo = await run(conn, "cat /proc/meminfo")
        who = await run(conn, "hostname; id -un; grep -c . /var/lib/dpkg/status")
        tools = await run(conn, "ls --version | head -1; apt list --installed 2>/dev/null | wc -l")
        kernel = await run(
            conn,
            "dpkg-query -W -f '${Status}\\n' linux-image-$(uname -r);"
            " find /lib/modules/$(uname -r) -name '*.ko*' | wc -l; ls /boot/initrd.img-$(uname -r);"
            " apt-cache policy nmap | grep -c Candidate:",
        )
        disk = await run(conn, "df -B1M --output=size,used / | tail -1")
        persona = await run(conn, "cat /etc/motd; getent passwd deploy; wc -l < ~/.bash_history")
        logins = await run(conn, "last -w -n 50")
    # Sensors' Telnet sessions land on the guest's port 23 (socket-activated telnetd).
    seen = await vm_fleet.telnet_prompt(lease.id)
    await vm_fleet.sensor().release(lease.id)

    installed = {
        line.split()[1].partition(":")[0]
        for line in str(dpkg.stdout).splitlines()
        if line.startswith("ii ")
    }
    assert {"openssh-server", "coreutils", "apt", "systemd"} <= installed, dpkg.stdout

    # procps' columns (busybox prints "PID   USER     TIME  COMMAND") and real daemons.
    header, *processes = str(ps.stdout).splitlines()
    assert header.split() == [
        "USER", "PID", "%CPU", "%MEM", "VSZ", "RSS", "TTY", "STAT", "START", "TIME", "COMMAND",
    ]  # fmt: skip
    commands = " ".join(line.split(None, 10)[-1] for line in processes)
    for daemon in ("/sbin/init", "systemd-journald", "sshd", "cron"):
        assert daemon in commands, ps.stdout
    exe, version = str(init.stdout).splitlines()[:2]
    assert exe == "/usr/lib/systemd/systemd" and "procps-ng" in version, init.stdout

    models = set(re.findall(r"^model name\s*: (.*)$", str(cpuinfo.stdout), flags=re.MULTILINE))
    assert models == {qemu_model_name(CPU_MODEL)}, cpuinfo.stdout
    # As many CPUs as the domain's vcpus (guest_vcpus, 1 by default).
    assert len(re.findall(r"^processor\s*:", str(cpuinfo.stdout), flags=re.MULTILINE)) == 1

    # MemTotal is the domain's memory less what the kernel keeps for itself.
    total = re.search(r"^MemTotal:\s+(\d+) kB$", str(meminfo.stdout), flags=re.MULTILINE)
    assert total is not None, meminfo.stdout
    assert 0.8 * MEMORY_MIB * 1024 <= int(total.group(1)) <= MEMORY_MIB * 1024

    hostname, user, status_lines = str(who.stdout).split()
    assert (hostname, user) == ("srv04", "root")
    assert int(status_lines) > 1000  # dpkg's database lists every installed package
    assert b"srv04 login:" in seen

    coreutils, apt_lines = str(tools.stdout).splitlines()
    assert coreutils.startswith("ls (GNU coreutils)"), tools.stdout
    assert int(apt_lines) > 100  # apt reads the same database: every package installed

    # The running kernel is an installed package with all its modules and an initrd, and
    # apt knows what it could install (its package lists are there).
    status, modules, initrd, candidates = str(kernel.stdout).splitlines()
    assert status == "install ok installed", kernel.stdout
    assert int(modules) > 1000 and initrd.startswith("/boot/initrd.img-"), kernel.stdout
    assert candidates == "1", kernel.stdout

    # A small cloud VM's disk: its size as built, a few hundred MB of it used.
    size, used = (int(n) for n in str(disk.stdout).split())
    log.info("guest root file system: %d MiB, %d MiB used", size, used)
    assert 0.9 * DEBIAN_DISK_MIB <= size <= DEBIAN_DISK_MIB
    assert 200 <= used <= 2048

    motd = str(persona.stdout)
    assert "Debian GNU/Linux comes with ABSOLUTELY NO WARRANTY" in motd, motd
    assert ":/home/deploy:/bin/bash" in motd and int(motd.split()[-1]) >= 10, motd

    # Earlier logins of the administrators, from the persona's office, and the install boot.
    history = str(logins.stdout)
    assert "reboot   system boot" in history, history
    assert sum(host in history for host in ADMIN_HOSTS) == len(ADMIN_HOSTS), history
