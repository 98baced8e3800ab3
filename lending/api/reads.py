"""What the API reads from Redis: a request's state, a user's loans, where a book is.

Each read is bounded: a request's outcome is looked for in the tail's recent window,
then in at most ``lookup_limit`` events from the request's millisecond on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.api.tail import EventTail
from lending.domain.events import Event
from lending.domain.streamids import id_key, id_ms, next_id
from lending.keys import LENDING_GROUP, Keys
from lending.redis.replies import Entries, text

LOOKUP_PAGE = 500

LENT = "lent"
IN_STORAGE = "in storage"
ON_THE_SHELVES = "on the shelves"


@dataclass(frozen=True)
class Pending:
    """The request is in its stream without an outcome: queued, or being processed.

    :param shutting_down: a wait for its outcome was cut short: the API is stopping.
    """

    shutting_down: bool = False


@dataclass(frozen=True)
class Unavailable:
    """The request was processed, but its event is beyond the lookup (or trimmed away)."""


RequestState = Event | Pending | Unavailable | None  # None: no such request


async def request_state(
    client: Redis, keys: Keys, tail: EventTail, action: str, request_id: str, *, lookup_limit: int = 10_000
) -> RequestState:
    """The outcome of (``action``, ``request_id``), or where it stands without one.

    The commit writes an entry's event and acknowledges it in one step, so an entry not
    yet delivered to the group, or pending in it, has no event: that is read first (one
    transaction), and the events are searched only for an entry that was acknowledged
    (or is gone: trimmed after it was).
    """
    if (event := tail.recent(action, request_id)) is not None:
        return event
    stream = keys.requests(action)
    async with client.pipeline(transaction=True) as pipe:
        pipe.xrange(stream, min=request_id, max=request_id, count=1)
        pipe.xpending_range(stream, LENDING_GROUP, min=request_id, max=request_id, count=1)
        pipe.xinfo_groups(stream)
        found, pending, groups = await pipe.execute(raise_on_error=False)
    exists = bool(found) and not isinstance(found, ResponseError)
    if exists and _unfinished(request_id, pending, groups):
        return Pending()
    event = await find_event(client, keys, action, request_id, limit=lookup_limit)
    if event is not None:
        return event
    return Unavailable() if exists else None


def _unfinished(request_id: str, pending: Any, groups: Any) -> bool:
    """Is the entry pending in the group, or not delivered to it yet (no group: no worker
    ever ran)?"""
    if isinstance(pending, list) and pending:
        return True
    if isinstance(groups, ResponseError):
        return True
    group = next((g for g in groups if text(g["name"]) == LENDING_GROUP), None)
    return group is None or id_key(request_id) > id_key(text(group["last-delivered-id"]))


async def find_event(client: Redis, keys: Keys, action: str, request_id: str, *, limit: int) -> Event | None:
    """The event of (``action``, ``request_id``) among the first ``limit`` events from the
    request's millisecond on (an event comes after its request)."""
    wanted = (request_id.encode(), action.encode())
    start = f"{id_ms(request_id)}-0"
    read = 0
    while read < limit:
        entries = cast(
            Entries, await client.xrange(keys.events, min=start, max="+", count=min(LOOKUP_PAGE, limit - read))
        )
        for event_id, fields in entries:
            if fields and (fields.get(b"request_id"), fields.get(b"action")) == wanted:
                return Event.from_fields(fields, text(event_id))
        following = next_id(text(entries[-1][0])) if len(entries) == LOOKUP_PAGE else None
        if following is None:  # the last page, or nothing can come after it
            return None
        read += len(entries)
        start = following
    return None


async def events_after(
    client: Redis, keys: Keys, after: str, *, until: str = "+", count: int = LOOKUP_PAGE
) -> list[Event]:
    """Up to ``count`` events after the id ``after`` and up to ``until``, oldest first."""
    start = next_id(after)
    if start is None:  # nothing comes after the last possible ID
        return []
    entries = cast(Entries, await client.xrange(keys.events, min=start, max=until, count=count))
    return [Event.from_fields(fields, text(event_id)) for event_id, fields in entries if fields]


async def loans(client: Redis, keys: Keys, user_id: str) -> list[str]:
    """The books ``user_id`` holds (the commit keeps ``{NS}:user:<id>:books`` with the loans)."""
    return sorted(text(book) for book in await client.smembers(keys.user_books(user_id)))


async def whereabouts(client: Redis, keys: Keys, book_id: str) -> tuple[str, str | None]:
    """Where ``book_id`` is (``LENT``, ``IN_STORAGE`` or ``ON_THE_SHELVES``: neither lent nor
    stored), and who holds it when lent; both read in one transaction."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hget(keys.lent_books, book_id)
        pipe.sismember(keys.storage, book_id)
        holder, stored = await pipe.execute()
    if holder is not None:
        return LENT, text(holder)
    return (IN_STORAGE if stored else ON_THE_SHELVES), None
