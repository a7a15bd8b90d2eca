"""The roles the `honeyfleet` command knows, found through package entry points.

The base package imports no role: each role package (sensor, poolnode, controller)
declares a `RolePlugin` under the ``honeyfleet.roles`` entry-point group in
pyproject.toml, and commands that span roles (``up``) add themselves under
``honeyfleet.commands``. The CLI looks both up with importlib.metadata, so a role is
a plugin of the base and never the other way round (`lint-imports` checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, TypeVar

from honeyfleet.adminconfig import AdminConfig
from honeyfleet.config import ConfigProblems, parse_section, read_toml
from honeyfleet.errors import ConfigError, FailedPrecondition
from honeyfleet.pki import Role

T = TypeVar("T")
ROLES_GROUP = "honeyfleet.roles"
COMMANDS_GROUP = "honeyfleet.commands"
ADMIN_SECTION = "admin"

AddCommands = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


@dataclass(frozen=True)
class RolePlugin:
    """What a role package offers the `honeyfleet` command."""

    role: Role
    """The role's certificate role; its value is also the command and config section name."""
    help: str
    """One line for ``honeyfleet --help``."""
    config: type[Any]
    """The frozen dataclass of the role's config section."""
    serve: Callable[[Any, asyncio.Event], Coroutine[Any, Any, None]]
    """Run the role with a parsed config until the event is set."""
    overrides: tuple[str, ...] = ()
    """Config keys the role's command also takes as ``--key`` flags."""
    joinable: bool = True
    """Whether ``honeyfleet <role> join`` enrols a host as this role with a join token."""
    add_commands: AddCommands | None = None
    """Adds the role's further top-level commands (e.g. ``replay``, ``image``)."""
    check_with_others: Callable[[Any, Mapping[str, Any]], list[ConfigError]] | None = None
    """Checks the role's parsed section against the other sections of the same file
    (section -> parsed config), for ``config check``; returns the problems. Roles never
    import each other, so it reads the others' settings by attribute name."""

    @property
    def section(self) -> str:
        """The role's config section (and command name)."""
        return self.role.value


class NoRoles(FailedPrecondition):
    """No role is registered: the package metadata is missing or stale."""


def _points() -> dict[str, EntryPoint]:
    """The registered roles' entry points by name, none of them loaded."""
    points = {p.name: p for p in entry_points(group=ROLES_GROUP)}
    if not points:
        raise NoRoles(
            f"no roles registered under the {ROLES_GROUP!r} entry points: "
            "reinstall honeyfleet (pip install -e .) so its metadata is current"
        )
    return points


@functools.cache
def find_role(section: str) -> RolePlugin | None:
    """The role registered for a config section (None if there is none), loading only it:
    a role's process runs for months, and the other roles' configs it would import stay
    in its memory for nothing."""
    point = _points().get(section)
    if point is None:
        return None
    plugin = point.load()
    if not isinstance(plugin, RolePlugin) or plugin.section != point.name:
        raise NoRoles(f"entry point {point.name} = {point.value} is not a RolePlugin for it")
    return plugin


def role_sections() -> set[str]:
    """The registered roles' config sections, without loading any of them."""
    return set(_points())


@functools.cache
def roles() -> dict[str, RolePlugin]:
    """Config section -> the role registered for it (in a stable order), all loaded."""
    return {name: plugin for name in sorted(_points()) if (plugin := find_role(name)) is not None}


def extra_commands() -> list[AddCommands]:
    """The ``honeyfleet.commands`` entry points (commands spanning roles, like ``up``)."""
    return [p.load() for p in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: p.name)]


def sections() -> dict[str, type[Any]]:
    """Every known config section -> its dataclass (the roles' and the operator tools')."""
    return {**{s: r.config for s, r in roles().items()}, ADMIN_SECTION: AdminConfig}


def load_role(
    cls: type[T], section: str, path: Path | None, overrides: Mapping[str, Any] | None = None
) -> T:
    """Parse one section of a config file (defaults, env and overrides apply)."""
    table: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        data = read_toml(path)
        # Only the names: checking them must not load every role.
        unknown = sorted(set(data) - role_sections() - {ADMIN_SECTION})
        if unknown:
            raise ConfigProblems([ConfigError(k, "unknown section") for k in unknown])
        table = data.get(section, {})
        base = path.resolve().parent
    return parse_section(cls, section, table, base_dir=base, overrides=overrides)
