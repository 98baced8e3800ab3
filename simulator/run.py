"""``simulator run``: traffic, optional chaos, then the invariant check."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass

import structlog

from lending import checker
from lending.cluster import namespace_url
from lending.connection import Tls, make_client
from lending.keys import Keys

from .deployment import Deployment
from .driver import Driver
from .stats import RunReport
from .workload import Workload

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunOptions:
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
    shelving_fail_rate: float = 0.0
    shelving_latency_ms: float = 0.0
    max_books_per_user: int = 5
    storage_capacity: int = 20
    claim_idle_ms: int = 3_000
    seed: int = 1
    progress: bool = False
    quiescence_timeout_s: float = 120.0
    tls: Tls = Tls()


async def simulate(options: RunOptions) -> RunReport:
    chaos = options.kill_every_s or options.restart_redis_every_s
    deployment = Deployment(
        options.namespace,
        redis_url=options.redis_url,
        workers=options.workers,
        worker_args=(
            "--log-level", "warning", "--log-format", "json",
            "--max-books-per-user", str(options.max_books_per_user),
            "--storage-capacity", str(options.storage_capacity),
            "--claim-idle-ms", str(options.claim_idle_ms),
        ),
        worker_env={
            "LENDING_SHELVING_FAIL_RATE": str(options.shelving_fail_rate),
            "LENDING_SHELVING_LATENCY_MS": str(options.shelving_latency_ms),
            **options.tls.env(),
        },
        appendfsync="always" if chaos else "everysec",
    )
    await asyncio.to_thread(deployment.start)
    # With a cluster URL, talk to the master owning the namespace, as the workers do.
    client = make_client(await namespace_url(deployment.redis_url, options.namespace, options.tls), tls=options.tls)
    rng = random.Random(options.seed)
    try:
        driver = Driver(
            client,
            Keys(options.namespace),
            Workload(users=options.users, catalogue=options.catalogue, seed=options.seed),
            rate=options.rate,
            duration_s=options.duration_s,
            requests=options.requests,
            progress=options.progress,
        )
        chaos_tasks = []
        if options.kill_every_s:
            chaos_tasks.append(asyncio.create_task(_every(options.kill_every_s, deployment.kill_random_worker, rng)))
        if options.restart_redis_every_s:
            chaos_tasks.append(asyncio.create_task(_every(options.restart_redis_every_s, deployment.restart_redis)))
        traffic = asyncio.create_task(driver.run(drain_timeout_s=options.quiescence_timeout_s))
        if chaos_tasks:
            # Chaos lasts as long as requests are being sent, then the service settles.
            await driver.sending_finished.wait()
            for task in chaos_tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        report = await traffic
        report.chaos = {"worker_kills": deployment.kills, "redis_restarts": deployment.redis_restarts}
        result = await checker.check(
            client, options.namespace, options.max_books_per_user, options.storage_capacity,
            wait_quiescent_s=options.quiescence_timeout_s,
        )
        report.check = result.as_json()
        return report
    finally:
        await client.aclose()
        await asyncio.to_thread(deployment.stop)


async def _every(seconds: float, action: object, *args: object) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(action, *args)  # type: ignore[arg-type]
        except Exception:
            log.exception("chaos action failed")
