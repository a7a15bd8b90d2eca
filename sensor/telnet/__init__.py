"""The Telnet frontend: a telnetlib3 server that proxies attackers into leased guests' logins.

:class:`TelnetFrontend` listens; each connection is a :class:`TelnetSession` that shows the
guests' greeting, leases a guest once a username is typed, answers the guest's login
prompts for the attacker (spoofing the credentials, :mod:`sensor.telnet.dialogue`) and
relays the shell. :class:`TelnetShared` is what the sessions of a sensor share.
"""

from __future__ import annotations

from sensor.telnet.frontend import TelnetFrontend
from sensor.telnet.session import TelnetSession, TelnetShared

__all__ = ["TelnetFrontend", "TelnetSession", "TelnetShared"]
