"""The API's own metrics at ``GET /metrics``: responses by route, method and status, their
times, and gauges of what the process holds open; labels bounded whatever clients send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.api.config import ApiSettings
from lending.redis.embedded import EmbeddedRedis, free_port

from .api_support import LiveApi, raw_connection, raw_exchange, serving
from .conftest import StartWorker
from .support import wait_until


@pytest.fixture
async def live(redis_url: str, namespace: str, redis: Redis) -> AsyncIterator[LiveApi]:
    async with serving(ApiSettings(redis_url=redis_url, namespace=namespace)) as live:
        yield live


#: Every sample of a scrape: (name, labels) → value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(live: LiveApi) -> Samples:
    """Every sample of ``/metrics``: (name, labels) → value."""
    response = await live.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def responses(samples: Samples, route: str, method: str, status: int) -> float:
    """How many ``status`` responses ``route`` gave to ``method``."""
    key = frozenset({"route": route, "method": method, "status": str(status)}.items())
    return samples.get(("lending_api_responses_total", key), 0.0)


async def test_responses_are_counted_by_route_template_method_and_status(
    live: LiveApi, start_worker: StartWorker
) -> None:
    await start_worker()
    lend = await live.http.post("/v1/lends?wait=5", json={"user_id": "ada", "book_ids": ["b1"]})
    assert lend.status_code == 200
    assert (await live.http.post("/v1/returns", json={"user_id": "ada", "book_ids": []})).status_code == 422
    assert (await live.http.get("/v1/users/ada/loans")).status_code == 200
    assert (await live.http.get("/v1/users/bob/loans")).status_code == 200
    assert (await live.http.get("/no/such/page/ada")).status_code == 404

    samples = await scrape(live)

    assert responses(samples, "/v1/lends", "POST", 200) == 1
    assert responses(samples, "/v1/returns", "POST", 422) == 1
    assert responses(samples, "/v1/users/{user_id}/loans", "GET", 200) == 2
    assert responses(samples, "other", "GET", 404) == 1
    timed = frozenset({"route": "/v1/lends"}.items())
    assert samples[("lending_api_response_seconds_count", timed)] == 1
    # Raw paths never become labels: their values are without end.
    assert not any("ada" in value or "/no/such" in value for _, labels in samples for _, value in labels)


async def test_a_head_request_is_counted_under_the_route_that_answered_it(live: LiveApi) -> None:
    assert (await live.http.head("/v1/books/dune")).status_code == 200

    assert responses(await scrape(live), "/v1/books/{book_id}", "HEAD", 200) == 1


async def test_an_unusual_method_is_counted_as_other(live: LiveApi) -> None:
    assert (await live.http.request("PROPFIND", "/v1/books/b1")).status_code == 405

    assert responses(await scrape(live), "/v1/books/{book_id}", "other", 405) == 1


async def test_the_gauges_show_waiting_requests_and_open_streams(live: LiveApi) -> None:
    # No worker: the request waits for its outcome until it gives up.
    waiting = asyncio.create_task(live.http.post("/v1/lends?wait=3", json={"user_id": "ada", "book_ids": ["b1"]}))
    async with live.http.stream("GET", "/v1/events") as stream:
        assert stream.status_code == 200
        await wait_until(lambda: live.api.tail.waiters == 1)

        samples = await scrape(live)

        assert samples[("lending_api_waiting_requests", frozenset())] == 1
        assert samples[("lending_api_event_streams", frozenset({("stream", "events")}))] == 1
        assert samples[("lending_api_event_streams", frozenset({("stream", "dashboard")}))] == 0
        assert samples[("lending_api_events_tail_up", frozenset())] == 1
    assert (await waiting).status_code == 504

    samples = await scrape(live)
    assert samples[("lending_api_waiting_requests", frozenset())] == 0
    assert responses(samples, "/v1/lends", "POST", 504) == 1


async def test_the_metrics_say_when_the_events_tail_has_lost_redis_and_count_the_503s(
    namespace: str, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    try:
        async with serving(ApiSettings(redis_url=server.url, namespace=namespace)) as live:
            assert (await scrape(live))[("lending_api_events_tail_up", frozenset())] == 1
            server.stop()
            with capture_logs():
                gone = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
                await wait_until(lambda: not live.api.tail.connected)

                samples = await scrape(live)  # served without Redis

            assert gone.status_code == 503
            assert samples[("lending_api_events_tail_up", frozenset())] == 0
            assert responses(samples, "/v1/lends", "POST", 503) == 1
            server.start()
            await wait_until(lambda: live.api.tail.connected, timeout_s=10)
            assert (await scrape(live))[("lending_api_events_tail_up", frozenset())] == 1
    finally:
        server.stop()


async def test_connections_refused_below_the_application_are_counted_by_problem(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    async with serving(ApiSettings(redis_url=redis_url, namespace=namespace, max_clients=2)) as live:
        samples = await scrape(live)  # the client's one connection, kept alive
        assert samples[("lending_api_max_clients", frozenset())] == 2
        assert samples[("lending_api_open_connections", frozenset())] == 1
        _reader, writer = await raw_connection(live)
        try:
            await wait_until(lambda: len(live.server.server_state.connections) == 2)
            status, _, _ = await raw_exchange(live, b"GET /v1/books/b1 HTTP/1.1\r\nHost: api\r\n\r\n")
        finally:
            writer.close()
        assert status == "HTTP/1.1 503 Service Unavailable"
        await wait_until(lambda: len(live.server.server_state.connections) == 1)
        assert (await raw_exchange(live, b"GARBAGE\r\n\r\n"))[0] == "HTTP/1.1 400 Bad Request"

        samples = await scrape(live)

    def refused(problem: str) -> float:
        return samples[("lending_api_refused_connections_total", frozenset({("problem", problem)}))]

    assert refused("too-many-connections") == 1 and refused("malformed-http") == 1
    assert refused("head-too-large") == 0 and refused("request-timeout") == 0
