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

from lending.api.reads import events_after
from lending.api.tail import EventTail
from lending.domain.events import Event
from lending.domain.streamids import id_key
from lending.keys import Keys

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
) -> AsyncIterator[bytes]:
    """The frames of a ``GET /v1/events`` stream: the events after ``last_event_id`` first
    (when given), then the live ones, those ``accept`` lets through; a comment every
    ``keep_alive_s`` of silence."""
    subscription = tail.subscribe(accept, maxsize=queue_size)
    # Events up to the tail's position went by before the subscription: read them from
    # the stream; the later ones come through the subscription.
    until = tail.position
    try:
        yield RETRY_FRAME
        sent = last_event_id
        while sent is not None and id_key(sent) < id_key(until):
            events = await events_after(client, keys, sent, until=until)
            if not events:
                break
            for missed in events:
                if accept is None or accept(missed):
                    yield outcome_frame(missed)
            sent = events[-1].event_id
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
