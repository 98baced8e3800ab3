"""``python -m lending status``: what a namespace is doing, for an operator."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.domain.streamids import id_key, id_ms, next_id
from lending.keys import REQUEST_TYPES, Keys
from lending.ops import dead_letters
from lending.redis import eviction
from lending.redis.replies import text
from lending.redis.workers import live_workers, read_limits, worker_infos
from lending.settings import Limits

LAG_SCAN_LIMIT = 10_000  # Redis 6.2 reports no lag: count unread entries up to this
PENDING_LIST_LIMIT = 1_000  # status --pending: entries shown per stream


async def read_status(client: Redis, namespace: str) -> dict[str, Any]:
    """A snapshot of the namespace: streams, groups, workers, storage, loans, against the
    limits its workers published (the defaults when none did)."""
    keys = Keys(namespace)
    published = await read_limits(client, keys)
    limits = published or Limits()
    workers = await live_workers(client, keys)
    infos = await worker_infos(client, keys, sorted(workers))
    now_ms = time.time() * 1000
    groups = [await read_group(client, stream, group, set(workers), now_ms) for stream, group in keys.consumed()]
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
        "inbox": await client.llen(keys.inbox),
        "groups": groups,
        "workers": [worker_entry(w, ttl, infos.get(w, {}), now_ms) for w, ttl in sorted(workers.items())],
        "storage": {"books": await client.scard(keys.storage), "capacity": limits.storage_capacity},
        "limits": {**dataclasses.asdict(limits), "published": published is not None},
        "books_lent": await client.hlen(keys.lent_books),
        "users_at_limit": at_limit,
        "dead_letters": await client.xlen(keys.dead_letters),
        "dead_letters_trimmed": await dead_letters.trimmed(client, keys),
        "maxmemory_policy": await eviction.read_policy(client),  # None: INFO refused
    }


async def read_overview(client: Redis, keys: Keys, now_ms: float | None = None) -> dict[str, Any]:
    """The part of ``read_status`` a dashboard reads every second, without its costly
    parts (the ``SCAN`` of every user for ``users_at_limit``, the streams' lengths): the
    storage against its capacity, books lent, dead letters waiting, the live workers
    and each consumer group's lag and pending entries."""
    now = time.time() * 1000 if now_ms is None else now_ms
    limits = await read_limits(client, keys) or Limits()
    workers = await live_workers(client, keys)
    infos = await worker_infos(client, keys, sorted(workers))
    groups = await asyncio.gather(*(read_group(client, s, g, set(workers), now) for s, g in keys.consumed()))
    async with client.pipeline(transaction=False) as pipe:
        pipe.scard(keys.storage)
        pipe.hlen(keys.lent_books)
        pipe.xlen(keys.dead_letters)
        in_storage, lent, letters = await pipe.execute()
    return {
        "storage": {"books": int(in_storage), "capacity": limits.storage_capacity},
        "books_lent": int(lent),
        "dead_letters": int(letters),
        "workers": [worker_entry(w, ttl, infos.get(w, {}), now) for w, ttl in sorted(workers.items())],
        "groups": list(groups),
    }


def worker_entry(worker_id: str, ttl_ms: int, info: Mapping[str, str], now_ms: float) -> dict[str, Any]:
    """A live worker as ``status`` shows it, from what it published (``None`` for what it
    did not: a worker of an older version); uptime by this host's clock."""

    def number(name: str) -> int | None:
        value = info.get(name, "")
        return int(value) if value.isdigit() else None

    started_ms = number("started_ms")
    return {
        "worker_id": worker_id,
        "ttl_ms": ttl_ms,
        "host": info.get("host"),
        "pid": number("pid"),
        "version": info.get("version"),
        "started_ms": started_ms,
        "uptime_s": None if started_ms is None else round(max(0.0, now_ms - started_ms) / 1000, 1),
        "processed": number("processed"),
        "failed": number("failed"),
    }


async def read_group(
    client: Redis, stream: str, group: str, live: set[str], now_ms: float | None = None
) -> dict[str, Any]:
    """Lag, pending entries (and the oldest one's idle time and age) of ``group`` on
    ``stream``; consumers holding entries that are not in ``live`` are listed as dead.

    The age is the time since the entry was added, from its ID (by ``now_ms``, this
    host's clock unless given): the idle time says nothing of it, since the consumer
    holding an entry renews it."""
    out: dict[str, Any] = {
        "stream": stream,
        "group": group,
        "exists": False,
        "lag": 0,
        "pending": 0,
        "oldest_pending_idle_ms": None,
        "oldest_pending_id": None,
        "oldest_pending_age_ms": None,
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
        # After the greatest ID there is nothing to read (and Redis refuses the range).
        after = next_id(text(info["last-delivered-id"]))
        unread = [] if after is None else await client.xrange(stream, min=after, max="+", count=LAG_SCAN_LIMIT)
        out["lag"] = len(unread or [])
    if out["pending"]:
        summary = await client.xpending(stream, group)
        # No minimum: the entries XINFO counted were acknowledged in between (a normal race).
        if summary["min"] is not None:
            out["oldest_pending_id"] = text(summary["min"])
            out["oldest_pending_age_ms"] = age_ms(text(summary["min"]), now_ms)
            oldest = await client.xpending_range(stream, group, min=summary["min"], max=summary["min"], count=1)
            if oldest:
                out["oldest_pending_idle_ms"] = int(oldest[0]["time_since_delivered"])
        out["dead_consumers"] = [
            {"consumer": text(c["name"]), "pending": int(c["pending"])}
            for c in summary["consumers"]
            if text(c["name"]) not in live
        ]
    return out


async def read_pending(
    client: Redis, keys: Keys, consumer: str, now_ms: float | None = None, limit: int = PENDING_LIST_LIMIT
) -> list[dict[str, Any]]:
    """The entries pending on ``consumer`` in the namespace's groups, oldest first in
    each stream (at most ``limit`` per stream): id, stream, group, deliveries, idle time
    and age (from the ID)."""
    out: list[dict[str, Any]] = []
    for stream, group in keys.consumed():
        try:
            rows: list[dict[str, Any]] = await client.xpending_range(
                stream, group, min="-", max="+", count=limit, consumername=consumer
            )
        except ResponseError:  # no such stream or group yet
            continue
        out += [
            {
                "id": text(row["message_id"]),
                "stream": stream,
                "group": group,
                "deliveries": int(row["times_delivered"]),
                "idle_ms": int(row["time_since_delivered"]),
                "age_ms": age_ms(text(row["message_id"]), now_ms),
            }
            for row in rows
        ]
    return out


def render_pending(consumer: str, entries: list[dict[str, Any]], limit: int = PENDING_LIST_LIMIT) -> str:
    if not entries:
        return f"consumer {consumer}: no pending entries"
    lines = [f"consumer {consumer}: {len(entries)} pending entr{'y' if len(entries) == 1 else 'ies'}"]
    lines += [
        f"  {e['id']}  {e['stream']}  deliveries {e['deliveries']}, idle {duration(e['idle_ms'] / 1000)}, "
        f"added {duration(e['age_ms'] / 1000)} ago"
        for e in entries
    ]
    streams = {e["stream"] for e in entries}
    full = sorted(s for s in streams if sum(e["stream"] == s for e in entries) >= limit)
    if full:
        lines.append(f"  (the first {limit} of each of {', '.join(full)} shown)")
    return "\n".join(lines)


def age_ms(entry_id: str, now_ms: float | None = None) -> int:
    """How long ago the entry ``entry_id`` was added (by its ID's timestamp)."""
    now = time.time() * 1000 if now_ms is None else now_ms
    return max(0, int(now - id_ms(entry_id)))


@dataclass(frozen=True)
class Thresholds:
    """What ``status --check`` holds a namespace to; ``None`` leaves a value unchecked.

    :param max_lag: entries a group may have left to read, per group.
    :param max_pending_age_s: age (from its ID) the oldest pending entry of a group may have.
    :param max_dead_letters: dead letters that may wait.
    :param min_workers: live workers there must be.
    """

    max_lag: int | None = None
    max_pending_age_s: float | None = None
    max_dead_letters: int | None = None
    min_workers: int | None = None


@dataclass(frozen=True)
class Breach:
    """A threshold that ``status`` breaks: ``check`` names the option (``max-lag``)."""

    check: str
    value: int | float
    limit: int | float
    message: str


def breaches(status: Mapping[str, Any], thresholds: Thresholds) -> list[Breach]:
    """Every threshold ``status`` (from ``read_status``) breaks, one per group for the
    per-group ones, in a stable order."""
    out: list[Breach] = []
    groups = [g for g in status["groups"] if g["exists"]]
    if thresholds.max_lag is not None:
        for g in groups:
            if g["lag"] > thresholds.max_lag:
                where = f"{g['group']} on {g['stream']}"
                message = f"FAIL lag: {where} has {g['lag']} entries to read (--max-lag {thresholds.max_lag})"
                out.append(Breach("max-lag", g["lag"], thresholds.max_lag, message))
    if thresholds.max_pending_age_s is not None:
        for g in groups:
            age_s = (g["oldest_pending_age_ms"] or 0) / 1000
            if age_s > thresholds.max_pending_age_s:
                limit = thresholds.max_pending_age_s
                message = (
                    f"FAIL pending age: the oldest pending entry of {g['group']} on {g['stream']} "
                    f"({g['oldest_pending_id']}) is {age_s:.1f} s old (--max-pending-age {limit:g})"
                )
                out.append(Breach("max-pending-age", round(age_s, 1), limit, message))
    letters = status["dead_letters"]
    if thresholds.max_dead_letters is not None and letters > thresholds.max_dead_letters:
        message = (
            f"FAIL dead letters: {letters} dead letter{'' if letters == 1 else 's'} waiting "
            f"(--max-dead-letters {thresholds.max_dead_letters})"
        )
        out.append(Breach("max-dead-letters", letters, thresholds.max_dead_letters, message))
    workers = len(status["workers"])
    if thresholds.min_workers is not None and workers < thresholds.min_workers:
        message = (
            f"FAIL workers: {workers} live worker{'' if workers == 1 else 's'} (--min-workers {thresholds.min_workers})"
        )
        out.append(Breach("min-workers", workers, thresholds.min_workers, message))
    return out


def ok_line(status: Mapping[str, Any]) -> str:
    """The one line of a ``status --check`` that found nothing wrong."""
    groups = [g for g in status["groups"] if g["exists"]]
    ages = [g["oldest_pending_age_ms"] for g in groups if g["oldest_pending_age_ms"] is not None]
    workers = len(status["workers"])
    return (
        f"OK: namespace {status['namespace']!r}: {workers} live worker{'' if workers == 1 else 's'}, "
        f"lag {max((g['lag'] for g in groups), default=0)}, "
        + (f"oldest pending {max(ages) / 1000:.1f} s old" if ages else "nothing pending")
        + f", {status['dead_letters']} dead letter{'' if status['dead_letters'] == 1 else 's'}"
    )


def group_lag(reported: int, last_delivered_id: str, last_generated_id: str) -> int:
    """The lag ``XINFO GROUPS`` reports, but 0 when the group has read up to the stream's
    last generated ID: Redis 7.0 reports a stale lag after a failover, its replicas having
    kept an old ``entries-read`` (redis/redis#12898)."""
    return 0 if id_key(last_delivered_id) >= id_key(last_generated_id) else reported


def render(status: dict[str, Any]) -> str:
    lines = [f"namespace {status['namespace']}", "streams"]
    lines += [f"  {name:<17} {length}" for name, length in status["streams"].items()]
    lines.append(f"inbox             {status['inbox']} waiting to be queued")
    lines.append("groups")
    for g in status["groups"]:
        if not g["exists"]:
            lines.append(f"  {g['group']} on {g['stream']}: not created yet")
            continue
        oldest = []
        if g["oldest_pending_idle_ms"] is not None:
            oldest.append(f"oldest idle {g['oldest_pending_idle_ms'] / 1000:.1f} s")
        if g["oldest_pending_age_ms"] is not None:
            oldest.append(f"added {g['oldest_pending_age_ms'] / 1000:.1f} s ago")
        lines.append(
            f"  {g['group']} on {g['stream']}: lag {g['lag']}, pending {g['pending']}"
            + (f" ({', '.join(oldest)})" if oldest else "")
        )
        for dead in g["dead_consumers"]:
            lines.append(f"    dead consumer {dead['consumer']} holds {dead['pending']} entries")
    lines.append(f"live workers      {len(status['workers']) or 'none'}")
    lines += [f"  {_worker_line(w)}" for w in status["workers"]]
    lines += [
        f"storage           {status['storage']['books']} / {status['storage']['capacity']}",
        f"books lent        {status['books_lent']}",
        f"users at limit    {status['users_at_limit']}",
        "limits            " + _limits_line(status["limits"]),
        f"dead letters      {status['dead_letters']}"
        + (
            f" ({status['dead_letters_trimmed']} older ones dropped by the cap)"
            if status["dead_letters_trimmed"]
            else ""
        ),
        f"maxmemory-policy  {status['maxmemory_policy'] or 'unknown'}",
    ]
    verdict = eviction.judge(status["maxmemory_policy"])
    if verdict.level != "ok":
        lines.append(f"  warning: {verdict.message}")
    return "\n".join(lines)


def _worker_line(worker: Mapping[str, Any]) -> str:
    about = []
    if worker["host"] is not None:
        about.append(f"{worker['host']} pid {worker['pid']}")
    if worker["version"] is not None:
        about.append(f"version {worker['version']}")
    if worker["uptime_s"] is not None:
        about.append(f"up {duration(worker['uptime_s'])}")
    if worker["processed"] is not None:
        about.append(f"processed {worker['processed']}, failed {worker['failed'] or 0}")
    return f"{worker['worker_id']}  " + ", ".join([*about, f"ttl {worker['ttl_ms'] / 1000:.1f} s"])


def duration(seconds: float) -> str:
    """``seconds`` for a human: ``42.0 s``, ``5 min 03 s``, ``2 h 07 min``, ``3 d 04 h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def _limits_line(limits: dict[str, Any]) -> str:
    line = (
        f"{limits['max_books_per_user']} books per user, {limits['max_books_per_request']} per request, "
        f"storage capacity {limits['storage_capacity']}"
    )
    return line if limits["published"] else line + " (defaults: no worker has published its limits)"
