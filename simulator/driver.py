"""Sending simulated requests at an offered rate and matching their events."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from lending.domain.events import Event
from lending.keys import Keys
from lending.redis.consumer import FindRedis
from lending.redis.replies import Entries, StreamsReply, is_transient, text

from .stats import RunReport, latency_summary
from .workload import Request, Workload

log = structlog.get_logger(__name__)


@dataclass
class InFlight:
    request: Request
    sent_at: float
    events: int = 0


@dataclass
class Driver:
    """Open-loop traffic: ``rate`` requests per second, for ``duration_s`` or ``requests``.

    The sender does not wait for outcomes: a slow service shows as growing latency
    and outstanding requests, not as a lower offered rate. ``on_redis_error`` finds Redis
    again after a transient error (on a cluster: the slot's new master after a failover).
    """

    client: Redis
    keys: Keys
    workload: Workload
    rate: float
    duration_s: float | None = None
    requests: int | None = None
    progress: bool = False
    batch_max: int = 500
    report: RunReport = field(default_factory=RunReport)
    on_redis_error: FindRedis | None = None

    def __post_init__(self) -> None:
        self._inflight: dict[tuple[str, str], InFlight] = {}
        self._done: set[tuple[str, str]] = set()
        self._after = "0-0"
        self._stop_reading = asyncio.Event()
        self.sending_finished = asyncio.Event()
        # Events read before their request's XADD reply: matched once the reply comes.
        self._early: dict[tuple[str, str], list[tuple[Event, float]]] = {}
        self._recent: list[float] = []

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    async def run(self, drain_timeout_s: float = 120.0) -> RunReport:
        last = cast(Entries, await self.client.xrevrange(self.keys.events, count=1))
        self._after = text(last[0][0]) if last else "0-0"
        reader = asyncio.create_task(self._read_events())
        progress = asyncio.create_task(self._show_progress()) if self.progress else None
        started = time.monotonic()
        try:
            try:
                await self._send()
            finally:
                self.sending_finished.set()
            deadline = time.monotonic() + drain_timeout_s
            # Polling: the wait ends on a deadline as much as on the last outcome.
            while self._inflight and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            # Give a duplicate event a moment to show up before the books are closed.
            await asyncio.sleep(0.3)
        finally:
            self.report.duration_s = time.monotonic() - started
            self._stop_reading.set()
            await reader
            if progress:
                progress.cancel()
                if sys.stderr.isatty():
                    print(file=sys.stderr)
        self.report.missing = len(self._inflight)
        self.report.unknown_events = sum(len(events) for events in self._early.values())
        return self.report

    async def _send(self) -> None:
        start = time.monotonic()
        sent = 0
        while True:
            elapsed = time.monotonic() - start
            if self.duration_s is not None and elapsed >= self.duration_s:
                return
            if self.requests is not None and sent >= self.requests:
                return
            due = int(elapsed * self.rate) + 1 - sent
            if self.requests is not None:
                due = min(due, self.requests - sent)
            if due > 0:
                sent += await self._send_batch(min(due, self.batch_max))
            await asyncio.sleep(max(0.0, (sent / self.rate) - (time.monotonic() - start)) or 0.001)

    async def _send_batch(self, n: int) -> int:
        """XADD ``n`` requests in one pipeline; returns ``n`` (each was tried once)."""
        batch = [self.workload.next_request() for _ in range(n)]
        async with self.client.pipeline(transaction=False) as pipe:
            for request in batch:
                pipe.xadd(
                    self.keys.requests(request.action),
                    {"user_id": request.user_id, "book_ids": ",".join(request.book_ids)},
                )
            sent_at = time.monotonic()
            try:
                # Redis may refuse some of the commands (out of memory) and add the others.
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # Unknown whether they were added: forget them; their events count as unknown.
                for request in batch:
                    self.workload.outcome(request, "lost", ())
                log.warning("send failed; Redis unavailable", error=str(exc))
                if not await self._find_redis():
                    await asyncio.sleep(0.2)
                return n
        errors = [r for r in replies if isinstance(r, Exception) and not isinstance(r, OutOfMemoryError)]
        if errors and not is_transient(errors[0]):
            raise errors[0]
        if errors:
            await self._find_redis()
        for request, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                # Refused (out of memory, or Redis loading its data): not added, no event due.
                if isinstance(reply, OutOfMemoryError):
                    self.report.refused += 1
                self.workload.outcome(request, "refused", ())
                continue
            self.report.sent += 1
            key = (request.action, text(reply))
            self._inflight[key] = InFlight(request, sent_at)
            # The event may have been read before XADD's reply reached us.
            for event, seen_at in self._early.pop(key, []):
                self._record(event, seen_at)
        if errors:
            log.warning("Redis refused requests", count=len(errors), error=str(errors[0]))
        return n

    async def _read_events(self) -> None:
        while not self._stop_reading.is_set():
            try:
                reply = await self.client.xread({self.keys.events: self._after}, count=1000, block=100)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not await self._find_redis():
                    await asyncio.sleep(0.2)
                continue
            now = time.monotonic()
            for _stream, entries in cast(StreamsReply, reply or []):
                for event_id, fields in entries:
                    self._after = text(event_id)
                    self._record(Event.from_fields(fields or {}, self._after), now)

    async def _find_redis(self) -> bool:
        """``on_redis_error``: ``True`` when Redis is now somewhere else."""
        if self.on_redis_error is None:
            return False
        try:
            return await self.on_redis_error()
        except Exception as exc:
            log.warning("could not find Redis again yet", error=str(exc))
            return False

    def _record(self, event: Event, now: float) -> None:
        key = (event.action, event.request_id)
        inflight = self._inflight.pop(key, None)
        if inflight is not None:
            self._done.add(key)
            self.report.outcomes[event.status] += 1
            latency = (now - inflight.sent_at) * 1000.0
            self.report.latencies_ms.append(latency)
            self._recent.append(latency)
            self.workload.outcome(inflight.request, event.status, event.books)
        elif key in self._done:
            self.report.duplicated += 1
            log.error("second event for a request", action=event.action, request_id=event.request_id)
        else:
            self._early.setdefault(key, []).append((event, now))

    async def _show_progress(self) -> None:
        last_done, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            done, now = sum(self.report.outcomes.values()), time.monotonic()
            rate = (done - last_done) / (now - last_time)
            last_done, last_time = done, now
            p99 = latency_summary(self._recent)["p99_ms"]
            self._recent = []
            line = (
                f"sent {self.report.sent}  "
                + "  ".join(f"{k} {v}" for k, v in sorted(self.report.outcomes.items()))
                + f"  outstanding {self.outstanding}  rate {rate:.0f}/s  p99 {p99:.1f} ms"
                + (f"  refused (out of memory) {self.report.refused}" if self.report.refused else "")
            )
            if sys.stderr.isatty():
                print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
