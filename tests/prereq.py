"""Prerequisites of tests: missing ones fail in CI (make test installs them), skip elsewhere."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unmet(message: str) -> NoReturn:
    """A prerequisite is missing: fail in CI (make test installs everything), skip elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    """The path of a tool; fails in CI (it must be installed) and skips, saying why, elsewhere."""
    # Tools from the dev extra live next to the interpreter, not necessarily on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        unmet(f"{name} not found: install {package} (make test installs it)")
    return path
