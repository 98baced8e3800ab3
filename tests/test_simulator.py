"""The simulator: its workload and statistics (pure), its chaos (pauses, a memory limit)
and its command line."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from lending.errors import ConfigError
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Settings
from simulator.cli import main
from simulator.deployment import Deployment
from simulator.driver import Driver
from simulator.run import memory_bytes
from simulator.stats import RunReport, latency_summary, percentile
from simulator.workload import Workload, Zipf

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
        [
            sys.executable,
            "-m",
            "simulator",
            "run",
            "--requests",
            "300",
            "--rate",
            "300",
            "--workers",
            "1",
            "--users",
            "20",
            "--catalogue",
            "100",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
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


# -- chaos: pausing workers ----------------------------------------------------------------------

MARK = "SIM_TEST_RUN"  # an environment mark every process of a run inherits (LENDING_* are not passed on)


def processes_of_run(mark: str) -> dict[int, str]:
    """pid -> state (``T``: stopped) of every live process that inherited ``MARK=mark``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARK}={mark}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z":
            found[int(entry.name)] = state
    return found


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stopped(pid: int, timeout_s: float = 5.0) -> bool:
    """Is ``pid`` stopped (``T``), once a signal sent to it had time to arrive?"""
    deadline = time.monotonic() + timeout_s
    while state_of(pid) != "T":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def simulator(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulator", "run", "--users", "20", "--catalogue", "200", *args]


def simulator_env(mark: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LENDING_")}, MARK: mark}


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


@needs_proc
async def test_a_paused_worker_is_killed_and_continued_safely_and_stop_continues_the_paused(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    deployment = Deployment(namespace, redis_url=redis_url, workers=1, worker_args=("--log-level", "warning"))
    await asyncio.to_thread(deployment.start)
    try:
        rng = random.Random(1)
        first = deployment.pause_random_worker(rng)
        assert first is not None and stopped(first.process.pid)
        assert deployment.pause_random_worker(rng) is None, "the only worker is paused already"

        # Killing the stopped worker works; continuing it afterwards does nothing, and does
        # not touch its successor under the same id.
        await asyncio.to_thread(deployment.kill_random_worker, rng)
        assert first.process.returncode == -signal.SIGKILL
        successor = deployment.workers[first.worker_id]
        deployment.resume(first)
        assert successor.alive and not stopped(successor.process.pid, timeout_s=0.5)

        await asyncio.to_thread(deployment.wait_ready)
        second = deployment.pause_random_worker(rng)
        assert second is successor and stopped(second.process.pid)
    finally:
        await asyncio.to_thread(deployment.stop)
    # stop() continued it first: it acted on SIGTERM and shut down cleanly (a stopped
    # process would have been SIGKILLed after the grace period).
    assert successor.process.returncode == 0
    assert deployment.pauses == 2 and deployment.kills == 1


@needs_proc
def test_run_with_pauses_reports_them_and_leaves_nothing_stopped(tmp_path: Path) -> None:
    out, mark = tmp_path / "report.json", uuid.uuid4().hex
    proc = subprocess.run(
        simulator(
            "--duration",
            "6",
            "--rate",
            "50",
            "--workers",
            "2",
            "--pause-every",
            "1",
            "--claim-idle-ms",
            "1000",
            "--json",
            str(out),
        ),
        cwd=ROOT,
        env=simulator_env(mark),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT        OK" in proc.stdout
    report = json.loads(out.read_text())
    assert report["chaos"]["worker_pauses"] > 0
    assert f"worker_pauses {report['chaos']['worker_pauses']}" in proc.stdout
    assert report["missing_events"] == 0 and report["duplicate_events"] == 0
    assert report["check"]["clean"]
    assert processes_of_run(mark) == {}


def pausing_run(mark: str) -> subprocess.Popen[str]:
    """A 60 s run of two workers, one paused now and then; its processes carry ``mark``."""
    return subprocess.Popen(
        simulator("--duration", "60", "--rate", "20", "--workers", "2", "--pause-every", "0.3"),
        cwd=ROOT,
        env=simulator_env(mark),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_a_paused_worker(proc: subprocess.Popen[str], mark: str, ready: Callable[[], bool] = lambda: True) -> None:
    """Until a worker of ``proc``'s run is paused right now (and ``ready``), within 60 s."""
    deadline = time.monotonic() + 60
    while "T" not in processes_of_run(mark).values() or not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no worker was paused within 60 s: {processes_of_run(mark)}"
        time.sleep(0.05)


@needs_proc
@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_continues_its_paused_workers_and_stops_everything(interrupt: signal.Signals) -> None:
    mark = uuid.uuid4().hex
    proc = pausing_run(mark)
    try:
        wait_for_a_paused_worker(proc, mark)
        proc.send_signal(interrupt)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "Aborted!" in err, err
    assert processes_of_run(mark) == {}
    # A worker left stopped would not act on SIGTERM: the run would SIGKILL it after 15 s.
    assert time.monotonic() - signalled < 12


@needs_proc
def test_a_killed_run_takes_its_redis_server_and_workers_with_it() -> None:
    """SIGKILL leaves the simulator no time to stop anything: its children must end anyway
    (a test's timeout once left a redis-server and two workers running)."""
    mark = uuid.uuid4().hex
    proc = pausing_run(mark)
    try:
        # Its reaper, its redis-server and two workers, one of them paused.
        wait_for_a_paused_worker(proc, mark, ready=lambda: len(children_of(proc.pid)) >= 4)
        children = children_of(proc.pid)
    finally:
        proc.kill()
        proc.communicate()
    assert sorted(children.values()).count("redis-server") == 1, children
    deadline = time.monotonic() + 10
    while left := {pid: name for pid, name in children.items() if live(pid)}:
        assert time.monotonic() < deadline, f"still running 10 s after the run was killed: {left}"
        time.sleep(0.05)


def children_of(parent: int) -> dict[int, str]:
    """pid -> name of the live children of ``parent``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        try:
            name, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:  # not a process, or gone meanwhile
            continue
        state, ppid = rest.split()[:2]
        if int(ppid) == parent and state != "Z":
            found[int(entry.name)] = name.split("(", 1)[1]
    return found


def live(pid: int) -> bool:
    """``pid`` runs (a zombie is dead: nothing may reap an orphan here)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# -- chaos: Redis out of memory --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5mb", 5 * 1024 * 1024),
        ("5MB", 5 * 1024 * 1024),
        ("5m", 5_000_000),
        ("512kb", 512 * 1024),
        ("100k", 100_000),
        ("1gb", 1024**3),
        ("2g", 2_000_000_000),
        ("12345", 12345),
        ("7b", 7),
    ],
)
def test_memory_sizes_as_redis_reads_them(size: str, expected: int) -> None:
    assert memory_bytes(size) == expected


@pytest.mark.parametrize("size", ["", "mb", "5 tb", "-5mb", "5.5mb", "five"])
def test_not_a_memory_size(size: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        memory_bytes(size)


async def test_the_driver_counts_requests_redis_refuses_for_lack_of_memory() -> None:
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedRedis(
            Path(data),
            port=free_port(),
            persistent=False,
            extra_args=("--maxmemory", "1", "--maxmemory-policy", "noeviction"),
        )
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


def test_run_with_maxmemory_ends_clean_once_the_limit_is_lifted(tmp_path: Path) -> None:
    """A private Redis holds about 1.5 MB once the workers are connected; this traffic adds
    about 1 MB more, so 2 MB is full within seconds. Requests wait, the driver's own XADDs
    are refused (and counted, not crashed on); once the limit is lifted every request that
    was queued is answered, as if Redis had been away for a while: none failed, no book lost."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator",
            "run",
            "--duration",
            "8",
            "--rate",
            "500",
            "--workers",
            "2",
            "--users",
            "2000",
            "--catalogue",
            "50000",
            "--maxmemory",
            "2mb",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    assert report.get("memory", {}).get("maxmemory_bytes") == 2 * 1024 * 1024, proc.stdout + proc.stderr
    assert report["memory"]["full_s"] > 0 or report["refused_out_of_memory"] > 0, "memory never got full"
    assert "memory        maxmemory 2097152 bytes (noeviction)" in proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert report["missing_events"] == 0 and report["duplicate_events"] == 0
    assert report["check"]["clean"] and report["check"]["quiescent"]
    assert "failed" not in report["outcomes"], "valid requests failed for lack of memory"


# -- the command line --------------------------------------------------------------------------------


def test_run_help_lists_the_chaos_options() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    assert "--pause-every SECONDS" in result.output and "--maxmemory SIZE" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--maxmemory", "5mb", "--redis-url", "redis://127.0.0.1:1"], "--maxmemory needs the simulator's own Redis"),
        (["--maxmemory", "5 parsecs"], "not a memory size"),
        (["--maxmemory", "0"], "more than 0"),
        (["--pause-every", "1", "--redis-url", "redis://127.0.0.1:1"], "--pause-every"),
        (["--claim-idle-ms", "50"], "50 is not in the range 100<=x<=86400000"),
    ],
)
def test_run_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", "--duration", "1", *args])
    assert result.exit_code == 2
    assert message in result.output


#: The whole-number options ``run`` hands on to its workers, and the ``Settings`` field each sets.
HANDED_ON = {
    "--claim-idle-ms": "claim_idle_ms",
    "--retry-max-ms": "retry_max_ms",
    "--max-books-per-user": "max_books_per_user",
    "--storage-capacity": "storage_capacity",
}


@pytest.mark.parametrize(("option", "field"), HANDED_ON.items())
def test_run_takes_for_its_workers_exactly_the_values_a_worker_takes(option: str, field: str) -> None:
    run = main.commands["run"]
    (bounds,) = (p.type for p in run.params if option in p.opts and isinstance(p.type, click.IntRange))
    assert bounds.min is not None and bounds.max is not None

    for taken in (bounds.min, bounds.max):
        Settings().replace(**{field: taken})
    for refused in (bounds.min - 1, bounds.max + 1):
        with pytest.raises(ConfigError):
            Settings().replace(**{field: refused})


@pytest.mark.parametrize(
    "args",
    [["run", "--duration", "1", "--json"], ["bench", "--workers", "", "--rates", "", "--output"]],
    ids=["run", "bench"],
)
def test_an_output_file_in_a_missing_folder_is_a_usage_error_before_anything_runs(
    args: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, [*args, str(tmp_path / "missing" / "out.json")])

    assert result.exit_code == 2, result.output
    assert "missing' does not exist" in result.output
    assert "RESULT" not in result.output and "saved to" not in result.output


def test_run_writes_its_json_report_to_stdout_with_a_dash() -> None:
    result = CliRunner().invoke(
        main, ["run", "--requests", "20", "--workers", "1", "--users", "5", "--catalogue", "20", "--json", "-"]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("\n{") :])
    assert report["requests"] == 20
