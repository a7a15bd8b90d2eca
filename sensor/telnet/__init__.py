"""The Telnet frontend: a telnetlib3 server that proxies attackers into leased guests' logins.

:class:`TelnetFrontend` listens; each connection is a :class:`TelnetSession` (an adapter
over the protocol-neutral :mod:`sensor.session`) that shows the guests' greeting, leases
a guest once a login deserves one, answers the guest's login prompts for the attacker
(spoofing the credentials, :mod:`sensor.telnet.dialogue`) and relays the shell.
"""

from __future__ import annotations

from sensor.telnet.frontend import TelnetFrontend
from sensor.telnet.session import TelnetSession

__all__ = ["TelnetFrontend", "TelnetSession"]
