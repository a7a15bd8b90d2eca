"""Cowrie's userdb format: wildcards, negation, regexes, first match wins, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from honeyfleet.errors import ConfigError
from sensor.userdb import UserDB

RULES = """
# comment, then a blank line

root:x:!root
root:x:!/^admin[0-9]+$/
root:x:*
/^adm.n$/i:x:secret
*:x:!*
"""


def test_first_matching_rule_wins_with_negation_and_wildcards() -> None:
    db = UserDB.parse(RULES)
    assert db.check("root", "toor")
    assert not db.check("root", "root")
    assert not db.check("root", "admin42")
    assert db.check("root", "admin")  # the regex is anchored: no match, then `*` allows
    assert db.check("ADMIN", "secret")
    assert not db.check("admin", "other")
    assert not db.check("guest", "guest")  # `*:x:!*` denies everyone else


def test_no_rule_matching_denies() -> None:
    assert not UserDB.parse("alice:x:wonderland").check("bob", "wonderland")


def test_default_rules_let_root_in_with_anything_but_obvious_passwords() -> None:
    db = UserDB.load(None)
    assert db.check("root", "hunter2")
    assert not db.check("root", "root")
    assert not db.check("root", "MyHoneyPot")
    assert not db.check("admin", "hunter2")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("root", "expected username:x:password"),
        (":x:pw", "expected username:x:password"),
        ("root:x:/(/", "bad regex"),
        ("root:x:/" + "a" * 300 + "/", "regex longer than"),
    ],
)
def test_malformed_lines_name_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        UserDB.parse("# header\n" + text, "/etc/userdb.txt")
    assert caught.value.key == "/etc/userdb.txt:2"
    assert problem in caught.value.problem


def test_huge_attacker_input_never_reaches_a_regex() -> None:
    db = UserDB.parse("root:x:!/a+$/\nroot:x:*")
    assert db.check("root", "a" * 100_000)  # too long for the regex: falls through to `*`


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        UserDB.load(tmp_path / "missing.txt")
