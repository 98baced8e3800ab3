"""``simulator run``: traffic, optional chaos, then the invariant check."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis

from lending.keys import Keys
from lending.ops import checker
from lending.redis.cluster import cluster_client, is_cluster_url
from lending.redis.connection import check_reachable, make_client, redacted
from lending.redis.consumer import FindRedis
from lending.redis.replies import is_transient
from lending.redis.tasks import cancel_and_wait
from lending.settings import Tls

from .deployment import Deployment
from .driver import Driver
from .stats import RunReport
from .workload import Workload

log = structlog.get_logger(__name__)

#: How often the memory watch samples ``INFO memory`` under ``--maxmemory``.
MEMORY_SAMPLE_S = 0.1


@dataclass(frozen=True)
class RunOptions:
    """One simulation run.

    :param pause_every_s: SIGSTOP a random worker about this often (±50 %) ...
    :param pause_s: ... for a random time in this range, then SIGCONT it.
    :param maxmemory: the private Redis's ``maxmemory`` in bytes (``noeviction``), lifted
        once the traffic is over.
    :param retry_max_ms: the workers' ``--retry-max-ms`` (``None``: theirs, 60 s). With a
        flaky shelving service an unlucky entry is retried up to ``--max-deliveries``
        times, its waits doubling up to this: the run waits ``quiescence_timeout_s`` for
        the last outcome, and a wait that outlasts it counts the request as missing.
    """

    redis_url: str | None
    namespace: str
    users: int = 200
    catalogue: int = 10_000
    rate: float = 200.0
    duration_s: float | None = None
    requests: int | None = None
    workers: int = 2
    kill_every_s: float | None = None
    restart_redis_every_s: float | None = None
    pause_every_s: float | None = None
    pause_s: tuple[float, float] = (1.5, 4.0)
    maxmemory: int | None = None
    shelving_fail_rate: float = 0.0
    shelving_latency_ms: float = 0.0
    max_books_per_user: int = 5
    storage_capacity: int = 20
    claim_idle_ms: int = 3_000
    retry_max_ms: int | None = None
    seed: int = 1
    progress: bool = False
    quiescence_timeout_s: float = 120.0
    tls: Tls = field(default_factory=Tls)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def memory_bytes(size: str) -> int:
    """A memory size as Redis reads it (``5mb`` = 5 MiB, ``5m`` = 5,000,000 bytes)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b?)\s*", size.lower())
    if match is None:
        raise ValueError(f"{size!r} is not a memory size like 5mb, 512kb or 1gb")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class MemoryWatch:
    """How long the private Redis was out of memory, from ``INFO memory`` samples."""

    full_s: float = 0.0
    first_full_at_s: float | None = None

    async def run(self, client: Redis, started: float) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(MEMORY_SAMPLE_S)
            try:
                info: dict[str, Any] = await client.info("memory")
            except Exception as exc:
                if is_transient(exc):
                    continue
                log.exception("cannot watch Redis memory")
                return
            now = time.monotonic()
            limit = int(info.get("maxmemory", 0))
            # What Redis compares with maxmemory: not the AOF and replica buffers.
            used = int(info["used_memory"]) - int(info.get("mem_not_counted_for_evict", 0))
            if limit and used > limit:
                self.full_s += now - last
                if self.first_full_at_s is None:
                    self.first_full_at_s = now - started
            last = now

    def as_json(self, maxmemory: int) -> dict[str, Any]:
        return {
            "maxmemory_bytes": maxmemory,
            "full_s": round(self.full_s, 1),
            "first_full_at_s": None if self.first_full_at_s is None else round(self.first_full_at_s, 1),
        }


def _deployment(options: RunOptions) -> Deployment:
    """The processes of a run: the workers (and Redis, unless ``redis_url``)."""
    chaos = options.kill_every_s or options.restart_redis_every_s
    return Deployment(
        options.namespace,
        redis_url=options.redis_url,
        workers=options.workers,
        worker_args=(
            "--log-level",
            "warning",
            "--log-format",
            "json",
            "--max-books-per-user",
            str(options.max_books_per_user),
            "--storage-capacity",
            str(options.storage_capacity),
            "--claim-idle-ms",
            str(options.claim_idle_ms),
            *(() if options.retry_max_ms is None else ("--retry-max-ms", str(options.retry_max_ms))),
        ),
        worker_env={
            "LENDING_SHELVING_FAIL_RATE": str(options.shelving_fail_rate),
            "LENDING_SHELVING_LATENCY_MS": str(options.shelving_latency_ms),
            **options.tls.env(),
        },
        appendfsync="always" if chaos else "everysec",
        redis_args=(
            ("--maxmemory", str(options.maxmemory), "--maxmemory-policy", "noeviction") if options.maxmemory else ()
        ),
    )


async def simulate(options: RunOptions) -> RunReport:
    """Run the traffic (and chaos) of ``options``, then check the invariants.

    However the run ends (done, failed, Ctrl-C, or SIGTERM, which ends it as Ctrl-C does)
    the chaos stops, every paused worker is continued and every process the run started
    is stopped.
    """
    if options.maxmemory and options.redis_url:
        raise ValueError("maxmemory needs the simulator's own Redis (no redis_url)")
    deployment = _deployment(options)
    client: Redis | None = None
    follow: FindRedis | None = None
    with _sigterm_cancels_the_run() as termination:
        try:
            await _in_thread_to_the_end(deployment.start)
            # With a cluster URL, talk to the master owning the namespace, and follow the
            # slot to its next master after a failover, as the workers do.
            if is_cluster_url(deployment.redis_url):
                client, follow = await cluster_client(deployment.redis_url, options.namespace, options.tls)
            else:
                client = make_client(deployment.redis_url, tls=options.tls)
            await check_reachable(client, redacted(deployment.redis_url))
            return await _run(options, deployment, client, follow)
        except asyncio.CancelledError:
            termination.unwinding = True
            if termination.requested:
                raise KeyboardInterrupt from None  # the way Ctrl-C ends a run (after the clean-up below)
            raise
        finally:
            termination.unwinding = True  # the clean-up is not to be cancelled
            deployment.resume_all()
            if client is not None:
                await client.aclose()
            await asyncio.to_thread(deployment.stop)


async def _run(options: RunOptions, deployment: Deployment, client: Redis, follow: FindRedis | None) -> RunReport:
    driver = Driver(
        client,
        Keys(options.namespace),
        Workload(users=options.users, catalogue=options.catalogue, seed=options.seed),
        rate=options.rate,
        duration_s=options.duration_s,
        requests=options.requests,
        progress=options.progress,
        on_redis_error=follow,
    )
    chaos = _start_chaos(options, deployment)
    memory = MemoryWatch() if options.maxmemory else None
    if memory is not None:
        chaos.append(asyncio.create_task(memory.run(client, time.monotonic())))
    traffic = asyncio.create_task(driver.run(drain_timeout_s=options.quiescence_timeout_s))
    sending = asyncio.create_task(driver.sending_finished.wait())
    try:
        # Chaos and the memory limit last as long as requests are being sent; then the
        # service settles, and the entries that waited for memory are processed.
        await asyncio.wait([traffic, sending], return_when=asyncio.FIRST_COMPLETED)
        await _cancel(sending, *chaos)
        if memory is not None:
            await _lift_memory_limit(client)
        report = await traffic
    finally:
        await _cancel(sending, *chaos, traffic)  # when interrupted or failed: nothing left running

    report.chaos = {
        "worker_kills": deployment.kills,
        "redis_restarts": deployment.redis_restarts,
        "worker_pauses": deployment.pauses,
    }
    if memory is not None:
        report.memory = memory.as_json(options.maxmemory or 0)
    result = await _check(client, options.namespace, options.quiescence_timeout_s, follow)
    report.check = result.as_json()
    return report


async def _check(client: Redis, namespace: str, timeout_s: float, follow: FindRedis | None) -> checker.Report:
    """The invariant check; with ``follow`` (a cluster) a failover meanwhile is ridden out:
    the client follows the slot to its new master and the check starts again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await checker.check(client, namespace, wait_quiescent_s=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            if follow is None or not is_transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("checking: Redis unavailable, trying again", error=str(exc))
            with contextlib.suppress(Exception):
                await follow()
            await asyncio.sleep(0.2)


def _start_chaos(options: RunOptions, deployment: Deployment) -> list[asyncio.Task[None]]:
    rng = random.Random(options.seed)
    chaos: list[asyncio.Task[None]] = []
    if options.kill_every_s:
        chaos.append(asyncio.create_task(_every(options.kill_every_s, deployment.kill_random_worker, rng)))
    if options.restart_redis_every_s:
        chaos.append(asyncio.create_task(_every(options.restart_redis_every_s, deployment.restart_redis)))
    if options.pause_every_s:
        # A generator of its own: adding pauses does not change which workers are killed.
        pauses = random.Random(f"pause-{options.seed}")
        chaos.append(asyncio.create_task(_pause_workers(deployment, options.pause_every_s, options.pause_s, pauses)))
    return chaos


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` (again while one lingers) and wait for them; their errors are
    not raised here (where one matters it was awaited already)."""
    await cancel_and_wait(tasks, timeout_s=10.0)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


class _Termination:
    """SIGTERM's handler: cancels ``task``, and again every second until the task starts
    its clean-up (``unwinding``): a cancellation lost inside a Redis call (see
    ``lending.redis.tasks``) must not leave the run going."""

    def __init__(self, task: asyncio.Task[Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        self.requested = False
        self.unwinding = False
        self._task = task
        self._loop = loop

    def __call__(self) -> None:
        self.requested = True
        self._cancel()

    def _cancel(self) -> None:
        if self._task is None or self.unwinding or self._task.done():
            return
        self._task.cancel()
        self._loop.call_later(1.0, self._cancel)


@contextlib.contextmanager
def _sigterm_cancels_the_run() -> Iterator[_Termination]:
    """While inside, SIGTERM cancels the current task (``requested`` says whether it did).
    (Without a handler SIGTERM would end the process at once, leaving paused workers
    stopped and every process the run started running.)"""
    loop = asyncio.get_running_loop()
    termination = _Termination(asyncio.current_task(), loop)
    try:
        loop.add_signal_handler(signal.SIGTERM, termination)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not the main thread)
        yield termination
        return
    try:
        yield termination
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _every(seconds: float, action: Callable[..., object], *args: object) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await _in_thread_to_the_end(action, *args)
        except Exception:
            log.exception("chaos action failed")


async def _in_thread_to_the_end(action: Callable[..., object], *args: object) -> None:
    """``action(*args)`` in a thread. Cancelled, it still waits for the action to finish (a
    thread cannot be stopped): a kill and restart of a worker, a Redis restart or the start
    of the deployment is never left half done, racing the deployment's stop."""
    done = asyncio.ensure_future(asyncio.to_thread(action, *args))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])
        if not done.cancelled() and done.exception() is not None:
            log.warning(
                "interrupted action failed",
                action=getattr(action, "__name__", str(action)),
                error=repr(done.exception()),
            )
        raise


async def _pause_workers(
    deployment: Deployment, every_s: float, pause_s: tuple[float, float], rng: random.Random
) -> None:
    """Every ``every_s`` (±50 %) SIGSTOP a random worker for a random time in ``pause_s``,
    then SIGCONT it. Pauses of different workers may overlap. When this task ends, every
    worker it paused is continued."""
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    try:
        while True:
            await asyncio.sleep(every_s * rng.uniform(0.5, 1.5))
            worker = deployment.pause_random_worker(rng)
            if worker is not None:
                timers.append(loop.call_later(rng.uniform(*pause_s), deployment.resume, worker))
            timers = [t for t in timers if t.when() > loop.time()]
    finally:
        for timer in timers:
            timer.cancel()
        deployment.resume_all()


async def _lift_memory_limit(client: Redis, timeout_s: float = 30.0) -> None:
    """``CONFIG SET maxmemory 0``, riding out a Redis that is briefly unavailable."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.config_set("maxmemory", 0)
            return
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
