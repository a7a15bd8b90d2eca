"""Resolve, download (with a cache) and unpack the Debian packages a guest is made of."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ._errors import ImageBuildError
from ._host import run

# Packages whose files end up in the guest. The kernel comes from the spec; the shared
# libraries of the dynamically linked programs are found by following Depends.
BUSYBOX_PACKAGE = "busybox-static"
DROPBEAR_PACKAGE = "dropbear-bin"
# A real bash as the login shell: busybox ash prints a "BusyBox ... built-in shell"
# banner at every login, and attackers' scripts very often start with #!/bin/bash.
BASH_PACKAGE = "bash"
# Terminal descriptions, so bash/readline behave on the usual TERM values.
TERMINFO_PACKAGE = "ncurses-base"
DYNAMIC_PACKAGES = (DROPBEAR_PACKAGE, BASH_PACKAGE)

# Bound on the Depends walk: it needs about ten packages; anything near this many
# means the walk escaped into something it should not have.
_MAX_PACKAGES = 40


def _show(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Return the candidate version's control fields for each package name."""
    wanted = sorted(set(names))
    try:
        out = run(["apt-cache", "show", "--no-all-versions", *wanted])
    except ImageBuildError as exc:
        raise ImageBuildError(
            f"apt does not know some of {', '.join(wanted)}; run 'apt-get update' ({exc})"
        ) from exc
    stanzas: dict[str, dict[str, str]] = {}
    for block in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            m = re.match(r"([A-Za-z0-9-]+): ?(.*)", line)
            if m:
                fields[m.group(1)] = m.group(2)
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    missing = [n for n in wanted if n not in stanzas]
    if missing:
        raise ImageBuildError(f"no installable candidate for {', '.join(missing)}")
    return stanzas


def versions(names: Iterable[str]) -> dict[str, str]:
    """{package: candidate version} from the host's apt lists."""
    return {name: fields["Version"] for name, fields in _show(names).items()}


def _depends(fields: dict[str, str]) -> list[str]:
    """Package names from Pre-Depends/Depends, first alternative, versions dropped."""
    names: list[str] = []
    for key in ("Pre-Depends", "Depends"):
        for clause in filter(None, (c.strip() for c in fields.get(key, "").split(","))):
            first = clause.split("|")[0].strip()
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def resolve_packages(kernel_package: str) -> dict[str, str]:
    """Return {package: version} for every package the guest is built from.

    The kernel meta package is followed one step to the versioned image package (its
    own Depends are host tooling such as initramfs-tools, which the guest does not
    want). The Depends of the dynamically linked programs are followed to closure,
    but only into packages of the ``libs`` section, where Debian puts shared
    libraries (libc6, zlib1g, ...): the rest (base-files, debianutils) is not wanted.
    """
    top = _show([kernel_package, BUSYBOX_PACKAGE, TERMINFO_PACKAGE, *DYNAMIC_PACKAGES])
    result = {name: top[name]["Version"] for name in top}
    # A meta package depends on the versioned image package; a versioned image
    # package depends on no other linux-image-*, so this also accepts one directly.
    # It is looked up together with the first round of libraries: each apt-cache
    # call costs most of a second, and this is also the cost of a no-op rebuild.
    kernel_image = [d for d in _depends(top[kernel_package]) if d.startswith("linux-image-")][:1]
    seen = set(result)
    frontier = kernel_image + [d for p in DYNAMIC_PACKAGES for d in _depends(top[p])]
    while frontier:
        todo = sorted(set(frontier) - seen)
        if not todo:
            break
        if len(seen) + len(todo) > _MAX_PACKAGES:
            raise ImageBuildError("dependency walk for shared libraries grew too large")
        fields = _show(todo)
        seen.update(todo)
        frontier = []
        for name in todo:
            if name in kernel_image:
                result[name] = fields[name]["Version"]
            elif fields[name].get("Section", "").rpartition("/")[2] == "libs":
                result[name] = fields[name]["Version"]
                frontier.extend(_depends(fields[name]))
    return result


def _deb_name(name: str, version: str) -> str:
    """Prefix of the file apt-get download writes (the epoch colon is %-escaped)."""
    return f"{name}_{version.replace(':', '%3a')}_"


def download(packages: dict[str, str], cache_dir: Path) -> dict[str, Path]:
    """Return {package: .deb path}, downloading into cache_dir what is not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)

    def cached(name: str, version: str) -> Path | None:
        hits = sorted(cache_dir.glob(_deb_name(name, version) + "*.deb"))
        return hits[0] if hits else None

    missing = [f"{n}={v}" for n, v in sorted(packages.items()) if cached(n, v) is None]
    if missing:
        # Download into a scratch directory and move complete files in, so an
        # interrupted download never leaves a truncated .deb in the cache.
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".dl-") as tmp:
            # apt drops privileges to _apt for downloads and warns when that user
            # cannot write the target directory; the cache is ours, so download as root.
            run(
                ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *missing],
                cwd=Path(tmp),
                timeout=1800.0,
            )
            for deb in Path(tmp).glob("*.deb"):
                shutil.move(str(deb), cache_dir / deb.name)
    paths: dict[str, Path] = {}
    for name, version in packages.items():
        path = cached(name, version)
        if path is None:
            raise ImageBuildError(f"apt-get download did not produce {name} {version}")
        paths[name] = path
    return paths


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (not its maintainer scripts) under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest], timeout=600.0)
