"""The worker's CPU per batch, alone: python bench/batch_cpu.py [BATCH [CONCURRENT [BATCHES]]]

Lends of a new user and a new book each (every book comes from shelving, as in the API
benchmark), processed by ``LendingService.process_batch`` in batches of BATCH (default 5),
CONCURRENT batches at a time (default 3), BATCHES batches (default 3,000). Prints the
process's CPU time per batch and per request: what one batch costs the worker, without
the consumer loop, the HTTP API or other processes competing for the cores. Runs on a
private embedded Redis (appendonly everysec, as the service's default), or on REDIS_URL.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import uvloop

from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.consumer import Delivery, ensure_group
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.redis.replies import StreamsReply, text
from lending.redis.scripts import Scripts
from lending.service.lending import LendingService
from lending.service.shelving_mock import ShelvingService
from lending.settings import Settings


async def measure(url: str, size: int, concurrent: int, batches: int) -> str:
    client = make_client(url)
    namespace = f"batch-cpu-{os.getpid()}"
    keys = Keys(namespace)
    try:
        for stream, group in (
            (keys.lend_requests, LENDING_GROUP),
            (keys.return_requests, LENDING_GROUP),
            (keys.shelving_returns, SHELVING_GROUP),
        ):
            await ensure_group(client, stream, group)
        scripts = Scripts()
        await scripts.load(client)
        service = LendingService(
            client, Settings(namespace=namespace, worker_id="w1"), scripts, ShelvingService(client, keys, scripts)
        )
        async with client.pipeline(transaction=False) as pipe:
            for k in range(size * batches):
                pipe.xadd(keys.lend_requests, {"user_id": f"u{k}", "book_ids": f"b{k}"})
            await pipe.execute()
        reply = cast(
            StreamsReply,
            await client.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=size * batches),
        )
        deliveries = [Delivery(keys.lend_requests, text(entry), fields or {}, 1) for entry, fields in reply[0][1]]
        slots = asyncio.Semaphore(concurrent)

        async def one(batch: list[Delivery]) -> None:
            async with slots:
                events = await service.process_batch(batch)
                if not all(event is not None and event.status == "accepted" for event in events):
                    raise RuntimeError(f"not every lend was accepted: {events}")

        started = time.process_time()
        await asyncio.gather(*(one(deliveries[k : k + size]) for k in range(0, len(deliveries), size)))
        cpu_us = (time.process_time() - started) * 1e6
        return (
            f"batches of {size}, {concurrent} at a time: {cpu_us / batches:.0f} µs of CPU per batch, "
            f"{cpu_us / len(deliveries):.0f} µs per request"
        )
    finally:
        async for key in client.scan_iter(match=keys.pattern("*"), count=1000):
            await client.delete(key)
        await client.aclose()


def main() -> None:
    given = [int(arg) for arg in sys.argv[1:4]]
    size, concurrent, batches = given + [5, 3, 3000][len(given) :]
    url = os.environ.get("REDIS_URL")
    if url:
        print(uvloop.run(measure(url, size, concurrent, batches)))
        return
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedRedis(Path(data), free_port())
        server.start()
        try:
            print(uvloop.run(measure(server.url, size, concurrent, batches)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
