"""relay.lua: requests handed in through the inbox become request entries, with receipts."""

from __future__ import annotations

from redis.asyncio import Redis

from lending.domain.submission import MAX_BOOKS, MAX_ID_BYTES, RECEIPT_TTL_MS, encode_submission
from lending.keys import ACTIONS, Keys
from lending.redis.scripts import Scripts

from ..support import decoded, stream_entries
from .conftest import (
    assert_reads_then_writes,
    assert_unchanged,
    fill_stream,
    is_oom,
    monitored,
    monitored_error,
    out_of_memory,
    snapshot,
)

NONCE = "0123456789abcdef0123456789abcdef"


def nonce(n: int) -> str:
    return f"{n:032x}"


async def relay(redis: Redis, scripts: Scripts, keys: Keys, batch: int = 100) -> int:
    taken = await scripts.relay(
        redis,
        [keys.inbox, *(keys.requests(a) for a in ACTIONS)],
        [keys.receipts_prefix, RECEIPT_TTL_MS, batch, MAX_ID_BYTES, MAX_BOOKS, *ACTIONS],
    )
    return int(taken)


async def receipt(redis: Redis, keys: Keys, of: str) -> list[dict[str, str]]:
    return [fields for _, fields in await stream_entries(redis, keys.receipt(of))]


async def test_a_submission_becomes_a_request_entry_and_its_receipt_names_it(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    await redis.rpush(keys.inbox, encode_submission(NONCE, "return", "ada", ["b1", "b2"]))

    taken, commands = await monitored(redis, keys, lambda: relay(redis, scripts, keys))

    assert taken == 1
    [(entry_id, fields)] = await stream_entries(redis, keys.return_requests)
    assert fields == {"user_id": "ada", "book_ids": "b1,b2"}
    assert await receipt(redis, keys, NONCE) == [{"request_id": entry_id}]
    assert 0 < await redis.pttl(keys.receipt(NONCE)) <= RECEIPT_TTL_MS
    assert not await redis.exists(keys.inbox, keys.lend_requests)
    assert_reads_then_writes(commands, f"XADD {keys.return_requests}")


async def test_submissions_are_queued_in_order_a_batch_at_a_time(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    for n in range(5):
        await redis.rpush(keys.inbox, encode_submission(nonce(n), "lend", f"user-{n}", ["b1"]))

    assert await relay(redis, scripts, keys, batch=3) == 3
    assert await redis.llen(keys.inbox) == 2
    assert await relay(redis, scripts, keys, batch=3) == 2
    assert await relay(redis, scripts, keys, batch=3) == 0

    entries = await stream_entries(redis, keys.lend_requests)
    assert [fields["user_id"] for _, fields in entries] == [f"user-{n}" for n in range(5)]
    for n, (entry_id, _) in enumerate(entries):
        assert await receipt(redis, keys, nonce(n)) == [{"request_id": entry_id}]


async def test_out_of_bounds_submissions_are_refused_on_their_receipt(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    refused = {
        nonce(1): (encode_submission(nonce(1), "renew", "ada", ["b1"]), "unknown action"),
        nonce(2): (encode_submission(nonce(2), "lend", "", ["b1"]), "user_id is empty"),
        nonce(3): (encode_submission(nonce(3), "lend", "a" * 513, ["b1"]), "user_id is longer than 512 bytes"),
        nonce(4): (encode_submission(nonce(4), "lend", "ada", ["b" * 513]), "a book id is longer than 512 bytes"),
        nonce(5): (encode_submission(nonce(5), "lend", "ada", ["b"] * 1001), "more than 1000 book ids"),
        nonce(6): (encode_submission(nonce(6), "lend", "a\x00da", ["b1"]), "control character in user_id or book_ids"),
        nonce(7): (encode_submission(nonce(7), "lend", "ada", ["b1\rX"]), "control character in user_id or book_ids"),
        nonce(8): (encode_submission(nonce(8), "lend", "ada", []), "book_ids is empty"),
        nonce(9): (encode_submission(nonce(9), "lend", "ada", ["b1"]) + "\nuser_id\nmallory", "malformed submission"),
        nonce(10): (f"1\n{nonce(10)}\nlend\nada", "malformed submission"),
        nonce(11): (encode_submission(nonce(11), "lend", "ada", ["b" * 500] * 1000) + "x" * 20_000, "too large"),
    }
    for raw, _ in refused.values():
        await redis.rpush(keys.inbox, raw)

    assert await relay(redis, scripts, keys) == len(refused)

    for name, (_, reason) in refused.items():
        [answer] = await receipt(redis, keys, name)
        assert reason in answer["error"], (name, answer)
    assert not await redis.exists(keys.lend_requests, keys.return_requests, keys.inbox)


async def test_a_submission_without_a_nonce_is_dropped(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    for raw in ("", "garbage", "1\nXYZ\nlend\nada\nb1", f"2\n{NONCE}\nlend\nada\nb1", "1\nabc\nlend\nada\nb1"):
        await redis.rpush(keys.inbox, raw)

    assert await relay(redis, scripts, keys) == 5

    assert not await redis.exists(keys.lend_requests, keys.inbox, keys.receipt(NONCE))


async def test_a_squatted_receipt_gets_no_answer_but_the_request_is_queued(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await redis.rpush(keys.receipt(NONCE), "squatted")
    await redis.rpush(keys.inbox, encode_submission(NONCE, "lend", "ada", ["b1"]))

    assert await relay(redis, scripts, keys) == 1

    assert await redis.xlen(keys.lend_requests) == 1
    assert [decoded(v) for v in await redis.lrange(keys.receipt(NONCE), 0, -1)] == ["squatted"]


async def test_a_full_request_stream_refuses_its_own_submissions_and_the_others_are_queued(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    """One stream out of IDs held up both actions' submissions in the inbox for ever (the
    whole call was refused), logged as if Redis were away."""
    redis = each_server
    await fill_stream(redis, keys.return_requests)
    returning, lending = nonce(1), nonce(2)
    await redis.rpush(keys.inbox, encode_submission(returning, "return", "ada", ["b1"]))
    await redis.rpush(keys.inbox, encode_submission(lending, "lend", "ada", ["b2"]))

    assert await relay(redis, scripts, keys) == 2

    [refused] = await receipt(redis, keys, returning)
    assert refused["error"].startswith(f"STREAMFULL {keys.return_requests}")
    [(entry_id, _)] = await stream_entries(redis, keys.lend_requests)
    assert await receipt(redis, keys, lending) == [{"request_id": entry_id}]
    assert not await redis.exists(keys.inbox)


async def test_out_of_memory_refuses_the_call_and_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    await redis.rpush(keys.inbox, encode_submission(NONCE, "lend", "ada", ["b1"]))
    await scripts.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, _ = await monitored_error(redis, keys, lambda: relay(redis, scripts, keys))

    assert is_oom(error), error
    await assert_unchanged(redis, keys, before)
