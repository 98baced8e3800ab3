"""How a ``get_books.py --api`` run may end: ``lending.client``'s outcomes, and ``Invalid``.

Apart from ``client.py`` so that the command line can name it without loading httpx.
"""

from __future__ import annotations

from dataclasses import dataclass

from lending.client import Outcome


@dataclass(frozen=True)
class Invalid:
    """The API refused the request as invalid before queuing it: nothing was queued."""

    reason: str


ApiOutcome = Outcome | Invalid
