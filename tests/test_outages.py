"""Redis refusing writes, slow work and dependency outages cost latency, never requests
or books (issue 8, items 2, 3, 6, 7 and 8).

- Out of memory, or a stream out of IDs, Redis refuses the commit as a whole: the
  entries wait, uncharged, and are processed once the condition is gone.
- A slow handler is reported as slow, not as Redis being away.
- A live worker keeps its entries however long its work takes.
- Retries back off, so an outage of the shelving service costs time, not failures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.domain.backoff import jittered, retry_backoff_s
from lending.domain.streamids import MAX_ID
from lending.errors import ConfigError
from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.ops.checker import check
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Limits, Settings

from .conftest import StartWorker
from .support import all_events, decoded, event_for, send, start_worker_process, stop_process, wait_until

SERVERS = ["6.2", "7"]


def redis_7_binary() -> str | None:
    """Debian's redis-server, when it is a 7.x (``.ci/run`` installs it)."""
    path = shutil.which("redis-server", path="/usr/bin")
    if path is None:
        return None
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return path if " v=7." in version or " v=8." in version else None


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A private server whose limits the test may change: the embedded 6.2, and a 7.x."""
    if request.param == "6.2":
        server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    binary = redis_7_binary()
    if binary is None:
        pytest.skip("no Redis 7 binary at /usr/bin/redis-server (Debian's redis-server package)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def wait_answering(client: Redis) -> None:
    async def answers() -> bool:
        try:
            return bool(await client.ping())
        except Exception:
            return False

    await wait_until(answers)


FAST_RETRIES = ("--max-deliveries", "2", "--retry-base-ms", "50", "--retry-max-ms", "200")


# -- out of memory ---------------------------------------------------------------------


async def test_out_of_memory_requests_wait_and_are_processed_once_memory_is_back(
    server_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    client = make_client(server_url)
    await wait_answering(client)
    for stream, group in (
        (keys.lend_requests, LENDING_GROUP),
        (keys.return_requests, LENDING_GROUP),
        (keys.shelving_returns, SHELVING_GROUP),
    ):
        await ensure_group(client, stream, group)
    worker = start_worker_process("w1", server_url, namespace, *FAST_RETRIES, "--storage-capacity", "2")
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # queue everything first
        await client.sadd(keys.storage, "stored-1")
        await client.hset(keys.shelving_state, "stored-1", "earlier")
        await client.hset(keys.from_shelving, "stored-1", "earlier")
        lends = [await send(client, keys, "lend", f"user-{n}", [f"book-{n}"]) for n in range(10)]
        lends.append(await send(client, keys, "lend", "ada", ["stored-1"]))
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")  # every write that needs memory is refused
        os.kill(worker.pid, signal.SIGCONT)

        await asyncio.sleep(2.0)  # many retry rounds (50-200 ms apart) while out of memory
        assert await client.xlen(keys.events) == 0
        assert await client.hlen(keys.lent_books) == 0
        assert await client.hlen(keys.grants) == 0  # shelving refused too: nothing handed out
        pending = await client.xpending_range(keys.lend_requests, LENDING_GROUP, min="-", max="+", count=100)
        assert len(pending) == len(lends)
        assert all(p["times_delivered"] == 1 for p in pending), "waiting out OOM was charged as deliveries"

        await client.config_set("maxmemory", "0")
        for entry in lends:
            event = await event_for(client, keys, "lend", entry, timeout_s=15)
            assert event.status == "accepted", event
        assert await client.xlen(keys.dead_letters) == 0
        assert len(await all_events(client, keys)) == len(lends)
        report = await check(
            client, namespace, wait_quiescent_s=10, limits=Limits(max_books_per_user=5, storage_capacity=2)
        )
        assert report.clean, report.violations
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGCONT)
        await client.config_set("maxmemory", "0")
        code, _, log = stop_process(worker)
        await client.aclose()
    assert code == 0, log
    assert "Traceback" not in log, log


async def test_a_worker_started_while_redis_is_out_of_memory_waits_then_serves(server_url: str, namespace: str) -> None:
    keys = Keys(namespace)
    client = make_client(server_url)
    await wait_answering(client)
    entry = await send(client, keys, "lend", "ada", ["b1"])
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", "1")
    starting = asyncio.create_task(asyncio.to_thread(start_worker_process, "w1", server_url, namespace))
    try:
        await asyncio.sleep(1.5)
        assert not starting.done(), "the worker claimed to be ready while Redis refused every write"
        await client.config_set("maxmemory", "0")
        worker = await asyncio.wait_for(starting, 20)
        assert (await event_for(client, keys, "lend", entry)).status == "accepted"
        code, _, log = stop_process(worker)
        assert code == 0, log
        assert "out of memory: waiting" in log, log
    finally:
        await client.config_set("maxmemory", "0")
        await client.aclose()


# -- a commit that would fail at its last write -------------------------------------------


async def block_stream(client: Redis, stream: str) -> None:
    """Give ``stream`` the largest possible last ID: no entry can be added to it."""
    await client.xadd(stream, {"x": "y"}, id=MAX_ID)
    await client.xdel(stream, MAX_ID)


async def namespace_state(client: Redis, keys: Keys) -> dict[str, object]:
    return {
        "lent": await client.hgetall(keys.lent_books),
        "storage": await client.smembers(keys.storage),
        "shelving": await client.hgetall(keys.shelving_state),
        "from_shelving": await client.hgetall(keys.from_shelving),
        "returns": await client.xlen(keys.shelving_returns),
        "count": await client.get(keys.user_count("ada")),
        "events": await client.xlen(keys.events),
    }


async def test_an_events_stream_out_of_ids_changes_nothing_and_the_request_waits(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(max_deliveries=2, retry_base_ms=50, retry_max_ms=200)
    first = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", first)).status == "accepted"
    await redis.delete(keys.events)
    await block_stream(redis, keys.events)
    before = await namespace_state(redis, keys)

    second = await send(redis, keys, "return", "ada", ["b1"])
    await asyncio.sleep(1.5)  # several rounds of retries
    assert await namespace_state(redis, keys) == before, "a refused commit changed the state"
    pending = await redis.xpending_range(keys.return_requests, LENDING_GROUP, min="-", max="+", count=10)
    assert [(decoded(p["message_id"]), p["times_delivered"]) for p in pending] == [(second, 1)]
    assert await redis.xlen(keys.dead_letters) == 0

    await redis.delete(keys.events)  # the operator's fix
    event = await event_for(redis, keys, "return", second)
    assert (event.status, event.books) == ("returned", ("b1",))
    assert await redis.hlen(keys.lent_books) == 0


async def test_a_returns_stream_out_of_ids_changes_nothing_and_the_request_waits(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(max_deliveries=2, retry_base_ms=50, retry_max_ms=200, storage_capacity=0)
    first = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", first)).status == "accepted"
    await block_stream(redis, keys.shelving_returns)
    before = await namespace_state(redis, keys)

    second = await send(redis, keys, "return", "ada", ["b1"])  # b1 must go back to shelving
    await asyncio.sleep(1.5)
    assert await namespace_state(redis, keys) == before
    assert await redis.xlen(keys.dead_letters) == 0

    # The operator moves the blocked stream aside (its group goes with it).
    await redis.delete(keys.shelving_returns)
    event = await event_for(redis, keys, "return", second, timeout_s=15)
    assert event.status == "returned"
    await wait_until(lambda: _shelving_freed(redis, keys, "b1"), timeout_s=15)


async def _shelving_freed(redis: Redis, keys: Keys, book: str) -> bool:
    return not await redis.hexists(keys.shelving_state, book)


# -- slow work ---------------------------------------------------------------------------


async def test_a_slow_handler_is_reported_as_slow_not_as_redis_being_away(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    with capture_logs() as logs:
        await start_worker(request_timeout_s=0.2, shelving_latency_ms=1000, max_deliveries=1)
        entry = await send(redis, keys, "lend", "ada", ["b1"])
        event = await event_for(redis, keys, "lend", entry)
    assert event.status == "failed"
    assert "processing took longer than 0.2 s" in event.reason
    assert not [line for line in logs if "redis unavailable" in line["event"]]
    assert [line for line in logs if line["event"] == "processing failed"]


async def test_a_live_workers_entries_are_not_taken_however_long_its_work_takes(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Shelving calls of up to 1.5 s against a claim-idle of 0.3 s: without renewal the
    other worker would take the entries over mid-call, and the work would be repeated."""
    slow = await start_worker(worker_id="slow", shelving_latency_ms=1000, claim_idle_ms=300)
    other = await start_worker(worker_id="other", claim_idle_ms=300)
    entries = [await send(redis, keys, "lend", f"user-{n}", [f"book-{n}"]) for n in range(6)]
    for entry in entries:
        assert (await event_for(redis, keys, "lend", entry)).status == "accepted"
    for worker in (slow, other):
        reclaims = worker.metrics.registry.get_sample_value("lending_reclaims_total", {"consumer": "lending-service"})
        assert not reclaims, f"{worker.settings.worker_id} took over {reclaims} entries of a live worker"
    assert len(await all_events(redis, keys)) == len(entries)


def test_a_claim_idle_too_short_for_renewal_is_refused() -> None:
    with pytest.raises(ConfigError, match="claim-idle-ms"):
        Settings(claim_idle_ms=50)


def test_a_claim_idle_shorter_than_a_shelving_call_is_warned_about() -> None:
    (warning,) = Settings(claim_idle_ms=1000, shelving_latency_ms=1000).warnings()
    assert "claim-idle-ms (1000)" in warning
    assert Settings(claim_idle_ms=30_000, shelving_latency_ms=1000).warnings() == []


# -- retries -----------------------------------------------------------------------------


def test_retry_delays_double_with_jitter_up_to_the_cap() -> None:
    import random

    rng = random.Random(7)
    for failures in range(1, 12):
        full = retry_backoff_s(failures, 1.0, 60.0)
        assert full == min(60.0, 2 ** (failures - 1))
        delay = jittered(full, rng)
        assert full / 2 <= delay <= full


def test_with_the_default_settings_an_outage_of_two_minutes_costs_no_request() -> None:
    settings = Settings()
    shortest_waits = [
        retry_backoff_s(failures, settings.retry_base_ms / 1000, settings.retry_max_ms / 1000) / 2
        for failures in range(1, settings.max_deliveries)
    ]
    assert sum(shortest_waits) >= 120


async def test_a_shelving_outage_costs_latency_not_failures(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """With fixed retries 100 ms apart, ten deliveries would be spent within a second of
    a 2.5 s outage; backing off, they are not."""
    worker = await start_worker(shelving_fail_rate=1.0, retry_base_ms=100, retry_max_ms=1000)
    entry = await send(redis, keys, "lend", "ada", ["b1"])
    await asyncio.sleep(2.5)
    worker.shelving._fail_rate = 0.0  # the shelving service is back
    event = await event_for(redis, keys, "lend", entry, timeout_s=10)
    assert event.status == "accepted", event
    assert await redis.xlen(keys.dead_letters) == 0


async def lapse_while_w2_starts_with_a_limit_of_2(redis: Redis, keys: Keys) -> None:
    """As if w1 had stalled past its TTL while w2 started with 2 books per user (one step,
    so that w1's heartbeat sees all of it or none)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker("w1"))
        pipe.set(keys.worker("w2"), "token-of-w2", px=60_000)
        pipe.sadd(keys.workers, "w2")
        pipe.hset(keys.config, "max_books_per_user", "2")
        await pipe.execute()


async def test_a_worker_whose_id_lapsed_while_the_others_changed_the_limits_stops(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Two sets of limits must never run at once: not even after a stall past the TTL."""
    worker = await start_worker(worker_id="w1", worker_ttl_ms=1_500, max_books_per_user=5)
    await lapse_while_w2_starts_with_a_limit_of_2(redis, keys)

    await wait_until(lambda: worker.lost_id, timeout_s=5)
    assert not await redis.exists(keys.worker("w1"))


async def test_a_worker_whose_id_and_limits_redis_lost_with_no_other_worker_live_serves_on(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Redis came back from an older snapshot: its limits are the stale ones, not the worker's."""
    worker = await start_worker(worker_id="w1", worker_ttl_ms=1_500, max_books_per_user=2)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker("w1"))
        pipe.hset(keys.config, "max_books_per_user", "5")
        await pipe.execute()

    await wait_until(lambda: redis.exists(keys.worker("w1")), timeout_s=5)
    assert await redis.hget(keys.config, "max_books_per_user") == b"2"
    request_id = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", request_id)).status == "accepted"
    assert not worker.lost_id


async def test_a_stalled_worker_commits_nothing_under_its_old_limits(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Its heartbeat (every 20 s here) has not noticed yet when a request comes: the
    commit itself finds the namespace's limits changed, writes nothing, and the worker
    stops at once; a worker with the new limits answers the request."""
    stalled = await start_worker(worker_id="w1", worker_ttl_ms=60_000, max_books_per_user=5)
    await lapse_while_w2_starts_with_a_limit_of_2(redis, keys)

    request_id = await send(redis, keys, "lend", "ada", ["b1", "b2", "b3"])
    await wait_until(lambda: stalled.lost_id, timeout_s=5)
    assert await redis.xlen(keys.events) == 0
    assert not await redis.exists(keys.user_count("ada"))

    await start_worker(worker_id="w3", max_books_per_user=2)
    event = await event_for(redis, keys, "lend", request_id, timeout_s=10)
    assert event.status == "denied", event
    assert not await redis.exists(keys.user_count("ada"))


async def test_a_live_worker_finding_older_limits_publishes_its_own_and_commits(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Redis came back from an older snapshot that has the worker's key but older limits.
    The refused commit costs the entry no delivery: with one allowed, it is not dead-lettered."""
    worker = await start_worker(worker_id="w1", worker_ttl_ms=60_000, max_books_per_user=2, max_deliveries=1)
    await redis.hset(keys.config, "max_books_per_user", "5")

    request_id = await send(redis, keys, "lend", "ada", ["b1"])

    assert (await event_for(redis, keys, "lend", request_id, timeout_s=5)).status == "accepted"
    assert await redis.hget(keys.config, "max_books_per_user") == b"2"
    assert not worker.lost_id


async def test_a_worker_whose_liveness_key_redis_lost_holds_its_id_again_and_serves(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    # A failover or restart without the key (kill -9 of a master before it replicated):
    # nobody else holds the id, so the worker takes it again rather than stop.
    worker = await start_worker(worker_id="w1", worker_ttl_ms=1_500)
    await redis.delete(keys.worker("w1"), keys.worker_info("w1"))

    await wait_until(lambda: redis.exists(keys.worker("w1")), timeout_s=5)
    request_id = await send(redis, keys, "lend", "ada", ["b1"])

    assert (await event_for(redis, keys, "lend", request_id)).status == "accepted"
    assert not worker.lost_id
    assert (await redis.hgetall(keys.worker_info("w1")))[b"host"]
