"""The life cycle of one attacker session, either protocol, as an explicit state machine.

::

    CONNECTED --login deserves a guest--> LEASING --lease--> JOINING --guest login--> PROXYING
        ^                                    |                   |                       |
        +---- lease or guest fails (the attacker sees a failed login) --+                 |
    any state -------------------------------------------------------------------------> CLOSED

A scanner that never logs in stays CONNECTED until it leaves or its grace time ends,
and never causes a lease. SSH joins when the userdb accepted a password and is
PROXYING at once; Telnet joins once a password deserves it and is PROXYING when the
guest let the attacker in.
"""

from __future__ import annotations

from enum import Enum

from honeyfleet.errors import FailedPrecondition


class SessionState(Enum):
    """Where a connection is in its life."""

    CONNECTED = "connected"
    LEASING = "leasing"
    JOINING = "joining"
    PROXYING = "proxying"
    CLOSED = "closed"


ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CONNECTED: frozenset({SessionState.LEASING, SessionState.CLOSED}),
    SessionState.LEASING: frozenset(
        {SessionState.JOINING, SessionState.CONNECTED, SessionState.CLOSED}
    ),
    SessionState.JOINING: frozenset(
        {SessionState.PROXYING, SessionState.CONNECTED, SessionState.CLOSED}
    ),
    SessionState.PROXYING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


def transition(current: SessionState, new: SessionState) -> SessionState:
    """The new state, if the move is legal; FailedPrecondition otherwise."""
    if new not in ALLOWED[current]:
        raise FailedPrecondition(f"session cannot go from {current.value} to {new.value}")
    return new
