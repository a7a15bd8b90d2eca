"""The flags and config of operator commands that talk to the controller as an admin."""

from __future__ import annotations

import argparse
from pathlib import Path

from honeyfleet.adminconfig import AdminConfig
from honeyfleet.roles import ADMIN_SECTION, load_role


def add_admin_flags(p: argparse.ArgumentParser) -> None:
    """Add --config and the per-flag overrides of the ``[admin]`` section."""
    p.add_argument("--config", type=Path, help="config file with an [admin] section")
    p.add_argument("--controller", help="controller host:port")
    p.add_argument("--ca", type=Path, help="fleet CA certificate")
    p.add_argument("--cert", type=Path, help="admin certificate")
    p.add_argument("--key", type=Path, help="admin key")


def admin_config(args: argparse.Namespace) -> AdminConfig:
    """The ``[admin]`` settings from the config file and the flags of `add_admin_flags`."""
    overrides = {
        "controller": args.controller,
        "tls_ca": args.ca,
        "tls_cert": args.cert,
        "tls_key": args.key,
    }
    return load_role(AdminConfig, ADMIN_SECTION, args.config, overrides)
