"""`up`'s check that the ports its roles will bind are free."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fleetup.up import port_taken


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback listener on a port of the kernel's choosing."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_a_listening_port_is_taken(listener: socket.socket) -> None:
    assert port_taken(listener.getsockname()[1])


def test_a_port_left_in_time_wait_by_a_stopped_fleet_is_free(listener: socket.socket) -> None:
    # The server's side closes first, as a sensor ending a session does, so the port's
    # connection lingers in TIME_WAIT after the listener itself has gone.
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        accepted, _ = listener.accept()
        accepted.close()
        assert client.recv(1) == b""
    listener.close()
    assert not port_taken(port)
