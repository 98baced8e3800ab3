"""Prometheus metrics, liveness and readiness on --metrics-port."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from redis.asyncio import Redis

from lending.domain.events import STATUSES
from lending.keys import ACTIONS, LENDING_GROUP, SHELVING_GROUP, Keys
from lending.metrics import Metrics
from lending.ops import monitoring
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Settings
from lending.worker import Worker

from .conftest import StartWorker
from .support import ROOT, decoded, event_for, http_get, process_env, send, send_raw, wait_until, xadd_fields


async def test_metrics_count_requests_and_show_the_namespace(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b1", "b2"]))
    await event_for(redis, keys, "lend", await send_raw(redis, keys, "lend", {"user_id": "ada"}))

    assert await http_get(port, "/healthz") == (200, "ok\n")

    async def shows_loans() -> bool:
        _, body = await http_get(port, "/metrics")
        return "lending_books_lent 2.0" in body

    await wait_until(shows_loans, timeout_s=10)
    _, body = await http_get(port, "/metrics")
    assert 'lending_requests_total{action="lend",status="accepted"} 1.0' in body
    assert 'lending_requests_total{action="lend",status="rejected"} 1.0' in body
    assert "lending_batch_seconds_count" in body
    assert f'lending_stream_pending{{group="lending-service",stream="{keys.lend_requests}"}} 0.0' in body
    assert (await http_get(port, "/nothing"))[0] == 404


async def test_during_a_redis_outage_the_worker_is_live_but_not_ready(tmp_path: Path, namespace: str) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    server.start()
    port = free_port()
    client = make_client(server.url)
    settings = Settings(worker_id="w1", redis_url=server.url, namespace=namespace, metrics_port=port, retry_base_ms=100)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())

    async def codes() -> list[int]:
        """The answers of /livez, /readyz and /healthz."""
        try:
            return [(await http_get(port, path))[0] for path in ("/livez", "/readyz", "/healthz")]
        except OSError:
            return []

    async def codes_are(*expected: int) -> bool:
        return await codes() == list(expected)

    try:
        await wait_until(lambda: codes_are(200, 200, 200))
        server.kill()
        # Not ready (nothing to route to it), but alive: restarting it would not bring Redis back.
        await wait_until(lambda: codes_are(200, 503, 503), timeout_s=15)
        for _ in range(10):  # and it stays alive while Redis is away
            await asyncio.sleep(0.3)
            assert (await codes())[0] == 200
        server.start()
        await wait_until(lambda: codes_are(200, 200, 200), timeout_s=15)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        server.stop()


async def test_during_a_redis_outage_the_metrics_say_redis_is_down_and_the_gauges_stale(
    tmp_path: Path, namespace: str
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    server.start()
    port = free_port()
    client = make_client(server.url)
    settings = Settings(worker_id="w1", redis_url=server.url, namespace=namespace, metrics_port=port, retry_base_ms=100)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())

    async def sample(name: str) -> float | None:
        try:
            _, body = await http_get(port, "/metrics")
        except OSError:
            return None
        found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
        return float(found.group(1)) if found else None

    async def is_(name: str, expected: float) -> bool:
        return await sample(name) == expected

    try:
        await wait_until(lambda: is_("lending_redis_up", 1.0), timeout_s=10)
        read_before = await sample("lending_gauges_read_timestamp_seconds")
        assert read_before is not None and abs(read_before - time.time()) < 5
        server.kill()
        await wait_until(lambda: is_("lending_redis_up", 0.0), timeout_s=15)
        # The gauges keep their last values; the time they were read says how old they are.
        stale = await sample("lending_gauges_read_timestamp_seconds")
        await asyncio.sleep(2.5)
        assert await sample("lending_gauges_read_timestamp_seconds") == stale
        server.start()
        await wait_until(lambda: is_("lending_redis_up", 1.0), timeout_s=15)
        read_after = await sample("lending_gauges_read_timestamp_seconds")
        assert read_after is not None and stale is not None and read_after > stale
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        server.stop()


async def test_livez_fails_when_a_consumer_is_stuck(tmp_path: Path, namespace: str) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    port = free_port()
    client = make_client(server.url)
    settings = Settings(
        worker_id="w1", redis_url=server.url, namespace=namespace, metrics_port=port, liveness_timeout_s=1.0
    )

    async def hangs() -> bool:
        # A look-up for the Redis to follow that never comes back (say, a lost cluster).
        await asyncio.Event().wait()
        return False

    worker = Worker(settings, client, handle_signals=False, on_redis_error=hangs)
    task = asyncio.create_task(worker.run())

    async def live_is(code: int) -> bool:
        try:
            return (await http_get(port, "/livez"))[0] == code
        except OSError:  # not listening yet
            return False

    try:
        await wait_until(lambda: live_is(200))
        server.kill()  # the consumers' next error sends them into the hook, for good
        await wait_until(lambda: live_is(503), timeout_s=15)
        assert (await http_get(port, "/livez"))[1] != "ok\n"
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        server.stop()


def sample(worker: Worker, name: str, **labels: str) -> float | None:
    """The value of one sample of the worker's registry (``None``: no such series)."""
    return worker.metrics.registry.get_sample_value(name, labels)


# -- outcomes, and counters that exist from the start --------------------------------


async def test_failed_outcomes_are_counted(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    # Shelving is down and one delivery is all an entry gets: the lend is dead-lettered.
    worker = await start_worker(shelving_fail_rate=1.0, max_deliveries=1)
    request = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", request)).status == "failed"

    await wait_until(lambda: sample(worker, "lending_requests_total", action="lend", status="failed") == 1)
    assert sample(worker, "lending_dead_letters_total", consumer=LENDING_GROUP) == 1
    assert sample(worker, "lending_request_latency_seconds_count", action="lend") == 1


async def test_counters_with_known_labels_start_at_zero(start_worker: StartWorker) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    _, body = await http_get(port, "/metrics")
    for action in ACTIONS:
        for status in STATUSES:
            assert f'lending_requests_total{{action="{action}",status="{status}"}} 0.0' in body
    for group in (LENDING_GROUP, SHELVING_GROUP):
        for name in ("retries", "reclaims", "dead_letters", "redis_reconnects"):
            assert f'lending_{name}_total{{consumer="{group}"}} 0.0' in body


# -- latency, batches, pending age, dead letters, process, build ---------------------


async def test_latency_runs_from_the_entry_id_to_the_commit(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    # A request queued 5 s ago (its ID says so) that the worker answers now.
    queued_ms = int(time.time() * 1000) - 5_000
    fields = xadd_fields({"user_id": "ada", "book_ids": "b1"})
    request = decoded(await redis.xadd(keys.lend_requests, fields, id=f"{queued_ms}-0"))
    worker = await start_worker()
    assert (await event_for(redis, keys, "lend", request)).status == "accepted"

    await wait_until(lambda: sample(worker, "lending_request_latency_seconds_count", action="lend") == 1)
    latency = sample(worker, "lending_request_latency_seconds_sum", action="lend")
    assert latency is not None and 5.0 <= latency < 30.0
    assert sample(worker, "lending_request_latency_seconds_bucket", action="lend", le="2.5") == 0
    assert sample(worker, "lending_request_latency_seconds_count", action="return") == 0
    assert sample(worker, "lending_batch_size_count") == 1
    assert sample(worker, "lending_batch_size_sum") == 1


async def test_oldest_pending_age_is_the_entry_age_not_its_idle_time(redis: Redis, keys: Keys) -> None:
    # An entry queued two minutes ago, just read by a consumer that holds it (and would
    # renew it: its idle time says nothing of how long the sender has been waiting).
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    queued_ms = int(time.time() * 1000) - 120_000
    fields = xadd_fields({"user_id": "ada", "book_ids": "b1"})
    await redis.xadd(keys.lend_requests, fields, id=f"{queued_ms}-0")
    await redis.xadd(keys.lend_requests, fields)
    await redis.xreadgroup(LENDING_GROUP, "ghost", {keys.lend_requests: ">"})
    for n in range(3):
        await redis.xadd(keys.dead_letters, xadd_fields({"request_id": f"{n}-1", "error": "boom"}))

    metrics = Metrics()
    await monitoring.refresh(metrics, redis, keys)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    age = value("lending_oldest_pending_age_seconds", stream=keys.lend_requests, group=LENDING_GROUP)
    assert age is not None and 120.0 <= age < 180.0
    (oldest,) = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, min="-", max="+", count=1)
    assert int(oldest["time_since_delivered"]) < 10_000
    assert value("lending_oldest_pending_age_seconds", stream=keys.return_requests, group=LENDING_GROUP) == 0
    assert value("lending_stream_pending", stream=keys.lend_requests, group=LENDING_GROUP) == 2
    assert value("lending_dead_letters_waiting") == 3


async def test_process_metrics_and_build_info(start_worker: StartWorker) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    _, body = await http_get(port, "/metrics")
    assert f'lending_build_info{{version="{version("lending")}"}} 1.0' in body
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert re.search(rf"^{name} \d", body, re.MULTILINE), name


async def test_namespace_wide_gauges_say_how_to_aggregate_them(start_worker: StartWorker) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    _, body = await http_get(port, "/metrics")
    helps = dict(re.findall(r"^# HELP (\w+) (.*)$", body, re.MULTILINE))
    for name in (
        "lending_stream_lag",
        "lending_stream_pending",
        "lending_oldest_pending_age_seconds",
        "lending_storage_books",
        "lending_books_lent",
        "lending_dead_letters_waiting",
    ):
        assert "namespace-wide: aggregate with max() across workers" in helps[name], (name, helps.get(name))


# -- where the metrics listen --------------------------------------------------------


async def test_metrics_listen_on_loopback_by_default(start_worker: StartWorker) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    assert (await http_get(port, "/metrics"))[0] == 200
    # Bound to 127.0.0.1 only, not to every address: another address of the host is refused.
    with pytest.raises(OSError):
        await http_get(port, "/metrics", host="127.0.0.2")


async def test_metrics_host_chooses_the_address(start_worker: StartWorker) -> None:
    port = free_port()
    await start_worker(metrics_port=port, metrics_host="127.0.0.2")
    assert (await http_get(port, "/metrics", host="127.0.0.2"))[0] == 200
    with pytest.raises(OSError):
        await http_get(port, "/metrics")


def test_metrics_host_is_an_option_with_its_env_var() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    entry = " ".join(result.stdout.partition("--metrics-host")[2].split("\n  --")[0].split())
    assert "env var: LENDING_METRICS_HOST" in entry and "127.0.0.1" in entry, result.stdout


# -- a taken port --------------------------------------------------------------------


async def test_a_taken_metrics_port_is_one_line_and_exit_1_before_the_id_is_claimed(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "w-port", "--metrics-port", str(port)],
            cwd=ROOT,
            env=process_env(redis_url, namespace),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines[0]
    assert not await redis.exists(keys.worker("w-port"))
    assert not await redis.sismember(keys.workers, "w-port")
