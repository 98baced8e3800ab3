"""The shelving service, as the lending service sees it: one idempotent call.

Books are handed out with ``get_book(book_id, context_id)`` (asked many at a time):
asking again with the same context answers yes again. Books come back through the
``{NS}:shelving:returns`` stream, each with the context it was handed out to.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from lending.errors import LendingError


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
