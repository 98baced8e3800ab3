"""Keeping streams bounded without losing work.

Request streams and ``{NS}:shelving:returns`` are trimmed (``XTRIM MINID``) only below
the oldest entry that some consumer group still has to read or acknowledge: trimming
never loses an entry that is waiting to be processed. ``{NS}:events`` keeps a window of
about ``events_maxlen`` entries (approximate ``MAXLEN``: Redis trims whole nodes).

Consumers of workers that are gone, and that hold nothing, are removed from the groups
(``forget_dead_consumers``), so that the groups do not collect a consumer per worker id
that ever ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.domain.streamids import id_key, next_id
from lending.keys import Keys
from lending.redis.replies import Entries, text
from lending.redis.scripts import Script

# Consumers checked per call of forget_consumers.lua.
CONSUMER_PAGE = 100


async def safe_trim_id(client: Redis, stream: str) -> str | None:
    """The lowest ID that every group of ``stream`` still needs (entries below it are
    read and acknowledged by all groups), or ``None`` when nothing may be trimmed."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    if not groups:
        return None  # nobody consumes it yet: everything is still to be read
    needed: list[str] = []
    for group in groups:
        summary = await client.xpending(stream, text(group["name"])) if int(group["pending"]) else None
        needed.append(first_needed(group, summary))
    return min(needed, key=id_key)


def first_needed(group: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    """The lowest ID a group still needs, from its XINFO GROUPS entry and, when that
    counted pending entries, its XPENDING summary: its oldest pending entry, or else the
    entry after its last delivered one.

    XPENDING shows no minimum when the entries XINFO counted were acknowledged in
    between (a normal race): nothing is pending then. The last delivered ID read before
    is no newer than the current one, so trimming below it stays safe.
    """
    oldest = summary.get("min") if summary else None
    if oldest is not None:
        return text(oldest)
    last = text(group["last-delivered-id"])
    return next_id(last) or last  # after MAX_ID nothing comes: trimming below it is as safe


async def trim(client: Redis, keys: Keys, events_maxlen: int) -> dict[str, int]:
    """Trim the namespace's streams once; how many entries each lost."""
    removed: dict[str, int] = {}
    for stream, _group in keys.consumed():
        minid = await safe_trim_id(client, stream)
        if minid is not None:
            removed[stream] = int(await client.xtrim(stream, minid=minid, approximate=False))
    removed[keys.events] = int(await client.xtrim(keys.events, maxlen=events_maxlen, approximate=True))
    if removed[keys.events]:
        first = cast(Entries, await client.xrange(keys.events, count=1))
        if first:
            await client.set(keys.events_trimmed_to, text(first[0][0]))
    return removed


async def forget_dead_consumers(client: Redis, forget: Script, keys: Keys) -> dict[str, list[str]]:
    """Remove from the namespace's groups every consumer that holds no pending entry and
    has no live worker (``forget``: ``forget_consumers.lua``, which checks both in the
    step that removes); stream -> the consumers removed from its group."""
    removed: dict[str, list[str]] = {}
    for stream, group in keys.consumed():
        try:
            consumers = await client.xinfo_consumers(stream, group)
        except ResponseError:  # no such stream or group yet
            continue
        idle = [text(c["name"]) for c in consumers if int(c["pending"]) == 0]
        for start in range(0, len(idle), CONSUMER_PAGE):
            names = idle[start : start + CONSUMER_PAGE]
            gone = await forget(client, [stream, *(keys.worker(name) for name in names)], [group, *names])
            removed.setdefault(stream, []).extend(text(name) for name in gone)
    return {stream: names for stream, names in removed.items() if names}
