"""Chaos under load, through the simulator: worker kills, Redis restarts, a flaky and
slow shelving service. Each run ends with every request answered exactly once and the
invariant checker clean. Loopback only; each run stops by itself."""

from __future__ import annotations

import uuid
from dataclasses import replace

from simulator.run import RunOptions, simulate


def base_options() -> RunOptions:
    """What every chaos run shares; each test ``replace``s what it is about."""
    return RunOptions(
        redis_url=None,  # the simulator's own redis-server on a free loopback port
        namespace=f"chaos-{uuid.uuid4().hex[:8]}",
        users=100,
        catalogue=500,  # small: popular books are contended, denials and storage both happen
        rate=150,
        claim_idle_ms=1_000,
        quiescence_timeout_s=60,
    )


def assert_all_answered_once(report: object) -> None:
    from simulator.stats import RunReport

    assert isinstance(report, RunReport)
    summary = report.render()
    assert report.missing == 0, summary
    assert report.duplicated == 0, summary
    assert report.check["quiescent"], summary
    assert report.check["clean"], summary
    assert report.ok


async def test_three_workers_one_killed_every_two_seconds() -> None:
    report = await simulate(replace(base_options(), workers=3, kill_every_s=2.0, duration_s=30.0))
    assert_all_answered_once(report)
    assert report.chaos["worker_kills"] >= 10
    assert {"accepted", "denied", "returned"} <= set(report.outcomes)


async def test_redis_restarts_under_load_lose_nothing() -> None:
    report = await simulate(replace(base_options(), workers=2, restart_redis_every_s=4.0, duration_s=14.0))
    assert_all_answered_once(report)
    assert report.chaos["redis_restarts"] >= 3


async def test_flaky_slow_shelving_service() -> None:
    # Waits between retries of at most 2 s: an entry unlucky ten times in a row (30 %
    # failures) is dead-lettered within the run's 60 s wait for the last outcome; with
    # the default 60 s an unlucky one was still waiting when the run stopped looking.
    report = await simulate(
        replace(
            base_options(),
            workers=2,
            shelving_fail_rate=0.3,
            shelving_latency_ms=5.0,
            duration_s=8.0,
            rate=100,
            retry_max_ms=2_000,
        )
    )
    assert_all_answered_once(report)
    assert report.outcomes["accepted"] > 0
