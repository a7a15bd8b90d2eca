"""The Telnet keys of the sensor's config: Cowrie-style TOML parses, bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from honeyfleet.config import ConfigProblems, parse_section
from sensor.config import SensorConfig

TOML_STYLE = {
    # As an operator writes them in TOML: literal strings keep the regex escapes.
    "telnet_listen": ["0.0.0.0:23", "[::]:23"],
    "telnet_username_prompt_regex": r"(?:^|\n)[^\n]*(?:[Ll]ogin|[Uu]sername): ?$",
    "telnet_username_in_negotiation_regex": r"(USER\x01)([^\x00-\x03\xff]*)",
}


def parse(table: dict[str, object]) -> SensorConfig:
    return parse_section(SensorConfig, "sensor", table, base_dir=Path("/"), env={})


def test_cowrie_style_values_parse_to_the_defaults() -> None:
    config = parse(TOML_STYLE)
    default = SensorConfig()
    assert config.telnet_listen == ("0.0.0.0:23", "[::]:23")
    assert config.telnet_username_prompt_regex == default.telnet_username_prompt_regex
    assert (
        config.telnet_username_in_negotiation_regex == default.telnet_username_in_negotiation_regex
    )
    assert parse({"telnet_listen": []}).telnet_listen == ()  # Telnet off


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("telnet_password_prompt_regex", "(", "not a valid regular expression"),
        ("telnet_username_in_negotiation_regex", "USER(.*)", "username in group 2"),
        ("telnet_listen", ["localhost"], "must be host:port"),
        ("telnet_max_subnegotiation", 0, "greater than 0"),
        ("telnet_login_fail_delay", -1, "0 or more"),
    ],
)
def test_bad_values_name_their_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigProblems, match=f"sensor.{key}: .*{problem}"):
        parse({key: value})
