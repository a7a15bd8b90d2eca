"""Per-source tables count one client as one source, however its address is written.

An IPv4 client of a dual-stack listener arrives as ``::ffff:a.b.c.d``, and an IPv6
attacker holds a whole /64: neither may make one source look like many to the
unauthenticated pool's share, the penalties, the guest budget or the event budget.
"""

from __future__ import annotations

from dataclasses import replace

from sensor.config import SensorConfig
from sensor.eventbudget import EventBudget, EventLimits
from sensor.metrics import SensorMetrics
from sensor.session.admission import Admission, Slot
from sensor.session.budget import LeaseBudget
from sensor.session.penalties import Outcome, Penalties
from sensor.session.sources import source_of

CONFIG = SensorConfig()


def test_a_mapped_address_is_its_ipv4_address_and_an_ipv6_source_is_its_64() -> None:
    assert source_of("::ffff:192.0.2.7") == source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")


def test_a_penalty_follows_the_source_across_mapped_and_rotated_addresses() -> None:
    config = replace(CONFIG, penalty_min=1.0, penalty_exempt=("10.0.0.0/8",))
    penalties = Penalties(config)
    penalties.penalise("::ffff:192.0.2.1", Outcome.AUTH_FAILED)
    assert penalties.refused("192.0.2.1")
    penalties.penalise("2001:db8::1", Outcome.AUTH_FAILED)
    assert penalties.refused("2001:db8::2")
    assert not penalties.refused("2001:db8:0:1::1")
    # An exempt IPv4 network covers its clients on a dual-stack listener too.
    assert not penalties.penalise("::ffff:10.1.2.3", Outcome.AUTH_FAILED)
    assert not penalties.refused("10.1.2.3")


def test_one_64_gets_one_share_of_the_unauthenticated_pool() -> None:
    admission = Admission(replace(CONFIG, max_startups_per_source=2), SensorMetrics())
    for host in (1, 2):
        assert isinstance(admission.admit("ssh", f"2001:db8::{host}", spool_near_full=False), Slot)
    assert admission.admit("ssh", "2001:db8::3", spool_near_full=False) == (
        "max_startups_per_source"
    )
    assert isinstance(admission.admit("ssh", "2001:db8:0:1::1", spool_near_full=False), Slot)


def test_the_guest_budget_counts_a_source_once_however_it_is_written() -> None:
    budget = LeaseBudget(per_source=1, total=10)
    assert budget.take("::ffff:192.0.2.1") is None
    assert budget.take("192.0.2.1") is not None
    assert budget.take("2001:db8::1") is None
    assert budget.take("2001:db8::2") is not None
    budget.give("192.0.2.1")
    assert budget.take("::ffff:192.0.2.1") is None


def test_a_64_shares_one_event_budget() -> None:
    limits = EventLimits(
        session_max_events=100,
        session_events_per_minute=100,
        source_max_events=2,
        source_events_per_minute=1,
    )
    budget = EventBudget(limits, SensorMetrics(), clock=lambda: 0.0)
    assert budget.source_allows("2001:db8::1")
    assert budget.source_allows("2001:db8::2")
    assert not budget.source_allows("2001:db8::3")
    assert budget.source_allows("2001:db8:0:1::1")
