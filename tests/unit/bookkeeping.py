"""The controller's lease bookkeeping for unit tests: a real state store and registry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from controller import registry_service
from controller.leases import LeaseManager
from controller.nodeclient import NodeClients
from controller.registry import Registry
from controller.registry_service import PoolNodeRegistryServicer
from controller.statestore import StateStore
from controller.waiters import CapacityWaiters
from honeyfleet.tls import TlsFiles


def bookkeeping(
    store: StateStore, nodes: Any, *, dead_after: float
) -> tuple[Registry, LeaseManager]:
    """A registry and its lease manager; acquires wait up to an hour, none is shed."""
    registry = Registry(
        store,
        CapacityWaiters(16),
        dead_after=dead_after,
        heartbeat_interval=dead_after / 3,
        max_node_guests=16,
    )
    return registry, LeaseManager(
        registry,
        store,
        nodes,
        ttl=3600.0,
        wait=3600.0,
        max_per_sensor=16,
        max_in_flight=16,
        loop_lag=lambda: 0.0,
        max_loop_lag=3600.0,
    )


async def heartbeat_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, dead_after: float
) -> tuple[StateStore, Registry, LeaseManager, PoolNodeRegistryServicer]:
    """An open state store, the bookkeeping over it and the servicer of pool nodes'
    heartbeats, whose caller is always pool node n1 (close the store when done)."""
    store = StateStore(tmp_path / "controller.sqlite3")
    await store.open()
    nowhere = TlsFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    nodes = NodeClients(nowhere, timeout=3600.0)
    registry, leases = bookkeeping(store, nodes, dead_after=dead_after)
    servicer = PoolNodeRegistryServicer(
        registry, leases, nodes, heartbeat_interval=5.0, revoked_serials=frozenset
    )
    caller = SimpleNamespace(identity=SimpleNamespace(name="n1"))
    monkeypatch.setattr(registry_service, "current_caller", lambda: caller)
    return store, registry, leases, servicer
