"""The ``honeyfleet pki`` sub-commands: create the fleet CA, issue, tokens, revocation.

``add_parser`` attaches everything to the main CLI's sub-parsers; each leaf command sets
``func(args) -> int``. Expected failures (PkiError, file-system errors) print one line on
stderr saying what to do and return exit code 2; only bugs produce tracebacks.

Every command takes ``--dir``, the CA directory: default ``$HONEYFLEET_PKI_DIR``, else
``./pki``.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from honeyfleet.pki import certs
from honeyfleet.pki.ca import (
    CA_CERT_FILE,
    ISSUED_DIR,
    ISSUING_CERT_FILE,
    LEAF_VALIDITY_DAYS,
    REVOKED_FILE,
    ROOT_DIR,
    init_ca,
    load_ca,
    rotate_issuing,
)
from honeyfleet.pki.errors import IdentityError, PkiError
from honeyfleet.pki.identity import Role, identity_from_certificate
from honeyfleet.pki.revocation import RevocationList
from honeyfleet.pki.tokens import ENROLLABLE_ROLES, create_token, read_token_unverified

__all__ = [
    "DEFAULT_DIR",
    "ENV_DIR",
    "EXIT_ERROR",
    "add_address_flags",
    "add_parser",
    "parse_duration",
]

ENV_DIR = "HONEYFLEET_PKI_DIR"
DEFAULT_DIR = Path("pki")
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], int]

_DURATION_RE = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ROLES = [r.value for r in Role]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pki`` command and its sub-commands to the main CLI's ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"CA directory (default: ${ENV_DIR}, else ./{DEFAULT_DIR})",
    )
    pki = subparsers.add_parser("pki", help="manage the fleet certificate authority")
    commands = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    p = commands.add_parser("init", parents=[common], help="create a new fleet CA")
    p.add_argument("--fleet", required=True, help="fleet name (the SPIFFE trust domain)")
    p.add_argument("--validity-days", type=_positive_int, default=3650, metavar="N")
    p.add_argument(
        "--root-dir",
        type=Path,
        default=None,
        help=f"where the root key goes (default: DIR/{ROOT_DIR}); move it offline afterwards",
    )
    p.set_defaults(func=_cmd_init)

    p = commands.add_parser(
        "rotate-issuing",
        parents=[common],
        help="replace the controller's issuing CA (needs the offline root key)",
    )
    p.add_argument("--root-dir", type=Path, required=True, help="directory holding root.key")
    p.add_argument("--validity-days", type=_positive_int, default=3650, metavar="N")
    p.add_argument(
        "--revoke-old",
        action="store_true",
        help="also revoke the old issuing CA: every certificate it signed is refused "
        "(after a compromise; members must re-enrol)",
    )
    p.set_defaults(func=_cmd_rotate_issuing)

    p = commands.add_parser("issue", parents=[common], help="issue a key and certificate")
    p.add_argument("--role", required=True, choices=_ROLES)
    p.add_argument("--name", required=True, help="unique name, e.g. the host name")
    add_address_flags(p, "DNS name SANs (no wildcards)", "IP address SANs")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: DIR/{ISSUED_DIR}/ROLE-NAME)",
    )
    p.add_argument(
        "--validity-days",
        type=_positive_int,
        default=LEAF_VALIDITY_DAYS,
        metavar="N",
        help="lifetime; controllers, pool nodes and sensors renew their own before it ends "
        f"(default {LEAF_VALIDITY_DAYS})",
    )
    p.set_defaults(func=_cmd_issue)

    token = commands.add_parser("token", help="join tokens for enrolling hosts")
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    p = token_commands.add_parser(
        "create", parents=[common], help="print a one-time join token on stdout"
    )
    p.add_argument("--role", required=True, choices=sorted(r.value for r in ENROLLABLE_ROLES))
    p.add_argument("--ttl", type=_duration_arg, default=timedelta(hours=1), help="e.g. 30m, 1h")
    p.add_argument("--name", required=True, help="the name the joining host gets")
    add_address_flags(
        p,
        "DNS names its certificate carries (pool nodes; no wildcards)",
        "IP addresses its certificate carries (pool nodes)",
    )
    p.add_argument(
        "--reenrol",
        action="store_true",
        help="the name is already enrolled: replace it and revoke its current certificate",
    )
    p.set_defaults(func=_cmd_token_create)

    p = commands.add_parser("revoke", parents=[common], help="revoke a certificate")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=_serial_arg, help="serial number in hex")
    which.add_argument("--cert", type=Path, help="certificate file to revoke")
    p.add_argument("--reason", default="unspecified")
    p.set_defaults(func=_cmd_revoke)

    p = commands.add_parser("list-revoked", parents=[common], help="list revoked serials")
    p.set_defaults(func=_cmd_list_revoked)

    p = commands.add_parser("show", parents=[common], help="describe a certificate file")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_show)


def add_address_flags(p: argparse.ArgumentParser, dns_help: str, ip_help: str) -> None:
    """Add the repeatable ``--dns NAME...`` and ``--ip ADDR...`` options to ``p``."""
    p.add_argument("--dns", nargs="+", action="extend", default=[], metavar="NAME", help=dns_help)
    p.add_argument("--ip", nargs="+", action="extend", default=[], metavar="ADDR", help=ip_help)


def parse_duration(text: str) -> timedelta:
    """Parse ``<positive integer><s|m|h|d>`` (e.g. ``30m``); ValueError on anything else."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a whole number and one unit, e.g. 90s, 30m, 1h, 2d"
        )
    return timedelta(**{_DURATION_UNITS[match[2]]: int(match[1])})


def _duration_arg(text: str) -> timedelta:
    """argparse type for durations."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    """argparse type for a positive whole number."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a whole number >= 1")
    return int(text)


def _serial_arg(text: str) -> int:
    """argparse type for a hex serial; accepts ``0x`` and OpenSSL's ``aa:bb`` spelling."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,40}", digits) or int(digits, 16) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid serial {text!r}: use the hex serial shown by `honeyfleet pki show`"
        )
    return int(digits, 16)


def _handles_errors(fn: Handler) -> Handler:
    """Turn expected errors into one stderr line and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        """Run the command, reporting PKI and file-system errors."""
        try:
            return fn(args)
        except PkiError as exc:
            _err(f"honeyfleet pki: error: {exc}")
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _err(
                f"honeyfleet pki: error: {where}{exc.strerror or exc}; check the path and "
                "its permissions"
            )
        return EXIT_ERROR

    return run


def _ca_dir(args: argparse.Namespace) -> Path:
    """The CA directory: --dir, else $HONEYFLEET_PKI_DIR, else ./pki."""
    if args.dir is not None:
        return Path(args.dir)
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _out(text: str) -> None:
    """Write a line to stdout (results only; diagnostics go to stderr)."""
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    """Write a line to stderr."""
    sys.stderr.write(text + "\n")


@_handles_errors
def _cmd_init(args: argparse.Namespace) -> int:
    """``pki init``: create the CA."""
    directory = _ca_dir(args)
    root_dir = args.root_dir if args.root_dir is not None else directory / ROOT_DIR
    ca = init_ca(directory, args.fleet, validity_days=args.validity_days, root_dir=root_dir)
    _out(f"created CA for fleet {ca.fleet!r} in {ca.directory}")
    _out(f"CA fingerprint (sha256): {ca.fingerprint}")
    _out(f"keep {ca.directory} private; distribute only {ca.directory / 'ca.pem'}")
    _out(f"move {root_dir} OFFLINE: its root.key is needed only to rotate the issuing CA")
    return 0


@_handles_errors
def _cmd_rotate_issuing(args: argparse.Namespace) -> int:
    """``pki rotate-issuing``: a new issuing CA from the root key; optionally revoke the old."""
    ca, old = rotate_issuing(_ca_dir(args), args.root_dir, validity_days=args.validity_days)
    _out(f"new issuing CA serial {ca.cert.serial_number:x}; old one {old.serial_number:x}")
    if args.revoke_old and old != ca.root:
        RevocationList(ca.revoked_path).revoke(old.serial_number, "issuing CA rotated out")
        _out(f"revoked the old issuing CA {old.serial_number:x}")
    _out("restart the controller to sign with the new issuing CA")
    return 0


@_handles_errors
def _cmd_issue(args: argparse.Namespace) -> int:
    """``pki issue``: generate a key and certificate for one identity."""
    directory = _ca_dir(args)
    ca = load_ca(directory)
    out = args.out if args.out is not None else directory / ISSUED_DIR / f"{args.role}-{args.name}"
    issued = ca.issue(
        Role(args.role),
        args.name,
        dns=args.dns,
        ips=args.ip,
        validity_days=args.validity_days,
        out_dir=out,
    )
    _out(f"issued {issued.identity.uri} serial {issued.serial:x}")
    _out(f"  key:  {issued.key_path}")
    _out(f"  cert: {issued.cert_path}")
    _out(f"  ca:   {issued.ca_path}")
    return 0


@_handles_errors
def _cmd_token_create(args: argparse.Namespace) -> int:
    """``pki token create``: print only the token on stdout, so it can be captured."""
    ca = load_ca(_ca_dir(args))
    token = create_token(
        ca,
        Role(args.role),
        ttl=args.ttl,
        name=args.name,
        dns=args.dns,
        ips=args.ip,
        reenrol=args.reenrol,
    )
    _out(token)
    claims = read_token_unverified(token)
    addresses = ", ".join((*claims.dns, *claims.ips)) or "none"
    replaces = "; replaces the current certificate" if claims.reenrol else ""
    _err(
        f"single-use join token for {args.role}/{args.name} (addresses: {addresses}), "
        f"fleet {ca.fleet!r}, expires {claims.expires_at.isoformat()}{replaces}"
    )
    return 0


@_handles_errors
def _cmd_revoke(args: argparse.Namespace) -> int:
    """``pki revoke``: add a serial (given, or read from a certificate) to revoked.json."""
    ca = load_ca(_ca_dir(args))
    if args.cert is not None:
        cert = certs.load_certificate(args.cert)
        if not ca.is_issuer_of(cert):
            raise PkiError(
                f"{args.cert} was not issued by the fleet CA in {ca.directory}; "
                "pass the CA directory that issued it with --dir"
            )
        serial = cert.serial_number
    else:
        serial = args.serial
    if RevocationList(ca.revoked_path).revoke(serial, args.reason):
        _out(f"revoked serial {serial:x} in {ca.revoked_path}")
    else:
        _out(f"serial {serial:x} was already revoked")
    return 0


@_handles_errors
def _cmd_list_revoked(args: argparse.Namespace) -> int:
    """``pki list-revoked``: one line per serial: hex serial, time, reason."""
    ca = load_ca(_ca_dir(args))
    entries = RevocationList(ca.revoked_path).entries()
    for serial, entry in sorted(entries.items(), key=lambda kv: (kv[1].revoked_at, kv[0])):
        _out(f"{serial:x}\t{entry.revoked_at.isoformat()}\t{entry.reason}")
    if not entries:
        _err("no revoked certificates")
    return 0


@_handles_errors
def _cmd_show(args: argparse.Namespace) -> int:
    """``pki show``: identity, serial, SANs and validity; CA and revocation status if known."""
    cert = certs.load_certificate(args.file)
    try:
        identity = identity_from_certificate(cert).uri
    except IdentityError as exc:
        identity = f"none ({exc})"
    dns, ips = _sans(cert)
    _out(f"identity:   {identity}")
    _out(f"serial:     {cert.serial_number:x}")
    _out(f"subject:    {cert.subject.rfc4514_string()}")
    _out(f"issuer:     {cert.issuer.rfc4514_string()}")
    _out(f"dns:        {', '.join(dns) or '-'}")
    _out(f"ip:         {', '.join(ips) or '-'}")
    _out(f"not before: {cert.not_valid_before_utc.isoformat()}")
    _out(f"not after:  {cert.not_valid_after_utc.isoformat()}")
    _out(f"sha256:     {certs.fingerprint(cert)}")
    # Status against a local CA, when there is one: handy on an admin host, skipped elsewhere.
    directory = _ca_dir(args)
    ca_path = directory / CA_CERT_FILE
    if ca_path.is_file():
        issuers = [certs.load_certificate(ca_path)]
        if (directory / ISSUING_CERT_FILE).is_file():
            issuers.append(certs.load_certificate(directory / ISSUING_CERT_FILE))
        issued = "yes" if any(_signed_by(cert, i) for i in issuers) else "no"
        revoked = RevocationList(directory / REVOKED_FILE).is_revoked(cert.serial_number)
        _out(f"issued by {ca_path}: {issued}")
        _out(f"revoked:    {'yes' if revoked else 'no'}")
    return 0


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses in the certificate's SANs (empty when it has none).

    Newer cryptography refuses to build an empty SubjectAlternativeName, so a CA certificate
    (which carries none) cannot be described through a stand-in extension.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]
