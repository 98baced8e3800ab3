"""The shelving service: what the lending service needs of it, and a mock of it.

Books are handed out with an idempotent ``get_book(book_id, context_id)`` (asked many
at a time): asking again with the same context answers yes again. Every hand-out is
recorded in the library's grants ledger in the same atomic step. Books come back
through the ``{NS}:shelving:returns`` stream, consumed by the ``shelving-service``
group, each with the context it was handed out to.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Sequence
from typing import Protocol

from redis.asyncio import Redis

from .errors import LendingError
from .faults import fault_point
from .keys import SHELVING_GROUP, Keys
from .scripts import Scripts
from .stream import Delivery


class Grant(enum.IntEnum):
    """The shelving service's answer for one book."""

    REFUSED = 0  # handed out to another context
    NEW = 1  # handed out to this context now
    HELD = 2  # already handed out to this context (a retry)


class ShelvingUnavailable(LendingError):
    """The (simulated) remote shelving service failed to answer."""


class Shelving(Protocol):
    """What the lending service asks of the shelving service."""

    async def get_many(self, asks: Sequence[tuple[str, str]]) -> list[Grant]:
        """Answer ``get_book(book_id, context_id)`` for each ``(book_id, context_id)``.

        A book handed out (``NEW``) must be in ``{NS}:grants`` by the time the call
        returns, written in the same atomic step as the hand-out. Raises
        ``ShelvingUnavailable`` when the service does not answer."""
        ...


class ShelvingService:
    """The shelving mock. ``fail_rate`` and ``latency_ms`` simulate a remote service."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts,
        *,
        fail_rate: float = 0.0,
        latency_ms: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._scripts = scripts
        self._fail_rate = fail_rate
        self._latency_s = latency_ms / 1000.0
        self._rng = rng or random.Random()

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
            "stream", keys.shelving_returns, "entry_id", delivery.entry_id,
            "error", error, "deliveries", str(delivery.deliveries),
        ]
        for name in ("book_ids", "context_ids"):
            if name.encode() in delivery.fields:
                letter += [name, delivery.fields[name.encode()]]
        await self._scripts.dead_letter(
            self._client, [keys.shelving_returns, keys.dead_letters], [SHELVING_GROUP, delivery.entry_id, *letter]
        )


def _csv(raw: bytes | None) -> list[str]:
    """Comma-separated values of a returns entry field; ``split`` keeps empty contexts."""
    if not raw:
        return []
    return raw.decode("utf-8", "replace").split(",")
