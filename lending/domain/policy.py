"""The lending rules as pure functions: no Redis, easy to test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lending.domain.commit import Lend, Record, Reject, Return
from lending.domain.events import ACCEPTED, DENIED, REJECTED, RETURNED, Event
from lending.domain.requests import BookRequest, Rejection
from lending.keys import LEND, RETURN


@dataclass(frozen=True)
class LoanDecision:
    allowed: bool
    reason: str = ""


NOTHING_AVAILABLE = "none of the requested books is available"


def decide_loan(held: int, reserved: int, limit: int) -> LoanDecision:
    """May a user holding ``held`` books take ``reserved`` more under ``limit``?"""
    if reserved == 0:
        return LoanDecision(False, NOTHING_AVAILABLE)
    if held + reserved > limit:
        return LoanDecision(
            False,
            f"user holds {held} book{'s' if held != 1 else ''}; {reserved} more would exceed "
            f"the limit of {limit} per user",
        )
    return LoanDecision(True)


def nothing_to_return_reason(user_id: str) -> str:
    return f"none of the requested books is lent to {user_id}"


def decide_batch(
    requests: Sequence[BookRequest | Rejection],
    reserved: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    counts: Mapping[str, int],
    holders: Mapping[str, str],
    limit: int,
) -> list[Record]:
    """Each entry's outcome, in order, as the record the commit applies.

    :param requests: the batch's parsed entries, in arrival order.
    :param reserved: lend request id -> (books reserved from storage, books shelving
        handed to it); lends not in it got nothing.
    :param counts: user -> books held before the batch (missing: 0).
    :param holders: book -> user holding it, for the books being returned.
    :param limit: books one user may hold.

    Later requests see the effect of earlier ones on counts and holders.
    """
    held = dict(counts)
    holder = dict(holders)
    out: list[Record] = []
    for r in requests:
        if isinstance(r, Rejection):
            out.append(Reject(Event(r.request_id, r.action, r.user_id, REJECTED, reason=r.reason)))
        elif r.action == LEND:
            stored, granted = reserved.get(r.request_id, ((), ()))
            out.append(_decide_lend(r, tuple(stored), tuple(granted), held, limit))
        elif r.action == RETURN:
            out.append(_decide_return(r, held, holder))
        else:  # a request type in the registry without its rule here
            raise ValueError(f"no rule decides {r.action!r} requests")
    return out


def _decide_lend(
    r: BookRequest, stored: tuple[str, ...], granted: tuple[str, ...], held: dict[str, int], limit: int
) -> Lend:
    mine = set(stored) | set(granted)
    books = tuple(book for book in r.book_ids if book in mine)
    decision = decide_loan(held.get(r.user_id, 0), len(books), limit)
    if decision.allowed:
        held[r.user_id] = held.get(r.user_id, 0) + len(books)
        skipped = tuple(book for book in r.book_ids if book not in mine)
        event = Event(r.request_id, LEND, r.user_id, ACCEPTED, books, skipped)
    else:
        event = Event(r.request_id, LEND, r.user_id, DENIED, (), r.book_ids, decision.reason)
    return Lend(event, stored, granted)


def _decide_return(r: BookRequest, held: dict[str, int], holder: dict[str, str]) -> Return:
    returned = tuple(book for book in r.book_ids if holder.get(book) == r.user_id)
    for book in returned:
        holder[book] = ""
    if not returned:
        reason = nothing_to_return_reason(r.user_id)
        return Return(Event(r.request_id, RETURN, r.user_id, DENIED, (), r.book_ids, reason))
    held[r.user_id] = held.get(r.user_id, 0) - len(returned)
    skipped = tuple(book for book in r.book_ids if book not in set(returned))
    return Return(Event(r.request_id, RETURN, r.user_id, RETURNED, returned, skipped))
