"""Consuming Redis Streams with a consumer group: reading, retrying, keeping, taking over.

A ``StreamConsumer`` reads new entries of its streams in batches with XREADGROUP and
hands each batch to a handler, a bounded number of entries at a time. Entries that are
not finished stay pending and come back:

- an entry whose processing failed is retried after a delay that doubles with each
  failure (``retry_base_ms`` up to ``retry_max_ms``, jittered). A failure of Redis
  itself (connection lost, loading, out of memory, a refused write) is not the entry's
  fault: it is retried without counting a delivery, as is an entry the handler
  ``Deferred`` (e.g. a commit under stale limits). Any other failure counts one, and
  the entry is dead-lettered at its ``max_deliveries``-th;
- while this consumer holds an entry (in flight or waiting for its retry) it renews the
  entry's idle time every third of ``claim_idle_ms``, so no other consumer takes over
  the work of a live one;
- entries pending on another consumer for ``claim_idle_ms`` are taken over (that
  consumer died or stalled), and entries pending on this consumer from an earlier run
  are resumed; both count a delivery;
- an entry deleted from its stream while pending is dead-lettered, and stays pending
  until then (``autoclaim.lua``, ``claim.lua``, ``renew.lua``: Redis 7's XCLAIM and
  XAUTOCLAIM would drop it from the pending list, and its request would never get an
  outcome);
- an entry delivered more than ``max_deliveries`` times goes to the dead-letter
  handler instead of the handler.

When Redis is found somewhere new (a cluster slot's new master, see ``redis_moved``),
whatever waits for Redis resumes at once: the read loop, and the entries that failed
for Redis's sake.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from structlog.contextvars import bound_contextvars

from lending.domain.backoff import jittered, retry_backoff_s
from lending.domain.streamids import id_key
from lending.errors import Deferred, KeyOfWrongType
from lending.metrics import Metrics
from lending.redis.inflight import InFlight
from lending.redis.replies import (
    Entries,
    StreamsReply,
    is_outage,
    is_refusal,
    is_transient,
    reply_text,
    text,
)
from lending.redis.scripts import Scripts
from lending.redis.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

CLAIM_PAGE = 100
#: The most entry ids one script call takes: a script passes them on to one command with
#: Lua's unpack(), which fails at about 8,000.
SCRIPT_IDS = 1000
#: Why an entry deleted from its stream while pending is dead-lettered.
DELETED = "the entry was deleted from its stream before it was processed"


@dataclass(frozen=True)
class Delivery:
    """One delivery of a stream entry to this consumer."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


# Processes a batch of deliveries; raising fails every delivery of the batch.
Handler = Callable[[Sequence[Delivery]], Awaitable[Any]]
DeadLetterHandler = Callable[[Delivery, str], Awaitable[Any]]
# Finds Redis again after a transient error (a cluster slot's current master); True
# when it is now somewhere else.
FindRedis = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class ConsumerConfig:
    group: str
    consumer: str
    concurrency: int
    read_count: int
    claim_idle_ms: int
    retry_base_ms: int
    retry_max_ms: int
    max_deliveries: int
    handler_timeout_s: float
    max_batches: int | None = None  # None: as many as concurrency lets
    batch_patience_s: float = 0.05
    block_ms: int = 500


async def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` at ID 0 (so queued entries are read), if missing.

    Looked up first: XGROUP CREATE is refused while Redis is out of memory, even for a
    group that exists, and a worker must go on consuming then."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        groups = []
    if any(text(g["name"]) == group for g in groups):
        return
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise KeyOfWrongType(stream, text(await client.type(stream)), "stream") from exc
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class Retry:
    """A failed entry waiting for its next attempt."""

    failures: int
    due: float  # time.monotonic() of the next attempt
    counts: bool  # the next attempt counts a delivery
    error: str


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
        scripts: Scripts,
        metrics: Metrics | None = None,
        on_redis_error: FindRedis | None = None,
        rng: random.Random | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._streams = list(streams)
        self._config = config
        self._handler = handler
        self._dead_letter = dead_letter
        self._scripts = scripts
        self._log = log.bind(consumer=name)
        self._name = name
        self._metrics = metrics or Metrics()
        self._metrics.add_consumer(name)
        self._on_redis_error = on_redis_error
        self._rng = rng or random.Random()
        self._on_reconnect = on_reconnect  # e.g. check the (perhaps new) server again
        self._inflight: InFlight[tuple[str, str]] = InFlight(
            config.concurrency, max_tasks=config.max_batches, patience_s=config.batch_patience_s
        )
        self._retries: dict[tuple[str, str], Retry] = {}
        self._claim_cursors: dict[str, str | bytes] = {}  # stream -> where the next take-over page starts
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # stopping, or Redis found somewhere new: stop waiting
        self._moved_at = float("-inf")
        self._next_claim = 0.0
        self._next_resume = 0.0
        self._resume_all = True  # at start and after a reconnect: every own entry at once
        self.processed = 0
        self.failures = 0
        self.connected = False
        self._round_started: float | None = None  # time.monotonic() of the read loop's latest round

    def stalled_s(self, now: float) -> float:
        """How long the read loop has been in its current round (0 before it runs).

        A round takes at most a few seconds, even while Redis is away (a blocking read,
        a backoff, a command's socket timeout); a round that lasts far longer is stuck."""
        return 0.0 if self._round_started is None else now - self._round_started

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        """Stop reading new entries; in-flight ones finish (see ``drain``)."""
        self._stopping.set()
        self._wake.set()

    def redis_moved(self) -> None:
        """Redis is now somewhere else (a cluster slot's new master): retry at once what
        waits for it. The read loop stops backing off; entries that failed for Redis's
        sake are due now, and so are those of batches under way that fail later on."""
        self._moved_at = time.monotonic()
        for retry in self._retries.values():
            if not retry.counts:
                retry.due = min(retry.due, self._moved_at)
        self._wake.set()

    async def run(self) -> None:
        """Read and dispatch until stopped, riding out lost connections."""
        renewing = asyncio.create_task(self._renew_forever())
        try:
            await self._consume()
        finally:
            await cancel_and_wait([renewing])  # again while it lingers: a lost cancellation

    async def _consume(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._round_started = time.monotonic()
            try:
                if not self.connected:
                    await self.ensure_groups()
                    self.connected = True
                    if failures:
                        self._metrics.reconnects.labels(self._name).inc()
                        if self._on_reconnect is not None:
                            await self._on_reconnect()
                    self._resume_all = True
                await self._tick()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = jittered(retry_backoff_s(failures, base_s=0.1), self._rng)
                if not is_outage(exc):
                    self._log.exception("consumer loop error, retrying", retry_in_s=round(delay, 2))
                elif self.connected or failures == 1:
                    self._log.warning("redis unavailable, retrying", error=str(exc), retry_in_s=round(delay, 2))
                self.connected = False
                if self._on_redis_error is not None and is_transient(exc):
                    try:
                        moved = await self._on_redis_error()
                    except Exception as hook_exc:
                        self._log.warning("could not find Redis again yet", error=str(hook_exc))
                    else:
                        # Redis answered: try again soon rather than back off; at once
                        # if it is somewhere new.
                        delay = 0.0 if moved else min(delay, 0.05)
                        if moved:
                            self.redis_moved()
                await self._sleep(delay)

    async def ensure_groups(self) -> None:
        """Create the consumer group on each stream if missing (also after a Redis restart
        that lost it)."""
        for stream in self._streams:
            await ensure_group(self._client, stream, self._config.group)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for in-flight entries; ``True`` when all finished."""
        return await self._inflight.drain(timeout_s)

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_claim:
            await self._claim_abandoned()
            self._next_claim = now + min(max(self._config.claim_idle_ms / 2000.0, 0.1), 5.0)
        if now >= self._next_resume or self._due_retry(now):
            await self._resume_own()
            self._next_resume = now + max(self._config.retry_base_ms / 1000.0, 0.1)
        if await self._wait_for_slot():
            await self._read_new()

    def _due_retry(self, now: float) -> bool:
        return any(r.due <= now for key, r in self._retries.items() if key not in self._inflight)

    async def _wait_for_slot(self) -> bool:
        # XREADGROUP's COUNT applies to each stream: leave room for one entry of each.
        need = min(len(self._streams), self._config.concurrency)
        room = await self._inflight.wait_for_room(need, self._config.block_ms / 1000.0)
        return room and not self._stopping.is_set()

    async def _read_new(self) -> None:
        free = self._inflight.free
        # Wake up for the next retry rather than sleep the whole block time.
        due = min((r.due for r in self._retries.values()), default=None)
        block_ms = self._config.block_ms
        if due is not None:
            block_ms = max(1, min(block_ms, int((due - time.monotonic()) * 1000)))
        reply = await self._client.xreadgroup(
            self._config.group,
            self._config.consumer,
            dict.fromkeys(self._streams, ">"),
            count=max(1, min(self._config.read_count, free) // len(self._streams)),
            block=block_ms,
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
            # Bounded: at most 10 pages per stream and tick; the next tick goes on from
            # there (deleted entries stay pending, and a long run of them would otherwise
            # keep it from the entries behind them), then starts over.
            cursor = self._claim_cursors.get(stream, "-")
            for _ in range(10):
                ids, deleted, cursor = await self._scripts.autoclaim(
                    self._client,
                    [stream],
                    [self._config.group, self._config.consumer, self._config.claim_idle_ms, CLAIM_PAGE, cursor],
                )
                self._finish_deleted(stream, deleted)
                claimed += len(ids)
                if not cursor:
                    break
            self._claim_cursors[stream] = cursor or "-"
        if claimed:
            self._metrics.reclaims.labels(self._name).inc(claimed)
            self._log.info("took over abandoned entries", count=claimed)
            # They are ours now: process them at once rather than after retry_base_ms.
            self._resume_all = True
            await self._resume_own()

    def _finish_deleted(self, stream: str, ids: Sequence[bytes]) -> None:
        """Dead-letter entries deleted from ``stream`` while pending, as many as there is
        room for. They stay pending (on whichever consumer held them) until finished: the
        next take-over finds the rest, as it would should this worker die first."""
        gone = [Delivery(stream, text(entry_id), {}, 1) for entry_id in ids]
        for delivery in [d for d in gone if (stream, d.entry_id) not in self._inflight][: max(self._inflight.free, 0)]:
            self._inflight.start([(stream, delivery.entry_id)], self._finish_if_deleted(delivery, own=False))

    async def _resume_own(self) -> None:
        """Deliver again this consumer's pending entries that are not being processed:
        failed ones whose retry is due, and ones this process does not know (left by an
        earlier run, taken over, or whose delivery was lost with a connection)."""
        fresh_ms = 0 if self._resume_all else self._config.retry_base_ms
        self._resume_all = False
        now = time.monotonic()
        for stream in self._streams:
            free = self._inflight.free
            if free <= 0:
                return
            held = sum(1 for s, _ in (*self._inflight.items(), *self._retries) if s == stream)
            pending: list[dict[str, Any]] = await self._client.xpending_range(
                stream,
                self._config.group,
                min="-",
                max="+",
                count=free + held,
                consumername=self._config.consumer,
            )
            counted: dict[str, int] = {}  # resumed with a delivery counted (XCLAIM)
            kept: dict[str, int] = {}  # resumed as they are (Redis failed, not them)
            for p in pending:
                entry_id, delivered = text(p["message_id"]), int(p["times_delivered"])
                key = (stream, entry_id)
                retry = self._retries.get(key)
                if key in self._inflight or (retry and retry.due > now):
                    continue
                if retry is None and int(p["time_since_delivered"]) < fresh_ms:
                    continue
                (counted if retry is None or retry.counts else kept)[entry_id] = delivered
                if len(counted) + len(kept) >= free:
                    break
            batch = await self._fetch(stream, counted, kept)
            # An entry that failed before is retried on its own, so that one poison entry
            # cannot fail the entries it happened to be batched with.
            suspects = [d for d in batch if (d.stream, d.entry_id) in self._retries and d.entry_id in counted]
            for delivery in suspects:
                self._dispatch([delivery])
            self._dispatch([d for d in batch if d not in suspects])

    async def _fetch(self, stream: str, counted: dict[str, int], kept: dict[str, int]) -> list[Delivery]:
        """The entries' fields: claimed again for ``counted`` (it adds a delivery), read
        with XRANGE for ``kept``. An entry deleted from the stream meanwhile comes back
        without fields, to be dead-lettered (it is still pending)."""
        batch: list[Delivery] = []
        for ids in in_pieces(list(counted)):
            entries, deleted = await self._scripts.claim(
                self._client, [stream], [self._config.group, self._config.consumer, *ids]
            )
            batch += [
                Delivery(stream, text(entry_id), _pairs(fields), counted[text(entry_id)] + 1)
                for entry_id, fields in entries
            ]
            batch += [Delivery(stream, text(entry_id), {}, counted[text(entry_id)] + 1) for entry_id in deleted]
        if kept:
            async with self._client.pipeline(transaction=False) as pipe:
                for entry_id in kept:
                    pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
                replies = await pipe.execute()
            found = {
                text(entry_id): fields or {}
                for reply in replies
                for entry_id, fields in cast(Entries, reply)
                if entry_id is not None
            }
            batch += [Delivery(stream, entry_id, found.get(entry_id, {}), n) for entry_id, n in kept.items()]
        return batch

    async def _finish_if_deleted(self, gone: Delivery, *, own: bool = True) -> None:
        """An entry deleted from its stream while pending can never be processed: it is
        dead-lettered (a ``failed`` outcome, and whatever its request holds given back;
        an acknowledgement alone kept a lend's reserved books from storage for ever).
        Another consumer's (``own=False``) is not retried here should that fail: it is
        not ours to resume, and the next take-over finds it again."""
        self._retries.pop((gone.stream, gone.entry_id), None)
        self._log.warning("a pending entry was deleted from its stream", stream=gone.stream, entry_id=gone.entry_id)
        await self._give_up(gone, DELETED, retry=own)

    async def _renew_forever(self) -> None:
        """Every third of ``claim_idle_ms``: renew the entries this consumer holds."""
        interval = max(self._config.claim_idle_ms / 3000.0, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except Exception as exc:
                if not is_outage(exc):
                    self._log.exception("renewing held entries failed")

    async def renew(self) -> int:
        """Reset the idle time of the entries this consumer holds (in flight or waiting
        for a retry), if still its own; returns how many were renewed."""
        renewed = 0
        held = {*self._inflight.items(), *self._retries}
        for stream in self._streams:
            for ids in in_pieces(sorted((entry_id for s, entry_id in held if s == stream), key=id_key)):
                args = [self._config.group, self._config.consumer, ids[0], ids[-1], *ids]
                renewed += int(await self._scripts.renew(self._client, [stream], args))
        return renewed

    def _dispatch(self, deliveries: Sequence[Delivery]) -> None:
        """Start one task for a batch; each entry takes a place of ``concurrency``."""
        fresh = [d for d in deliveries if (d.stream, d.entry_id) not in self._inflight]
        # An entry deleted from the stream comes back without fields (XADD needs one).
        for gone in [d for d in fresh if not d.fields]:
            self._inflight.start([(gone.stream, gone.entry_id)], self._finish_if_deleted(gone))
        batch = [d for d in fresh if d.fields]
        if batch:
            self._inflight.start([(d.stream, d.entry_id) for d in batch], self._handle(batch))

    async def _handle(self, batch: Sequence[Delivery]) -> None:
        spent = [d for d in batch if d.deliveries > self._config.max_deliveries]
        live = [d for d in batch if d.deliveries <= self._config.max_deliveries]
        try:
            for delivery in spent:
                retry = self._retries.get((delivery.stream, delivery.entry_id))
                error = (
                    retry.error
                    if retry
                    else (
                        f"delivered {delivery.deliveries - 1} times without finishing "
                        "(the worker processing it died or timed out)"
                    )
                )
                await self._give_up(delivery, error)
            if live:
                await self._process(live)
        except asyncio.CancelledError:
            self._log.warning("processing cancelled; entries stay pending", entries=len(batch))

    async def _give_up(self, delivery: Delivery, error: str, *, retry: bool = True) -> None:
        """Dead-letter ``delivery``; if even that fails, it stays pending (and is retried
        unless ``retry`` is false)."""
        key = (delivery.stream, delivery.entry_id)
        with bound_contextvars(stream=delivery.stream, entry_id=delivery.entry_id):
            try:
                await self._dead_letter(delivery, error)
            except Exception as exc:
                self._log.error(
                    "could not dead-letter the entry; it stays pending", error=f"{type(exc).__name__}: {exc}"
                )
                if retry:
                    self._schedule(delivery, error, counts=False)
                return
            self._retries.pop(key, None)
            self._metrics.dead_letters.labels(self._name).inc()
            self._log.error("dead-lettered", error=error)

    async def _process(self, batch: Sequence[Delivery]) -> None:
        started = time.monotonic()
        deadline = asyncio.timeout(self._config.handler_timeout_s)
        try:
            async with deadline:
                await self._handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                await self._fail(batch, f"processing took longer than {self._config.handler_timeout_s:g} s", exc)
            elif is_refusal(exc):
                # Loud: an operator must act (free memory, fix an ACL, move a full stream).
                self._log.error(
                    "Redis refused the commit; entries wait, uncharged",
                    entries=len(batch),
                    error=reply_text(exc) if isinstance(exc, ResponseError) else str(exc),
                )
                for delivery in batch:
                    self._schedule(delivery, f"{type(exc).__name__}: {exc}", counts=False, started=started)
            elif isinstance(exc, Deferred):
                self._log.warning("entries deferred; they stay pending, uncharged", entries=len(batch), error=str(exc))
                for delivery in batch:
                    self._schedule(delivery, f"{type(exc).__name__}: {exc}", counts=False, started=started)
            elif is_outage(exc):
                self._log.warning(
                    "redis unavailable while processing; entries stay pending", entries=len(batch), error=str(exc)
                )
                for delivery in batch:
                    self._schedule(delivery, f"{type(exc).__name__}: {exc}", counts=False, started=started)
            else:
                await self._fail(batch, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, exc)
            return
        for delivery in batch:
            self._retries.pop((delivery.stream, delivery.entry_id), None)
        self.processed += len(batch)

    async def _fail(self, batch: Sequence[Delivery], error: str, exc: BaseException) -> None:
        """A failure of the entries themselves: each counts a delivery."""
        self.failures += len(batch)
        # The traceback once per entry (its first failure), and once per batch: the same
        # for every entry of it, and for every later attempt of a poison entry.
        first = any((d.stream, d.entry_id) not in self._retries for d in batch)
        self._log.error(
            "processing failed", entries=[d.entry_id for d in batch], error=error, exc_info=exc if first else None
        )
        for delivery in batch:
            with bound_contextvars(stream=delivery.stream, entry_id=delivery.entry_id, deliveries=delivery.deliveries):
                if delivery.deliveries >= self._config.max_deliveries:
                    self._log.error("processing failed for the last time")
                    await self._give_up(delivery, error)
                else:
                    retry = self._schedule(delivery, error, counts=True)
                    self._metrics.retries.labels(self._name).inc()
                    self._log.warning("will retry", retry_in_s=round(retry.due - time.monotonic(), 2))

    def _schedule(self, delivery: Delivery, error: str, *, counts: bool, started: float | None = None) -> Retry:
        """Retry ``delivery`` after the backoff of its failures; at once if the attempt failed
        for Redis's sake (not ``counts``) and ``started`` before Redis moved."""
        key = (delivery.stream, delivery.entry_id)
        failures = self._retries[key].failures + 1 if key in self._retries else 1
        delay_s = retry_backoff_s(failures, self._config.retry_base_ms / 1000.0, self._config.retry_max_ms / 1000.0)
        due = time.monotonic() + jittered(delay_s, self._rng)
        if not counts and started is not None and started <= self._moved_at:
            due = self._moved_at
        retry = Retry(failures, due, counts, error)
        self._retries[key] = retry
        return retry

    async def _sleep(self, seconds: float) -> None:
        """Sleep until stopped, Redis moved (``redis_moved``), or ``seconds`` passed."""
        with suppress(TimeoutError):
            # Not wait_for: on 3.11 it loses a cancellation that comes as the event is set.
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        if not self._stopping.is_set():
            self._wake.clear()


def _pairs(fields: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields from a script's reply (a flat list of field, value, ...)."""
    return dict(zip(fields[::2], fields[1::2], strict=True))


def in_pieces(ids: list[str]) -> list[list[str]]:
    """``ids`` in pieces of at most ``SCRIPT_IDS``."""
    return [ids[k : k + SCRIPT_IDS] for k in range(0, len(ids), SCRIPT_IDS)]
