"""Running a worker: find or start Redis, run the worker, clean up."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from lending.redis.cluster import cluster_client, is_cluster_url
from lending.redis.connection import check_reachable, make_client
from lending.redis.embedded import find_or_start
from lending.settings import Settings
from lending.worker import Worker

log = structlog.get_logger(__name__)
T = TypeVar("T")


def run_sync(settings: Settings) -> int:
    """Run a worker to completion on a new event loop (uvloop's when wanted and present)."""
    return run_fast(run(settings), use_uvloop=settings.uvloop)


def run_fast(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` on uvloop (when wanted and installed), with the collector tuned."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            log.warning("uvloop is not installed: using asyncio's event loop")
    # Everything imported so far lives as long as the process: keep it out of the
    # collector's way, and collect less often (batches allocate many short-lived
    # objects; each young-generation pass showed up as tail latency).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def run(settings: Settings) -> int:
    """Run one worker until it is stopped; returns the exit code.

    With no Redis configured, the default URL is used if a Redis answers there; else the
    embedded redis-server is started on 127.0.0.1 with its data in ``settings.data_dir``
    (or shared, or adopted: see ``embedded.find_or_start``). The worker that owns it
    stops it last, once it has drained its work and released its id.
    """
    if settings.redis_url is not None:
        return await _serve(settings, settings.redis_url)
    # Called here, not in a thread: a Ctrl-C during the start then cancels this task
    # only once it is complete, and the ``finally`` stops what was started.
    default = find_or_start(settings.effective_redis_url, settings.data_dir, settings.embedded_port)
    try:
        return await _serve(settings, default.url)
    finally:
        default.release()


async def _serve(settings: Settings, url: str) -> int:
    """Connect to ``url`` (for a cluster, to the namespace's master) and run the worker."""
    pool_size = settings.concurrency * 2 + 16
    follow: Callable[[], Awaitable[bool]] | None = None
    if is_cluster_url(url):
        client, follow = await cluster_client(url, settings.namespace, settings.tls, max_connections=pool_size)
        master = client.connection_pool.connection_kwargs
        log.info("cluster: the namespace's slot is served by", master=f"{master.get('host')}:{master.get('port')}")
    else:
        client = make_client(url, max_connections=pool_size, tls=settings.tls)
    try:
        await check_reachable(client, url)
        return await Worker(settings, client, on_redis_error=follow).run()
    finally:
        await client.aclose()
