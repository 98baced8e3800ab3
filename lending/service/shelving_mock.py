"""A mock of the remote shelving service, run by every worker beside the lending service.

It implements ``service.shelving.Shelving`` on the namespace's own Redis
(``shelving_get.lua``: the hand-out and its ledger record in one step), and consumes
``{NS}:shelving:returns`` as the ``shelving-service`` group.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from redis.asyncio import Redis

from lending.faults import fault_point
from lending.keys import SHELVING_GROUP, Keys
from lending.redis.consumer import Delivery
from lending.redis.scripts import Scripts
from lending.service.shelving import Grant, ShelvingUnavailable
from lending.settings import Settings


class ShelvingService:
    """The shelving mock. ``fail_rate`` and ``latency_ms`` simulate a remote service;
    ``dead_letters_maxlen`` caps ``{NS}:dead-letters`` when it parks a returns entry."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts,
        *,
        fail_rate: float = 0.0,
        latency_ms: float = 0.0,
        rng: random.Random | None = None,
        dead_letters_maxlen: int = Settings.dead_letters_maxlen,
    ) -> None:
        self._client = client
        self._keys = keys
        self._scripts = scripts
        self._fail_rate = fail_rate
        self._latency_s = latency_ms / 1000.0
        self._rng = rng or random.Random()
        self._dead_letters_maxlen = dead_letters_maxlen

    async def get_many(self, asks: Sequence[tuple[str, str]]) -> list[Grant]:
        """Answer many ``get_book(book_id, context_id)`` questions in one call."""
        if self._latency_s:
            await asyncio.sleep(self._rng.uniform(0.5, 1.5) * self._latency_s)
        if self._fail_rate and self._rng.random() < self._fail_rate:
            raise ShelvingUnavailable("shelving service did not answer (simulated failure)")
        if not asks:
            return []
        args = [item for ask in asks for item in ask]
        codes = await self._scripts.shelving_get(self._client, [self._keys.shelving_state, self._keys.grants], args)
        return [Grant(int(code)) for code in codes]

    async def release_all(self, deliveries: Sequence[Delivery]) -> None:
        """Apply a batch of ``shelving:returns`` entries (each one atomic on its own)."""
        for delivery in deliveries:
            await self.release(delivery)

    async def release(self, delivery: Delivery) -> bool:
        """Apply one ``shelving:returns`` entry; ``False`` when it was already applied."""
        books = _csv(delivery.fields.get(b"book_ids"))
        contexts = _csv(delivery.fields.get(b"context_ids"))
        if len(contexts) != len(books):
            contexts = []  # no usable contexts: free the books whoever holds them
        fault_point("before_release")
        done = await self._scripts.shelving_release(
            self._client,
            [self._keys.shelving_returns, self._keys.shelving_state],
            [SHELVING_GROUP, delivery.entry_id, len(books), *books, *contexts],
        )
        return bool(done)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """A returns entry that keeps failing: park it, acknowledged, with the error."""
        keys = self._keys
        letter: list[str | bytes] = [
            "stream",
            keys.shelving_returns,
            "entry_id",
            delivery.entry_id,
            "error",
            error,
            "deliveries",
            str(delivery.deliveries),
        ]
        for name in ("book_ids", "context_ids"):
            if name.encode() in delivery.fields:
                letter += [name, delivery.fields[name.encode()]]
        await self._scripts.dead_letter(
            self._client,
            [keys.shelving_returns, keys.dead_letters, keys.dead_letters_trimmed],
            [SHELVING_GROUP, delivery.entry_id, self._dead_letters_maxlen, *letter],
        )


def _csv(raw: bytes | None) -> list[str]:
    """Comma-separated values of a returns entry field; ``split`` keeps empty contexts."""
    if not raw:
        return []
    return raw.decode("utf-8", "replace").split(",")
