from __future__ import annotations

from redis.asyncio import Redis

from lending.keys import Keys

from .conftest import StartWorker
from .support import event_for, send


async def test_lend_then_return(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    lend_id = await send(redis, keys, "lend", "Salvatore", ["ofmiceandmen"])
    event = await event_for(redis, keys, "lend", lend_id)
    assert (event.status, event.books) == ("accepted", ("ofmiceandmen",))
    return_id = await send(redis, keys, "return", "Salvatore", ["ofmiceandmen"])
    event = await event_for(redis, keys, "return", return_id)
    assert (event.status, event.books) == ("returned", ("ofmiceandmen",))
