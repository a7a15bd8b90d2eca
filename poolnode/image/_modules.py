"""Kernel module selection: which .ko files, in which order, from modules.dep."""

from __future__ import annotations

from pathlib import Path

from ._errors import ImageBuildError
from ._host import run


def _norm(name: str) -> str:
    """Module names treat '-' and '_' as the same character."""
    return name.replace("-", "_")


class ModuleIndex:
    """The dependency data depmod writes for one kernel tree.

    Reading modules.dep (hard dependencies), modules.softdep (``pre:`` soft
    dependencies such as ext4 -> crc32c) and modules.alias (to turn a soft
    dependency like ``crc32c`` into a module file) means the load order follows
    the kernel that is actually packaged rather than a hard-coded chain.
    """

    def __init__(self, moddir: Path) -> None:
        """Load the index files under ``moddir`` (``.../lib/modules/<release>``)."""
        self.moddir = moddir
        self.deps: dict[str, list[str]] = {}
        self.path: dict[str, str] = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            target, _, rest = line.partition(":")
            name = _norm(Path(target).name.removesuffix(".ko"))
            self.path[name] = target
            self.deps[name] = [_norm(Path(d).name.removesuffix(".ko")) for d in rest.split()]
        self.builtin = {
            _norm(Path(line.strip()).name.removesuffix(".ko"))
            for line in (moddir / "modules.builtin").read_text().splitlines()
            if line.strip()
        }
        self.softdep_pre: dict[str, list[str]] = {}
        softdep = moddir / "modules.softdep"
        for line in softdep.read_text().splitlines() if softdep.exists() else []:
            words = line.split()
            if len(words) < 3 or words[0] != "softdep":
                continue
            pre: list[str] = []
            section = ""
            for w in words[2:]:
                if w.endswith(":"):
                    section = w
                elif section == "pre:":
                    pre.append(w)
            self.softdep_pre[_norm(words[1])] = pre
        self.alias: dict[str, list[str]] = {}
        alias = moddir / "modules.alias"
        for line in alias.read_text().splitlines() if alias.exists() else []:
            words = line.split()
            if len(words) == 3 and words[0] == "alias" and _norm(words[2]) in self.path:
                self.alias.setdefault(words[1], []).append(_norm(words[2]))

    def _lookup(self, name: str) -> list[str]:
        """Map a module name or alias to the modules that provide it.

        An alias can have several providers (crypto-crc32c: crc32c-intel and
        crc32c_generic). All are taken, because which one loads depends on the
        guest CPU: TCG's default qemu64 model lacks SSE4.2, so only the generic
        one works there, while a KVM guest would prefer the accelerated one.
        """
        n = _norm(name)
        if n in self.path:
            return [n]
        return self.alias.get(name, [])

    def load_order(self, wanted: tuple[str, ...]) -> list[str]:
        """Relative .ko paths for ``wanted`` plus dependencies, dependencies first."""
        order: list[str] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...], required: bool) -> None:
            if name in done or name in self.builtin:
                return
            mods = self._lookup(name)
            if not mods:
                if required:
                    raise ImageBuildError(f"kernel module {name!r} not found in {self.moddir}")
                return  # an unresolvable soft dependency is, by definition, optional
            for mod in mods:
                if mod in done:
                    continue
                if mod in chain:
                    raise ImageBuildError(f"module dependency cycle: {' -> '.join((*chain, mod))}")
                for pre in self.softdep_pre.get(mod, []):
                    visit(pre, (*chain, mod), False)
                # modules.dep lists the deepest dependency last, as modprobe loads it.
                for dep in reversed(self.deps[mod]):
                    visit(dep, (*chain, mod), True)
                done.add(mod)
                order.append(self.path[mod])

        for name in wanted:
            visit(name, (), True)
        return order


def run_depmod(root: Path, release: str) -> None:
    """Generate modules.dep and friends for ``root/lib/modules/<release>``."""
    run(["depmod", "-a", "-b", root, release], timeout=600.0)
