"""The sensor's configuration (the ``[sensor]`` section).

Every bound on what an attacker can make the sensor hold (connections, bytes, time,
channels) is a key here with a safe default, so an internet-facing sensor is bounded
out of the box.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from honeyfleet import outbox, uploader
from honeyfleet.config import (
    fraction,
    host_port,
    instance_id,
    non_negative,
    optional_host_port,
    positive,
    setting,
)
from honeyfleet.errors import ConfigError
from honeyfleet.tls import TlsFiles
from sensor.ssh_persona import DEBIAN_12, PERSONAS, Persona, persona_name

# asyncssh refuses packets longer than this whatever we configure (connection.py).
ASYNCSSH_MAX_PACKET = 256 * 1024


def telnetd_greeting(kernel_release: str, hostname: str) -> str:
    """What Debian's inetutils telnetd and login print first, ``{peer}`` for the client.

    telnetd's banner names the kernel, the client's host and the pty; login's prompt
    the host name.
    """
    return f"\r\nLinux {kernel_release} ({{peer}}) (pts/0)\r\n\r\n{hostname} login: "


# What a Debian 12 guest (host srv04, Debian 12's kernel) prints before its login prompt;
# the sensor shows it itself until a guest is leased.
TELNET_GREETING = telnetd_greeting("6.1.0-57-amd64", "srv04")
# Prompts of busybox, Debian/Ubuntu and OpenWRT logins ("srv04 login: ", "Password: "),
# searched at the end of what the guest printed since the last answer.
TELNET_USERNAME_PROMPT = r"(?:^|\n)[^\n]*(?:[Ll]ogin|[Uu]sername): ?$"
TELNET_PASSWORD_PROMPT = r"(?:^|\n)[^\n]*[Pp]assword: ?$"  # noqa: S105 (a prompt)
# Shells' prompts end in "# ", "$ ", "% " or "> " (busybox "~ # ", Debian "user@host:~$ ").
TELNET_SHELL_PROMPT = r"[#$%>] ?$"
# Searched in each raw ENVIRON/NEW-ENVIRON subnegotiation; group 2 is the username. Like
# Cowrie's, but without its leading and trailing ".*" (which made the search cubic in an
# attacker's subnegotiation), and the value stops at the next NEW-ENVIRON type byte,
# where Cowrie's ran on to the next IAC.
TELNET_USERNAME_IN_NEGOTIATION = r"(USER\x01)([^\x00-\x03\xff]*)"


def _listen_list(value: tuple[str, ...]) -> str | None:
    """Check: one or more host:port entries."""
    if not value:
        return "needs at least one host:port"
    problems = [p for p in map(host_port, value) if p]
    return problems[0] if problems else None


def _optional_listen_list(value: tuple[str, ...]) -> str | None:
    """Check: host:port entries (none: that frontend is off)."""
    problems = [p for p in map(host_port, value) if p]
    return problems[0] if problems else None


def _regex(value: str) -> str | None:
    """Check: a regular expression."""
    try:
        re.compile(value)
    except re.error as e:
        return f"not a valid regular expression ({e})"
    return None


def _negotiation_regex(value: str) -> str | None:
    """Check: a regular expression over raw bytes with the username in group 2."""
    try:
        groups = re.compile(value.encode("latin-1")).groups
    except (re.error, UnicodeEncodeError) as e:
        return f"not a valid regular expression over bytes ({e})"
    return None if groups >= 2 else "needs the username in group 2"


def _startups(value: str) -> str | None:
    """Check: start:rate:full, 0 < start <= full, rate in 1..100."""
    try:
        start, rate, full = (int(part) for part in value.split(":"))
    except ValueError:
        return "must be start:rate:full, e.g. 10:30:100"
    if not (0 < start <= full and 0 < rate <= 100):
        return "needs 0 < start <= full and rate from 1 to 100"
    return None


def _networks(value: tuple[str, ...]) -> str | None:
    """Check: addresses or CIDR networks."""
    for net in value:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as e:
            return str(e)
    return None


@dataclass(frozen=True)
class SensorConfig:
    """Settings of a sensor process."""

    controller: str = setting(
        "127.0.0.1:7300", "host:port of the controller's fleet API", check=host_port
    )
    state_dir: Path = setting(Path("state/sensor"), "where the sensor keeps keys, spool, logs")
    uuid: str = setting(
        "",
        "this sensor's identity, the uuid field of every event (Cowrie's [honeypot] uuid); "
        "empty: made once and kept in state_dir/uuid",
        check=instance_id,
    )
    guest_arch: str = setting(
        "linux-x64-lsb",
        "the guests' architecture as cowrie.session.params reports it (Cowrie's arch names)",
        check=instance_id,
    )
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/cert.pem"), "the sensor's certificate")
    tls_key: Path = setting(Path("tls/key.pem"), "the sensor's private key")
    metrics_listen: str = setting(
        "", "host:port for Prometheus metrics (empty: off)", check=optional_host_port
    )

    # The SSH frontend.
    ssh_listen: tuple[str, ...] = setting(
        factory=lambda: ("0.0.0.0:2222",), help="host:port list for SSH", check=_listen_list
    )
    ssh_persona: str = setting(
        DEBIAN_12.name,
        "the OpenSSH server the SSH frontend plays, as its distribution ships it "
        "(sensor/ssh_persona.py; known: debian-12)",
        check=persona_name,
    )
    ssh_moduli_file: Path | None = setting(
        None,
        "DH group-exchange primes, as OpenSSH reads them (unset: the persona's, "
        "/etc/ssh/moduli; missing: RFC 3526 groups 14/16/18)",
    )
    ssh_auth_fail_delay: float | None = setting(
        None,
        "seconds PAM makes a failed SSH password wait, varied and padded as Debian's sshd "
        "does (unset: the persona's, 2)",
        check=non_negative,
    )
    ssh_max_inflated_bytes: int = setting(
        512 * 1024 * 1024,
        "bytes a connection may inflate with zlib@openssh.com in all (each packet: 256 KiB)",
        check=positive,
    )
    userdb: Path | None = setting(
        None, "Cowrie-format userdb (user:x:password); unset: root with any password but root"
    )

    # The Telnet frontend (Cowrie's proxy option names where the meaning is the same).
    telnet_listen: tuple[str, ...] = setting(
        # Off unless asked for, as in Cowrie: Telnet exposure is a deliberate choice.
        factory=tuple,
        help='host:port list for Telnet, e.g. ["0.0.0.0:23"] (empty: no Telnet)',
        check=_optional_listen_list,
    )
    telnet_greeting: str = setting(
        TELNET_GREETING,
        "banner and login prompt shown before a guest is leased (as guests print); "
        "{peer}: the client's address",
    )
    telnet_username_prompt_regex: str = setting(
        TELNET_USERNAME_PROMPT, "what marks the guest's username prompt", check=_regex
    )
    telnet_password_prompt_regex: str = setting(
        TELNET_PASSWORD_PROMPT, "what marks the guest's password prompt", check=_regex
    )
    telnet_shell_prompt_regex: str = setting(
        TELNET_SHELL_PROMPT,
        "with telnet_spoof_authentication off, what shows the guest let the attacker in",
        check=_regex,
    )
    telnet_username_in_negotiation_regex: str = setting(
        TELNET_USERNAME_IN_NEGOTIATION,
        "finds a username (group 2) in a client's raw subnegotiation (NEW-ENVIRON USER)",
        check=_negotiation_regex,
    )
    telnet_spoof_authentication: bool = setting(
        True, "the userdb decides and the guest gets the lease's credentials (false: guest decides)"
    )
    telnet_login_fail_delay: float = setting(
        3.0, "seconds before Login incorrect when no guest could be had", check=non_negative
    )
    telnet_max_subnegotiation: int = setting(
        4096, "longest subnegotiation (IAC SB ... IAC SE) in bytes", check=positive
    )
    telnet_max_negotiations: int = setting(
        200, "option commands and subnegotiations a peer may send per connection", check=positive
    )
    telnet_max_line: int = setting(
        4096, "longest input line kept (login or command)", check=positive
    )
    log_raw: bool = setting(False, "log raw Telnet bytes from attackers and guests (for tuning)")
    log_raw_max_bytes: int = setting(
        65536, "raw bytes logged per direction and session when log_raw is on", check=positive
    )

    # Leases and guests.
    guest_labels: Mapping[str, str] = setting(
        factory=dict, help="labels a pool node must offer for this sensor's leases"
    )
    lease_timeout: float = setting(
        30.0, "seconds to wait for a lease after a login before failing it", check=positive
    )
    guest_login_timeout: float = setting(
        15.0, "seconds to open the tunnel and log into the guest", check=positive
    )
    max_leases: int = setting(
        64, "guests this sensor's sessions hold at once (more logins fail)", check=positive
    )
    max_leases_per_source: int = setting(
        2, "guests one attacker address holds at once (more logins fail)", check=positive
    )
    revocation_interval: float = setting(
        30.0,
        "seconds between fetches of the controller's revocation list; a pool node whose "
        "certificate is on it gets no new tunnels",
        check=positive,
    )

    # Events.
    spool_max_bytes: int = setting(
        256 * 1024 * 1024, "bound on undelivered events in the spool", check=positive
    )
    spool_near_full: float = setting(
        0.9, "spool fill fraction at which new sessions are refused", check=fraction
    )
    spool_reserve_bytes: int = setting(
        16 * 1024 * 1024,
        "disk the spool holds back for running sessions' events; less free: new sessions refused",
        check=non_negative,
    )
    session_max_events: int = setting(
        10000,
        "events one session may write (then one honeyfleet.session.event_budget)",
        check=positive,
    )
    session_events_per_minute: int = setting(
        3000,
        "events one session may write per minute (a minute's worth at once)",
        check=positive,
    )
    source_max_events: int = setting(
        50000,
        "events all sessions of one address may write at once (refilled over time)",
        check=positive,
    )
    source_events_per_minute: int = setting(
        6000, "rate at which an address's event budget refills", check=positive
    )
    upload_batch: int = uploader.batch_setting()
    upload_linger: float = uploader.linger_setting()
    upload_max_linger: float = uploader.max_linger_setting()
    json_log: Path | None = setting(None, "also write events to this Cowrie JSON lines file")

    # Recordings and captured files.
    recording_max_bytes: int = setting(
        32 * 1024 * 1024, "bound on one session's asciicast file", check=positive
    )
    recording_held_bytes: int = setting(
        64 * 1024,
        "recording kept in memory (never on disk) before a Telnet client logs in",
        check=positive,
    )
    capture_max_bytes: int = setting(
        64 * 1024 * 1024, "largest uploaded file captured", check=positive
    )
    capture_max_open: int = setting(
        32, "uploads a session may have open (being captured) at once", check=positive
    )
    artefact_max_bytes: int = setting(
        4 * 1024 * 1024 * 1024,
        "bound on captures (downloads/) and recordings (tty/) together; past it none are kept",
        check=positive,
    )
    artefact_outbox_max_bytes: int = outbox.max_bytes_setting()
    artefact_outbox_max_files: int = outbox.max_files_setting()
    artefact_keep_local: bool = setting(
        True,
        "keep captures and recordings on the sensor once the controller stored them; false "
        "removes them then, giving their bytes back to artefact_max_bytes",
    )

    # Bounds on what attackers can make the sensor hold.
    max_connections: int = setting(1024, "connections at once", check=positive)
    max_connections_per_ip: int = setting(16, "connections at once per address", check=positive)
    max_startups: str = setting(
        DEBIAN_12.max_startups,
        "unauthenticated connections per protocol, start:rate:full (OpenSSH MaxStartups; "
        "debian-12: 10:30:100)",
        check=_startups,
    )
    max_startups_per_source: int = setting(
        4,
        "unauthenticated connections per address and protocol (PerSourceMaxStartups)",
        check=positive,
    )
    per_source_penalties: bool = setting(
        True, "refuse sources that misbehave for a while (OpenSSH PerSourcePenalties)"
    )
    penalty_authfail: float = setting(
        5.0, "penalty seconds for a connection that failed to log in", check=non_negative
    )
    penalty_noauth: float = setting(
        1.0, "penalty seconds for a connection that never tried to log in", check=non_negative
    )
    penalty_grace_exceeded: float = setting(
        10.0,
        "penalty seconds for a connection that outlived login_grace_time",
        check=non_negative,
    )
    penalty_min: float = setting(
        15.0, "a source is refused once its penalty reaches this many seconds", check=positive
    )
    penalty_max: float = setting(600.0, "longest penalty, in seconds", check=positive)
    penalty_max_sources: int = setting(
        65536, "penalised sources remembered (the least recent go first)", check=positive
    )
    penalty_exempt: tuple[str, ...] = setting(
        factory=tuple, help="addresses/networks never penalised (CIDR)", check=_networks
    )
    # The default persona's (for Telnet too, as max_startups): a value of its own gives
    # SSH away.
    login_grace_time: float = setting(
        DEBIAN_12.login_grace_time,
        "seconds a connection has to log in (OpenSSH LoginGraceTime; debian-12: 120)",
        check=positive,
    )
    max_auth_attempts: int = setting(
        DEBIAN_12.max_auth_tries,
        "failed logins per connection; the last one disconnects (OpenSSH MaxAuthTries; "
        "debian-12: 6)",
        check=positive,
    )
    max_preauth_bytes: int = setting(
        256 * 1024, "bytes accepted from a client before it logs in", check=positive
    )
    max_packet_size: int = setting(
        35000, "largest SSH packet length a client may declare in the clear", check=positive
    )
    write_buffer_high: int = setting(
        1024 * 1024,
        "bytes buffered for a client that does not read (past it, a channel's output in "
        "flight still arrives: up to 4 MiB, the pool node's credit)",
        check=positive,
    )
    idle_timeout: float = setting(
        300.0, "seconds without client input before a session is closed", check=positive
    )
    session_timeout: float = setting(3600.0, "longest session, in seconds", check=positive)
    max_channels: int = setting(8, "channels open at once per connection", check=positive)
    refusal_event_interval: float = setting(
        10.0, "at most one refusal event per this many seconds", check=non_negative
    )

    def __post_init__(self) -> None:
        if self.max_packet_size > ASYNCSSH_MAX_PACKET:
            raise ConfigError("max_packet_size", f"at most {ASYNCSSH_MAX_PACKET} (asyncssh's)")
        if self.penalty_min > self.penalty_max:
            raise ConfigError("penalty_min", "cannot exceed penalty_max (nobody would be refused)")
        if self.max_connections_per_ip > self.max_connections:
            raise ConfigError("max_connections_per_ip", "cannot exceed max_connections")
        if self.login_grace_time <= self.lease_timeout + self.guest_login_timeout:
            raise ConfigError(
                "login_grace_time",
                "must exceed lease_timeout + guest_login_timeout (a login includes both)",
            )

    @property
    def persona(self) -> Persona:
        """The SSH persona ``ssh_persona`` names."""
        return PERSONAS[self.ssh_persona]

    @property
    def auth_fail_delay(self) -> float:
        """PAM's delay for a failed SSH password: ssh_auth_fail_delay or the persona's."""
        if self.ssh_auth_fail_delay is None:
            return self.persona.auth_fail_delay
        return self.ssh_auth_fail_delay

    @property
    def moduli_file(self) -> Path:
        """Where the DH group-exchange primes are: ssh_moduli_file or the persona's."""
        return self.ssh_moduli_file or self.persona.moduli_file

    @property
    def max_startups_triple(self) -> tuple[int, int, int]:
        """max_startups as (start, rate, full)."""
        start, rate, full = (int(part) for part in self.max_startups.split(":"))
        return start, rate, full

    @property
    def tls(self) -> TlsFiles:
        """The sensor's TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)

    @property
    def recordings_dir(self) -> Path:
        """Where asciicast recordings go."""
        return self.state_dir / "tty"

    @property
    def downloads_dir(self) -> Path:
        """Where captured files go, named by sha256."""
        return self.state_dir / "downloads"
