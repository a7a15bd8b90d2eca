"""The pool node's configuration (the ``[poolnode]`` section)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from honeyfleet.config import host_port, setting
from honeyfleet.tls import TlsFiles


@dataclass(frozen=True)
class PoolNodeConfig:
    """Settings of a pool node process."""

    controller: str = setting(
        "127.0.0.1:7300", "host:port of the controller's fleet API", check=host_port
    )
    listen: str = setting(
        "127.0.0.1:7310", "host:port the node serves PoolNodeService and Tunnel on", check=host_port
    )
    advertise: str = setting("", "host:port the controller and sensors dial (default: listen)")
    state_dir: Path = setting(Path("state/poolnode"), "where the node keeps overlays and state")
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/cert.pem"), "the node's certificate")
    tls_key: Path = setting(Path("tls/key.pem"), "the node's private key")
    labels: Mapping[str, str] = setting(
        factory=lambda: {"image": "busybox"}, help="image labels sensors can ask for"
    )
    share_guests: bool = setting(
        False, "let attackers from different addresses share a guest when none is pristine"
    )

    @property
    def tls(self) -> TlsFiles:
        """The node's TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)

    @property
    def advertised(self) -> str:
        """The address to register with the controller."""
        return self.advertise or self.listen
