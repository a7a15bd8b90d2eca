"""The `honeyfleet` command: one sub-command per role and operator task."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from honeyfleet import __version__
from honeyfleet.admincli import add_admin_flags, admin_config
from honeyfleet.config import ConfigProblems, parse_section, read_toml
from honeyfleet.errors import ConfigError, HoneyfleetError
from honeyfleet.pki.cli import add_address_flags
from honeyfleet.roles import (
    RolePlugin,
    extra_commands,
    find_role,
    load_role,
    roles,
    sections,
)
from honeyfleet.systemd import notify
from honeyfleet.tls import TlsFiles

log = logging.getLogger("honeyfleet")
EXIT_ERROR = 2


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


def _serve(plugin: RolePlugin) -> Callable[[argparse.Namespace], int]:
    """The command that runs a role with its config section."""

    def run(args: argparse.Namespace) -> int:
        overrides = {key: getattr(args, key) for key in plugin.overrides}
        config = load_role(plugin.config, plugin.section, args.config, overrides)
        return asyncio.run(_until_signalled(lambda stop: plugin.serve(config, stop)))

    return run


def _join(plugin: RolePlugin) -> Callable[[argparse.Namespace], int]:
    """The ``<role> join`` command: enrol this host with a join token."""

    def run(args: argparse.Namespace) -> int:
        from honeyfleet.enroll import enroll, read_token_file

        if args.token is not None:
            print(
                "warning: --token puts the join token in shell history and `ps`; "
                "use --token-file FILE or --token-file - (stdin)",
                file=sys.stderr,
            )
            token = args.token
        else:
            token = read_token_file(args.token_file)

        if args.config is not None:
            files: TlsFiles = load_role(plugin.config, plugin.section, args.config).tls
        else:
            out = args.out
            files = TlsFiles(ca=out / "ca.pem", cert=out / "cert.pem", key=out / "key.pem")
        identity = asyncio.run(
            enroll(
                args.controller,
                token,
                plugin.role,
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


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from honeyfleet.status import fetch, render, to_json

    config = admin_config(args)
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

    config = admin_config(args)

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
    known = sections()
    problems = []
    parsed: dict[str, Any] = {}
    for section in data:
        if section not in known:
            problems.append(ConfigError(section, f"unknown section (known: {', '.join(known)})"))
            continue
        try:
            parsed[section] = parse_section(
                known[section], section, data[section], base_dir=args.file.resolve().parent
            )
        except ConfigProblems as e:
            problems.extend(e.problems)
    for section, config in parsed.items():
        plugin = roles().get(section)
        if plugin is not None and plugin.check_with_others is not None:
            problems.extend(plugin.check_with_others(config, parsed))
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print(f"{args.file}: OK ({', '.join(data) or 'no sections'})")
    return 0


def _add_join(commands: Any, plugin: RolePlugin) -> None:
    role, section = plugin.role, plugin.section
    p = commands.add_parser("join", help=f"enrol this host as a {role} with a join token")
    p.add_argument(
        "--controller",
        required=True,
        help="the controller's enrolment endpoint host:port (enroll_listen)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the join token from `honeyfleet pki token create` (- for stdin)",
    )
    source.add_argument(
        "--token", help="the join token itself (deprecated: visible in `ps` and shell history)"
    )
    p.add_argument("--name", help="only to double-check: the token names the member")
    add_address_flags(
        p,
        "only to double-check: the token names the certificate's DNS names",
        "only to double-check: the token names the certificate's IP addresses",
    )
    p.add_argument("--config", type=Path, help=f"write to the tls_* paths of its [{section}]")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("tls"),
        help="directory for ca.pem, cert.pem, key.pem (without --config)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_join(plugin))


def build_parser(role: str | None = None) -> argparse.ArgumentParser:
    """The full command-line parser, or with ``role`` only that role's command.

    A role's process runs for months: built alone, its parser never imports the
    operator tools' modules (rich, the events and artefacts clients, ``up``), which
    would otherwise stay in its memory for nothing (about 3.5 MiB).
    """
    parser = argparse.ArgumentParser(prog="honeyfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"honeyfleet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if role is not None:
        plugin = find_role(role)
        if plugin is None:
            raise ValueError(f"no role {role!r} is registered")
        _add_role(commands, plugin, tools=False)
        return parser

    from honeyfleet import artefactscli, eventscli
    from honeyfleet.pki import cli as pki_cli

    pki_cli.add_parser(commands)
    eventscli.add_parser(commands)
    artefactscli.add_parser(commands)

    for plugin in roles().values():
        _add_role(commands, plugin, tools=True)
    for add_commands in extra_commands():
        add_commands(commands)

    p = commands.add_parser("status", help="show fleet state")
    add_admin_flags(p)
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
        add_admin_flags(q)
        q.set_defaults(func=_cmd_node)

    p = commands.add_parser("config", help="configuration tools")
    sub = p.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    q = sub.add_parser("check", help="validate a config file and print every problem")
    q.add_argument("file", type=Path)
    q.set_defaults(func=_cmd_config_check)
    return parser


def _add_role(commands: Any, plugin: RolePlugin, *, tools: bool) -> None:
    """A role's command (run it, ``join``), and with ``tools`` its further commands."""
    section = plugin.section
    p = commands.add_parser(section, help=plugin.help)
    p.add_argument("--config", type=Path, help=f"honeyfleet.toml with a [{section}] section")
    for key in plugin.overrides:
        p.add_argument(f"--{key}", help=f"override [{section}] {key}")
    p.set_defaults(func=_serve(plugin))
    if plugin.joinable:
        _add_join(p.add_subparsers(dest=f"{section}_command", metavar="COMMAND"), plugin)
    if tools and plugin.add_commands is not None:
        plugin.add_commands(commands)


def _command(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option (the top-level
    options before it take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `honeyfleet` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    # A role's command loads only that role (honeyfleet.roles.find_role).
    is_role = command is not None and find_role(command) is not None
    args = build_parser(command if is_role else None).parse_args(argv)
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
