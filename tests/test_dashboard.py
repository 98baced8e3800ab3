"""The dashboard: its aggregates as pure code (percentiles, per-second buckets, the
bounded tail, heartbeat ages), then the page and its stream served by a live API with a
real Redis and a real worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.api.aggregate import Aggregates, Heartbeats, Second, Throughput, latency_ms, percentile
from lending.api.config import ApiSettings
from lending.api.dashboard import CONTENT_SECURITY_POLICY, RECENT_SECONDS, Dashboard
from lending.api.tail import EventTail
from lending.domain.events import ACCEPTED, DENIED, RETURNED, Event
from lending.keys import Keys
from lending.ops.status import read_overview, read_status
from lending.redis.connection import make_client
from lending.redis.embedded import free_port

from .api_support import LiveApi, problem, serving
from .conftest import StartWorker
from .support import event_for, send, wait_until

# -- percentiles and latencies -------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([float(n) for n in range(1, 101)], 50, 50.0),
        ([float(n) for n in range(1, 101)], 99, 99.0),
        ([float(n) for n in range(1, 101)], 100, 100.0),
        ([float(n) for n in range(1, 11)], 99, 10.0),  # 9.9 ranks round up: the largest
        ([float(n) for n in range(1, 11)], 50, 5.0),
        ([1.0, 2.0], 1, 1.0),
    ],
)
def test_percentile_by_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(
    ("request_id", "event_id", "expected"),
    [
        ("1000-0", "1007-3", 7),
        ("1000-5", "1000-9", 0),
        ("2000-0", "1000-0", 0),  # a Redis whose clock is behind (after a failover): never negative
        ("", "1000-0", None),
        ("not-an-id", "1000-0", None),
        ("1000", "1000-0", None),  # a bare millisecond names no entry
    ],
)
def test_latency_is_the_event_id_less_the_request_id(request_id: str, event_id: str, expected: int | None) -> None:
    assert latency_ms(request_id, event_id) == expected


# -- per-second buckets --------------------------------------------------------------------


def test_outcomes_are_counted_per_completed_second() -> None:
    throughput = Throughput(window_s=60)
    throughput.observe(ACCEPTED, 2, 100.1)
    throughput.observe(DENIED, 4, 100.9)
    throughput.observe(ACCEPTED, 6, 100.95)
    throughput.observe(RETURNED, None, 101.5)

    assert throughput.seconds(101.9) == [Second(100, 3, {ACCEPTED: 2, DENIED: 1}, 4, 6, 6)]
    assert throughput.seconds(102.0) == [
        Second(100, 3, {ACCEPTED: 2, DENIED: 1}, 4, 6, 6),
        Second(101, 1, {RETURNED: 1}, None, None, None),  # an outcome without a latency
    ]


def test_seconds_without_outcomes_count_zero() -> None:
    throughput = Throughput(window_s=60)
    throughput.observe(ACCEPTED, 1, 10.0)
    throughput.observe(ACCEPTED, 1, 13.2)

    assert [(s.t, s.count) for s in throughput.seconds(15.0)] == [(10, 1), (11, 0), (12, 0), (13, 1), (14, 0)]


def test_looking_before_any_outcome_starts_the_clock() -> None:
    throughput = Throughput(window_s=60)
    assert throughput.seconds(50.5) == []
    assert throughput.seconds(52.1) == [Second(50, 0), Second(51, 0)]


def test_the_window_keeps_the_last_seconds_only_even_after_a_long_silence() -> None:
    throughput = Throughput(window_s=3)
    for t in range(10):
        throughput.observe(ACCEPTED, t, t + 0.5)
    assert [(s.t, s.count, s.p50_ms) for s in throughput.seconds(10.0)] == [(7, 1, 7), (8, 1, 8), (9, 1, 9)]

    started = time.monotonic()
    throughput.observe(ACCEPTED, 1, 1e9)  # a month of silence: no month of empty seconds is built
    assert [s.t for s in throughput.seconds(1e9 + 1)] == [999_999_998, 999_999_999, 1_000_000_000]
    assert time.monotonic() - started < 0.5


def test_a_busy_second_keeps_a_bounded_sample_of_its_latencies() -> None:
    throughput = Throughput(window_s=10, samples=100, seed=1)
    for n in range(10_000):  # latencies 0..99 ms, uniformly
        throughput.observe(ACCEPTED, n % 100, 5.5)
    assert throughput.held == 100

    (second,) = throughput.seconds(6.0)
    assert second.count == 10_000  # every outcome counted, whatever was sampled
    assert second.p50_ms is not None and 35 <= second.p50_ms <= 65
    assert second.p99_ms is not None and second.p99_ms >= 90


def test_below_the_sample_bound_the_percentiles_are_exact() -> None:
    throughput = Throughput(window_s=10, samples=1_000)
    for latency in range(200, 0, -1):  # 1..200 ms, in any order
        throughput.observe(ACCEPTED, latency, 7.0)
    (second,) = throughput.seconds(8.0)
    assert (second.p50_ms, second.p99_ms, second.max_ms) == (100, 198, 200)


# -- the tail of outcomes, heartbeats ------------------------------------------------------


def outcome(n: int, status: str = ACCEPTED, books: tuple[str, ...] = ("b1",)) -> Event:
    return Event(f"{1000 + n}-0", "lend", f"user-{n}", status, books=books, event_id=f"{1003 + n}-0")


def test_the_tail_keeps_the_latest_outcomes_newest_first() -> None:
    aggregates = Aggregates(window_s=10, tail=3)
    for n in range(10):
        aggregates.observe(outcome(n, DENIED if n % 2 else ACCEPTED), 20.0)

    assert [o["user_id"] for o in aggregates.latest()] == ["user-9", "user-8", "user-7"]
    assert [o["user_id"] for o in aggregates.latest(2)] == ["user-9", "user-8"]
    assert aggregates.latest()[0]["latency_ms"] == 3
    assert (aggregates.seen, dict(aggregates.totals)) == (10, {ACCEPTED: 5, DENIED: 5})


def test_a_tail_entry_lists_a_few_books_and_counts_them_all() -> None:
    aggregates = Aggregates(tail=1)
    aggregates.observe(outcome(1, books=tuple(f"b{n}" for n in range(40))), 1.0)
    (entry,) = aggregates.latest()
    assert (entry["books"], entry["book_count"]) == (["b0", "b1", "b2"], 40)


def test_a_heartbeat_age_is_known_once_a_renewal_was_seen() -> None:
    heartbeats = Heartbeats()
    assert heartbeats.observe({"w1": 6_000}) == {"w1": None}  # first seen: its full TTL is unknown
    assert heartbeats.observe({"w1": 5_000}) == {"w1": None}
    assert heartbeats.observe({"w1": 9_800, "w2": 3_000}) == {"w1": 0, "w2": None}  # w1 renewed
    assert heartbeats.observe({"w1": 8_300, "w2": 2_000}) == {"w1": 1_500, "w2": None}
    assert heartbeats.observe({"w2": 9_000}) == {"w2": 0}  # w1 gone: forgotten
    assert heartbeats.observe({"w1": 4_000}) == {"w1": None}  # back: learnt anew


# -- the page and its stream, live ---------------------------------------------------------


@pytest.fixture
async def live(redis_url: str, namespace: str, redis: Redis) -> AsyncIterator[LiveApi]:
    async with serving(ApiSettings(redis_url=redis_url, namespace=namespace)) as live:
        yield live


class Snapshots:
    """An open ``/v1/dashboard/stream``, read snapshot by snapshot."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.raw: list[str] = []

    async def next(self, timeout_s: float = 5.0) -> dict[str, Any]:
        event = ""
        async with asyncio.timeout(timeout_s):
            async for line in self.lines:
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "snapshot":
                    self.raw.append(line)
                    snapshot: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    return snapshot
        raise AssertionError("the stream ended")

    async def until(self, predicate: Any, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = await self.next(max(0.1, deadline - time.monotonic()))
            if predicate(snapshot):
                return snapshot


@asynccontextmanager
async def snapshots(live: LiveApi) -> AsyncIterator[Snapshots]:
    async with live.http.stream("GET", "/v1/dashboard/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Snapshots(response)


async def test_the_page_and_its_files_are_served_from_the_package(live: LiveApi) -> None:
    page = await live.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert '<script src="dashboard/dashboard.js" defer></script>' in page.text
    assert "http://" not in page.text.replace('"http://www.w3.org', "") and "https://" not in page.text
    for name, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = await live.http.get(f"/dashboard/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert "https://" not in response.text  # nothing from another host: it works offline
    problem(await live.http.get("/dashboard/secrets.py"), 404, "not-found")


async def test_the_stream_shows_outcomes_storage_and_workers_as_they_change(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(storage_capacity=4)
    async with snapshots(live) as stream:
        first = await stream.next()
        assert first["status"]["storage"] == {"books": 0, "capacity": 4}
        assert first["outcomes"] == [] and first["status"]["books_lent"] == 0
        (worker,) = first["status"]["workers"]
        assert worker["worker_id"] == "w1" and "host" not in worker and "pid" not in worker

        lent = await send(redis, keys, "lend", "ada", ["b1", "b2"])
        await event_for(redis, keys, "lend", lent)
        await send(redis, keys, "return", "ada", ["b1"])
        snapshot = await stream.until(lambda s: s["outcomes_seen"] >= 2 and s["status"]["storage"]["books"])

    assert snapshot["status"]["storage"]["books"] == 1  # the returned book went to the storage
    assert snapshot["status"]["books_lent"] == 1
    assert snapshot["totals"] == {"accepted": 1, "returned": 1}
    newest, older = snapshot["outcomes"]
    assert (older["request_id"], older["status"], older["books"]) == (lent, "accepted", ["b1", "b2"])
    assert newest["status"] == "returned" and newest["latency_ms"] >= 0
    assert sum(s["count"] for s in snapshot["seconds"]) <= 2  # seconds still going on are not in it
    groups = {g["stream"]: g for g in snapshot["status"]["groups"]}
    assert groups["lend-requests"]["lag"] == 0 and groups["lend-requests"]["pending"] == 0


async def test_a_snapshot_a_second_the_first_with_the_whole_window(live: LiveApi) -> None:
    async with snapshots(live) as stream:
        first = await stream.next()
        await asyncio.sleep(3.2)  # seconds go by before the next snapshots are read
        later = [await stream.next() for _ in range(3)]

    assert first["window_s"] == 300 and first["refresh_s"] == 1.0
    for snapshot in later:
        assert 1 <= len(snapshot["seconds"]) <= RECENT_SECONDS
        assert all(s["count"] == 0 for s in snapshot["seconds"])
    stamps = [s["t"] for s in later[-1]["seconds"]]
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps)))  # consecutive, oldest first


async def test_the_status_is_read_once_a_second_however_many_browsers_watch(live: LiveApi) -> None:
    dashboard = live.api.dashboard
    async with (
        snapshots(live) as a,
        snapshots(live) as b,
        snapshots(live) as c,
        snapshots(live) as d,
    ):
        await asyncio.gather(*(s.next() for s in (a, b, c, d)))
        reads, started = dashboard.status_reads, time.monotonic()
        for _ in range(3):
            await asyncio.gather(*(s.next() for s in (a, b, c, d)))
            assert (await live.http.get("/v1/dashboard")).status_code == 200
        elapsed = time.monotonic() - started
        assert dashboard.watchers == 4
        # One read per second at most, whatever the number of streams and snapshot requests.
        assert dashboard.status_reads - reads <= elapsed / dashboard.refresh_s + 1
        # The snapshots after the first are built once and sent to every stream as they are.
        assert a.raw[1:] == b.raw[1:] == c.raw[1:] == d.raw[1:]

    await wait_until(lambda: dashboard.watchers == 0)
    idle = dashboard.status_reads
    await asyncio.sleep(2.2)
    assert dashboard.status_reads == idle  # nobody watches: no reads


async def test_shutting_down_ends_the_streams(live: LiveApi) -> None:
    async with snapshots(live) as stream:
        await stream.next()
        live.api.release_all()
        rest = [line async for line in stream.lines if line]
    assert rest[-1] == ": closing; reconnect to go on"


async def test_a_status_redis_does_not_answer_is_shown_and_the_rest_goes_on(keys: Keys) -> None:
    port = free_port()
    client = make_client(f"redis://127.0.0.1:{port}")
    dashboard = Dashboard(client, keys, EventTail(client, keys), clock=lambda: 100.5)
    try:
        dashboard.observe(outcome(1))
        with capture_logs() as logs:
            snapshot = await dashboard.snapshot()
    finally:
        await client.aclose()
    # The page says what kind of failure; the API's log says the rest, from the first one.
    assert [entry["event"] for entry in logs] == ["dashboard: could not read the status"]
    assert str(port) in logs[0]["error"]
    assert snapshot["status"] is None and snapshot["status_error"] == "Redis did not answer; trying again"
    # The page is public: Redis's address stays in the API's log.
    assert str(port) not in orjson.dumps(snapshot).decode()
    assert snapshot["outcomes_seen"] == 1 and snapshot["outcomes"][0]["user_id"] == "user-1"


async def test_the_overview_is_the_status_without_its_costly_parts(
    redis: Redis, keys: Keys, namespace: str, start_worker: StartWorker
) -> None:
    await start_worker()
    await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b1", "b2"]))
    await event_for(redis, keys, "return", await send(redis, keys, "return", "ada", ["b1"]))

    now_ms = time.time() * 1000
    overview = await read_overview(redis, keys, now_ms)
    status = await read_status(redis, namespace)

    for name in ("storage", "books_lent", "dead_letters"):
        assert overview[name] == status[name]
    assert [w["worker_id"] for w in overview["workers"]] == [w["worker_id"] for w in status["workers"]]
    assert [(g["stream"], g["lag"], g["exists"]) for g in overview["groups"]] == [
        (g["stream"], g["lag"], g["exists"]) for g in status["groups"]
    ]
