"""The donor's terms: schedule parsing and the idle rules that take a GPU back."""

from __future__ import annotations

import datetime as dt

import pytest

from lorapool.service.pool.policy import DonationPolicy, GpuActivity, in_schedule, parse_schedule


def at(weekday: int, hour: int, minute: int = 0) -> dt.datetime:
    # 2026-11-23 is a Monday.
    return dt.datetime(2026, 11, 23 + weekday, hour, minute)


def test_schedule_across_midnight_and_weekends():
    parts = parse_schedule("19:00-07:00, weekends")
    assert in_schedule(parts, at(0, 19, 0)) and in_schedule(parts, at(1, 6, 59))
    assert not in_schedule(parts, at(2, 7, 0)) and not in_schedule(parts, at(2, 12))
    assert in_schedule(parts, at(5, 12)) and in_schedule(parts, at(6, 15))


@pytest.mark.parametrize("bad", ["25:00-07:00", "evenings", "", "9-17"])
def test_bad_schedule_names_the_item(bad):
    with pytest.raises(ValueError):
        DonationPolicy(schedule=bad)


def test_outside_schedule_gives_a_reason():
    now = [at(2, 12)]
    check = DonationPolicy(schedule="19:00-07:00").checker(probe=lambda: None, clock=lambda: now[0])
    assert "outside the donation schedule" in check(set())
    now[0] = at(2, 20)
    assert check(set()) is None


def test_idle_rule_ignores_our_own_jobs_and_waits_busy_minutes():
    activity = [GpuActivity(pids=(111,), utilization_percent=95.0)]
    policy = DonationPolicy(only_when_unused=True, busy_minutes=0)
    check = policy.checker(probe=lambda: activity[0])
    assert check({111}) is None, "our own training process is not the owner"
    activity[0] = GpuActivity(pids=(111, 222), utilization_percent=95.0)
    assert "the owner is using the GPU" in check({111})
    activity[0] = GpuActivity(pids=(111,), utilization_percent=5.0)
    assert check({111}) is None


def test_utilisation_threshold_needs_time_above_it():
    activity = GpuActivity(pids=(222,), utilization_percent=40.0)
    low = DonationPolicy(max_other_utilization=50, busy_minutes=0).checker(probe=lambda: activity)
    assert low(set()) is None
    high = DonationPolicy(max_other_utilization=30, busy_minutes=0).checker(probe=lambda: activity)
    assert high(set()) is not None
    slow = DonationPolicy(max_other_utilization=30, busy_minutes=5).checker(probe=lambda: activity)
    assert slow(set()) is None, "busy for less than busy_minutes"
