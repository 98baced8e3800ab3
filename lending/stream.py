"""Consuming Redis Streams with a consumer group: reading, retrying, taking over.

A ``StreamConsumer`` reads new entries of its streams in batches with XREADGROUP and
hands each to a handler, a bounded number at a time. Entries that are not finished
stay pending and come back:

- its own pending entries (left by a failure, a lost connection or a previous run
  under the same worker id) are claimed again with XCLAIM after ``retry_idle_ms``;
- entries pending on another consumer for ``claim_idle_ms`` are taken over with
  XAUTOCLAIM (that consumer died or stalled);
- an entry delivered more than ``max_deliveries`` times goes to the dead-letter
  handler instead of the handler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .metrics import Metrics
from .policy import retry_backoff_s

log = structlog.get_logger(__name__)

#: Errors that say nothing about the entry itself: Redis is gone, restarting or loading.
CLAIM_PAGE = 100

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Delivery:
    """One delivery of a stream entry to this consumer."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


# Replies of XREADGROUP / XCLAIM as parsed by redis-py with decode_responses=False.
Entries = list[tuple[bytes | None, dict[bytes, bytes] | None]]
StreamsReply = list[tuple[bytes, Entries]]

# Processes a batch of deliveries; raising fails every delivery of the batch.
Handler = Callable[[Sequence[Delivery]], Awaitable[Any]]
DeadLetterHandler = Callable[[Delivery, str], Awaitable[Any]]


@dataclass(frozen=True)
class ConsumerConfig:
    group: str
    consumer: str
    concurrency: int
    read_count: int
    claim_idle_ms: int
    retry_idle_ms: int
    max_deliveries: int
    handler_timeout_s: float
    block_ms: int = 500


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    # Cluster: the namespace's slot moved (resharding, failover) or the cluster is down.
    if isinstance(exc, (MovedError, AskError, ClusterDownError, TryAgainError)):
        return True
    # Redis answers LOADING while it reads its data back after a restart.
    # UNBLOCKED and READONLY: the node we block on or write to just became a replica.
    return isinstance(exc, ResponseError) and str(exc).startswith(
        ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "UNBLOCKED", "READONLY")
    )


async def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` at ID 0 (so queued entries are read), if missing."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamConsumer:
    """Consumes ``streams`` in one consumer group until ``stop()`` is called."""

    def __init__(
        self,
        client: Redis,
        streams: Sequence[str],
        config: ConsumerConfig,
        handler: Handler,
        dead_letter: DeadLetterHandler,
        name: str,
        metrics: Metrics | None = None,
        on_redis_error: Callable[[], Awaitable[None]] | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._streams = list(streams)
        self._config = config
        self._handler = handler
        self._dead_letter = dead_letter
        self._log = log.bind(consumer=name)
        self._name = name
        self._metrics = metrics or Metrics()
        self._on_redis_error = on_redis_error
        self._on_reconnect = on_reconnect  # e.g. check the (perhaps new) server again
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._next_retry = 0.0
        self.processed = 0
        self.failures = 0
        self.connected = False

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        """Stop reading new entries; in-flight ones finish (see ``drain``)."""
        self._stopping.set()

    async def run(self) -> None:
        """Read and dispatch until stopped, riding out lost connections."""
        failures = 0
        while not self._stopping.is_set():
            try:
                if not self.connected:
                    await self.ensure_groups()
                    self.connected = True
                    if failures:
                        self._metrics.reconnects.labels(self._name).inc()
                        if self._on_reconnect is not None:
                            await self._on_reconnect()
                    self._next_retry = 0.0  # resume own pending entries at once
                await self._tick()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = retry_backoff_s(failures, base_s=0.1)
                if not is_transient(exc):
                    self._log.exception("consumer loop error, retrying", retry_in_s=delay)
                elif self.connected or failures == 1:
                    self._log.warning("redis unavailable, retrying", error=str(exc), retry_in_s=delay)
                self.connected = False
                if self._on_redis_error is not None and is_transient(exc):
                    try:
                        await self._on_redis_error()
                    except Exception as hook_exc:
                        self._log.warning("could not find Redis again yet", error=str(hook_exc))
                await self._sleep(delay)

    async def ensure_groups(self) -> None:
        """Create the consumer group on each stream if missing (also after a Redis restart
        that lost it)."""
        for stream in self._streams:
            await ensure_group(self._client, stream, self._config.group)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for in-flight entries; ``True`` when all finished."""
        if not self._inflight:
            return True
        done, pending = await asyncio.wait(list(self._inflight.values()), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return not pending

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_claim:
            await self._claim_abandoned()
            self._next_claim = now + min(max(self._config.claim_idle_ms / 2000.0, 0.1), 5.0)
        if now >= self._next_retry:
            await self._resume_own(self._config.retry_idle_ms if self._next_retry else 0)
            self._next_retry = now + max(self._config.retry_idle_ms / 1000.0, 0.1)
        if await self._wait_for_slot():
            await self._read_new()

    async def _wait_for_slot(self) -> bool:
        # XREADGROUP's COUNT applies to each stream: leave room for one entry of each.
        need = min(len(self._streams), self._config.concurrency)
        while self._config.concurrency - len(self._inflight) < need:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=self._config.block_ms / 1000.0)
            except TimeoutError:
                return False
        return not self._stopping.is_set()

    async def _read_new(self) -> None:
        free = self._config.concurrency - len(self._inflight)
        reply = await self._client.xreadgroup(
            self._config.group,
            self._config.consumer,
            {stream: ">" for stream in self._streams},
            count=max(1, min(self._config.read_count, free) // len(self._streams)),
            block=self._config.block_ms,
        )
        batch = [
            Delivery(text(stream_raw), text(entry_id), fields or {}, 1)
            for stream_raw, entries in cast(StreamsReply, reply or [])
            for entry_id, fields in entries
        ]
        self._dispatch(batch)

    async def _claim_abandoned(self) -> None:
        """Take over entries idle on other consumers for longer than ``claim_idle_ms``."""
        claimed = 0
        for stream in self._streams:
            # redis-py drops the cursor of a JUSTID reply; claimed entries stop being
            # idle, so scanning from the start again finds the next ones.
            for _ in range(10):  # bounded: at most 10 pages per stream and tick
                ids = await self._client.xautoclaim(
                    stream,
                    self._config.group,
                    self._config.consumer,
                    self._config.claim_idle_ms,
                    start_id="0-0",
                    count=CLAIM_PAGE,
                    justid=True,
                )
                claimed += len(ids)
                if len(ids) < CLAIM_PAGE:
                    break
        if claimed:
            self._metrics.reclaims.labels(self._name).inc(claimed)
            self._log.info("took over abandoned entries", count=claimed)
            # They are ours now: process them at once rather than after retry_idle_ms.
            await self._resume_own(0)

    async def _resume_own(self, min_idle_ms: int) -> None:
        """Deliver again this consumer's pending entries that are not being processed."""
        for stream in self._streams:
            free = self._config.concurrency - len(self._inflight)
            if free <= 0:
                return
            pending: list[dict[str, Any]] = await self._client.xpending_range(
                stream,
                self._config.group,
                min="-",
                max="+",
                count=free + len(self._inflight),
                consumername=self._config.consumer,
                idle=min_idle_ms or None,
            )
            waiting = {
                text(p["message_id"]): int(p["times_delivered"])
                for p in pending
                if (stream, text(p["message_id"])) not in self._inflight
            }
            if not waiting:
                continue
            # XCLAIM to ourselves counts a delivery and returns the entries' fields.
            entries = await self._client.xclaim(
                stream, self._config.group, self._config.consumer, min_idle_ms, list(waiting)
            )
            batch = [
                Delivery(stream, text(entry_id), fields or {}, waiting[text(entry_id)] + 1)
                for entry_id, fields in cast(Entries, entries)
                if entry_id is not None  # Redis 6.2: a deleted entry still pending
            ]
            # An entry that failed before is retried on its own, so that one poison
            # entry cannot fail the entries it happened to be batched with.
            suspects = [d for d in batch if (d.stream, d.entry_id) in self._errors]
            for delivery in suspects:
                self._dispatch([delivery])
            self._dispatch([d for d in batch if (d.stream, d.entry_id) not in self._errors])
            found = {d.entry_id for d in batch}
            for entry in set(waiting) - found:
                await self._forget_if_deleted(stream, entry)

    async def _forget_if_deleted(self, stream: str, entry_id: str) -> None:
        """An entry deleted from its stream while pending can never be processed: ack it."""
        if not await self._client.xrange(stream, min=entry_id, max=entry_id, count=1):
            await self._client.xack(stream, self._config.group, entry_id)
            self._log.warning("acknowledged a pending entry deleted from its stream", stream=stream, entry_id=entry_id)

    def _dispatch(self, deliveries: Sequence[Delivery]) -> None:
        """Start one task for a batch; each entry counts against ``concurrency``."""
        fresh = [d for d in deliveries if (d.stream, d.entry_id) not in self._inflight]
        # An entry deleted from the stream comes back without fields (XADD needs one).
        for gone in [d for d in fresh if not d.fields]:
            self._track([gone], asyncio.create_task(self._forget_if_deleted(gone.stream, gone.entry_id)))
        batch = [d for d in fresh if d.fields]
        if batch:
            self._track(batch, asyncio.create_task(self._handle(batch)))

    def _track(self, batch: Sequence[Delivery], task: asyncio.Task[None]) -> None:
        keys = [(d.stream, d.entry_id) for d in batch]
        for key in keys:
            self._inflight[key] = task
        task.add_done_callback(lambda _t: self._done(keys))

    def _done(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._inflight.pop(key, None)
        self._slot_freed.set()

    async def _handle(self, batch: Sequence[Delivery]) -> None:
        spent = [d for d in batch if d.deliveries > self._config.max_deliveries]
        live = [d for d in batch if d.deliveries <= self._config.max_deliveries]
        try:
            for delivery in spent:
                key = (delivery.stream, delivery.entry_id)
                error = self._errors.pop(key, None) or (
                    f"delivered {delivery.deliveries - 1} times without finishing "
                    "(the worker processing it died or timed out)"
                )
                await self._dead_letter(delivery, error)
                self._metrics.dead_letters.labels(self._name).inc()
                self._log.error("dead-lettered", stream=delivery.stream, entry_id=delivery.entry_id, error=error)
            if live:
                await self._process(live)
        except asyncio.CancelledError:
            self._log.warning("processing cancelled; entries stay pending", entries=len(batch))
        except Exception as exc:
            self._log.error("could not finish entries; they stay pending", error=f"{type(exc).__name__}: {exc}")

    async def _process(self, batch: Sequence[Delivery]) -> None:
        try:
            await asyncio.wait_for(self._handler(batch), self._config.handler_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transient(exc):
                self._log.warning("redis unavailable while processing; entries stay pending",
                                  entries=len(batch), error=str(exc))
                return
            self.failures += len(batch)
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):
                error = f"processing took longer than {self._config.handler_timeout_s:g} s"
            for delivery in batch:
                key = (delivery.stream, delivery.entry_id)
                bound = self._log.bind(stream=delivery.stream, entry_id=delivery.entry_id,
                                       deliveries=delivery.deliveries, error=error)
                if delivery.deliveries >= self._config.max_deliveries:
                    bound.error("processing failed for the last time")
                    self._errors.pop(key, None)
                    await self._dead_letter(delivery, error)
                    self._metrics.dead_letters.labels(self._name).inc()
                else:
                    bound.warning("processing failed; will retry")
                    self._metrics.retries.labels(self._name).inc()
                    self._errors[key] = error
            return
        for delivery in batch:
            self._errors.pop((delivery.stream, delivery.entry_id), None)
        self.processed += len(batch)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass


def text(value: bytes | str | None) -> str:
    assert value is not None  # only called on IDs and names, which Redis always sends
    return value.decode() if isinstance(value, bytes) else value
