"""The CA key off the front line: an issuing CA under a root that stays offline.

Rotating the issuing CA needs only the root key; members keep trusting the root, so old
and new certificates work side by side, and a revoked issuing CA takes everything it
signed with it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from honeyfleet.authz import Authorizer
from honeyfleet.grpcserver import add_health_and_reflection, bind, mark_serving, new_server
from honeyfleet.pki import CertificateAuthority, RevocationList, Role, init_ca, load_ca
from honeyfleet.pki.ca import rotate_issuing
from honeyfleet.pki.errors import CaCorrupt
from honeyfleet.tls import TlsFiles, server_credentials
from tests.integration.test_peer_identity import health

BIN = Path(sys.executable).parent
RPC_TIMEOUT = 10.0


def issue(ca: CertificateAuthority, role: Role, name: str, out: Path) -> TlsFiles:
    ca.issue(role, name, ips=["127.0.0.1"], out_dir=out)
    return TlsFiles(ca=out / "ca.pem", cert=out / f"{name}.pem", key=out / f"{name}.key")


@pytest.fixture
async def controller_api(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, CertificateAuthority, Authorizer]]:
    """A fleet API (health only) of a fresh two-level CA, as the controller serves it."""
    ca = init_ca(tmp_path / "pki", "rotating")
    authorizer = Authorizer("rotating", {})
    server = new_server(authorizer)
    health = add_health_and_reflection(server, [])
    files = issue(ca, Role.CONTROLLER, "ctl", tmp_path / "ctl")
    port = bind(server, "127.0.0.1:0", server_credentials(files))
    await server.start()
    await mark_serving(health, [])
    yield f"127.0.0.1:{port}", ca, authorizer
    await server.stop(0)


async def test_rotation_keeps_old_and_new_certificates_working(
    controller_api, tmp_path: Path
) -> None:
    address, ca, authorizer = controller_api
    old_member = issue(ca, Role.SENSOR, "before", tmp_path / "before")
    rotated, old_issuing = rotate_issuing(ca.directory, ca.directory / "root")
    assert rotated.cert != old_issuing and rotated.root == ca.root
    assert rotated.fingerprint == ca.fingerprint  # join tokens and trust bundles unchanged
    new_member = issue(rotated, Role.SENSOR, "after", tmp_path / "after")
    assert await health(address, old_member) == grpc.StatusCode.OK
    assert await health(address, new_member) == grpc.StatusCode.OK
    # After a compromise: revoke the old issuing CA, and all it signed is refused.
    authorizer.update_revoked({old_issuing.serial_number})
    assert await health(address, old_member) == grpc.StatusCode.UNAUTHENTICATED
    assert await health(address, new_member) == grpc.StatusCode.OK


def test_rotation_needs_the_root_key(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "pki", "rotating")
    other = init_ca(tmp_path / "other", "rotating")
    with pytest.raises(CaCorrupt, match="not the key"):
        rotate_issuing(ca.directory, other.directory / "root")
    assert load_ca(ca.directory).cert == ca.cert


async def test_cli_init_and_rotation(tmp_path: Path) -> None:
    pki, root = tmp_path / "pki", tmp_path / "offline"

    async def honeyfleet(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "honeyfleet"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode()

    code, out = await honeyfleet(
        "pki", "init", "--fleet", "acme", "--dir", str(pki), "--root-dir", str(root)
    )
    assert code == 0, out
    assert "OFFLINE" in out and (root / "root.key").exists()
    assert not (pki / "root").exists()
    before = load_ca(pki)
    code, out = await honeyfleet(
        "pki", "rotate-issuing", "--dir", str(pki), "--root-dir", str(root), "--revoke-old"
    )
    assert code == 0, out
    after = load_ca(pki)
    assert after.cert != before.cert and after.root == before.root
    assert before.cert.serial_number in RevocationList(after.revoked_path).serials()
