"""The wait before a failed password is refused: libpam's variation, sshd's padding."""

from __future__ import annotations

import pytest

from sensor.ssh.faildelay import MIN_FAIL_DELAY, padding, pam_delay, user_delay


def test_pam_varies_its_delay_by_up_to_half_either_way() -> None:
    waits = [pam_delay(2.0) for _ in range(2000)]
    assert all(1.0 <= wait <= 3.0 for wait in waits)
    # The mean of three draws: centred on the delay asked for, rarely near the ends.
    assert sum(waits) / len(waits) == pytest.approx(2.0, abs=0.05)
    assert len({round(wait, 3) for wait in waits}) > 100


def test_each_user_has_a_fixed_minimum_of_5_to_9_3_ms() -> None:
    assert user_delay(1234, "root") == user_delay(1234, "root")
    delays = {user_delay(1234, f"user{i}") for i in range(200)}
    assert all(MIN_FAIL_DELAY <= delay < MIN_FAIL_DELAY + 0.0043 for delay in delays)
    assert len(delays) == 200
    # Another server (another secret) gives the same name another figure.
    assert user_delay(1234, "root") != user_delay(4321, "root")


@pytest.mark.parametrize(
    ("elapsed", "left"),
    [
        (0.001, 0.009),  # under the minimum: padded up to it
        (0.015, 0.005),  # past it: doubled once (0.02)
        (2.1, 0.46),  # past 0.01 x 128: 0.01 x 256 = 2.56
        (2.56, 0.0),  # exactly on a doubling
    ],
)
def test_sshd_pads_a_failure_to_its_minimum_doubled(elapsed: float, left: float) -> None:
    assert padding(elapsed, 0.01) == pytest.approx(left)
