"""Host programs the builder runs, and the Debian packages that provide them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._errors import ImageBuildError, MissingHostToolError

#: Host program -> Debian package providing it. Everything else (cpio archive, gzip,
#: password hashing input, stamps) is done in Python.
HOST_TOOLS: dict[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "readelf": "binutils",
    "openssl": "openssl",
    "mke2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
#: Further tools a Debian guest needs: mmdebstrap installs the system (with the host's
#: apt sources), chroot runs its own passwd tools and systemctl inside it.
DEBIAN_TOOLS: dict[str, str] = {"mmdebstrap": "mmdebstrap", "chroot": "coreutils"}

#: Debian packages to ``apt-get install`` on a host that builds guest images.
HOST_PACKAGES: tuple[str, ...] = tuple(sorted({*HOST_TOOLS.values(), *DEBIAN_TOOLS.values()}))

# Tools live in sbin on Debian, which is not on PATH for every caller (cron, units).
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(tool: str) -> str:
    """Return the absolute path of a host tool, or raise naming its package."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    found = shutil.which(tool, path=search)
    if found is None:
        package = HOST_TOOLS.get(tool) or DEBIAN_TOOLS.get(tool, tool)
        raise MissingHostToolError(tool, package)
    return found


def check_host_tools(debian: bool = False) -> None:
    """Fail early, naming every missing tool, rather than halfway through a build."""
    missing: list[MissingHostToolError] = []
    for tool in [*HOST_TOOLS, *(DEBIAN_TOOLS if debian else ())]:
        try:
            find_tool(tool)
        except MissingHostToolError as exc:
            missing.append(exc)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        packages = " ".join(sorted({m.package for m in missing}))
        tools = ", ".join(m.tool for m in missing)
        raise MissingHostToolError(tools, packages)
    if os.geteuid() != 0:
        # mke2fs -d copies file ownership from the staging tree; only root can make
        # root-owned files there, and a guest whose /etc is owned by uid 1000 would
        # both look wrong and let any user edit /etc/shadow.
        raise ImageBuildError("building the guest image needs root (file ownership in the image)")


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    stdin: str | None = None,
    timeout: float = 900.0,
) -> str:
    """Run a host tool and return its stdout; raise ImageBuildError with its stderr."""
    args = [str(a) for a in argv]
    args[0] = find_tool(args[0])
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{Path(args[0]).name} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ImageBuildError(
            f"{Path(args[0]).name} failed (exit {proc.returncode}): {tail or '(no output)'}"
        )
    return proc.stdout
