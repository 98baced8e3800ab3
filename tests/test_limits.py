"""One set of lending limits per namespace: the workers publish theirs in {NS}:config,
a worker with other limits is refused while one lives, and the tools read them."""

from __future__ import annotations

import subprocess
import sys

from redis.asyncio import Redis

from lending.keys import Keys

from .support import ROOT, process_env, start_worker_process, stop_process


def start(redis_url: str, namespace: str, worker_id: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), worker_id, *args],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_a_worker_with_other_limits_than_a_live_one_refuses_to_start(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    first = start_worker_process("w1", redis_url, namespace, "--max-books-per-user", "5")
    try:
        other = start(redis_url, namespace, "w2", "--max-books-per-user", "3")
        _, err = other.communicate(timeout=30)
        assert other.returncode == 1, err
        assert "Traceback" not in err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "'w1'" in line and "max-books-per-user 5" in line and "3" in line, line
        assert not await redis.exists(keys.worker("w2"))

        same = start_worker_process("w3", redis_url, namespace, "--max-books-per-user", "5")
        assert stop_process(same)[0] == 0
    finally:
        assert stop_process(first)[0] == 0

    # With no worker left, new limits take over.
    changed = start_worker_process("w2", redis_url, namespace, "--max-books-per-user", "3")
    try:
        assert await redis.hget(keys.config, "max_books_per_user") == b"3"
        status = subprocess.run(
            [sys.executable, "-m", "lending", "status", "--json"],
            cwd=ROOT,
            env=process_env(redis_url, namespace),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert '"max_books_per_user": 3' in status.stdout, status
    finally:
        assert stop_process(changed)[0] == 0
