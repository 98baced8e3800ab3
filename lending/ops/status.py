"""``python -m lending status``: what a namespace is doing, for an operator."""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.domain.streamids import id_key
from lending.keys import REQUEST_TYPES, Keys
from lending.redis import eviction
from lending.redis.replies import text
from lending.redis.workers import live_workers, read_limits
from lending.settings import Limits

LAG_SCAN_LIMIT = 10_000  # Redis 6.2 reports no lag: count unread entries up to this


async def read_status(client: Redis, namespace: str) -> dict[str, Any]:
    """A snapshot of the namespace: streams, groups, workers, storage, loans, against the
    limits its workers published (the defaults when none did)."""
    keys = Keys(namespace)
    published = await read_limits(client, keys)
    limits = published or Limits()
    workers = await live_workers(client, keys)
    groups = [await read_group(client, stream, group, set(workers)) for stream, group in keys.consumed()]
    at_limit = 0
    async for raw in client.scan_iter(match=keys.pattern("user:*:count"), count=1000):
        value = await client.get(raw)
        if value is not None and value.isdigit() and int(value) >= limits.max_books_per_user:
            at_limit += 1
    return {
        "namespace": namespace,
        "streams": {
            name: await client.xlen(key)
            for name, key in (
                *((t.stream, keys.requests(t.action)) for t in REQUEST_TYPES),
                ("events", keys.events),
                ("shelving:returns", keys.shelving_returns),
                ("dead-letters", keys.dead_letters),
            )
        },
        "groups": groups,
        "workers": [{"worker_id": w, "ttl_ms": ttl} for w, ttl in sorted(workers.items())],
        "storage": {"books": await client.scard(keys.storage), "capacity": limits.storage_capacity},
        "limits": {**dataclasses.asdict(limits), "published": published is not None},
        "books_lent": await client.hlen(keys.lent_books),
        "users_at_limit": at_limit,
        "dead_letters": await client.xlen(keys.dead_letters),
        "maxmemory_policy": await eviction.read_policy(client),  # None: INFO refused
    }


async def read_group(client: Redis, stream: str, group: str, live: set[str]) -> dict[str, Any]:
    """Lag, pending entries (and the oldest one's idle time) of ``group`` on ``stream``;
    consumers holding entries that are not in ``live`` are listed as dead."""
    out: dict[str, Any] = {
        "stream": stream,
        "group": group,
        "exists": False,
        "lag": 0,
        "pending": 0,
        "oldest_pending_idle_ms": None,
        "dead_consumers": [],
    }
    try:
        infos = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return out
    info = next((g for g in infos if text(g["name"]) == group), None)
    if info is None:
        return out
    out["exists"] = True
    out["pending"] = int(info["pending"])
    if info.get("lag") is not None:  # Redis 7
        out["lag"] = int(info["lag"])
        if out["lag"]:
            last_generated = text((await client.xinfo_stream(stream))["last-generated-id"])
            out["lag"] = group_lag(out["lag"], text(info["last-delivered-id"]), last_generated)
    else:
        unread = await client.xrange(stream, min="(" + text(info["last-delivered-id"]), max="+", count=LAG_SCAN_LIMIT)
        out["lag"] = len(unread or [])
    if out["pending"]:
        summary = await client.xpending(stream, group)
        # No minimum: the entries XINFO counted were acknowledged in between (a normal race).
        if summary["min"] is not None:
            oldest = await client.xpending_range(stream, group, min=summary["min"], max=summary["min"], count=1)
            if oldest:
                out["oldest_pending_idle_ms"] = int(oldest[0]["time_since_delivered"])
        out["dead_consumers"] = [
            {"consumer": text(c["name"]), "pending": int(c["pending"])}
            for c in summary["consumers"]
            if text(c["name"]) not in live
        ]
    return out


def group_lag(reported: int, last_delivered_id: str, last_generated_id: str) -> int:
    """The lag ``XINFO GROUPS`` reports, but 0 when the group has read up to the stream's
    last generated ID: Redis 7.0 reports a stale lag after a failover, its replicas having
    kept an old ``entries-read`` (redis/redis#12898)."""
    return 0 if id_key(last_delivered_id) >= id_key(last_generated_id) else reported


def render(status: dict[str, Any]) -> str:
    lines = [f"namespace {status['namespace']}", "streams"]
    lines += [f"  {name:<17} {length}" for name, length in status["streams"].items()]
    lines.append("groups")
    for g in status["groups"]:
        if not g["exists"]:
            lines.append(f"  {g['group']} on {g['stream']}: not created yet")
            continue
        idle = g["oldest_pending_idle_ms"]
        lines.append(
            f"  {g['group']} on {g['stream']}: lag {g['lag']}, pending {g['pending']}"
            + (f" (oldest idle {idle / 1000:.1f} s)" if idle is not None else "")
        )
        for dead in g["dead_consumers"]:
            lines.append(f"    dead consumer {dead['consumer']} holds {dead['pending']} entries")
    workers = ", ".join(f"{w['worker_id']} (ttl {w['ttl_ms'] / 1000:.1f} s)" for w in status["workers"]) or "none"
    lines += [
        f"live workers      {workers}",
        f"storage           {status['storage']['books']} / {status['storage']['capacity']}",
        f"books lent        {status['books_lent']}",
        f"users at limit    {status['users_at_limit']}",
        "limits            " + _limits_line(status["limits"]),
        f"dead letters      {status['dead_letters']}",
        f"maxmemory-policy  {status['maxmemory_policy'] or 'unknown'}",
    ]
    verdict = eviction.judge(status["maxmemory_policy"])
    if verdict.level != "ok":
        lines.append(f"  warning: {verdict.message}")
    return "\n".join(lines)


def _limits_line(limits: dict[str, Any]) -> str:
    line = (
        f"{limits['max_books_per_user']} books per user, {limits['max_books_per_request']} per request, "
        f"storage capacity {limits['storage_capacity']}"
    )
    return line if limits["published"] else line + " (defaults: no worker has published its limits)"
