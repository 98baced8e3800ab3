"""Server-Sent Events: the frames, and a stream of outcome events that resumes.

A stream subscribes to the tail first, then sends what the client missed (the events
after its ``Last-Event-ID``, read with ``XRANGE``), then the live events, skipping those
it already sent: nothing is lost or sent twice between the two. A stream dropped for
being slow, or ended by a shutdown, says so in a comment; the client's ``EventSource``
reconnects with the id of the last event it got, and resumes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lending.api.reads import events_after
from lending.api.tail import EventTail, Subscription
from lending.domain.events import Event
from lending.domain.streamids import id_key
from lending.keys import Keys
from lending.redis.replies import text

MEDIA_TYPE = "text/event-stream"
#: Tells the client's EventSource how long to wait before reconnecting (ms).
RETRY_FRAME = b"retry: 1000\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def frame(data: bytes, *, event_id: str = "", event: str = "") -> bytes:
    """One SSE message: ``data`` is one line of JSON (it holds no newline)."""
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {event}\n" if event else "")
    return head.encode() + b"data: " + data + b"\n\n"


def comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


def outcome_frame(event: Event) -> bytes:
    """An outcome event as a message: its stream id as the SSE ``id``, the event as JSON."""
    return frame(orjson.dumps(event.as_json()), event_id=event.event_id, event="outcome")


async def outcome_stream(
    client: Redis,
    keys: Keys,
    tail: EventTail,
    *,
    accept: Callable[[Event], bool] | None = None,
    last_event_id: str | None = None,
    keep_alive_s: float = 15.0,
    queue_size: int = 1_000,
) -> EventStreamResponse:
    """The ``GET /v1/events`` response: the events after ``last_event_id`` first (when
    given), then the live ones, those ``accept`` lets through; a comment every
    ``keep_alive_s`` of silence.

    The first missed events are read here, before any frame: a Redis that does not
    answer is the caller's error to give (503), not a stream cut off after its ``200``.

    :raises RedisError: the first missed events could not be read.
    """
    subscription = tail.subscribe(accept, maxsize=queue_size)
    # Events up to the tail's position went by before the subscription: read them from
    # the stream; the later ones come through the subscription.
    until = tail.position
    try:
        if last_event_id is not None and id_key(last_event_id) > id_key(until):
            last_event_id = await _within_stream(client, keys, last_event_id)
        missed = await _missed(client, keys, last_event_id, until)
    except BaseException:
        subscription.close()
        raise
    frames = _frames(client, keys, subscription, accept, last_event_id, missed, until, keep_alive_s)
    return EventStreamResponse(frames, subscription)


class EventStreamResponse(StreamingResponse):
    """A stream of frames whose subscription ends with the response, however it ends: the
    frames' own clean-up runs only once they were started."""

    def __init__(self, frames: AsyncIterator[bytes], subscription: Subscription) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(frames, media_type=MEDIA_TYPE, headers=headers)
        self._subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._subscription.close()


async def _within_stream(client: Redis, keys: Keys, last_event_id: str) -> str:
    """``last_event_id``, or the stream's last event when it is beyond it. An id that no
    event of the stream has reached (made up, or from before Redis lost its data) would
    have every later event skipped until some event passed it: for ever, for one far in
    the future. (One ahead of this process's tail alone, seen through another process,
    is kept: the events up to it are skipped here too.)"""
    last = await client.xrevrange(keys.events, count=1)
    newest = text(last[0][0]) if last else "0-0"
    return newest if id_key(last_event_id) > id_key(newest) else last_event_id


async def _missed(client: Redis, keys: Keys, after: str | None, until: str) -> list[Event]:
    """A page of the events after ``after`` up to ``until``."""
    if after is None or id_key(after) >= id_key(until):
        return []
    return await events_after(client, keys, after, until=until)


async def _frames(
    client: Redis,
    keys: Keys,
    subscription: Subscription,
    accept: Callable[[Event], bool] | None,
    sent: str | None,
    missed: list[Event],
    until: str,
    keep_alive_s: float,
) -> AsyncIterator[bytes]:
    try:
        yield RETRY_FRAME
        while missed:
            for earlier in missed:
                if accept is None or accept(earlier):
                    yield outcome_frame(earlier)
            sent = missed[-1].event_id
            try:
                missed = await _missed(client, keys, sent, until)
            except RedisError:  # the response has begun: end it, and say how to go on
                yield comment("Redis did not answer; reconnect with Last-Event-ID to resume")
                return
        sent_key = id_key(sent) if sent else None
        while True:
            try:
                event = await subscription.next(keep_alive_s)
            except TimeoutError:
                yield KEEP_ALIVE
                continue
            if event is None:
                reason = "dropped: too slow" if subscription.dropped else "closing"
                yield comment(f"{reason}; reconnect with Last-Event-ID to resume")
                return
            if sent_key is not None and id_key(event.event_id) <= sent_key:
                continue
            yield outcome_frame(event)
    finally:
        subscription.close()
