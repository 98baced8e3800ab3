"""The dashboard's aggregates, pure: outcomes per second with their latency percentiles,
a bounded tail of the latest outcomes, and the workers' heartbeat ages.

Everything here is fed by the events tail's listener (one call per outcome, O(1)
work and memory) and read once a second; nothing keeps an event for long, so the
dashboard costs the same whether it watches 10 or 10,000 outcomes a second. Time is
always passed in (``now_s``, Unix seconds), never read here.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lending.domain.events import Event

#: Books an outcome of the tail lists at most (the count says how many it had).
TAIL_BOOKS = 3


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0 < q <= 100) of ``ordered`` (sorted ascending) by the
    nearest rank: the smallest value with at least ``q`` % of the values at or below
    it. ``None`` for no values."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_ms(request_id: str, event_id: str) -> int | None:
    """From the request's queuing to its outcome: the event ID's millisecond minus the
    request ID's (both stamped by Redis's clock, so no host clock enters). ``None`` when
    either is not an entry ID (``<ms>-<seq>``); never negative (a failover to a server
    whose clock is behind)."""
    # Called for every outcome: a cheaper check than is_entry_id's, enough to take the ms.
    request_ms, request_dash, request_seq = request_id.partition("-")
    event_ms, event_dash, event_seq = event_id.partition("-")
    if not (request_dash and event_dash and request_ms.isdigit() and event_ms.isdigit()):
        return None
    if not (request_seq.isdigit() and event_seq.isdigit()):
        return None
    return max(0, int(event_ms) - int(request_ms))


@dataclass(frozen=True)
class Second:
    """One second's outcomes: its start (Unix seconds), how many, how many of each
    status, and the latency percentiles in ms (``None`` without a latency)."""

    t: int
    count: int
    statuses: Mapping[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "count": self.count,
            "statuses": dict(self.statuses),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


class Throughput:
    """Outcomes per second and their latency percentiles over the last ``window_s``
    completed seconds.

    The current second keeps its latencies (at most ``samples`` of them: past that, a
    uniform sample, by reservoir sampling, so memory is bounded at any rate; below it
    the percentiles are exact). When the second is over it becomes a ``Second``
    summary and its samples are dropped. Seconds without an outcome count 0.

    :param window_s: completed seconds kept.
    :param samples: latencies kept for the current second at most.
    :param seed: of the reservoir's random choices (tests pass one).
    """

    def __init__(self, window_s: int = 300, *, samples: int = 4_096, seed: int | None = None) -> None:
        if window_s < 1 or samples < 1:
            raise ValueError("window_s and samples must be at least 1")
        self.window_s = window_s
        self._samples_max = samples
        self._rng = random.Random(seed)
        self._done: deque[Second] = deque(maxlen=window_s)
        self._second: int | None = None
        self._count = 0
        self._statuses: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._seen = 0  # latencies offered in the current second

    def observe(self, status: str, latency: float | None, now_s: float) -> None:
        """Count one outcome of ``status`` seen at ``now_s``, with its latency (ms) if known."""
        self._roll(int(now_s))
        self._count += 1
        self._statuses[status] += 1
        if latency is None:
            return
        self._seen += 1
        if len(self._latencies) < self._samples_max:
            self._latencies.append(latency)
        else:
            slot = self._rng.randrange(self._seen)
            if slot < self._samples_max:
                self._latencies[slot] = latency

    @property
    def held(self) -> int:
        """Latencies held for the current second (at most ``samples``)."""
        return len(self._latencies)

    def seconds(self, now_s: float) -> list[Second]:
        """The completed seconds before ``now_s``'s, oldest first, at most ``window_s``
        (fewer until that many went by since the first outcome)."""
        self._roll(int(now_s))
        return list(self._done)

    def _roll(self, second: int) -> None:
        """Make ``second`` the current one: close the current one, and count 0 for the
        seconds in between."""
        if self._second is None:
            self._second = second
            return
        if second <= self._second:  # the same second (or the clock stepped back: keep counting)
            return
        self._done.append(self._summary())
        gap = second - self._second - 1
        first_empty = max(self._second + 1, second - self.window_s)
        if gap:
            self._done.extend(Second(t, 0) for t in range(first_empty, second))
        self._second = second
        self._count = 0
        self._statuses = Counter()
        self._latencies = []
        self._seen = 0

    def _summary(self) -> Second:
        assert self._second is not None  # set by the first _roll, before any summary
        ordered = sorted(self._latencies)
        return Second(
            t=self._second,
            count=self._count,
            statuses=dict(self._statuses),
            p50_ms=percentile(ordered, 50),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1] if ordered else None,
        )


def tail_entry(event: Event, latency: int | None) -> dict[str, Any]:
    """An outcome as the dashboard's tail shows it: a few of its books only."""
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "action": event.action,
        "status": event.status,
        "user_id": event.user_id,
        "books": list(event.books[:TAIL_BOOKS]),
        "book_count": len(event.books),
        "skipped": len(event.skipped),
        "reason": event.reason,
        "latency_ms": latency,
    }


class Aggregates:
    """What the dashboard knows of the outcomes: ``observe`` each one (the events
    tail's listener), read the rest once a second.

    :param window_s: seconds of rates and latencies kept.
    :param tail: latest outcomes kept.
    """

    def __init__(self, window_s: int = 300, tail: int = 50, *, samples: int = 4_096, seed: int | None = None):
        self.throughput = Throughput(window_s, samples=samples, seed=seed)
        # (event, latency): the entries are built when read, once a second, not per event.
        self._tail: deque[tuple[Event, int | None]] = deque(maxlen=tail)
        self.totals: Counter[str] = Counter()
        self.seen = 0

    def observe(self, event: Event, now_s: float) -> None:
        latency = latency_ms(event.request_id, event.event_id)
        self.throughput.observe(event.status, latency, now_s)
        self._tail.append((event, latency))
        self.totals[event.status] += 1
        self.seen += 1

    def latest(self, count: int | None = None) -> list[dict[str, Any]]:
        """The latest outcomes, newest first (``count`` of them at most)."""
        newest_first = list(reversed(self._tail))
        chosen = newest_first if count is None else newest_first[:count]
        return [tail_entry(event, latency) for event, latency in chosen]


class Heartbeats:
    """How long ago each live worker renewed its heartbeat, from the time its liveness
    key has left (``PTTL``), read about once a second.

    A renewal sets the key's TTL back to the worker's full TTL, which the worker does
    not publish: it is learnt as the largest TTL seen of that worker. The age is then
    that TTL minus the time left. Until a renewal has been seen (the TTL went up
    between two readings) the largest one seen may fall short, so the age is unknown
    (``None``): at most a heartbeat period after a worker is first seen.
    """

    def __init__(self) -> None:
        self._full: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._renewal_seen: set[str] = set()

    def observe(self, ttls: Mapping[str, int]) -> dict[str, int | None]:
        """``ttls``: live worker id -> ms its liveness key has left; returns worker id ->
        ms since its last heartbeat (``None``: not known yet). Workers not in ``ttls``
        are forgotten."""
        for gone in set(self._full) - set(ttls):
            del self._full[gone], self._last[gone]
            self._renewal_seen.discard(gone)
        ages: dict[str, int | None] = {}
        for worker, ttl in ttls.items():
            if worker in self._last and ttl > self._last[worker]:
                self._renewal_seen.add(worker)
            self._last[worker] = ttl
            self._full[worker] = max(self._full.get(worker, 0), ttl)
            ages[worker] = self._full[worker] - ttl if worker in self._renewal_seen else None
        return ages
