"""The sensor: SSH and Telnet frontends that proxy attackers into leased guests."""
