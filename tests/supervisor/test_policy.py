from __future__ import annotations

import pytest

from supervisor.policy import Backoff, RestartIntensity, ShutdownPlan, exit_status
from supervisor.spec import Layer


def test_backoff_grows_exponentially_and_is_capped():
    b = Backoff(initial=0.5, factor=2, maximum=4)
    assert [b.delay(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_intensity_escalates_only_past_max_restarts_within_the_period():
    r = RestartIntensity(max_restarts=3, period=10)
    assert [r.record(t) for t in (0, 1, 2)] == [False, False, False]
    assert r.record(3) is True


def test_intensity_forgets_restarts_older_than_the_period():
    r = RestartIntensity(max_restarts=2, period=10)
    assert not r.record(0)
    assert not r.record(5)
    assert not r.record(11)  # the one at 0 has left the window
    assert r.record(12)


@pytest.mark.parametrize("timeout", [3.0, 30.0, 600.0])
def test_shutdown_plan_stops_inner_layers_first_and_infra_at_the_deadline(timeout):
    plan = ShutdownPlan(timeout, min(5.0, timeout / 3))
    kills = [plan.kill_at(layer) for layer in (Layer.EDGE, Layer.WORK, Layer.MODEL, Layer.INFRA)]
    assert plan.drain_end < kills[0] <= kills[1] < kills[2] < kills[3] == timeout


def test_exit_status_is_zero_only_for_a_clean_shutdown():
    assert exit_status(killed=0, escalated=False, failed_to_start=False) == 0
    assert exit_status(killed=1, escalated=False, failed_to_start=False) != 0
    assert exit_status(killed=0, escalated=True, failed_to_start=False) != 0
    assert exit_status(killed=0, escalated=False, failed_to_start=True) != 0
