"""``python -m lending dead-letters list|retry|purge``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.domain.streamids import MAX_ID
from lending.keys import Keys
from lending.ops import dead_letters
from lending.ops.status import read_status
from lending.redis.connection import make_client
from lending.redis.scripts import Scripts

from .conftest import StartWorker
from .support import (
    ROOT,
    all_events,
    decoded,
    event_for,
    raw_entries,
    run_into_a_full_disk,
    send,
    wait_until,
    xadd_fields,
)


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


# -- one letter, unknown and malformed ids, usage ------------------------------------------


async def letter(
    redis: Redis, keys: Keys, user: str = "ada", error: str = "ShelvingUnavailable: down", books: str = "b1"
) -> str:
    """A dead letter as finish.lua writes it, for a lend that was never processed."""
    request = await send(redis, keys, "lend", user, books.split(","))
    fields = {
        "stream": keys.lend_requests,
        "request_id": request,
        "action": "lend",
        "error": error,
        "deliveries": "10",
        "user_id": user,
        "book_ids": books,
    }
    return decoded(await redis.xadd(keys.dead_letters, xadd_fields(fields)))


async def test_show_prints_one_letter(redis: Redis, keys: Keys, redis_url: str, namespace: str) -> None:
    letter_id = await letter(redis, keys, error="ValueError: bad book")

    shown = cli(redis_url, namespace, "show", letter_id)
    assert shown.returncode == 0, shown.stderr
    assert letter_id in shown.stdout and "ValueError: bad book" in shown.stdout and "ada" in shown.stdout

    as_json = json.loads(cli(redis_url, namespace, "show", letter_id, "--json").stdout)
    assert as_json["id"] == letter_id and as_json["user_id"] == "ada" and as_json["error"] == "ValueError: bad book"
    assert as_json["deliveries"] == 10


@pytest.mark.parametrize("command", ["show", "retry", "purge"])
@pytest.mark.parametrize("bad", ["1-1", "not-an-id", "1", "99999999999999999999-0"])
async def test_an_unknown_or_malformed_id_is_one_line_and_exit_1(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, command: str, bad: str
) -> None:
    known = await letter(redis, keys)
    ids = [bad] if command == "show" else [known, bad]

    proc = cli(redis_url, namespace, command, *ids)

    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert bad in proc.stderr
    assert await redis.xlen(keys.dead_letters) == 1, "nothing done when one id is bad"
    assert await redis.xlen(keys.lend_requests) == 1


@pytest.mark.parametrize(
    "args",
    [("retry",), ("purge",), ("retry", "1-1", "--all"), ("purge", "--user", "ada"), ("retry", "1-1", "--error", "x")],
)
def test_no_ids_without_all_and_filters_without_all_are_usage_errors(
    redis_url: str, namespace: str, args: tuple[str, ...]
) -> None:
    proc = cli(redis_url, namespace, *args)
    assert proc.returncode == 2, proc


# -- --json, filters -----------------------------------------------------------------------


async def test_json_on_every_subcommand_with_numbers_as_numbers(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    first, second = await letter(redis, keys, "ada"), await letter(redis, keys, "bob")

    listed = [json.loads(line) for line in cli(redis_url, namespace, "list", "--json").stdout.splitlines()]
    assert [(x["id"], x["deliveries"]) for x in listed] == [(first, 10), (second, 10)]

    retried = cli(redis_url, namespace, "retry", first, "--json")
    assert retried.returncode == 0, retried.stderr
    (queued,) = json.loads(retried.stdout)["retried"]
    assert queued["id"] == first and queued["stream"] == keys.lend_requests
    assert raw_entries(await redis.xrevrange(keys.lend_requests, count=1))[0][0] == queued["queued_as"]

    purged = cli(redis_url, namespace, "purge", second, "--json")
    assert json.loads(purged.stdout) == {"purged": 1, "ids": [second]}


async def test_filters_by_user_and_error(redis: Redis, keys: Keys, redis_url: str, namespace: str) -> None:
    ada_down = await letter(redis, keys, "ada", "ShelvingUnavailable: down")
    bob_down = await letter(redis, keys, "bob", "ShelvingUnavailable: down")
    ada_slow = await letter(redis, keys, "ada", "processing took longer than 10 s")

    def listed(*filters: str) -> list[str]:
        proc = cli(redis_url, namespace, "list", "--json", *filters)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line)["id"] for line in proc.stdout.splitlines()]

    assert listed("--user", "ada") == [ada_down, ada_slow]
    assert listed("--error", "Shelving") == [ada_down, bob_down]
    assert listed("--user", "ada", "--error", "longer than") == [ada_slow]
    assert listed("--user", "ada", "--count", "1") == [ada_down]

    assert cli(redis_url, namespace, "purge", "--all", "--user", "bob").stdout.strip() == "purged 1"
    retried = cli(redis_url, namespace, "retry", "--all", "--error", "longer than")
    assert retried.returncode == 0 and retried.stdout.startswith(f"{ada_slow} -> queued again as "), retried
    assert listed() == [ada_down]


async def test_the_workers_cap_the_stream_and_list_says_so(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, start_worker: StartWorker
) -> None:
    await start_worker(shelving_fail_rate=1.0, max_deliveries=1, dead_letters_maxlen=2)
    for n in range(3):  # one at a time: letters in this order
        request = await send(redis, keys, "lend", f"u{n}", [f"b{n}"])
        assert (await event_for(redis, keys, "lend", request)).status == "failed"

    assert await redis.xlen(keys.dead_letters) == 2
    listed = cli(redis_url, namespace, "list")
    assert listed.returncode == 0, listed.stderr
    note, *letters = listed.stdout.splitlines()
    assert note.startswith("note: the stream was capped: 1 older dead letter dropped"), note
    assert len(letters) == 2
    as_json = cli(redis_url, namespace, "list", "--json")
    assert [json.loads(line)["user_id"] for line in as_json.stdout.splitlines()] == ["u1", "u2"]
    assert as_json.stderr.startswith("note: the stream was capped"), as_json.stderr
    status = await read_status(redis, namespace)
    assert (status["dead_letters"], status["dead_letters_trimmed"]) == (2, 1)


# -- retrying: once, or not at all -----------------------------------------------------------


async def test_a_letter_retried_by_many_at_once_is_queued_once(redis: Redis, keys: Keys, redis_url: str) -> None:
    letter_id = await letter(redis, keys)
    before = await redis.xlen(keys.lend_requests)
    # Twenty operators, each connected already: every one of them finds the letter first.
    operators = [make_client(redis_url) for _ in range(20)]
    try:
        await asyncio.gather(*(operator.ping() for operator in operators))
        scripts = Scripts()
        results = await asyncio.gather(
            *(dead_letters.retry(operator, scripts, keys, [letter_id]) for operator in operators),
            return_exceptions=True,
        )
    finally:
        await asyncio.gather(*(operator.aclose() for operator in operators))

    done = [r for r in results if isinstance(r, list)]
    gone = [r for r in results if isinstance(r, dead_letters.LetterError)]
    assert len(done) == 1 and len(gone) == 19, results
    # Each of the others found the letter gone (before or while it ran), and queued nothing.
    assert all("queued" not in str(e) for e in gone), gone
    assert await redis.xlen(keys.lend_requests) == before + 1
    assert await redis.xlen(keys.dead_letters) == 0


async def test_a_retry_that_cannot_queue_keeps_the_letter(redis: Redis, keys: Keys) -> None:
    letter_id = await letter(redis, keys)
    await redis.delete(keys.lend_requests)
    await redis.set(keys.lend_requests, "not a stream")  # XADD fails: WRONGTYPE

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await dead_letters.retry(redis, Scripts(), keys, [letter_id])

    assert [decoded(entry_id) for entry_id, _ in raw_entries(await redis.xrange(keys.dead_letters))] == [letter_id]


async def test_a_retry_stopped_midway_says_which_letters_it_retried(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    fields = {"stream": keys.return_requests, "action": "return", "error": "x", "user_id": "bob", "book_ids": "r1"}
    first = decoded(await redis.xadd(keys.dead_letters, xadd_fields(fields)))
    second = await letter(redis, keys)
    await redis.xadd(keys.lend_requests, {"user_id": "x", "book_ids": "y"}, id=MAX_ID)  # no ID left

    result = cli(redis_url, namespace, "retry", first, second)

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: dead letter {second} was not retried: ") and "exhausted" in line, line
    assert f"retried before it: {first} (queued again as " in line, line
    assert [decoded(entry_id) for entry_id, _ in raw_entries(await redis.xrange(keys.dead_letters))] == [second]


@pytest.mark.parametrize("action", ["retry", "purge"])
async def test_a_retry_or_purge_whose_output_cannot_be_written_says_what_it_did_on_stderr(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, action: str
) -> None:
    letter_id = await letter(redis, keys)
    result = run_into_a_full_disk(redis_url, namespace, "-m", "lending", "dead-letters", action, letter_id)

    # Done: exit 0, as if printed (1 would tell a script that nothing was done).
    assert result.returncode == 0, result
    said = "queued again as" if action == "retry" else "purged 1"
    assert result.stderr.startswith("error: cannot write to stdout (") and said in result.stderr, result.stderr
    assert await redis.xlen(keys.dead_letters) == 0


async def test_a_retried_letter_queues_its_fields_as_they_were_bytes_and_all(redis: Redis, keys: Keys) -> None:
    """A value that is not UTF-8 (a foreign sender's) was queued again as U+FFFD: a valid
    request for user "\ufffd" in place of one the service would have rejected."""
    fields = {b"stream": keys.lend_requests.encode(), b"action": b"lend", b"user_id": b"\xff", b"book_ids": b"\xfe"}
    letter_id = decoded(await redis.xadd(keys.dead_letters, xadd_fields(fields)))

    (done,) = await dead_letters.retry(redis, Scripts(), keys, [letter_id])

    [(entry_id, queued)] = raw_entries(await redis.xrange(keys.lend_requests))
    assert decoded(entry_id) == done["queued_as"]
    assert queued == {b"user_id": b"\xff", b"book_ids": b"\xfe"}


async def test_a_letter_named_twice_is_retried_once(redis: Redis, keys: Keys, redis_url: str, namespace: str) -> None:
    letter_id = await letter(redis, keys)
    before = await redis.xlen(keys.lend_requests)

    padded = "00" + letter_id  # the same letter, spelled otherwise
    retried = cli(redis_url, namespace, "retry", letter_id, letter_id, padded)

    assert retried.returncode == 0 and retried.stdout.count("queued again as") == 1, retried
    assert await redis.xlen(keys.lend_requests) == before + 1
