"""Attackers' clients as the e2e tests run them: OpenSSH with sshpass, Debian's telnet."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tests.e2e.vmhost import VmHost
from tests.terminal import Terminal

LOGIN_WAIT = 60.0
SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
)  # fmt: skip


def openssh_argv(
    password: str, host: str, port: int, command: str, *, source: str | None = None
) -> list[str]:
    """``ssh root@host command`` on ``port``, from the ``source`` address if given."""
    bind = ["-b", source] if source else []
    return [
        "sshpass", "-p", password,
        "ssh", *bind, "-p", str(port), *SSH_OPTIONS, f"root@{host}", command,
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def telnet_login(
    vm_host: VmHost, host: str, port: int, password: str, *, source: str | None = None
) -> AsyncIterator[Terminal]:
    """Debian's telnet in the namespace, on a pty, logged in as root at the guest's shell."""
    bind = ["-b", source] if source else []
    term = await Terminal.spawn(*vm_host.ns_argv("telnet", *bind, host, str(port)))
    try:
        await term.expect(rb"login: ", timeout=LOGIN_WAIT)
        term.send(b"root\r")
        await term.expect(rb"Password: ", timeout=LOGIN_WAIT)
        term.send(password.encode() + b"\r")
        await term.expect(rb"# ", timeout=LOGIN_WAIT * 2)  # the guest's own shell
        yield term
    finally:
        await term.close()
