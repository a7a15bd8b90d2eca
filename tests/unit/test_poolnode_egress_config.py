"""The egress containment settings: defaults, and refusals that name their key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from honeyfleet.config import ConfigProblems, parse_section
from poolnode.config import PoolNodeConfig


def _parse(tmp_path: Path, **table: Any) -> PoolNodeConfig:
    return parse_section(
        PoolNodeConfig, "poolnode", {"backend_pass": "x", **table}, base_dir=tmp_path, env={}
    )


def test_sinkhole_is_the_default_and_fetch_is_opt_in(tmp_path: Path) -> None:
    config = _parse(tmp_path)
    assert config.egress_policy == "sinkhole"
    assert config.egress_fetch_proxy == ""
    fetch = _parse(
        tmp_path,
        egress_policy="fetch",
        egress_fetch_proxy="proxy.internal:3128",
        egress_fetch_deny=["*.gov", "10.0.0.1"],
    )
    assert fetch.egress_fetch_deny == ("*.gov", "10.0.0.1")


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"egress_policy": "allow"}, "egress_policy", "must be one of 'drop', 'sinkhole'"),
        ({"egress_policy": "fetch"}, "egress_fetch_proxy", "required with"),
        ({"egress_fetch_proxy": "nohost"}, "egress_fetch_proxy", "host:port"),
        ({"egress_dns_port": 70000}, "egress_dns_port", "TCP port"),
        ({"egress_dns_port": 9000, "egress_sinkhole_port": 9000}, "egress_sinkhole_port", "differ"),
        ({"egress_events_per_minute": 0}, "egress_events_per_minute", "greater than 0"),
        ({"egress_fetch_allow": ["ok.example", "bad host"]}, "egress_fetch_allow", "'bad host'"),
        ({"egress_fetch_max_bytes": -1}, "egress_fetch_max_bytes", "greater than 0"),
        ({"egress_log_group": 70000}, "egress_log_group", "NFLOG group"),
        ({"egress_dns_port": 9000, "egress_tftp_port": 9000}, "egress_tftp_port", "both UDP"),
    ],
)
def test_bad_egress_settings_name_their_key(
    tmp_path: Path, table: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigProblems) as e:
        _parse(tmp_path, **table)
    assert f"poolnode.{key}" in str(e.value)
    assert words in str(e.value)
