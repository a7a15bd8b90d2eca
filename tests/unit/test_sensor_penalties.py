"""Admission on its own: per-source penalties on a clock the test turns, the per-address
share, random early drop with eviction of the greediest source, and the guest budget.

The clock is injected (a monotonic clock in production), so nothing here waits.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from honeyfleet.config import ConfigProblems, parse_section
from sensor.config import SensorConfig
from sensor.metrics import SensorMetrics
from sensor.session.admission import EVICTED, Admission, Slot
from sensor.session.budget import LeaseBudget
from sensor.session.penalties import Outcome, Penalties

CONFIG = SensorConfig()


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Session:
    """A live session that records why it was closed."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.reasons: list[str] = []
        slot.attach(self)

    def close(self, reason: str) -> None:
        self.reasons.append(reason)
        self.slot.release(Outcome.NO_AUTH)


def admitted(admission: Admission, src: str, protocol: str = "ssh") -> Session:
    """A session for a connection that must be admitted."""
    slot = admission.admit(protocol, src, spool_near_full=False)
    assert isinstance(slot, Slot), slot
    return Session(slot)


def test_penalties_add_up_to_the_minimum_then_refuse_until_they_run_out() -> None:
    clock = Clock()
    penalties = Penalties(CONFIG, clock)
    for _ in range(2):
        penalties.penalise("192.0.2.1", Outcome.AUTH_FAILED)  # 5 s each
    assert not penalties.refused("192.0.2.1")  # 10 s: below penalty_min (15 s)
    penalties.penalise("192.0.2.1", Outcome.GRACE_EXCEEDED)  # 20 s
    assert penalties.refused("192.0.2.1")
    assert not penalties.refused("192.0.2.2")
    clock.now += 19
    assert penalties.refused("192.0.2.1")
    clock.now += 1.5
    assert not penalties.refused("192.0.2.1")
    assert len(penalties) == 0  # expired entries leave the table


def test_penalties_are_capped_and_logins_cost_nothing() -> None:
    clock = Clock()
    penalties = Penalties(replace(CONFIG, penalty_max=30.0), clock)
    assert not penalties.penalise("192.0.2.1", Outcome.AUTHENTICATED)
    for _ in range(100):
        penalties.penalise("192.0.2.1", Outcome.GRACE_EXCEEDED)
    clock.now += 29.5
    assert penalties.refused("192.0.2.1")
    clock.now += 1
    assert not penalties.refused("192.0.2.1")


def test_the_penalty_table_is_bounded_and_keeps_the_recent_offenders() -> None:
    penalties = Penalties(replace(CONFIG, penalty_max_sources=3, penalty_min=1.0), Clock())
    for i in range(10):
        penalties.penalise(f"192.0.2.{i}", Outcome.AUTH_FAILED)
    assert len(penalties) == 3
    assert [penalties.refused(f"192.0.2.{i}") for i in (6, 7, 8, 9)] == [False, True, True, True]


def test_exempt_networks_and_disabled_penalties_are_never_refused() -> None:
    config = replace(CONFIG, penalty_min=1.0, penalty_exempt=("10.0.0.0/8",))
    penalties = Penalties(config, Clock())
    penalties.penalise("10.1.2.3", Outcome.AUTH_FAILED)
    assert not penalties.refused("10.1.2.3")
    off = Penalties(replace(config, per_source_penalties=False), Clock())
    off.penalise("192.0.2.1", Outcome.AUTH_FAILED)
    assert not off.refused("192.0.2.1")


def test_a_source_is_refused_past_its_share_of_the_unauthenticated_pool() -> None:
    metrics = SensorMetrics()
    admission = Admission(replace(CONFIG, max_startups_per_source=2), metrics)
    held = [admitted(admission, "192.0.2.1") for _ in range(2)]
    assert admission.admit("ssh", "192.0.2.1", spool_near_full=False) == ("max_startups_per_source")
    admitted(admission, "192.0.2.2")
    # Each protocol has its own pool: the same address may still use Telnet.
    admitted(admission, "192.0.2.1", protocol="telnet")
    # Logged in: the slot leaves the pool and the address may start another.
    held[0].slot.logged_in()
    admitted(admission, "192.0.2.1")
    sample = metrics.registry.get_sample_value(
        "honeyfleet_sensor_refusals_total", {"reason": "max_startups_per_source"}
    )
    assert sample == 1


def test_when_the_pool_is_full_the_greediest_source_makes_room() -> None:
    metrics = SensorMetrics()
    config = replace(CONFIG, max_startups="4:100:4", max_startups_per_source=4)
    admission = Admission(config, metrics)
    greedy = [admitted(admission, "192.0.2.1") for _ in range(3)]
    other = admitted(admission, "192.0.2.2")
    # A source holding nothing gets in: the greediest source's oldest connection goes.
    newcomer = admitted(admission, "192.0.2.3")
    assert greedy[0].reasons == [EVICTED] and not greedy[1].reasons
    # The pool is full again; a source holding as much as the greediest is refused.
    assert admission.admit("ssh", "192.0.2.1", spool_near_full=False) == "max_startups"
    assert admission.unauthenticated("ssh") == 4
    assert not other.reasons and not newcomer.reasons
    assert metrics.registry.get_sample_value("honeyfleet_sensor_evictions_total") == 1


def test_no_source_is_evicted_down_below_the_newcomer_nor_penalised_for_it() -> None:
    metrics = SensorMetrics()
    config = replace(CONFIG, max_startups="3:100:3", max_startups_per_source=4, penalty_min=0.5)
    admission = Admission(config, metrics)
    # Every source holds one connection (the legitimate client among them): a newcomer
    # is refused rather than any of them cut off.
    singles = [admitted(admission, f"192.0.2.{i}") for i in range(3)]
    assert admission.admit("ssh", "192.0.2.9", spool_near_full=False) == "max_startups"
    assert not any(s.reasons for s in singles)
    assert metrics.registry.get_sample_value("honeyfleet_sensor_evictions_total") == 0

    # A source holding two gives its oldest up to a newcomer, and pays no penalty for it.
    crowded = Admission(config, SensorMetrics())
    greedy = [admitted(crowded, "198.51.100.1") for _ in range(2)]
    admitted(crowded, "198.51.100.2")
    admitted(crowded, "198.51.100.3")
    assert greedy[0].reasons == [EVICTED] and not greedy[1].reasons
    assert not crowded.penalties.refused("198.51.100.1")


def test_a_returned_slot_penalises_its_source_for_how_it_ended() -> None:
    clock = Clock()
    admission = Admission(replace(CONFIG, penalty_min=1.0), SensorMetrics(), clock=clock)
    session = admitted(admission, "192.0.2.1")
    session.slot.release(Outcome.AUTH_FAILED)
    assert admission.admit("ssh", "192.0.2.1", spool_near_full=False) == "penalty"
    logged_in = admitted(admission, "192.0.2.2")
    logged_in.slot.logged_in()
    logged_in.slot.release(Outcome.AUTHENTICATED)
    admitted(admission, "192.0.2.2")
    clock.now += 6
    admitted(admission, "192.0.2.1")


def test_the_guest_budget_bounds_leases_per_source_and_in_total() -> None:
    budget = LeaseBudget(per_source=1, total=2)
    assert budget.take("192.0.2.1") is None
    refusal = budget.take("192.0.2.1")
    assert refusal is not None and "max_leases_per_source" in refusal
    assert budget.take("192.0.2.2") is None
    refusal = budget.take("192.0.2.3")
    assert refusal is not None and "max_leases" in refusal
    budget.give("192.0.2.1")
    assert budget.take("192.0.2.3") is None
    assert budget.held == 2


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"max_startups": "10:30"}, "sensor.max_startups"),
        ({"max_startups": "100:30:10"}, "sensor.max_startups"),
        ({"max_startups": "10:0:100"}, "sensor.max_startups"),
        ({"max_startups_per_source": 0}, "sensor.max_startups_per_source"),
        ({"penalty_exempt": ["10.0.0.0/33"]}, "sensor.penalty_exempt"),
        ({"penalty_min": 700.0}, "sensor.penalty_min"),
        ({"max_leases_per_source": 0}, "sensor.max_leases_per_source"),
    ],
)
def test_bad_admission_settings_fail_naming_their_key(
    tmp_path: Path, table: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigProblems) as e:
        parse_section(SensorConfig, "sensor", table, base_dir=tmp_path, env={})
    assert [p.key for p in e.value.problems] == [key]
