"""The simulated library users: what they ask for and give back. Pure, seeded."""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field


class Zipf:
    """Book popularity: book ``k`` (0-based) is drawn with weight ``1 / (k + 1) ** s``."""

    def __init__(self, n: int, s: float = 1.0) -> None:
        weights = [1.0 / (k + 1) ** s for k in range(n)]
        self._cumulative = list(itertools.accumulate(weights))

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_left(self._cumulative, rng.random() * self._cumulative[-1])


@dataclass
class User:
    user_id: str
    held: set[str] = field(default_factory=set)  # lent, confirmed by an event
    asked: set[str] = field(default_factory=set)  # in lend requests without an event yet
    returning: set[str] = field(default_factory=set)  # in return requests without an event yet


@dataclass(frozen=True)
class Request:
    action: str  # "lend" or "return"
    user_id: str
    book_ids: tuple[str, ...]


@dataclass
class Workload:
    """Users borrowing Zipf-popular books and returning what they hold.

    :param return_share: share of requests that are returns (when the user may return).
    """

    users: int = 200
    catalogue: int = 10_000
    return_share: float = 0.4
    max_books: int = 3
    seed: int = 1
    zipf_s: float = 1.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._zipf = Zipf(self.catalogue, self.zipf_s)
        self.people = {f"user-{n}": User(f"user-{n}") for n in range(self.users)}
        self._ids = list(self.people)

    def book(self) -> str:
        return f"book-{self._zipf.draw(self.rng)}"

    def next_request(self) -> Request:
        if self.rng.random() < self.return_share:
            # A return, by someone who has something to return (a few tries to find one).
            for _ in range(20):
                user = self.people[self.rng.choice(self._ids)]
                returnable = (user.held | user.asked) - user.returning
                if returnable:
                    count = self.rng.randint(1, len(returnable))
                    books = tuple(self.rng.sample(sorted(returnable), count))
                    user.returning.update(books)
                    return Request("return", user.user_id, books)
        user = self.people[self.rng.choice(self._ids)]
        books = tuple(dict.fromkeys(self.book() for _ in range(self.rng.randint(1, self.max_books))))
        user.asked.update(books)
        return Request("lend", user.user_id, books)

    def outcome(self, request: Request, status: str, books: tuple[str, ...]) -> None:
        """What the user learns from the event of ``request``."""
        user = self.people[request.user_id]
        if request.action == "lend":
            user.asked.difference_update(request.book_ids)
            user.held.update(books)
        else:
            user.returning.difference_update(request.book_ids)
            user.held.difference_update(books)
