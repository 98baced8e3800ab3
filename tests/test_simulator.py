"""The simulator: its workload and statistics (pure), and its driver."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from lending.connection import make_client
from lending.embedded import EmbeddedRedis, free_port
from lending.keys import Keys
from simulator.driver import Driver
from simulator.stats import RunReport, latency_summary, percentile
from simulator.workload import Zipf, Workload

from .support import ROOT


def test_zipf_favours_popular_books() -> None:
    rng = random.Random(7)
    draws = Counter(Zipf(1000).draw(rng) for _ in range(20_000))
    assert draws[0] > draws[9] > draws[99]
    assert all(0 <= book < 1000 for book in draws)


def test_users_return_only_books_they_hold_or_asked_for() -> None:
    workload = Workload(users=5, catalogue=50, seed=3)
    for _ in range(500):
        request = workload.next_request()
        user = workload.people[request.user_id]
        if request.action == "return":
            assert set(request.book_ids) <= user.held | user.asked
            workload.outcome(request, "returned", request.book_ids)
        else:
            assert 1 <= len(request.book_ids) <= 3
            assert len(set(request.book_ids)) == len(request.book_ids)
            workload.outcome(request, "accepted", request.book_ids[:1])
    actions = Counter(workload.next_request().action for _ in range(200))
    assert actions["lend"] and actions["return"]


def test_outcomes_update_what_users_hold() -> None:
    workload = Workload(users=1, catalogue=10, seed=1)
    lend = workload.next_request()
    assert lend.action == "lend"
    workload.outcome(lend, "accepted", lend.book_ids[:1])
    user = workload.people[lend.user_id]
    assert user.held == {lend.book_ids[0]} and not user.asked


@pytest.mark.parametrize(("p", "expected"), [(50, 50.0), (95, 95.0), (99, 99.0), (100, 100.0)])
def test_percentile_nearest_rank(p: float, expected: float) -> None:
    assert percentile([float(v) for v in range(1, 101)], p) == expected


def test_latency_summary_of_nothing() -> None:
    assert latency_summary([]) == {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}


def test_report_fails_on_a_missing_or_duplicate_event() -> None:
    clean = {"clean": True, "quiescent": True, "violations": []}
    assert RunReport(sent=3, check=clean).ok
    assert not RunReport(sent=3, missing=1, check=clean).ok
    assert not RunReport(sent=3, duplicated=1, check=clean).ok
    assert not RunReport(sent=3, check={"clean": False}).ok


def test_run_command_reports_and_exits_zero_when_all_is_well(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "simulator", "run", "--requests", "300", "--rate", "300", "--workers", "1",
         "--users", "20", "--catalogue", "100", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT        OK" in proc.stdout
    report = json.loads(out.read_text())
    assert report["requests"] == 300
    assert sum(report["outcomes"].values()) == 300
    assert report["missing_events"] == 0 and report["duplicate_events"] == 0
    assert report["check"]["clean"] and report["check"]["quiescent"]
    assert report["latency"]["p99_ms"] > 0


def test_standard_mix_is_about_sixty_forty() -> None:
    workload = Workload(users=2000, catalogue=50_000, seed=1)
    actions = Counter(workload.next_request().action for _ in range(20_000))
    assert 0.37 <= actions["return"] / 20_000 <= 0.43


# -- the driver under Redis out of memory ------------------------------------------------------------


async def test_the_driver_counts_requests_redis_refuses_for_lack_of_memory() -> None:
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedRedis(Path(data), port=free_port(), persistent=False,
                               extra_args=("--maxmemory", "1", "--maxmemory-policy", "noeviction"))
        server.start()
        client = make_client(server.url)
        try:
            driver = Driver(client, Keys("oom"), Workload(users=5, catalogue=20), rate=200, requests=30)
            report = await driver.run(drain_timeout_s=5)
        finally:
            await client.aclose()
            server.stop()
    assert (report.refused, report.sent, report.missing) == (30, 0, 0)
    report.check = {"clean": True}
    assert report.ok, "refused requests are not missing outcomes"
    assert "refused       30 (by Redis: out of memory" in report.render()


