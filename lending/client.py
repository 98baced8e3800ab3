"""The sender's side: queue a request and wait for its outcome event."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

from redis.asyncio import Redis

from .events import Event
from .keys import Keys
from .stream import Entries, StreamsReply, text


async def submit(client: Redis, keys: Keys, action: str, user_id: str, book_ids: Sequence[str]) -> tuple[str, str]:
    """Queue a request; returns its id and the events-stream id to read events after.

    The last event id is taken before the request is added, so its event cannot be
    missed however fast a worker answers.
    """
    last = cast(Entries, await client.xrevrange(keys.events, count=1))
    after = text(last[0][0]) if last else "0-0"
    request_id = await client.xadd(keys.requests(action), {"user_id": user_id, "book_ids": ",".join(book_ids)})
    return text(request_id), after


async def wait_for_event(
    client: Redis, keys: Keys, action: str, request_id: str, after: str, timeout_s: float
) -> Event | None:
    """The event of (``action``, ``request_id``), or ``None`` if none came in time."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = await client.xread({keys.events: after}, count=500, block=max(1, min(5000, int(remaining * 1000))))
        for _stream, entries in cast(StreamsReply, reply or []):
            for event_id, fields in entries:
                after = text(event_id)
                if fields and fields.get(b"request_id") == request_id.encode() and fields.get(b"action") == action.encode():
                    return Event.from_fields(fields, after)
    return None
