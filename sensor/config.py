"""The sensor's configuration (the ``[sensor]`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from honeyfleet.config import host_port, setting
from honeyfleet.tls import TlsFiles


@dataclass(frozen=True)
class SensorConfig:
    """Settings of a sensor process."""

    controller: str = setting(
        "127.0.0.1:7300", "host:port of the controller's fleet API", check=host_port
    )
    state_dir: Path = setting(Path("state/sensor"), "where the sensor keeps keys, spool, logs")
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/cert.pem"), "the sensor's certificate")
    tls_key: Path = setting(Path("tls/key.pem"), "the sensor's private key")

    @property
    def tls(self) -> TlsFiles:
        """The sensor's TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)
