"""Generate the Python stubs in honeyfleet/v1/ from protos/, or check they are current.

    python scripts/gen_protos.py           # regenerate in place
    python scripts/gen_protos.py --check   # exit 1 if regenerating would change anything

The generator versions are pinned in pyproject.toml's dev extra, so the output is
reproducible and CI can diff it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("honeyfleet") / "v1"
# Files in the stub package that protoc does not write.
KEEP = {"__init__.py"}


def generate(out: Path) -> None:
    """Run protoc (with the mypy-protobuf plugins) over every proto into out."""
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # The mypy plugins chat on stderr; show it only when protoc fails.
    result = subprocess.run(cmd, cwd=PROTOS, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}")


def generated_files(root: Path) -> set[str]:
    """Names of generated files in a stub package directory."""
    return {p.name for p in (root / PACKAGE).iterdir() if p.is_file() and p.name not in KEEP}


def main() -> int:
    """Regenerate or check, per the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out)
        current = generated_files(ROOT)
        if args.check:
            stale = sorted(
                name
                for name in fresh | current
                if name not in fresh
                or name not in current
                or not filecmp.cmp(out / PACKAGE / name, ROOT / PACKAGE / name, shallow=False)
            )
            if stale:
                print(
                    "generated stubs are stale: "
                    + ", ".join(stale)
                    + "\nrun `python scripts/gen_protos.py` and commit the result",
                    file=sys.stderr,
                )
                return 1
            return 0
        for name in current - fresh:
            (ROOT / PACKAGE / name).unlink()
        for name in fresh:
            shutil.copyfile(out / PACKAGE / name, ROOT / PACKAGE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
