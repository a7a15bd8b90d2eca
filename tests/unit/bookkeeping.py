"""The controller's lease bookkeeping for unit tests: a real state store and registry."""

from __future__ import annotations

from typing import Any

from controller.leases import LeaseManager
from controller.registry import Registry
from controller.statestore import StateStore
from controller.waiters import CapacityWaiters


def bookkeeping(
    store: StateStore, nodes: Any, *, dead_after: float
) -> tuple[Registry, LeaseManager]:
    """A registry and its lease manager; acquires wait up to an hour, none is shed."""
    registry = Registry(store, CapacityWaiters(16), dead_after=dead_after, max_node_guests=16)
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
