"""GET /v1/events: the outcomes as Server-Sent Events, live and resumed from Last-Event-ID,
with a real worker and the API on uvicorn in this process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.api.config import ApiSettings
from lending.domain.events import ACCEPTED, Event
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port

from .api_support import LiveApi, problem, serving
from .conftest import StartWorker
from .support import all_events, decoded, send, wait_until, xadd_fields


@dataclass
class Frame:
    """One SSE message, or a comment (``comment`` set, the rest empty)."""

    id: str = ""
    event: str = ""
    data: str = ""
    comment: str = ""

    @property
    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.data)
        return decoded


@dataclass
class EventStream:
    """An open SSE response, read frame by frame."""

    response: httpx.Response
    lines: AsyncIterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lines = self.response.aiter_lines()

    async def frame(self, timeout_s: float = 10.0) -> Frame:
        """The next message or comment (the ``retry:`` advice is skipped)."""
        frame = Frame()
        async with asyncio.timeout(timeout_s):
            async for line in self.lines:
                if not line:
                    if frame != Frame():
                        return frame
                    continue
                name, _, value = line.partition(": ")
                if name == "":
                    frame.comment = value
                elif name in ("id", "event", "data"):
                    setattr(frame, name, value)
        raise AssertionError("the stream ended")

    async def outcomes(self, count: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < count:
            frame = await self.frame()
            if not frame.comment:
                out.append(frame)
        return out


@asynccontextmanager
async def events(live: LiveApi, path: str = "/v1/events", **headers: str) -> AsyncIterator[EventStream]:
    async with live.http.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventStream(response)


@pytest.fixture
async def live(redis_url: str, namespace: str, redis: Redis) -> AsyncIterator[LiveApi]:
    settings = ApiSettings(redis_url=redis_url, namespace=namespace, keep_alive_s=0.3, subscriber_queue=5)
    async with serving(settings) as live:
        yield live


async def subscribed(live: LiveApi, count: int = 1) -> None:
    """Until ``count`` streams are subscribed to the tail (a stream subscribes once its
    response starts)."""
    await wait_until(lambda: live.api.tail.subscribers >= count, interval_s=0.01)


async def test_live_outcomes_carry_their_event_id(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    async with events(live) as stream, events(live, "/v1/events?user_id=bob") as bobs:
        await subscribed(live, 2)
        ada = await send(redis, keys, "lend", "ada", ["b1"])
        bob = await send(redis, keys, "lend", "bob", ["b2"])

        everything = await stream.outcomes(2)
        (only_bob,) = await bobs.outcomes(1)

    stored = {event.request_id: event for event in await all_events(redis, keys)}
    # One batch may write its events in any order.
    assert sorted(frame.json["request_id"] for frame in everything) == sorted([ada, bob])
    for frame in everything:
        assert frame.event == "outcome"
        assert frame.id == frame.json["event_id"] == stored[frame.json["request_id"]].event_id
    assert (only_bob.json["request_id"], only_bob.json["books"]) == (bob, ["b2"])


async def test_a_quiet_stream_sends_keep_alive_comments(live: LiveApi) -> None:
    async with events(live) as stream:
        assert (await stream.frame(5)).comment == "keep-alive"


async def test_a_stream_resumes_after_its_last_event_id(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    for n in range(4):
        await send(redis, keys, "lend", f"user-{n}", [f"book-{n}"])
    await wait_until(lambda: _count(redis, keys, 4))
    first, *after_first = await all_events(redis, keys)

    async with events(live, **{"Last-Event-ID": first.event_id}) as stream:
        missed = await stream.outcomes(3)
        await subscribed(live)
        later = await send(redis, keys, "return", "user-0", ["book-0"])
        (live_frame,) = await stream.outcomes(1)

    assert [frame.id for frame in missed] == [event.event_id for event in after_first]
    assert (live_frame.json["request_id"], live_frame.json["action"]) == (later, "return")


async def test_resuming_filters_by_user_too(live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    for user in ("ada", "bob", "ada"):
        await send(redis, keys, "lend", user, [f"{user}-book-{await redis.xlen(keys.lend_requests)}"])
    await wait_until(lambda: _count(redis, keys, 3))

    async with events(live, "/v1/events?user_id=ada&after=0-1") as stream:
        frames = await stream.outcomes(2)

    assert [frame.json["user_id"] for frame in frames] == ["ada", "ada"]


async def test_a_slow_subscriber_is_dropped_and_told_to_resume(live: LiveApi) -> None:
    async with events(live) as stream:
        await subscribed(live)
        (subscription,) = live.api.tail._subscribers
        for n in range(6):  # one more than its queue holds
            subscription.offer(_event(n))

        frame = await stream.frame()
        while not frame.comment.startswith("dropped"):
            frame = await stream.frame()

    assert "reconnect with Last-Event-ID" in frame.comment


@pytest.mark.parametrize("headers", [{"Last-Event-ID": "yesterday"}, {"Last-Event-ID": "1-2-3"}])
async def test_a_bad_last_event_id_is_422(live: LiveApi, headers: dict[str, str]) -> None:
    problem(await live.http.get("/v1/events", headers=headers), 422, "invalid-parameter")


async def test_a_last_event_id_at_the_end_of_a_millisecond_resumes_after_it(
    live: LiveApi, redis: Redis, keys: Keys
) -> None:
    """The id after ``0-18446744073709551615`` is ``1-0``: a sequence of 2**64 made Redis
    refuse the read, and cut the stream off after its 200."""
    written = decoded(await redis.xadd(keys.events, xadd_fields(_event(5).fields())))
    await wait_until(lambda: live.api.tail.position == written)

    for last in ("0-18446744073709551615", "4-18446744073709551615"):
        async with events(live, **{"Last-Event-ID": last}) as stream:
            (missed,) = await stream.outcomes(1)
        assert missed.id == written


async def test_a_last_event_id_beyond_every_event_resumes_from_the_newest(
    live: LiveApi, redis: Redis, keys: Keys
) -> None:
    """An id no event has reached (made up, or from before Redis lost its data) skipped
    every live event until one passed it: for ever, for one far in the future."""
    written = decoded(await redis.xadd(keys.events, xadd_fields(_event(5).fields())))
    await wait_until(lambda: live.api.tail.position == written)

    async with events(live, **{"Last-Event-ID": "18446744073709551615-18446744073709551615"}) as stream:
        await subscribed(live)
        later = decoded(await redis.xadd(keys.events, xadd_fields(_event(6).fields())))
        (frame,) = await stream.outcomes(1)

    assert frame.id == later


async def test_resuming_while_redis_is_away_is_503(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    try:
        settings = ApiSettings(redis_url=server.url, namespace="ns", keep_alive_s=0.3)
        async with serving(settings) as live:
            client = make_client(server.url)
            written = decoded(await client.xadd(Keys("ns").events, xadd_fields(_event(5).fields())))
            await client.aclose()
            await wait_until(lambda: live.api.tail.position == written)
            server.stop()

            with capture_logs():
                response = await live.http.get("/v1/events", headers={"Last-Event-ID": "1-0"})

            problem(response, 503, "redis-unavailable")
    finally:
        server.stop()


async def test_a_closed_stream_unsubscribes(live: LiveApi) -> None:
    async with events(live):
        await subscribed(live)
    await wait_until(lambda: live.api.tail.subscribers == 0)


async def _count(redis: Redis, keys: Keys, count: int) -> bool:
    return int(await redis.xlen(keys.events)) >= count


def _event(n: int) -> Event:
    return Event(f"{n}-0", "lend", "ada", ACCEPTED, event_id=f"{n}-1")
