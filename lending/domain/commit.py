"""What a batch commits: one typed record per request entry, and their one encoding.

The service decides every outcome; ``commit.lua`` only checks that each entry is still
pending on this consumer and applies its record. ``encode_commit`` is the only writer
of the script's wire format (the script's header documents the same layout), used by
the service and by the script's tests alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lending.domain.events import ACCEPTED, RETURNED, Event
from lending.domain.streamids import id_range
from lending.keys import LEND, Keys
from lending.settings import Limits

Arg = str | bytes | int | float


@dataclass(frozen=True)
class Reject:
    """An entry that is not a valid request: only its ``rejected`` event is written."""

    event: Event


@dataclass(frozen=True)
class Lend:
    """A lend decided ``accepted`` (lend ``stored`` and ``granted``) or ``denied`` (give
    them back: storage first, the rest to shelving).

    :param stored: books this request reserved from the automated storage.
    :param granted: books the shelving service handed to this request (its context).
    """

    event: Event
    stored: tuple[str, ...] = ()
    granted: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.event.status == ACCEPTED


@dataclass(frozen=True)
class Return:
    """A return decided ``returned`` (take back ``event.books``) or ``denied``."""

    event: Event

    @property
    def returned(self) -> bool:
        return self.event.status == RETURNED


Record = Reject | Lend | Return


@dataclass(frozen=True)
class Fail:
    """A request that kept failing: its ``failed`` event and dead letter; whatever a lend
    holds (reservation, the grants naming it among ``books``) goes back.

    :param books: a lend's books, looked up in the grants ledger (none for a return).
    :param letter: the dead letter's fields.
    :param gone: the entry was deleted from its stream: a lend is finished even when no
        longer pending, while its reservation holds books.
    """

    event: Event
    books: tuple[str, ...]
    letter: Mapping[str, Arg]
    gone: bool = False


# The keys every commit names, in the script's KEYS[1..9] order.
FIXED_KEYS = 9


def fixed_keys(keys: Keys) -> list[str]:
    return [
        keys.lend_requests,
        keys.return_requests,
        keys.events,
        keys.lent_books,
        keys.storage,
        keys.shelving_returns,
        keys.from_shelving,
        keys.grants,
        keys.config,
    ]


def encode_commit(
    keys: Keys,
    group: str,
    consumer: str,
    limits: Limits,
    records: Sequence[Record],
    counts: Mapping[str, int] | None = None,
) -> tuple[list[str], list[Arg]]:
    """``commit.lua``'s KEYS and ARGV for ``records``, in the order they are applied,
    decided under ``limits`` (the script checks them against the namespace's, and gives
    back to storage up to their capacity) and under ``counts``, each user's count as
    read (the script checks those of the users it changes; ``None``: no check)."""
    all_keys = fixed_keys(keys)
    index: dict[str, int] = {}

    def key_index(name: str) -> int:
        if name not in index:
            all_keys.append(name)
            index[name] = len(all_keys) - FIXED_KEYS
        return index[name]

    body: list[Arg] = []
    for record in records:
        event = record.event
        if isinstance(record, Reject):
            body += ["X", *event.fields().values()]
        elif isinstance(record, Lend):
            body += [
                "L",
                *event.fields().values(),
                key_index(keys.user_count(event.user_id)),
                key_index(keys.user_books(event.user_id)),
                key_index(keys.reservation(event.request_id)),
                len(record.stored),
                *record.stored,
                len(record.granted),
                *record.granted,
            ]
        else:
            body += [
                "T",
                *event.fields().values(),
                key_index(keys.user_count(event.user_id)),
                key_index(keys.user_books(event.user_id)),
            ]
    checks: list[Arg] = []
    if counts is not None:
        for user in dict.fromkeys(r.event.user_id for r in records if not isinstance(r, Reject)):
            checks += [key_index(keys.user_count(user)), counts.get(user, 0)]
    lend_ids = [r.event.request_id for r in records if r.event.action == LEND]
    return_ids = [r.event.request_id for r in records if r.event.action != LEND]
    flat_limits = [item for pair in limits.fields().items() for item in pair]
    args: list[Arg] = [
        group,
        consumer,
        limits.storage_capacity,
        *id_range(lend_ids),
        *id_range(return_ids),
        len(flat_limits),
        *flat_limits,
        len(checks) // 2,
        *checks,
        *body,
    ]
    return all_keys, args


def encode_finish(
    keys: Keys, group: str, capacity: int, dead_letters_maxlen: int, fail: Fail
) -> tuple[list[str], list[Arg]]:
    """``finish.lua``'s KEYS and ARGV for ``fail``; the dead-letters stream keeps at most
    ``dead_letters_maxlen`` letters."""
    event = fail.event
    lend = event.action == LEND
    books = fail.books if lend else ()
    all_keys = [
        keys.requests(event.action),
        keys.events,
        keys.storage,
        keys.reservation(event.request_id),
        keys.shelving_returns,
        keys.dead_letters,
        keys.from_shelving,
        keys.grants,
        keys.dead_letters_trimmed,
        keys.config,
    ]
    args: list[Arg] = [
        group,
        event.request_id,
        capacity,
        dead_letters_maxlen,
        (2 if fail.gone else 1) if lend else 0,
        len(books),
        *books,
        len(event.fields()),
        *event.flat_fields(),
    ]
    for name, value in fail.letter.items():
        args += [name, value]
    return all_keys, args
