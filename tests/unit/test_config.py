"""Config parsing: types, environment overrides, every problem named by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ControllerConfig
from honeyfleet.config import ConfigProblems, parse_section
from poolnode.config import PoolNodeConfig


def test_defaults_and_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    config = parse_section(
        ControllerConfig, "controller", {"tls_cert": "certs/c.pem"}, base_dir=tmp_path, env={}
    )
    assert config.tls_cert == tmp_path / "certs/c.pem"
    assert config.state_dir == tmp_path / "state/controller"
    assert config.lease_wait == 20.0


def test_environment_overrides_file_and_overrides_win(tmp_path: Path) -> None:
    env = {"HONEYFLEET_CONTROLLER_LEASE_WAIT": "7", "HONEYFLEET_CONTROLLER_LISTEN": "[::1]:9"}
    config = parse_section(
        ControllerConfig,
        "controller",
        {"lease_wait": 3.0},
        base_dir=tmp_path,
        env=env,
        overrides={"listen": "127.0.0.1:1"},
    )
    assert config.lease_wait == 7.0
    assert config.listen == "127.0.0.1:1"


def test_tables_and_booleans_from_environment(tmp_path: Path) -> None:
    env = {
        "HONEYFLEET_POOLNODE_LABELS": "image=openwrt, arch=mips",
        "HONEYFLEET_POOLNODE_SHARE_GUESTS": "yes",
        "HONEYFLEET_POOLNODE_BACKEND_PASS": "pw",
    }
    config = parse_section(PoolNodeConfig, "poolnode", {}, base_dir=tmp_path, env=env)
    assert dict(config.labels) == {"image": "openwrt", "arch": "mips"}
    assert config.share_guests is True


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    table = {"listen": "no-port", "missed_heartbeats": 0, "lease_ttl": "long", "colour": "x"}
    env = {"HONEYFLEET_CONTROLLER_HEARTBEAT_INTERVAL": "soon"}
    with pytest.raises(ConfigProblems) as e:
        parse_section(ControllerConfig, "controller", table, base_dir=tmp_path, env=env)
    keys = sorted(p.key for p in e.value.problems)
    assert keys == [
        "controller.colour",
        "controller.heartbeat_interval",
        "controller.lease_ttl",
        "controller.listen",
        "controller.missed_heartbeats",
    ]
    assert "HONEYFLEET_CONTROLLER_HEARTBEAT_INTERVAL" in str(e.value)
    assert "must be greater than 0" in str(e.value)


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems, match="whole number"):
        parse_section(
            ControllerConfig, "controller", {"missed_heartbeats": True}, base_dir=tmp_path, env={}
        )


def test_cross_field_problems_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems, match=r"poolnode\.backend_pass"):
        parse_section(PoolNodeConfig, "poolnode", {}, base_dir=tmp_path, env={})
    with pytest.raises(ConfigProblems, match=r"poolnode\.static_hosts"):
        parse_section(
            PoolNodeConfig,
            "poolnode",
            {"backend": "static", "backend_pass": "x"},
            base_dir=tmp_path,
            env={},
        )


def test_disk_diff_is_refused_on_the_static_backend(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems, match=r"poolnode\.disk_diff"):
        parse_section(
            PoolNodeConfig,
            "poolnode",
            {"backend": "static", "backend_pass": "x", "static_hosts": ["h:22"], "disk_diff": True},
            base_dir=tmp_path,
            env={},
        )
    with pytest.raises(ConfigProblems, match=r"poolnode\.disk_diff_max_files"):
        parse_section(
            PoolNodeConfig,
            "poolnode",
            {"backend_pass": "x", "disk_diff_max_files": 0},
            base_dir=tmp_path,
            env={},
        )


def test_written_toml_reads_back(tmp_path: Path) -> None:
    from honeyfleet.config import read_toml, write_toml

    sections = {
        "controller": {"listen": "127.0.0.1:7300", "lease_wait": 2.5, "missed_heartbeats": 4},
        "poolnode": {
            "share_guests": True,
            "static_hosts": ['we"ird\\\\host:22'],
            "labels": {"image": "busybox"},
            "backend_pass": "p\\nw",
        },
    }
    path = tmp_path / "out.toml"
    write_toml(path, sections)
    assert read_toml(path) == sections
