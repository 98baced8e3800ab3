"""``python -m lending dead-letters list|retry|purge``."""

from __future__ import annotations

import json
import subprocess
import sys

from redis.asyncio import Redis

from lending.keys import Keys

from .conftest import StartWorker
from .support import ROOT, all_events, event_for, send, wait_until


def cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lending", "dead-letters", *args, "--redis-url", redis_url, "--namespace", namespace],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_list_retry_and_purge(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, start_worker: StartWorker
) -> None:
    # Shelving is down: the lends fail until dead-lettered.
    failing = await start_worker(shelving_fail_rate=1.0, max_deliveries=2)
    first = await send(redis, keys, "lend", "ada", ["b1"])
    second = await send(redis, keys, "lend", "bob", ["b2"])
    assert (await event_for(redis, keys, "lend", first)).status == "failed"
    assert (await event_for(redis, keys, "lend", second)).status == "failed"

    listed = cli(redis_url, namespace, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    # Both failed in one batch: their letters may be written in either order.
    letters = sorted((json.loads(line) for line in listed.stdout.splitlines()), key=lambda letter: letter["request_id"])
    assert [(letter["request_id"], letter["user_id"], letter["book_ids"]) for letter in letters] == [
        (first, "ada", "b1"),
        (second, "bob", "b2"),
    ]
    assert "ShelvingUnavailable" in letters[0]["error"]

    # Shelving is back: retrying the first queues it again as a new request, which succeeds.
    failing.stop()
    await wait_until(lambda: _no_worker(redis, keys))
    await start_worker(worker_id="w2")
    retried = cli(redis_url, namespace, "retry", letters[0]["id"])
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.split()[-1]
    assert new_id != first
    assert (await event_for(redis, keys, "lend", new_id)).status == "accepted"
    assert await redis.hget(keys.lent_books, "b1") == b"ada"

    purged = cli(redis_url, namespace, "purge", "--all")
    assert purged.returncode == 0 and purged.stdout.strip() == "purged 1"
    assert await redis.xlen(keys.dead_letters) == 0
    assert len(await all_events(redis, keys)) == 3  # two failed, one accepted


async def _no_worker(redis: Redis, keys: Keys) -> bool:
    return not await redis.exists(keys.worker("w1"))


def test_unreachable_redis(namespace: str) -> None:
    proc = cli("redis://127.0.0.1:1", namespace, "list")
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot reach Redis")
