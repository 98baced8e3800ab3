"""The ``Scripts`` holder: every file of ``lua/`` registered, and reloaded when Redis forgot it."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from lending.keys import Keys
from lending.redis.scripts import Scripts, _lua_dir


async def test_every_lua_file_is_registered(scripts: Scripts) -> None:
    on_disk = {p.name.removesuffix(".lua") for p in _lua_dir().iterdir() if p.name.endswith(".lua")}
    assert {script.name for script in scripts.all()} == on_disk


async def test_scripts_run_again_after_script_flush(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await scripts.load(redis)
    await redis.script_flush()
    assert await scripts.shelving_get(redis, [keys.shelving_state, keys.grants], ["b1", "r1"]) == [1]


async def test_concurrent_loads_of_one_script_all_succeed(redis: Redis) -> None:
    """On Redis 6.2 the first load finds out the shebang is not understood and switches
    the script; loads already under way must not fail on the switch."""
    script = Scripts().commit
    await asyncio.gather(*(script.load(redis) for _ in range(10)))
    assert (await redis.script_exists(script.sha)) == [True]
