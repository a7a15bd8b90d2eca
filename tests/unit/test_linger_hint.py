"""The linger hint: zero on a quiet fleet, N * (1/target - 1/rate) on a busy one, capped."""

from __future__ import annotations

import pytest

from controller.events.linger import LingerAdvisor, LingerPolicy


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def steady(advisor: LingerAdvisor, clock: Clock, events_per_second: int, seconds: int) -> None:
    """Feed the advisor a steady rate, one tenth of a second at a time."""
    for _ in range(seconds * 10):
        advisor.received(events_per_second // 10)
        clock.now += 0.1


def test_a_fleet_sending_fewer_events_than_the_batch_target_gets_no_hint() -> None:
    clock = Clock()
    advisor = LingerAdvisor(LingerPolicy(target=250, max_linger=2.5), clock)
    steady(advisor, clock, 200, 10)
    assert advisor.rate() == pytest.approx(200, rel=0.05)
    assert advisor.hint(streams=1000) == 0.0


def test_a_busy_fleet_is_asked_to_linger_so_batches_arrive_at_the_target() -> None:
    clock = Clock()
    advisor = LingerAdvisor(LingerPolicy(target=500, max_linger=5), clock)
    steady(advisor, clock, 2000, 10)
    # 1000 sensors at 2 events/s: L = 1000 * (1/500 - 1/2000) = 1.5 s, so each batch
    # carries 1 + 2 * 1.5 = 4 events and the fleet sends 2000 / 4 = 500 batches/s.
    assert advisor.hint(streams=1000) == pytest.approx(1.5, rel=0.05)
    # The same events from fewer sensors need less gathering.
    assert advisor.hint(streams=100) == pytest.approx(0.15, rel=0.05)


def test_the_hint_is_capped_and_can_be_turned_off() -> None:
    clock = Clock()
    capped = LingerAdvisor(LingerPolicy(target=10, max_linger=2.5), clock)
    off = LingerAdvisor(LingerPolicy(target=10, max_linger=0), clock)
    for advisor in (capped, off):
        advisor.received(1000)
    clock.now += 1
    assert capped.hint(streams=1000) == 2.5
    assert off.hint(streams=1000) == 0.0


def test_the_rate_forgets_a_burst_once_the_fleet_is_quiet_again() -> None:
    clock = Clock()
    advisor = LingerAdvisor(LingerPolicy(target=250, max_linger=2.5), clock)
    steady(advisor, clock, 5000, 3)
    assert advisor.hint(streams=1000) > 0
    clock.now += 2 * advisor.policy.window
    assert advisor.rate() == 0.0
    assert advisor.hint(streams=1000) == 0.0
