"""worker_claim.lua and worker_release.lua: one live process per worker id."""

from __future__ import annotations

from redis.asyncio import Redis

from lending.keys import Keys
from lending.scripts import Scripts

from .conftest import out_of_memory


async def test_worker_claim_and_renew(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 1
    assert await redis.get(key) == b"token-a"
    assert 0 < await redis.pttl(key) <= 10_000

    # Renewing with the same token extends the TTL.
    await redis.pexpire(key, 500)
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 1
    assert await redis.pttl(key) > 5_000


async def test_worker_claim_refuses_another_token_unless_forced(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])

    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 0]) == 0
    assert await redis.get(key) == b"token-a"

    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 1]) == 1
    assert await redis.get(key) == b"token-b"
    assert await redis.pttl(key) > 0
    # The old holder's next renewal now fails: it has lost the id.
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 0


async def test_worker_id_is_free_again_after_the_ttl(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])
    await redis.delete(key)  # as if the TTL had passed
    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 0]) == 1


async def test_worker_release_only_by_the_holder(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])

    assert await scripts.worker_release(redis, [key], ["token-b"]) == 0
    assert await redis.get(key) == b"token-a"

    assert await scripts.worker_release(redis, [key], ["token-a"]) == 1
    assert not await redis.exists(key)
    assert await scripts.worker_release(redis, [key], ["token-a"]) == 0


async def test_worker_claim_renews_while_redis_is_out_of_memory(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    # A renewal is a PEXPIRE: a live worker stays visible (allow-oom on Redis 7).
    redis = each_server
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])
    await redis.pexpire(key, 500)

    async with out_of_memory(redis):
        assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 1

    assert await redis.pttl(key) > 5_000
