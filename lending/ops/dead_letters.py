"""``python -m lending dead-letters list|retry|purge``: inspect and replay dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis

from lending.keys import Keys
from lending.redis.replies import Entries, text

# The fields of the original entry that a dead letter keeps, by the stream it came from.
REPLAYED_FIELDS = {"request": ("user_id", "book_ids"), "returns": ("book_ids", "context_ids")}


async def list_letters(client: Redis, keys: Keys, count: int) -> list[dict[str, Any]]:
    entries = cast(Entries, await client.xrange(keys.dead_letters, count=count))
    return [_letter(entry_id, fields or {}) for entry_id, fields in entries]


async def retry(client: Redis, keys: Keys, letter_ids: Sequence[str]) -> dict[str, str]:
    """Queue each letter's original entry again (a new entry, so a new request id) and
    delete the letter, both in one transaction; letter id -> new entry id."""
    out: dict[str, str] = {}
    for letter_id in letter_ids:
        found = cast(Entries, await client.xrange(keys.dead_letters, min=letter_id, max=letter_id))
        if not found:
            continue
        letter = _letter(letter_id, found[0][1] or {})
        stream = letter["stream"]
        kind = "returns" if stream == keys.shelving_returns else "request"
        if stream not in {consumed for consumed, _group in keys.consumed()}:
            continue  # not a stream of this namespace: leave it for a human
        fields = {name: letter[name] for name in REPLAYED_FIELDS[kind] if letter.get(name) is not None}
        if not fields:
            continue
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
            pipe.xdel(keys.dead_letters, letter_id)
            new_id, _ = await pipe.execute()
        out[letter_id] = text(new_id)
    return out


async def purge(client: Redis, keys: Keys, letter_ids: Sequence[str]) -> int:
    return int(await client.xdel(keys.dead_letters, *letter_ids)) if letter_ids else 0


async def all_ids(client: Redis, keys: Keys) -> list[str]:
    return [text(entry_id) for entry_id, _ in cast(Entries, await client.xrange(keys.dead_letters))]


def _letter(entry_id: bytes | str | None, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": text(entry_id)}
    for name, value in fields.items():
        out[text(name)] = value.decode("utf-8", "replace")
    return out
