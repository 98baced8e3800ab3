"""A namespace is matched literally: glob characters in it (``lib?``) never make
``check`` or ``status`` read another namespace's keys (``libX``)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from lending.keys import Keys, namespace_problem

from .support import ROOT


@pytest.mark.parametrize(
    ("namespace", "suffix", "pattern"),
    [
        ("lending", "*", "{lending}:*"),
        ("lib?", "user:*:count", r"{lib\?}:user:*:count"),
        ("a*b", "*", r"{a\*b}:*"),
        ("lib[1-2]", "workers:*", r"{lib\[1-2\]}:workers:*"),
        ("back\\slash", "*", r"{back\\slash}:*"),
    ],
)
def test_the_namespace_part_of_a_pattern_is_escaped_and_the_suffix_is_a_glob(
    namespace: str, suffix: str, pattern: str
) -> None:
    assert Keys(namespace).pattern(suffix) == pattern


@pytest.mark.parametrize("namespace", ["lending", "a b", "lib?", "bibliothèque", "back\\slash"])
def test_a_namespace_may_hold_inner_spaces_glob_characters_and_any_printable_character(namespace: str) -> None:
    assert namespace_problem(namespace) is None


@pytest.mark.parametrize("namespace", ["", "a{b", "a}b", " lending", "lending\n", "a\nb", "a\rb", "a\tb", "a\x7fb"])
def test_a_namespace_that_is_empty_padded_braced_or_holds_a_control_character_is_refused(namespace: str) -> None:
    assert namespace_problem(namespace) is not None


@pytest.fixture
async def lookalikes(redis: Redis) -> AsyncIterator[tuple[Keys, Keys]]:
    """Two namespaces, ``...lib?`` and ``...libX``: the first, read as a glob, matches the second."""
    run = uuid.uuid4().hex[:8]
    pair = (Keys(f"t{run}-lib?"), Keys(f"t{run}-libX"))
    yield pair
    for keys in pair:
        async for key in redis.scan_iter(match=keys.pattern("*"), count=1000):
            await redis.delete(key)


@pytest.mark.parametrize("namespace", ["lib?", "lib*", "lib[XY]", "lib\\X"])
async def test_a_pattern_matches_only_its_own_namespace_in_redis(redis: Redis, namespace: str) -> None:
    run = uuid.uuid4().hex[:8]
    own, other = Keys(f"t{run}-{namespace}"), Keys(f"t{run}-libX")
    try:
        await redis.set(own.user_count("ada"), 1)
        await redis.set(other.user_count("ada"), 1)

        found = {key.decode() async for key in redis.scan_iter(match=own.pattern("user:*:count"), count=1000)}

        assert found == {own.user_count("ada")}
    finally:
        await redis.delete(own.user_count("ada"), other.user_count("ada"))


async def test_check_and_status_of_lib_question_mark_see_only_their_own_keys(
    redis: Redis, redis_url: str, lookalikes: tuple[Keys, Keys]
) -> None:
    mine, other = lookalikes
    # libX: a user at the limit whose count names no lent book, a leftover reservation and
    # a live worker; lib? is empty, hence consistent.
    await redis.set(other.user_count("ada"), 5)
    await redis.sadd(other.reservation("1-0"), "b1")
    await redis.set(other.worker("w-other"), "token", px=60_000)

    check = _lending("check", "--redis-url", redis_url, "--namespace", mine.namespace, "--json")
    status = _lending("status", "--redis-url", redis_url, "--namespace", mine.namespace, "--json")

    assert check.returncode == 0, check
    assert json.loads(check.stdout)["violations"] == []
    assert status.returncode == 0, status
    seen = json.loads(status.stdout)
    assert (seen["workers"], seen["users_at_limit"]) == ([], 0)


def _lending(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lending", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
