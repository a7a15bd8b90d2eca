"""Configuration: one TOML file with a section per role, parsed once at the edge.

Each role declares a frozen dataclass whose fields are made with :func:`setting`.
:func:`parse_section` fills one from a TOML table, then applies
``HONEYFLEET_<SECTION>_<KEY>`` environment variables, then explicit overrides (CLI
flags). Unknown keys and bad values are collected and reported together, each naming
its key, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from honeyfleet.errors import ConfigError, HoneyfleetError

T = TypeVar("T")
Check = Callable[[Any], str | None]


class ConfigProblems(HoneyfleetError):
    """Every problem found in a configuration, each naming its key."""

    def __init__(self, problems: list[ConfigError]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    check: Check | None = None,
) -> Any:
    """Declare a config field with its documentation and an optional validity check."""
    metadata = {"help": help, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def positive(value: Any) -> str | None:
    """Check: a number greater than zero."""
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    """Check: a number of zero or more."""
    return None if value >= 0 else "must be 0 or more"


def fraction(value: float) -> str | None:
    """Check: a number in (0, 1]."""
    return None if 0 < value <= 1 else "must be more than 0 and at most 1"


def instance_id(value: str) -> str | None:
    """Check: empty, or 1-128 printable ASCII characters without spaces."""
    if value == "" or re.fullmatch(r"[\x21-\x7e]{1,128}", value):
        return None
    return "must be empty or 1-128 printable ASCII characters without spaces"


def host_port(value: Any) -> str | None:
    """Check: ``host:port`` (IPv6 hosts in brackets) with a port in 0..65535."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be host:port, e.g. 127.0.0.1:7300 or [::1]:7300"
    return None


def optional_host_port(value: str) -> str | None:
    """Check: empty (the feature is off) or ``host:port``."""
    return None if value == "" else host_port(value)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into a ConfigError naming the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None


def parse_section(
    cls: type[T],
    section: str,
    table: Mapping[str, Any] | None,
    *,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build the dataclass ``cls`` from a TOML table plus environment and overrides.

    Relative paths resolve against ``base_dir`` (the config file's directory).
    Raises ConfigProblems listing every bad or unknown key.
    """
    env = os.environ if env is None else env
    table = dict(table or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    problems: list[ConfigError] = []
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(ConfigError(f"{section}.{key}", f"unknown key (known: {known})"))
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{section}.{name}"
        env_name = f"HONEYFLEET_{section}_{name}".upper()
        raw: Any = dataclasses.MISSING
        from_env = False
        if overrides and overrides.get(name) is not None:
            raw = overrides[name]
        elif env_name in env:
            raw, from_env = env[env_name], True
        elif name in table:
            raw = table[name]
        if raw is dataclasses.MISSING:
            if _has_no_default(field):
                problems.append(ConfigError(key, "required"))
            continue
        try:
            value = _coerce(hints[name], raw, from_env=from_env, base_dir=base_dir)
        except (TypeError, ValueError) as e:
            where = f" (from {env_name})" if from_env else ""
            problems.append(ConfigError(key, f"{e}{where}"))
            continue
        check = field.metadata.get("check")
        if check is not None and value is not None and (problem := check(value)):
            problems.append(ConfigError(key, f"{problem}, got {value!r}"))
            continue
        values[name] = value
    if problems:
        raise ConfigProblems(problems)
    for name, field in fields.items():
        # Defaults that are relative paths resolve like values from the file.
        if name not in values and isinstance(field.default, Path):
            values[name] = _resolve(field.default, base_dir)
    try:
        return cls(**values)
    except ConfigError as e:  # cross-field checks in __post_init__
        raise ConfigProblems([ConfigError(f"{section}.{e.key}", e.problem)]) from None


def _has_no_default(field: dataclasses.Field[Any]) -> bool:
    """Whether a dataclass field must be given."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _resolve(path: Path, base_dir: Path) -> Path:
    """Make a config path absolute relative to the config file's directory."""
    path = path.expanduser()
    return path if path.is_absolute() else base_dir / path


def _coerce(hint: Any, raw: Any, *, from_env: bool, base_dir: Path) -> Any:
    """Convert a TOML or environment value to the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (from_env and raw == ""):
            return None
        return _coerce(inner[0], raw, from_env=from_env, base_dir=base_dir)
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"must be one of {', '.join(map(repr, args))}, got {raw!r}")
        return raw
    if hint is bool:
        if from_env and isinstance(raw, str):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if not isinstance(raw, bool):
            raise ValueError(f"must be true or false, got {raw!r}")
        return raw
    if hint is int:
        if from_env and isinstance(raw, str):
            raw = _parse_number(raw, int)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"must be a whole number, got {raw!r}")
        return raw
    if hint is float:
        if from_env and isinstance(raw, str):
            raw = _parse_number(raw, float)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"must be a number, got {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"must be a string, got {raw!r}")
        return raw
    if hint is Path:
        if not isinstance(raw, str | Path) or str(raw) == "":
            raise ValueError(f"must be a path, got {raw!r}")
        return _resolve(Path(raw), base_dir)
    if origin is tuple:
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise ValueError(f"must be a list, got {raw!r}")
        return tuple(_coerce(args[0], item, from_env=from_env, base_dir=base_dir) for item in raw)
    if origin is dict or origin is Mapping:
        if from_env and isinstance(raw, str):
            raw = dict(_split_pair(part) for part in raw.split(",") if part.strip())
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise ValueError(f"must be a table of strings, got {raw!r}")
        return types.MappingProxyType(dict(raw))
    raise TypeError(f"unsupported config type {hint!r}")


def _parse_number(text: str, kind: type[int] | type[float]) -> int | float:
    """Parse a number from an environment variable, with a readable error."""
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None


def _split_pair(text: str) -> tuple[str, str]:
    """Parse ``key=value`` from an environment variable's comma-separated table."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"must be key=value pairs separated by commas, got {text!r}")
    return key.strip(), value.strip()


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a config file of tables of scalars and lists (what our configs hold)."""
    lines: list[str] = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def _toml_value(value: Any) -> str:
    """A TOML literal; JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {value!r} as TOML")
