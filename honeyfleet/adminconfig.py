"""Settings of operator tools (`honeyfleet status`, `node drain`): the ``[admin]`` section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from honeyfleet.config import host_port, setting
from honeyfleet.tls import TlsFiles


@dataclass(frozen=True)
class AdminConfig:
    """Where the controller is and which admin certificate to use."""

    controller: str = setting(
        "127.0.0.1:7300", "host:port of the controller's fleet API", check=host_port
    )
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/admin.pem"), "an admin certificate")
    tls_key: Path = setting(Path("tls/admin.key"), "the admin certificate's key")

    @property
    def tls(self) -> TlsFiles:
        """The admin TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)
