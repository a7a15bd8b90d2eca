"""Cowrie's userdb: which username/password pairs let an attacker in.

One rule a line, ``username:uid:password`` (the uid field is ignored, by convention
``x``). Either side may be ``*`` (anything) or ``/regex/`` (``/regex/i`` ignores case);
a password starting with ``!`` denies instead of allows. Blank lines and lines starting
with ``#`` are skipped. The first rule whose username and password both match decides,
as in Cowrie; no matching rule denies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from honeyfleet.errors import ConfigError

# Rules come from the operator, inputs from attackers: bound both so a rule cannot be a
# huge pattern and an attacker's string cannot make a pattern run long.
MAX_PATTERN = 256
MAX_INPUT = 1024
MAX_RULES = 10_000
DEFAULT_RULES = "root:x:!root\nroot:x:!123456\nroot:x:!/honeypot/i\nroot:x:*\n"
_REGEX = re.compile(r"/(.+)/(i)?")

Matcher = str | re.Pattern[str]


@dataclass(frozen=True)
class Rule:
    """One userdb line."""

    username: Matcher
    password: Matcher
    allow: bool
    line: int


class UserDB:
    """An ordered list of rules; :meth:`check` says whether a login is accepted."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    @classmethod
    def parse(cls, text: str, source: str = "userdb") -> UserDB:
        """Parse userdb text; ConfigError names ``source:line`` for a malformed line."""
        rules = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            parts = line.split(":", 2)
            if len(parts) != 3 or not parts[0]:
                raise ConfigError(where, f"expected username:x:password, got {line[:80]!r}")
            username, _, password = parts
            allow = not password.startswith("!")
            if not allow:
                password = password[1:]
            rules.append(Rule(_matcher(username, where), _matcher(password, where), allow, number))
            if len(rules) > MAX_RULES:
                raise ConfigError(where, f"more than {MAX_RULES} rules")
        return cls(rules)

    @classmethod
    def load(cls, path: Path | None) -> UserDB:
        """Read a userdb file, or the built-in default rules when ``path`` is None."""
        if path is None:
            return cls.parse(DEFAULT_RULES, "default userdb")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("userdb", f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("userdb", f"{path} is not UTF-8 text") from None
        return cls.parse(text, str(path))

    def check(self, username: str, password: str) -> bool:
        """Whether the first rule matching this pair allows it."""
        for rule in self.rules:
            if _matches(rule.username, username) and _matches(rule.password, password):
                return rule.allow
        return False


def _matcher(field: str, where: str) -> Matcher:
    """A literal, ``*``, or a compiled ``/regex/``."""
    found = _REGEX.fullmatch(field)
    if found is None:
        return field
    pattern = found.group(1)
    if len(pattern) > MAX_PATTERN:
        raise ConfigError(where, f"regex longer than {MAX_PATTERN} characters")
    try:
        return re.compile(pattern, re.IGNORECASE if found.group(2) else 0)
    except re.error as e:
        raise ConfigError(where, f"bad regex /{pattern}/: {e}") from None


def _matches(matcher: Matcher, value: str) -> bool:
    """Cowrie's matching: ``*`` anything, literals exactly, regexes anywhere (search)."""
    if isinstance(matcher, str):
        return matcher in ("*", value)
    return len(value) <= MAX_INPUT and matcher.search(value) is not None
