"""worker_claim.lua, worker_renew.lua and worker_release.lua: one live process per
worker id, a registry of the namespace's workers, what each says about itself, and one
set of lending limits.

``WorkerId`` is the one caller of these scripts (it lays out their arguments); the
tests go through it and assert on the keys the scripts write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from lending.errors import LimitsChanged, LimitsDiffer, WorkerIdTaken
from lending.keys import Keys
from lending.redis.scripts import Scripts
from lending.redis.workers import WorkerId, live_workers, read_limits, worker_infos
from lending.settings import Limits

from ..support import hash_of
from .conftest import out_of_memory

INFO: dict[str, str | int] = {"host": "h1", "pid": 42, "version": "0.1.0", "started_ms": 1_700_000_000_000}


def holder(redis: Redis, scripts: Scripts, keys: Keys, token: str, worker_id: str = "w1") -> WorkerId:
    return WorkerId(redis, scripts, keys, worker_id, token, 10_000, INFO)


async def test_claim_holds_the_id_registers_it_and_publishes_the_limits(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await holder(redis, scripts, keys, "token-a").claim(Limits(storage_capacity=7))
    assert await redis.get(keys.worker("w1")) == b"token-a"
    assert 0 < await redis.pttl(keys.worker("w1")) <= 10_000
    assert await redis.smembers(keys.workers) == {b"w1"}
    assert await read_limits(redis, keys) == Limits(storage_capacity=7)
    assert set(await live_workers(redis, keys)) == {"w1"}


async def test_claim_publishes_the_info_afresh_with_the_ttl(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.worker_info("w1"), mapping={"processed": "99", "stale": "x"})  # an earlier run's
    await holder(redis, scripts, keys, "token-a").claim(Limits())
    assert await hash_of(redis, keys.worker_info("w1")) == {
        **{name: str(value) for name, value in INFO.items()},
        **Limits().fields(),
    }
    assert 0 < await redis.pttl(keys.worker_info("w1")) <= 10_000
    assert await worker_infos(redis, keys, ["w1", "w2"]) == {
        "w1": {**{name: str(value) for name, value in INFO.items()}, **Limits().fields()},
        "w2": {},
    }


async def test_renew_publishes_the_counters_and_extends_the_info_ttl(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await redis.pexpire(keys.worker_info("w1"), 500)
    assert await a.renew({"processed": 7, "failed": 1})
    assert await hash_of(redis, keys.worker_info("w1")) == {
        **{name: str(value) for name, value in INFO.items()},
        **Limits().fields(),
        "processed": "7",
        "failed": "1",
    }
    assert await redis.pttl(keys.worker_info("w1")) > 5_000


async def test_renew_extends_the_ttl(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await redis.pexpire(keys.worker("w1"), 500)
    assert await a.renew()
    assert await redis.pttl(keys.worker("w1")) > 5_000


async def test_claim_refuses_another_token_unless_forced(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    a, b = holder(redis, scripts, keys, "token-a"), holder(redis, scripts, keys, "token-b")
    await a.claim(Limits())

    with pytest.raises(WorkerIdTaken):
        await b.claim(Limits())
    assert await redis.get(keys.worker("w1")) == b"token-a"

    await b.claim(Limits(), force=True)
    assert await redis.get(keys.worker("w1")) == b"token-b"
    assert not await a.renew()  # the old holder has lost the id


async def test_renew_takes_a_lost_liveness_key_again(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # A Redis restart or failover that lost the keys, while nobody else took the id.
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await redis.delete(keys.worker("w1"), keys.worker_info("w1"), keys.workers)

    assert await a.renew({"processed": 3, "failed": 0})

    assert await redis.get(keys.worker("w1")) == b"token-a"
    assert 0 < await redis.pttl(keys.worker("w1")) <= 10_000
    assert await redis.smembers(keys.workers) == {b"w1"}
    assert await hash_of(redis, keys.worker_info("w1")) == {
        **{name: str(value) for name, value in INFO.items()},
        **Limits().fields(),
        "processed": "3",
        "failed": "0",
    }
    assert 0 < await redis.pttl(keys.worker_info("w1")) <= 10_000


async def test_renew_publishes_the_limits_again_when_redis_lost_them(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A Redis restarted without its data: the API and the checker read the limits, and
    would assume the defaults."""
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits(storage_capacity=7, max_books_per_user=2))
    await redis.delete(keys.worker("w1"), keys.worker_info("w1"), keys.workers, keys.config)

    assert await a.renew()

    assert await read_limits(redis, keys) == Limits(storage_capacity=7, max_books_per_user=2)


async def test_a_live_worker_publishes_its_limits_again_over_older_ones(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """While a worker is live no worker with other limits can start, so other limits in
    {NS}:config come from older data (a restore) or a hand edit: its commits would write
    nothing while they differ (commit.lua), so the heartbeat puts its own back."""
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits(storage_capacity=7))
    await redis.hset(keys.config, "storage_capacity", "9")

    assert await a.renew()

    assert await read_limits(redis, keys) == Limits(storage_capacity=7)
    assert await redis.get(keys.worker("w1")) == b"token-a"


# Hand edits of {NS}:config, each of which the workers' rules must survive.
CONFIG_EDITS: dict[str, Callable[[Redis, Keys], Awaitable[object]]] = {
    "config deleted": lambda redis, keys: redis.delete(keys.config),
    "a field deleted": lambda redis, keys: redis.hdel(keys.config, "max_books_per_user"),
    "a field written otherwise": lambda redis, keys: redis.hset(keys.config, "max_books_per_user", "5.0"),
    "a config that is no hash": lambda redis, keys: redis.set(keys.config, "x"),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS.values()), ids=list(CONFIG_EDITS))
async def test_renew_publishes_a_config_edited_by_hand_again(
    redis: Redis, keys: Keys, scripts: Scripts, edit: Callable[[Redis, Keys], Awaitable[object]]
) -> None:
    """The tools (check, status, the API) would assume the default for what is missing."""
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits(storage_capacity=7, max_books_per_user=2))
    await edit(redis, keys)

    assert await a.renew()

    assert await read_limits(redis, keys) == Limits(storage_capacity=7, max_books_per_user=2)
    assert await redis.pttl(keys.worker("w1")) > 0


async def test_renew_replaces_an_info_that_is_no_hash(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await redis.set(keys.worker_info("w1"), "x")  # a hand edit: every heartbeat failed

    assert await a.renew({"processed": 1, "failed": 0})

    assert (await hash_of(redis, keys.worker_info("w1")))["processed"] == "1"


async def test_claim_replaces_a_config_that_is_no_hash(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.set(keys.config, "x")  # a hand edit
    assert await read_limits(redis, keys) is None  # the tools assume the defaults, and say so

    await holder(redis, scripts, keys, "token-a").claim(Limits(storage_capacity=7))

    assert await read_limits(redis, keys) == Limits(storage_capacity=7)


async def test_renew_does_not_take_a_lapsed_id_again_under_other_limits(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The worker stalled past its TTL while the others were restarted with a lower
    capacity: coming back with its own, it would fill storage over the new one."""
    stalled = holder(redis, scripts, keys, "token-a")
    await stalled.claim(Limits(storage_capacity=20))
    await redis.delete(keys.worker("w1"))  # its TTL ran out while it stalled
    restarted = holder(redis, scripts, keys, "token-b", worker_id="w2")
    await restarted.claim(Limits(storage_capacity=2))

    with pytest.raises(LimitsChanged, match="live worker 'w2' now runs with storage-capacity 2, this one with 20"):
        await stalled.renew()

    assert not await redis.exists(keys.worker("w1"))
    assert await read_limits(redis, keys) == Limits(storage_capacity=2)


async def test_renew_takes_a_lapsed_id_again_with_its_limits_when_no_worker_is_live(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Redis came back with older data (a restart from an older snapshot, a failover that
    lost the last writes): the limits there are stale, and the live workers must not stop."""
    worker = holder(redis, scripts, keys, "token-a")
    await worker.claim(Limits(max_books_per_user=2))
    await redis.delete(keys.worker("w1"))
    await redis.hset(keys.config, "max_books_per_user", "5")  # the older data's

    assert await worker.renew()

    assert await redis.get(keys.worker("w1")) == b"token-a"
    assert await read_limits(redis, keys) == Limits(max_books_per_user=2)


async def test_worker_id_is_free_again_after_the_ttl(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await holder(redis, scripts, keys, "token-a").claim(Limits())
    await redis.delete(keys.worker("w1"))  # as if the TTL had passed
    await holder(redis, scripts, keys, "token-b").claim(Limits())
    assert await redis.get(keys.worker("w1")) == b"token-b"


async def test_release_only_by_the_holder(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await holder(redis, scripts, keys, "token-b").release()
    assert await redis.get(keys.worker("w1")) == b"token-a"

    await a.release()
    assert not await redis.exists(keys.worker("w1"), keys.worker_info("w1"))
    assert await redis.smembers(keys.workers) == set()


async def test_a_worker_with_other_limits_is_refused_while_one_lives(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await holder(redis, scripts, keys, "token-a", "w1").claim(Limits(max_books_per_user=5))
    with pytest.raises(LimitsDiffer) as refused:
        await holder(redis, scripts, keys, "token-b", "w2").claim(Limits(max_books_per_user=3))
    assert (refused.value.worker_id, refused.value.field, refused.value.theirs, refused.value.mine) == (
        "w1",
        "max_books_per_user",
        "5",
        "3",
    )
    assert await read_limits(redis, keys) == Limits(max_books_per_user=5)
    assert not await redis.exists(keys.worker("w2"))

    # The same limits are fine; once w1 is gone, new limits take over.
    await holder(redis, scripts, keys, "token-c", "w3").claim(Limits(max_books_per_user=5))
    await redis.delete(keys.worker("w1"), keys.worker("w3"))  # both died
    await holder(redis, scripts, keys, "token-b", "w2").claim(Limits(max_books_per_user=3))
    assert await read_limits(redis, keys) == Limits(max_books_per_user=3)
    assert await redis.smembers(keys.workers) == {b"w2"}, "dead workers leave the set"


@pytest.mark.parametrize("edit", list(CONFIG_EDITS.values()), ids=list(CONFIG_EDITS))
async def test_a_live_workers_own_limits_refuse_a_worker_with_others_whatever_config_holds(
    redis: Redis, keys: Keys, scripts: Scripts, edit: Callable[[Redis, Keys], Awaitable[object]]
) -> None:
    """A hand edit of {NS}:config let a worker with other limits start beside a live one,
    and then each committed in turn."""
    await holder(redis, scripts, keys, "token-a", "w1").claim(Limits(max_books_per_user=5))
    await edit(redis, keys)

    with pytest.raises(LimitsDiffer, match="live worker 'w1' runs with max-books-per-user 5, this one with 2"):
        await holder(redis, scripts, keys, "token-b", "w2").claim(Limits(max_books_per_user=2))
    await holder(redis, scripts, keys, "token-c", "w3").claim(Limits(max_books_per_user=5))  # the same: fine


@pytest.mark.parametrize("edit", list(CONFIG_EDITS.values()), ids=list(CONFIG_EDITS))
async def test_a_stalled_worker_does_not_come_back_beside_one_with_other_limits_after_a_config_edit(
    redis: Redis, keys: Keys, scripts: Scripts, edit: Callable[[Redis, Keys], Awaitable[object]]
) -> None:
    """w1 stalled past its TTL, w3 started with 3 books per user, then a hand edit of
    {NS}:config: w1's heartbeat took its id again with its own limits, and both served."""
    stalled = holder(redis, scripts, keys, "token-a", "w1")
    await stalled.claim(Limits(max_books_per_user=5))
    await redis.delete(keys.worker("w1"))
    restarted = holder(redis, scripts, keys, "token-c", "w3")
    await restarted.claim(Limits(max_books_per_user=3))
    await edit(redis, keys)

    with pytest.raises(LimitsChanged, match="live worker 'w3' now runs with max-books-per-user 3, this one with 5"):
        await stalled.renew()

    assert not await redis.exists(keys.worker("w1"))
    assert await restarted.renew()
    assert await read_limits(redis, keys) == Limits(max_books_per_user=3)


async def test_of_two_live_workers_with_other_limits_the_one_that_finds_the_config_not_its_own_stops(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """However two came to run at once (a race of two starts), they must not each put
    back their own limits and commit in turn."""
    a = holder(redis, scripts, keys, "token-a", "w1")
    await a.claim(Limits(max_books_per_user=5))
    c = holder(redis, scripts, keys, "token-c", "w3")
    await redis.delete(keys.worker("w1"))  # as if c had not seen a when it started
    await c.claim(Limits(max_books_per_user=3))
    await redis.set(keys.worker("w1"), "token-a", px=10_000)  # a is live all the same

    with pytest.raises(LimitsChanged):
        await a.renew()
    assert await c.renew()
    assert await read_limits(redis, keys) == Limits(max_books_per_user=3)


async def test_read_limits_without_any_worker(redis: Redis, keys: Keys) -> None:
    assert await read_limits(redis, keys) is None


async def test_renew_works_while_redis_is_out_of_memory(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    # A renewal is a PEXPIRE: a live worker stays visible (allow-oom on Redis 7).
    redis = each_server
    a = holder(redis, scripts, keys, "token-a")
    await a.claim(Limits())
    await redis.pexpire(keys.worker("w1"), 500)

    async with out_of_memory(redis):
        assert await a.renew({"processed": 12345, "failed": 0})

    assert await redis.pttl(keys.worker("w1")) > 5_000
    assert await redis.pttl(keys.worker_info("w1")) > 5_000
    assert await redis.hget(keys.worker_info("w1"), "processed") == b"12345"
