"""``python -m lending dead-letters list|show|retry|purge``: inspect and replay dead letters.

Commands on letter ids check them all first (``find``): an id that is not an entry ID,
names no letter, or a letter that cannot be replayed stops the command before it does
anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from lending.domain.streamids import canonical_id, is_entry_id, next_id
from lending.errors import LendingError
from lending.keys import Keys
from lending.redis.replies import Entries, reply_text, text
from lending.redis.scripts import Scripts

# The fields of the original entry that a dead letter keeps, by the stream it came from.
REPLAYED_FIELDS = {"request": ("user_id", "book_ids"), "returns": ("book_ids", "context_ids")}
# Letter fields that hold numbers: shown as numbers (in --json too).
NUMBER_FIELDS = ("deliveries",)
PAGE = 1_000


class LetterError(LendingError):
    """Some of the letter ids given cannot be acted on; nothing was done, unless the
    message names letters retried before.

    :param letter_ids: the ids at fault.
    """

    def __init__(self, message: str, letter_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.letter_ids = list(letter_ids)


@dataclass(frozen=True)
class Filter:
    """Which letters a command takes: all of them, or those of ``user`` (its ``user_id``)
    whose ``error`` contains ``error``."""

    user: str | None = None
    error: str | None = None

    def __bool__(self) -> bool:
        return self.user is not None or self.error is not None

    def matches(self, letter: dict[str, Any]) -> bool:
        if self.user is not None and letter.get("user_id") != self.user:
            return False
        return self.error is None or self.error in str(letter.get("error", ""))


async def letters(client: Redis, keys: Keys, where: Filter = Filter()) -> AsyncIterator[dict[str, Any]]:
    """Every letter that ``where`` takes, oldest first (read a page at a time)."""
    start = "-"
    while True:
        page = cast(Entries, await client.xrange(keys.dead_letters, min=start, count=PAGE))
        for entry_id, fields in page:
            letter = _letter(entry_id, fields or {})
            if where.matches(letter):
                yield letter
        following = next_id(text(page[-1][0])) if len(page) == PAGE else None
        if following is None:  # the last page, or nothing can come after it
            return
        start = following


async def list_letters(client: Redis, keys: Keys, count: int, where: Filter = Filter()) -> list[dict[str, Any]]:
    """The first ``count`` letters that ``where`` takes, oldest first."""
    out: list[dict[str, Any]] = []
    async for letter in letters(client, keys, where):
        out.append(letter)
        if len(out) >= count:
            break
    return out


async def trimmed(client: Redis, keys: Keys) -> int:
    """How many letters the workers dropped, oldest first, to keep the stream within
    ``--dead-letters-maxlen``."""
    value = await client.get(keys.dead_letters_trimmed)
    return int(value) if value is not None and value.isdigit() else 0


async def find(client: Redis, keys: Keys, letter_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The letters ``letter_ids`` name, in that order.

    :raises LetterError: an id is not an entry ID (``<ms>-<seq>``), or names no letter.
    """
    return [_letter(entry_id, fields) for entry_id, fields in await _find_raw(client, keys, letter_ids)]


async def _find_raw(
    client: Redis, keys: Keys, letter_ids: Sequence[str]
) -> list[tuple[bytes | None, dict[bytes, bytes]]]:
    """``find``, each letter as Redis holds it: its id and its fields, bytes."""
    malformed = [letter_id for letter_id in letter_ids if not is_entry_id(letter_id)]
    if malformed:
        raise LetterError(f"not a dead-letter id (<ms>-<seq>): {', '.join(map(repr, malformed))}", malformed)
    async with client.pipeline(transaction=False) as pipe:
        for letter_id in letter_ids:
            pipe.xrange(keys.dead_letters, min=letter_id, max=letter_id, count=1)
        replies = cast(list[Entries], await pipe.execute())
    missing = [letter_id for letter_id, found in zip(letter_ids, replies, strict=True) if not found]
    if missing:
        raise LetterError(f"no such dead letter in {keys.dead_letters}: {', '.join(missing)}", missing)
    return [(found[0][0], found[0][1] or {}) for found in replies]


def replay(keys: Keys, letter: dict[str, Any]) -> tuple[str, dict[str, str]] | str:
    """The stream and fields that retrying ``letter`` queues; else why it cannot be retried."""
    stream = letter.get("stream")
    if stream not in {consumed for consumed, _group in keys.consumed()}:
        return f"its stream {stream!r} is not one of namespace {keys.namespace!r}"
    kind = "returns" if stream == keys.shelving_returns else "request"
    fields = {name: letter[name] for name in REPLAYED_FIELDS[kind] if letter.get(name) is not None}
    if not fields:
        return f"it keeps none of the fields of the original entry ({', '.join(REPLAYED_FIELDS[kind])})"
    return stream, fields


async def retry(client: Redis, scripts: Scripts, keys: Keys, letter_ids: Sequence[str]) -> list[dict[str, str]]:
    """Queue each letter's original entry again (a new entry, so a new request id) and
    delete the letter, both in one step (``retry_letter.lua``), which queues nothing once
    the letter is gone; ``{id, stream, queued_as}`` for each.

    :raises LetterError: an id is malformed or unknown, or its letter cannot be replayed
        (nothing is queued then); or a letter went (another operator's purge or retry),
        or Redis refused to queue it, while this one ran: the ones before it were
        retried, and the message names them.
    :raises RedisError: Redis refused to queue the first letter (nothing was queued).
    """
    plans = []
    for entry_id, raw in await _find_raw(client, keys, distinct(letter_ids)):
        letter = _letter(entry_id, raw)
        plan = replay(keys, letter)
        if isinstance(plan, str):
            raise LetterError(f"cannot retry dead letter {letter['id']}: {plan}", [letter["id"]])
        stream, fields = plan
        # Queued as the letter holds them: values that are not UTF-8 stay what they were.
        plans.append((letter["id"], stream, {name: raw[name.encode()] for name in fields}))
    out: list[dict[str, str]] = []
    for letter_id, stream, values in plans:
        pairs = [item for pair in values.items() for item in pair]
        try:
            queued = await scripts.retry_letter(client, [keys.dead_letters, stream], [letter_id, *pairs])
        except RedisError as exc:
            if not out:
                raise
            reason = reply_text(exc) if isinstance(exc, ResponseError) else str(exc) or type(exc).__name__
            raise LetterError(f"dead letter {letter_id} was not retried: {reason}{_done(out)}", [letter_id]) from exc
        if queued is None:
            raise LetterError(f"dead letter {letter_id} went while it was retried{_done(out)}", [letter_id])
        out.append({"id": letter_id, "stream": stream, "queued_as": text(queued)})
    return out


def _done(retried: list[dict[str, str]]) -> str:
    """What a retry stopped midway did before it."""
    if not retried:
        return ""
    return "; retried before it: " + ", ".join(f"{x['id']} (queued again as {x['queued_as']})" for x in retried)


async def purge(client: Redis, keys: Keys, letter_ids: Sequence[str]) -> int:
    """Delete the letters ``letter_ids``; how many were deleted.

    :raises LetterError: an id is malformed or unknown (nothing is deleted then).
    """
    letter_ids = distinct(letter_ids)
    if not letter_ids:
        return 0
    await find(client, keys, letter_ids)
    return int(await client.xdel(keys.dead_letters, *letter_ids))


def distinct(letter_ids: Sequence[str]) -> list[str]:
    """``letter_ids`` with each letter once, however it is spelled (``007-0`` is ``7-0``)."""
    return list(dict.fromkeys(canonical_id(letter_id) or letter_id for letter_id in letter_ids))


async def all_ids(client: Redis, keys: Keys, where: Filter = Filter()) -> list[str]:
    return [letter["id"] async for letter in letters(client, keys, where)]


def _letter(entry_id: bytes | str | None, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": text(entry_id)}
    for name, value in fields.items():
        field = text(name)
        decoded = value.decode("utf-8", "replace")
        out[field] = int(decoded) if field in NUMBER_FIELDS and decoded.isascii() and decoded.isdigit() else decoded
    return out
