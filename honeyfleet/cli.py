"""The `honeyfleet` command: one sub-command per role and operator task."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from honeyfleet import __version__
from honeyfleet.adminconfig import AdminConfig
from honeyfleet.config import ConfigProblems, parse_section, read_toml
from honeyfleet.errors import HoneyfleetError
from honeyfleet.pki import Role
from honeyfleet.systemd import notify
from honeyfleet.tls import TlsFiles

log = logging.getLogger("honeyfleet")
T = TypeVar("T")
EXIT_ERROR = 2


def _roles() -> dict[str, type[Any]]:
    """Config section name -> dataclass (imported lazily: a sensor needs no libvirt)."""
    from controller.config import ControllerConfig
    from poolnode.config import PoolNodeConfig
    from sensor.config import SensorConfig

    return {
        "controller": ControllerConfig,
        "poolnode": PoolNodeConfig,
        "sensor": SensorConfig,
        "admin": AdminConfig,
    }


def load_role(
    cls: type[T], section: str, path: Path | None, overrides: Mapping[str, Any] | None = None
) -> T:
    """Parse one role's section of a config file (defaults, env and overrides apply)."""
    table: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        data = read_toml(path)
        unknown = sorted(set(data) - set(_roles()))
        if unknown:
            from honeyfleet.errors import ConfigError

            raise ConfigProblems([ConfigError(k, "unknown section") for k in unknown])
        table = data.get(section, {})
        base = path.resolve().parent
    return parse_section(cls, section, table, base_dir=base, overrides=overrides)


async def _until_signalled(body: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    """Run a server body until SIGINT or SIGTERM; SIGHUP is a reload, never a kill.

    Servers re-read changed TLS files and revocations by themselves, so a reload
    (systemd's ExecReload) only needs acknowledging.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        log.info("SIGHUP: changed certificates and revocations are picked up automatically")
        notify("RELOADING=1")
        notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    await body(stop)
    return 0


def _cmd_controller(args: argparse.Namespace) -> int:
    from controller.config import ControllerConfig
    from controller.server import serve

    config = load_role(ControllerConfig, "controller", args.config, {"listen": args.listen})
    return asyncio.run(_until_signalled(lambda stop: serve(config, stop)))


def _cmd_sensor(args: argparse.Namespace) -> int:
    from sensor.config import SensorConfig
    from sensor.service import serve

    config = load_role(SensorConfig, "sensor", args.config)
    return asyncio.run(_until_signalled(lambda stop: serve(config, stop)))


def _cmd_poolnode(args: argparse.Namespace) -> int:
    from poolnode.config import PoolNodeConfig
    from poolnode.server import serve

    config = load_role(PoolNodeConfig, "poolnode", args.config)
    return asyncio.run(_until_signalled(lambda stop: serve(config, stop)))


def _cmd_image(args: argparse.Namespace) -> int:
    from poolnode.image import main as image_main

    code: int = image_main(args.rest)
    return code


def _join(role: Role, section: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from honeyfleet.enroll import enroll

        if args.config is not None:
            cls = _roles()[section]
            files: TlsFiles = load_role(cls, section, args.config).tls
        else:
            out = args.out
            files = TlsFiles(ca=out / "ca.pem", cert=out / "cert.pem", key=out / "key.pem")
        identity = asyncio.run(
            enroll(
                args.controller,
                args.token,
                role,
                files,
                name=args.name,
                dns_names=args.dns,
                ip_addresses=args.ip,
                overwrite=args.force,
            )
        )
        print(f"enrolled as {identity.uri}; certificate in {files.cert}, key in {files.key}")
        return 0

    return run


def _admin(args: argparse.Namespace) -> AdminConfig:
    overrides = {
        "controller": args.controller,
        "tls_ca": args.ca,
        "tls_cert": args.cert,
        "tls_key": args.key,
    }
    return load_role(AdminConfig, "admin", args.config, overrides)


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from honeyfleet.status import fetch, render, to_json

    config = _admin(args)
    state = asyncio.run(fetch(config.controller, config.tls))
    if args.json:
        print(to_json(state))
    else:
        # Wide enough for the tables when piped, where rich would assume 80 columns.
        render(state, Console(width=None if sys.stdout.isatty() else 160))
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    import grpc

    from honeyfleet.errors import RPCError
    from honeyfleet.tls import secure_channel
    from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc

    config = _admin(args)

    async def call() -> None:
        async with secure_channel(config.controller, config.tls) as channel:
            stub = fleet_pb2_grpc.FleetServiceStub(channel)
            try:
                if args.node_command == "drain":
                    await stub.DrainPoolNode(fleet_pb2.DrainPoolNodeRequest(name=args.name))
                elif args.node_command == "resume":
                    await stub.ResumePoolNode(fleet_pb2.ResumePoolNodeRequest(name=args.name))
                else:
                    await stub.RemovePoolNode(fleet_pb2.RemovePoolNodeRequest(name=args.name))
            except grpc.aio.AioRpcError as e:
                raise RPCError.wrap(args.node_command, e) from None

    asyncio.run(call())
    print(f"pool node {args.name}: {args.node_command} done")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    data = read_toml(args.file)
    roles = _roles()
    problems = []
    from honeyfleet.errors import ConfigError

    for section in data:
        if section not in roles:
            problems.append(ConfigError(section, f"unknown section (known: {', '.join(roles)})"))
            continue
        try:
            parse_section(
                roles[section], section, data[section], base_dir=args.file.resolve().parent
            )
        except ConfigProblems as e:
            problems.extend(e.problems)
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print(f"{args.file}: OK ({', '.join(data) or 'no sections'})")
    return 0


def _add_admin_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file with an [admin] section")
    p.add_argument("--controller", help="controller host:port")
    p.add_argument("--ca", type=Path, help="fleet CA certificate")
    p.add_argument("--cert", type=Path, help="admin certificate")
    p.add_argument("--key", type=Path, help="admin key")


def _add_join(commands: Any, role: Role, section: str) -> None:
    p = commands.add_parser("join", help=f"enrol this host as a {role} with a join token")
    p.add_argument(
        "--controller",
        required=True,
        help="the controller's enrolment endpoint host:port (enroll_listen)",
    )
    p.add_argument("--token", required=True, help="join token from `honeyfleet pki token create`")
    p.add_argument("--name", help="name in the fleet (default: the token's, else the host name)")
    p.add_argument(
        "--dns",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="DNS names to put in the certificate",
    )
    p.add_argument(
        "--ip",
        nargs="+",
        action="extend",
        default=[],
        metavar="ADDR",
        help="IP addresses to put in the certificate",
    )
    p.add_argument("--config", type=Path, help=f"write to the tls_* paths of its [{section}]")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("tls"),
        help="directory for ca.pem, cert.pem, key.pem (without --config)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_join(role, section))


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    from honeyfleet import eventscli, up
    from honeyfleet.pki import cli as pki_cli
    from sensor import cli as sensor_cli

    parser = argparse.ArgumentParser(prog="honeyfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"honeyfleet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    pki_cli.add_parser(commands)
    eventscli.add_parser(commands)

    p = commands.add_parser("controller", help="run the controller")
    p.add_argument("--config", type=Path, help="honeyfleet.toml")
    p.add_argument("--listen", help="override [controller] listen")
    p.set_defaults(func=_cmd_controller)

    p = commands.add_parser("poolnode", help="run a pool node (or join the fleet as one)")
    p.add_argument("--config", type=Path, help="honeyfleet.toml with a [poolnode] section")
    p.set_defaults(func=_cmd_poolnode)
    _add_join(
        p.add_subparsers(dest="poolnode_command", metavar="COMMAND"), Role.POOLNODE, "poolnode"
    )

    p = commands.add_parser("sensor", help="run a sensor (or join the fleet as one)")
    p.add_argument("--config", type=Path, help="honeyfleet.toml with a [sensor] section")
    p.set_defaults(func=_cmd_sensor)
    _add_join(p.add_subparsers(dest="sensor_command", metavar="COMMAND"), Role.SENSOR, "sensor")
    sensor_cli.add_parsers(commands)

    up.add_parser(commands)

    p = commands.add_parser(
        "image", help="build the guest image (image build --help)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_image)

    p = commands.add_parser("status", help="show fleet state")
    _add_admin_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_status)

    p = commands.add_parser("node", help="drain, resume or remove a pool node")
    sub = p.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    for name, text in (
        ("drain", "stop new leases on a node"),
        ("resume", "undo a drain"),
        ("remove", "forget a decommissioned node (it must be stopped)"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("name", help="pool node name")
        _add_admin_flags(q)
        q.set_defaults(func=_cmd_node)

    p = commands.add_parser("config", help="configuration tools")
    sub = p.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    q = sub.add_parser("check", help="validate a config file and print every problem")
    q.add_argument("file", type=Path)
    q.set_defaults(func=_cmd_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `honeyfleet` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except ConfigProblems as e:
        for problem in e.problems:
            print(f"config: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except HoneyfleetError as e:
        print(f"honeyfleet: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
