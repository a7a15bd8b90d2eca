"""Attackers' clients as the e2e tests run them: real OpenSSH, password from sshpass."""

from __future__ import annotations

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
