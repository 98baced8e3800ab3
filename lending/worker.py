"""A worker process: the lending service and the shelving mock, consuming side by side."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from functools import partial

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending import __version__
from lending.domain.backoff import retry_backoff_s
from lending.domain.events import Event
from lending.errors import LimitsChanged, StaleLimits, StartRefused
from lending.interrupts import stop_signals
from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.logs import announce
from lending.metrics import Metrics
from lending.ops import monitoring, retention
from lending.redis import eviction
from lending.redis.consumer import ConsumerConfig, DeadLetterHandler, Delivery, FindRedis, Handler, StreamConsumer
from lending.redis.replies import is_out_of_memory, is_outage
from lending.redis.scripts import Scripts
from lending.redis.tasks import cancel_and_wait
from lending.redis.transaction import Transaction
from lending.redis.workers import WorkerId
from lending.service.inbox import InboxRelay
from lending.service.lending import LendingService
from lending.service.shelving_mock import ShelvingService
from lending.settings import Settings

log = structlog.get_logger(__name__)

READY_MESSAGE = "Ready to process events..."


class Worker:
    """Runs the consumers of one worker id until a signal (or ``handle_sig``) stops it.

    :param settings: the worker's configuration.
    :param client: a connected Redis client; the worker does not close it.
    :param handle_signals: install SIGINT/SIGTERM handlers (off for tests and embedding).
    :param on_redis_error: called after transient Redis errors to find Redis again (a
        cluster namespace follows its slot); returns ``True`` when Redis is now somewhere
        else, and then everything that waits for Redis resumes at once.
    """

    def __init__(
        self,
        settings: Settings,
        client: Redis,
        *,
        handle_signals: bool = True,
        on_redis_error: FindRedis | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._client = client
        self._handle_signals = handle_signals
        self._find_redis = on_redis_error
        self._renew_now = asyncio.Event()  # the heartbeat renews at once (Redis moved)
        #: Set once the id is claimed, the scripts loaded and the groups made ("Ready").
        self.started = asyncio.Event()
        self._scripts = Scripts()
        host, pid = socket.gethostname(), os.getpid()
        token = f"{host}:{pid}:{uuid.uuid4().hex[:8]}"
        info: dict[str, str | int] = {
            "host": host,
            "pid": pid,
            "version": __version__,
            "started_ms": int(time.time() * 1000),
        }
        self.worker_id = WorkerId(
            client, self._scripts, self.keys, settings.worker_id, token, settings.worker_ttl_ms, info
        )
        self.shelving = ShelvingService(
            client,
            self.keys,
            self._scripts,
            fail_rate=settings.shelving_fail_rate,
            latency_ms=settings.shelving_latency_ms,
            dead_letters_maxlen=settings.dead_letters_maxlen,
        )
        self.metrics = Metrics()
        self.lending = LendingService(client, settings, self._scripts, self.shelving, self.metrics)
        self.inbox = InboxRelay(
            client,
            self.keys,
            self._scripts,
            max_books=settings.max_books_per_request,
            on_redis_error=self._follow_redis if on_redis_error else None,
        )

        def consumer(
            group: str, streams: list[str], handler: Handler, dead_letter: DeadLetterHandler
        ) -> StreamConsumer:
            config = ConsumerConfig(
                group=group,
                consumer=settings.worker_id,
                concurrency=settings.concurrency,
                max_batches=settings.max_batches,
                batch_patience_s=settings.batch_patience_ms / 1000,
                read_count=settings.read_count,
                claim_idle_ms=settings.claim_idle_ms,
                retry_base_ms=settings.retry_base_ms,
                retry_max_ms=settings.retry_max_ms,
                max_deliveries=settings.max_deliveries,
                handler_timeout_s=settings.request_timeout_s,
            )
            return StreamConsumer(
                client,
                streams,
                config,
                handler,
                dead_letter,
                name=group,
                scripts=self._scripts,
                metrics=self.metrics,
                on_redis_error=self._follow_redis if on_redis_error else None,
                on_reconnect=self._check_eviction,
            )

        self.consumers = [
            consumer(LENDING_GROUP, self.keys.request_streams, self._handle_requests, self.lending.dead_letter),
            consumer(
                SHELVING_GROUP, [self.keys.shelving_returns], self.shelving.release_all, self.shelving.dead_letter
            ),
        ]
        self._stop = asyncio.Event()
        self._signals = 0
        self.lost_id = False
        self.refused_eviction = False
        self._eviction_reported: eviction.Verdict | None = None
        self._loops: list[asyncio.Task[None]] = []  # the consumers and the periodic tasks

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code.

        :raises MetricsUnavailable: the metrics port is taken (checked first: the worker
            id is claimed only once the port is ours).
        :raises EvictionRefused: Redis may evict any key (``allkeys-*``) and
            ``allow_eviction_data_loss`` is off.
        """
        server = None
        if self.settings.metrics_port is not None:
            server = await monitoring.serve(
                self.metrics, self.settings.metrics_host, self.settings.metrics_port, live=self.live, ready=self.healthy
            )
            host, port = server.sockets[0].getsockname()[:2]
            log.info("serving /metrics, /livez and /readyz", host=host, port=port)
        try:
            return await self._run(metrics=server is not None)
        finally:
            if server is not None:
                server.close()
                await server.wait_closed()

    async def _run(self, *, metrics: bool) -> int:
        await self._check_eviction(starting=True)
        for warning in self.settings.warnings():
            log.warning(warning)
        await self._start_up()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in stop_signals():
                loop.add_signal_handler(sig, partial(self.handle_sig, sig))
        tasks = [asyncio.create_task(consumer.run()) for consumer in self.consumers]
        heartbeat = asyncio.create_task(self._heartbeat())
        trimming = asyncio.create_task(self._trim_periodically())
        reconciling = asyncio.create_task(self._reconcile_periodically())
        relaying = asyncio.create_task(self.inbox.run())
        refreshing = asyncio.create_task(self._refresh_metrics()) if metrics else None
        self._loops = [t for t in (*tasks, heartbeat, trimming, reconciling, relaying, refreshing) if t is not None]
        self.started.set()
        announce(READY_MESSAGE)
        log.info("worker started", worker_id=self.settings.worker_id, namespace=self.settings.namespace)
        try:
            await self._stop.wait()
        finally:
            for consumer in self.consumers:
                consumer.stop()
            await asyncio.wait(tasks, timeout=2.0)
            drained = all(await asyncio.gather(*(c.drain(self.settings.shutdown_grace_s) for c in self.consumers)))
            await cancel_and_wait(self._loops)
            await self._release_id()
            counters = self.counters()
            log.info("worker stopped", processed=counters["processed"], failures=counters["failed"], drained=drained)
        return 1 if self.lost_id or self.refused_eviction else 0

    async def _start_up(self) -> None:
        """Check that the commit's transaction may run (``Transaction.probe``), claim the
        id, load the scripts, create the groups (before "Ready": XPENDING and XINFO work
        from then on). While Redis is out of memory this waits, as the consumers do,
        rather than fail."""
        claimed = False
        for attempt in range(1, 1_000_000):
            try:
                async with Transaction(self._client) as tx:  # before the claim: a refusal stops us
                    await tx.probe(self.keys.config)
                await self.worker_id.claim(self.settings.limits, force=self.settings.force)
                claimed = True
                await self._scripts.load(self._client)
                for consumer in self.consumers:
                    await consumer.ensure_groups()
                return
            except Exception as exc:
                if not is_out_of_memory(exc):
                    if claimed:  # not held for a worker that never ran
                        await self._release_id()
                    if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
                        raise StartRefused(
                            f"a key of namespace {self.settings.namespace!r} holds another type than the service "
                            f"keeps in it ({exc}); python -m lending check names it"
                        ) from exc
                    raise
                if attempt == 1:
                    log.warning("Redis is out of memory: waiting for it to start", error=str(exc))
                await asyncio.sleep(retry_backoff_s(attempt, base_s=0.1))

    def handle_sig(self, signum: int) -> None:
        """First signal: stop reading and finish in-flight work. Second: exit at once.

        The stop comes before the log line: shutdown must not depend on logging."""
        self._signals += 1
        if self._signals > 1:
            try:
                log.warning("second signal: exiting now; unfinished entries stay pending", signal=signum)
            finally:
                os._exit(128 + signum)
        self._stop.set()
        log.info(
            "stopping: finishing in-flight requests",
            signal=signal.Signals(signum).name,
            inflight=sum(c.inflight for c in self.consumers),
        )

    def stop(self) -> None:
        self._stop.set()

    async def _check_eviction(self, *, starting: bool = False) -> None:
        """Refuse a Redis that may evict any key: at start by raising ``EvictionRefused``,
        later (after a reconnect, perhaps to another server) by stopping with exit code 1.
        A risky or unknown policy is logged once, not again on every reconnect."""
        policy = await eviction.read_policy(self._client)
        verdict = eviction.judge(policy, self.settings.allow_eviction_data_loss)
        if verdict.level == "refuse":
            if starting:
                raise eviction.EvictionRefused(policy, verdict.message)
            if not self._stop.is_set():
                self.refused_eviction = True
                self._stop.set()
                log.error(verdict.message, policy=policy, action="stopping")
        elif verdict.level == "warn" and verdict != self._eviction_reported:
            log.warning(verdict.message, policy=policy)
        self._eviction_reported = verdict

    async def _follow_redis(self) -> bool:
        """Find Redis again (``on_redis_error``); when it is somewhere new, the consumers and
        the heartbeat stop waiting for it."""
        assert self._find_redis is not None  # only handed to the consumers when given
        moved = await self._find_redis()
        if moved:
            for consumer in self.consumers:
                consumer.redis_moved()
            self._renew_now.set()
        return moved

    async def _handle_requests(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        try:
            return await self.lending.handle(deliveries)
        except StaleLimits:
            # The heartbeat tells at once whether to stop or to publish these limits again.
            self._renew_now.set()
            raise

    async def _heartbeat(self) -> None:
        interval = self.settings.worker_ttl_ms / 3000.0
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # comes as the event is set (a stop while the worker follows a new master).
            with suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._renew_now.wait()
            self._renew_now.clear()
            try:
                held = await self.worker_id.renew(self.counters())
            except LimitsChanged as exc:
                log.error(
                    f"{exc}; stopping",
                    worker_id=self.settings.worker_id,
                    limit=exc.field,
                    theirs=exc.theirs,
                    mine=exc.mine,
                )
                self.lost_id = True
                self._stop.set()
                return
            except Exception as exc:
                if not is_outage(exc):
                    log.exception("heartbeat failed")
                continue
            if not held:
                log.error(
                    "another process took over this worker id (--force); stopping", worker_id=self.settings.worker_id
                )
                self.lost_id = True
                self._stop.set()
                return

    def counters(self) -> dict[str, int]:
        """Entries processed, and failed attempts, since start (published with the heartbeat)."""
        return {
            "processed": sum(c.processed for c in self.consumers),
            "failed": sum(c.failures for c in self.consumers),
        }

    def live(self) -> bool:
        """The process and its loops are alive: what ``/livez`` reports.

        A Redis outage does not fail it (the loops ride it out, and a restart would not
        bring Redis back); a loop that ended, or a consumer stuck in one round of its read
        loop for ``liveness_timeout_s``, does. (A blocked event loop cannot answer at all.)
        """
        if self._stop.is_set():
            return True  # stopping on purpose: the loops end as they should
        if any(task.done() for task in self._loops):
            return False
        now = time.monotonic()
        return all(c.stalled_s(now) < self.settings.liveness_timeout_s for c in self.consumers)

    def healthy(self) -> bool:
        """Ready: connected and consuming. What ``/readyz`` (and ``/healthz``) report."""
        return not self._stop.is_set() and all(c.connected for c in self.consumers)

    async def _refresh_metrics(self) -> None:
        while True:
            try:
                await monitoring.refresh(self.metrics, self._client, self.keys)
            except Exception as exc:
                if is_outage(exc):
                    self.metrics.redis_up.set(0)
                else:
                    log.exception("refreshing metrics failed")
            else:
                self.metrics.redis_up.set(1)
                self.metrics.gauges_read.set_to_current_time()
            await asyncio.sleep(2.0)

    async def _trim_periodically(self) -> None:
        """Every trim interval: trim the streams, then remove dead consumers that hold nothing."""
        while True:
            await asyncio.sleep(self.settings.trim_interval_s)
            await self._trim()
            await self._forget_dead_consumers()

    async def _trim(self) -> None:
        try:
            removed = await retention.trim(self._client, self.keys, self.settings.events_maxlen)
        except Exception as exc:
            if not is_outage(exc):
                log.exception("trimming streams failed")
            return
        if any(removed.values()):
            log.debug("trimmed streams", **removed)

    async def _forget_dead_consumers(self) -> None:
        try:
            forgotten = await retention.forget_dead_consumers(self._client, self._scripts.forget_consumers, self.keys)
        except Exception as exc:
            if not is_outage(exc):
                log.exception("removing dead consumers failed")
            return
        for stream, consumers in forgotten.items():
            log.info("removed dead consumers that held nothing", stream=stream, consumers=consumers)

    async def _reconcile_periodically(self) -> None:
        """Give back the shelving grants of finished requests that nobody settled (a
        worker that died or stalled between a shelving call and its commit)."""
        cursor = 0
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_ms / 1000.0)
            try:
                cursor, _ = await self.lending.reconcile_ledger(cursor)
            except Exception as exc:
                cursor = 0
                if not is_outage(exc):
                    log.exception("reconciling shelving grants failed")

    async def _release_id(self) -> None:
        try:
            await self.worker_id.release()
        except Exception as exc:
            log.warning("could not release the worker id; it expires by itself", error=str(exc))
