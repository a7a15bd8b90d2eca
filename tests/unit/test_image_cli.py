"""`honeyfleet image build` refuses bad specs before it touches the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolnode.image import DEBIAN_DISK_MIB, Distro, GuestImageSpec, ImageBuildError, main


def test_a_debian_image_too_small_for_debian_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--distro", "debian", "--disk-size-mib", "512", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "at least 1024" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_distro_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["build", "--distro", "ubuntu", "--out", str(tmp_path)])


def test_distro_defaults() -> None:
    assert GuestImageSpec(out_dir=Path("x")).distro is Distro.BUSYBOX
    assert DEBIAN_DISK_MIB >= 4096  # a small cloud VM's disk, not busybox's 2 GiB
    with pytest.raises(ImageBuildError):
        GuestImageSpec(out_dir=Path("x"), distro=Distro.DEBIAN, disk_size_mib=512)


def test_trust_ca_takes_a_ca_certificate_and_nothing_else(tmp_path: Path) -> None:
    from poolnode.egress.intercept import load_or_make_ca
    from poolnode.image._build import _fingerprint

    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    load_or_make_ca(cert, key)
    plain = GuestImageSpec(out_dir=tmp_path)
    trusting = GuestImageSpec(out_dir=tmp_path, trust_ca=cert.read_text())
    # One with a CA is another image (and one without keeps the fingerprint it had).
    assert _fingerprint(plain, {}) != _fingerprint(trusting, {})
    with pytest.raises(ImageBuildError, match="private key"):
        GuestImageSpec(out_dir=tmp_path, trust_ca=cert.read_text() + key.read_text())
    with pytest.raises(ImageBuildError, match="not a PEM CA certificate"):
        GuestImageSpec(out_dir=tmp_path, trust_ca="hello")


def test_a_busybox_root_gets_the_ca_as_its_bundle(tmp_path: Path) -> None:
    from poolnode.image import _rootfs

    _rootfs.trust_bundle(tmp_path, "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    bundle = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    assert bundle.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert bundle.stat().st_mode & 0o777 == 0o644


def test_build_reads_the_ca_file_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--trust-ca", str(tmp_path / "missing.pem"), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert "--trust-ca" in capsys.readouterr().err


def test_what_a_guest_sees_of_the_interception_ca_names_no_honeypot(tmp_path: Path) -> None:
    # An attacker can list the guest's local CAs and read any intercepted chain.
    from cryptography.x509.oid import NameOID

    from poolnode.egress.intercept import load_or_make_ca
    from poolnode.image._debian import LOCAL_CA

    ca, _ = load_or_make_ca(tmp_path / "ca.pem", tmp_path / "ca.key")
    names = [a.value for a in ca.subject] + [LOCAL_CA]
    assert not [n for n in names if "honey" in str(n).lower() or "egress" in str(n).lower()]
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Internal Root CA"
