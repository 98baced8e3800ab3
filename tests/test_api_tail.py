"""The API's events tail on its own: one reader of {NS}:events waking waiters, feeding
bounded subscriptions and listeners, and going on after Redis drops its connection."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.api.config import ApiSettings
from lending.api.state import Api
from lending.api.tail import EventTail
from lending.domain.events import ACCEPTED, DENIED, Event
from lending.keys import Keys
from lending.redis.connection import make_client

from .support import decoded, run_command, wait_until, xadd_fields


@pytest.fixture
async def tail(redis_url: str, keys: Keys, redis: Redis) -> AsyncIterator[EventTail]:
    client = make_client(redis_url, max_connections=2)
    tail = EventTail(client, keys, recent=3, block_ms=200)
    await tail.start()
    yield tail
    await tail.close()
    await client.aclose()


async def publish(redis: Redis, keys: Keys, request_id: str, user: str = "ada", status: str = ACCEPTED) -> Event:
    """Add an outcome event as a worker would; returns it with its id."""
    event = Event(request_id, "lend", user, status, books=("b1",))
    event_id = decoded(await redis.xadd(keys.events, xadd_fields(event.fields())))
    return dataclasses.replace(event, event_id=event_id)


async def test_a_waiter_is_woken_by_its_event(tail: EventTail, redis: Redis, keys: Keys) -> None:
    with tail.waiting("lend", "1-0") as future, tail.waiting("return", "1-0") as other:
        await publish(redis, keys, "2-0")
        published = await publish(redis, keys, "1-0")

        event = await asyncio.wait_for(future, 5)

        assert event == published and event is not None and event.event_id == published.event_id
        assert not other.done()  # the same id in the other stream is another request
    assert tail.waiters == 0


async def test_a_late_waiter_finds_its_event_in_the_recent_window(tail: EventTail, redis: Redis, keys: Keys) -> None:
    published = [await publish(redis, keys, f"{n}-0") for n in range(1, 5)]
    await wait_until(lambda: tail.position == published[-1].event_id)

    assert tail.expect("lend", "4-0").result() == published[-1]
    # The window keeps the last three outcomes.
    assert tail.recent("lend", "2-0") == published[1]
    assert tail.recent("lend", "1-0") is None
    assert not tail.expect("lend", "1-0").done()


async def test_the_tail_starts_at_the_end_of_the_stream(redis: Redis, redis_url: str, keys: Keys) -> None:
    await publish(redis, keys, "1-0")
    client = make_client(redis_url)
    tail = EventTail(client, keys, block_ms=200)
    try:
        await tail.start()
        later = await publish(redis, keys, "2-0")
        await wait_until(lambda: tail.position == later.event_id)
        assert tail.recent("lend", "1-0") is None and tail.recent("lend", "2-0") == later
    finally:
        await tail.close()
        await client.aclose()


async def test_subscriptions_get_what_they_accept(tail: EventTail, redis: Redis, keys: Keys) -> None:
    everything = tail.subscribe()
    bobs = tail.subscribe(lambda event: event.user_id == "bob")

    await publish(redis, keys, "1-0", user="ada")
    await publish(redis, keys, "2-0", user="bob", status=DENIED)

    assert [(await everything.next(5) or Event("", "", "", "")).request_id for _ in range(2)] == ["1-0", "2-0"]
    bob = await bobs.next(5)
    assert bob is not None and (bob.request_id, bob.status) == ("2-0", DENIED)
    with pytest.raises(TimeoutError):
        await bobs.next(0.3)
    everything.close()
    assert await everything.next() is None
    assert tail.subscribers == 1


async def test_a_subscriber_that_falls_behind_is_dropped(tail: EventTail) -> None:
    slow = tail.subscribe(maxsize=2)
    for n in range(3):
        tail.dispatch(Event(f"{n}-0", "lend", "ada", ACCEPTED, event_id=f"{n}-1"))

    assert slow.dropped and slow.closed
    assert await slow.next(1) is None  # what was queued is gone: the client resumes by id
    assert tail.subscribers == 0


async def test_listeners_see_every_event_and_a_failing_one_stops_nothing(tail: EventTail) -> None:
    seen: list[Event] = []

    def failing(_event: Event) -> None:
        raise RuntimeError("listener bug")

    remove = tail.add_listener(seen.append)
    tail.add_listener(failing)
    with capture_logs() as logs:
        tail.dispatch(Event("1-0", "lend", "ada", ACCEPTED))
    remove()
    tail.dispatch(Event("2-0", "lend", "ada", ACCEPTED))

    assert seen == [Event("1-0", "lend", "ada", ACCEPTED)]
    assert [log["event"] for log in logs] == ["an events listener failed"]
    assert tail.recent("lend", "2-0") is not None


async def test_release_all_answers_waiters_and_ends_subscriptions(tail: EventTail) -> None:
    future = tail.expect("lend", "1-0")
    subscription = tail.subscribe()

    tail.release_all()

    assert future.result() is None
    assert await subscription.next(1) is None
    assert (tail.waiters, tail.subscribers) == (0, 0)


async def test_a_lost_connection_loses_no_event(tail: EventTail, redis: Redis, keys: Keys) -> None:
    first = await publish(redis, keys, "1-0")
    await wait_until(lambda: tail.position == first.event_id)
    await redis.client_setname("test-killer")

    with capture_logs() as logs:
        # Kill every other client connection of the server: the tail's blocked XREAD among them.
        await run_command(redis, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        missed = await publish(redis, keys, "2-0")
        with tail.waiting("lend", "2-0") as future:
            assert await asyncio.wait_for(future, 10) == missed

    assert tail.connected
    assert "events tail: lost Redis, retrying" in [log["event"] for log in logs]


async def test_the_api_closes_even_when_a_background_task_loses_its_cancellation(
    redis_url: str, namespace: str
) -> None:
    # On Python 3.11 a cancellation can be lost inside a Redis call (the call returns):
    # here the limits refresher's read loses it, and the API must close all the same.
    client, tail_client = make_client(redis_url), make_client(redis_url)
    api = Api(ApiSettings(redis_url=redis_url, namespace=namespace, limits_refresh_s=0.01), client, tail_client)
    await api.start()
    inside = asyncio.Event()
    lost: list[bool] = []

    async def refresh_losing_a_cancellation() -> None:
        inside.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            lost.append(True)  # the read returns as if nothing happened

    api.refresh_limits = refresh_losing_a_cancellation  # type: ignore[method-assign]
    try:
        await inside.wait()
        await asyncio.wait_for(api.close(), 5)
        assert lost == [True]
    finally:
        await client.aclose()
        await tail_client.aclose()
