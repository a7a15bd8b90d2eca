"""Tests for honeyfleet.pki.cli: the `honeyfleet pki` commands, run in-process."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import timedelta
from pathlib import Path

import pytest

from honeyfleet.pki import Identity, Role, identity_from_certificate, load_ca, load_certificate
from honeyfleet.pki.cli import add_parser, parse_duration
from honeyfleet.pki.tokens import verify_token


def run(command: str, *extra: str | Path) -> int:
    """Parse ``honeyfleet <command> <extra...>`` like the main CLI would and run the handler.

    ``command`` is split shell-style; paths go in ``extra`` so they never need quoting.
    """
    parser = argparse.ArgumentParser(prog="honeyfleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*shlex.split(command), *map(str, extra)])
    result = args.func(args)
    assert isinstance(result, int)
    return result


@pytest.fixture
def pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An initialised CA directory (init's output discarded)."""
    d = tmp_path / "pki"
    assert run("pki init --fleet lab --dir", d) == 0
    capsys.readouterr()
    return d


def test_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init creates the CA and prints its fingerprint."""
    d = tmp_path / "pki"
    assert run("pki init --fleet lab --validity-days 30 --dir", d) == 0
    assert load_ca(d).fingerprint in capsys.readouterr().out


def test_init_twice_is_a_clean_error(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-init exits 2 with one helpful line and no traceback."""
    assert run("pki init --fleet lab --dir", pki) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_init_bad_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid fleet name is reported with the rule it broke."""
    assert run("pki init --fleet 'My Fleet' --dir", tmp_path / "pki") == 2
    assert "invalid fleet 'My Fleet'" in capsys.readouterr().err


def test_dir_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HONEYFLEET_PKI_DIR is used when --dir is absent."""
    d = tmp_path / "envpki"
    monkeypatch.setenv("HONEYFLEET_PKI_DIR", str(d))
    assert run("pki init --fleet lab") == 0
    assert (d / "ca.pem").is_file()


def test_default_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --dir or the env var, ./pki is used."""
    monkeypatch.delenv("HONEYFLEET_PKI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run("pki init --fleet lab") == 0
    assert (tmp_path / "pki" / "ca.pem").is_file()


def test_missing_ca_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Commands needing a CA say how to create one."""
    assert run("pki token create --role sensor --name s1 --dir", tmp_path / "x") == 2
    assert "pki init" in capsys.readouterr().err


def test_issue_default_out(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue writes into <dir>/issued/<role>-<name>/ with the requested SANs."""
    command = (
        "pki issue --role poolnode --name pn1 --dns pn1.example pn1.internal "
        "--ip 10.0.0.5 --ip ::1 --dir"
    )
    assert run(command, pki) == 0
    out_dir = pki / "issued" / "poolnode-pn1"
    cert = load_certificate(out_dir / "pn1.pem")
    assert identity_from_certificate(cert) == Identity("lab", Role.POOLNODE, "pn1")
    assert (out_dir / "pn1.key").is_file() and (out_dir / "ca.pem").is_file()
    out = capsys.readouterr().out
    assert f"{cert.serial_number:x}" in out
    assert "spiffe://lab/poolnode/pn1" in out


def test_issue_explicit_out_and_bad_ip(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out is honoured; an invalid --ip is reported, not raised."""
    out = tmp_path / "elsewhere"
    assert run("pki issue --role admin --name alice --dir", pki, "--out", out) == 0
    assert (out / "alice.pem").is_file()
    assert run("pki issue --role sensor --name s1 --ip 999.1.1.1 --dir", pki) == 2
    assert "invalid IP address '999.1.1.1'" in capsys.readouterr().err


def test_issue_twice_is_a_clean_error(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-issuing into the same directory refuses to replace the key."""
    assert run("pki issue --role sensor --name s1 --dir", pki) == 0
    assert run("pki issue --role sensor --name s1 --dir", pki) == 2
    assert "already exists" in capsys.readouterr().err


def test_issue_rejects_unknown_role(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse refuses roles outside the enum with its usual exit code 2."""
    with pytest.raises(SystemExit) as info:
        run("pki issue --role root --name x --dir", pki)
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_token_create_prints_only_the_token(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout holds exactly the token (scriptable); the description goes to stderr."""
    assert run("pki token create --role sensor --ttl 30m --name s9 --dir", pki) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert captured.out == token + "\n"
    claims = verify_token(token, load_ca(pki).token_key)
    assert claims.role is Role.SENSOR and claims.name == "s9"
    assert "s9" in captured.err


@pytest.mark.parametrize("ttl", ["0m", "1.5h", "1h30m", "10", "h", "-1h", "1w", " "])
def test_token_create_rejects_bad_ttl(
    pki: Path, ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Durations are parsed strictly, with an example in the error."""
    with pytest.raises(SystemExit) as info:
        run("pki token create --role sensor --dir", pki, f"--ttl={ttl}")
    assert info.value.code == 2
    assert "e.g. 90s, 30m, 1h, 2d" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    """The four units."""
    assert parse_duration(text) == expected


def test_revoke_by_cert_and_serial(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Revoking by file or by hex serial lands in revoked.json; list-revoked shows both."""
    run("pki issue --role sensor --name a --dir", pki)
    run("pki issue --role sensor --name b --dir", pki)
    a_path = pki / "issued" / "sensor-a" / "a.pem"
    a = load_certificate(a_path)
    b = load_certificate(pki / "issued" / "sensor-b" / "b.pem")
    capsys.readouterr()
    assert run("pki revoke --reason 'stolen laptop' --dir", pki, "--cert", a_path) == 0
    # OpenSSL's colon spelling and a 0x prefix are accepted too.
    b_hex = f"{b.serial_number:040x}"
    colon = ":".join(b_hex[i : i + 2] for i in range(0, len(b_hex), 2))
    assert run(f"pki revoke --serial {colon} --dir", pki) == 0
    assert run(f"pki revoke --serial 0x{b.serial_number:x} --dir", pki) == 0
    assert "already revoked" in capsys.readouterr().out
    data = json.loads((pki / "revoked.json").read_text())
    assert data[f"{a.serial_number:x}"]["reason"] == "stolen laptop"
    assert data[f"{b.serial_number:x}"]["reason"] == "unspecified"
    assert run("pki list-revoked --dir", pki) == 0
    lines = capsys.readouterr().out.splitlines()
    serials = [line.split("\t")[0] for line in lines]
    assert serials == [f"{a.serial_number:x}", f"{b.serial_number:x}"]
    assert lines[0].endswith("stolen laptop")


def test_revoke_refuses_foreign_cert(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate from another CA cannot be revoked here (it would be a no-op)."""
    other = tmp_path / "other"
    run("pki init --fleet lab --dir", other)
    run("pki issue --role sensor --name x --dir", other)
    capsys.readouterr()
    cert = other / "issued" / "sensor-x" / "x.pem"
    assert run("pki revoke --dir", pki, "--cert", cert) == 2
    assert "not issued by the fleet CA" in capsys.readouterr().err


@pytest.mark.parametrize("serial", ["xyz", "0", "", "1" * 41])
def test_revoke_rejects_bad_serial(
    pki: Path, serial: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad hex is an argparse error naming the value."""
    with pytest.raises(SystemExit) as info:
        run("pki revoke --dir", pki, f"--serial={serial}")
    assert info.value.code == 2
    assert "invalid serial" in capsys.readouterr().err


def test_revoke_needs_exactly_one_target(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--serial and --cert are mutually exclusive and one is required."""
    with pytest.raises(SystemExit):
        run("pki revoke --dir", pki)
    with pytest.raises(SystemExit):
        run("pki revoke --serial 1 --cert x.pem --dir", pki)


def test_list_revoked_empty(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty list prints nothing on stdout."""
    assert run("pki list-revoked --dir", pki) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no revoked" in captured.err


def test_show(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints identity, serial, SANs and validity, and status against the local CA."""
    run("pki issue --role controller --name ctl --dns ctl.example --ip 192.0.2.1 --dir", pki)
    path = pki / "issued" / "controller-ctl" / "ctl.pem"
    cert = load_certificate(path)
    capsys.readouterr()
    assert run("pki show --dir", pki, path) == 0
    out = capsys.readouterr().out
    assert "identity:   spiffe://lab/controller/ctl" in out
    assert f"serial:     {cert.serial_number:x}" in out
    assert "ctl.example" in out and "192.0.2.1" in out
    assert cert.not_valid_after_utc.isoformat() in out
    assert f"issued by {pki / 'ca.pem'}: yes" in out
    assert "revoked:    no" in out
    run("pki revoke --dir", pki, "--cert", path)
    capsys.readouterr()
    run("pki show --dir", pki, path)
    assert "revoked:    yes" in capsys.readouterr().out


def test_show_ca_cert_without_identity(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A certificate with no SPIFFE id is described, not rejected."""
    assert run("pki show --dir", pki, pki / "ca.pem") == 0
    assert "identity:   none" in capsys.readouterr().out


def test_show_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file is a clean error."""
    assert run("pki show --dir", tmp_path, tmp_path / "nope.pem") == 2
    assert "does not exist" in capsys.readouterr().err


def test_pki_without_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`honeyfleet pki` alone prints usage and exits 2."""
    with pytest.raises(SystemExit) as info:
        run("pki")
    assert info.value.code == 2
