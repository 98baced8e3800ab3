"""Prometheus /metrics and /healthz on --metrics-port."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from lending.domain.events import STATUSES
from lending.keys import ACTIONS, LENDING_GROUP, SHELVING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Settings
from lending.worker import Worker

from .conftest import StartWorker
from .support import event_for, http_get, send, send_raw, wait_until


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


async def test_healthz_is_503_while_redis_is_away(tmp_path: Path, namespace: str) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    server.start()
    port = free_port()
    client = make_client(server.url)
    settings = Settings(worker_id="w1", redis_url=server.url, namespace=namespace, metrics_port=port, retry_base_ms=100)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())

    async def health_is(code: int) -> bool:
        try:
            return (await http_get(port, "/healthz"))[0] == code
        except OSError:
            return False

    try:
        await wait_until(lambda: health_is(200))
        server.kill()
        await wait_until(lambda: health_is(503), timeout_s=15)
        server.start()
        await wait_until(lambda: health_is(200), timeout_s=15)
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
