"""The invariant checker: ``check_state`` on hand-built snapshots, ``check`` on a real
namespace corrupted on purpose, and ``python -m lending check`` as a process.

Each invariant of issue 3 is broken in exactly one way per case, and the checker must
name that invariant and the offending key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.ops import checker, retention
from lending.ops.checker import GroupState, Snapshot, Violation, check_state
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.embedded import free_port
from lending.redis.replies import text
from lending.redis.scripts import Scripts
from lending.service.lending import LendingService
from lending.service.shelving import Grant
from lending.service.shelving_mock import ShelvingService
from lending.settings import Limits, Settings
from lending.worker import Worker

from .conftest import StartWorker
from .support import (
    ROOT,
    decoded,
    event_for,
    hash_of,
    in_process_worker,
    process_env,
    process_one,
    raw_entries,
    send,
    send_raw,
    start_worker_process,
    stop_process,
    stream_entries,
    wait_until,
    xadd_fields,
)
from .test_reliability import deliver, drain_shelving_returns

LIMIT = 3  # books per user, assumed by the checker
CAPACITY = 3  # books in storage, assumed by the checker

NS = "lib"
K = Keys(NS)


# -- check_state: hand-built snapshots -------------------------------------------------


def consistent_snapshot() -> Snapshot:
    """A quiescent library with alice at the limit and storage at its capacity."""
    shelving = {"b1": "1-0", "b2": "1-0", "b3": "1-0", "b4": "2-0", "b5": "2-0", "b6": "2-0", "b7": "5-0"}
    return Snapshot(
        namespace=NS,
        lent={"b1": "alice", "b2": "alice", "b3": "alice", "b4": "bob"},
        counts={"alice": "3", "bob": "1"},
        loans={"alice": {"b1", "b2", "b3"}, "bob": {"b4"}},
        storage={"b5", "b6", "b7"},
        shelving=dict(shelving),
        from_shelving=dict(shelving),
        requests={"lend": ["1-0", "2-0", "5-0"], "return": ["3-0", "4-0"]},
        events=[
            ("10-0", "lend", "1-0"),
            ("11-0", "lend", "2-0"),
            ("12-0", "return", "3-0"),
            ("13-0", "return", "4-0"),
            ("14-0", "lend", "5-0"),
        ],
        groups=[
            GroupState(K.lend_requests, LENDING_GROUP, 0, False),
            GroupState(K.return_requests, LENDING_GROUP, 0, False),
            GroupState(K.shelving_returns, SHELVING_GROUP, 0, False),
        ],
    )


def in_flight(snapshot: Snapshot) -> Snapshot:
    """The same snapshot while a lend request is still pending."""
    snapshot.groups[0] = GroupState(K.lend_requests, LENDING_GROUP, 1, False)
    return snapshot


@dataclass(frozen=True)
class Corruption:
    """One way of breaking one invariant of ``consistent_snapshot()``."""

    change: Callable[[Snapshot], object]
    invariants: frozenset[str]  # exactly the invariants the checker must report
    key: str  # an offending key every reported violation must name

    def apply(self, snapshot: Snapshot) -> Snapshot:
        self.change(snapshot)
        return snapshot


def corruption(change: Callable[[Snapshot], object], key: str, *invariants: str) -> Corruption:
    return Corruption(change, frozenset(invariants), key)


def add_stored_book(snapshot: Snapshot, book: str) -> None:
    snapshot.storage.add(book)
    snapshot.shelving[book] = snapshot.from_shelving[book] = "6-0"


def lend_over_the_limit(snapshot: Snapshot) -> None:
    snapshot.lent["b8"] = "alice"
    snapshot.loans["alice"].add("b8")
    snapshot.counts["alice"] = "4"
    snapshot.shelving["b8"] = snapshot.from_shelving["b8"] = "6-0"


def store_a_lent_book(snapshot: Snapshot) -> None:
    # b5 leaves the library altogether, b1 (lent) takes its place in storage.
    snapshot.storage.discard("b5")
    del snapshot.shelving["b5"], snapshot.from_shelving["b5"]
    snapshot.storage.add("b1")


def forget_in_shelving(book: str) -> Callable[[Snapshot], None]:
    def change(snapshot: Snapshot) -> None:
        del snapshot.shelving[book], snapshot.from_shelving[book]

    return change


ALWAYS: dict[str, Corruption] = {
    "books set misses a lent book": corruption(
        lambda s: s.loans["alice"].discard("b2"), K.user_books("alice"), "loans-match-lent-books"
    ),
    "books set holds a book lent to another user": corruption(
        lambda s: s.loans["alice"].add("b4"), K.user_books("alice"), "loans-match-lent-books"
    ),
    "books set of a user who holds nothing": corruption(
        lambda s: s.loans.update(carol={"b9"}), K.user_books("carol"), "loans-match-lent-books"
    ),
    "count above the lent books": corruption(
        lambda s: s.counts.update(bob="2"), K.user_count("bob"), "count-matches-lent-books"
    ),
    "count below the lent books": corruption(
        lambda s: s.counts.update(alice="2"), K.user_count("alice"), "count-matches-lent-books"
    ),
    "missing count (0) with books lent": corruption(
        lambda s: s.counts.pop("bob"), K.user_count("bob"), "count-matches-lent-books"
    ),
    "count with no books lent": corruption(
        lambda s: s.counts.update(carol="1"), K.user_count("carol"), "count-matches-lent-books"
    ),
    "non-integer count": corruption(
        lambda s: s.counts.update(bob="one"), K.user_count("bob"), "count-matches-lent-books"
    ),
    "empty count": corruption(lambda s: s.counts.update(bob=""), K.user_count("bob"), "count-matches-lent-books"),
    "negative count": corruption(
        lambda s: s.counts.update(carol="-1"), K.user_count("carol"), "count-not-negative", "count-matches-lent-books"
    ),
    "more books than the limit": corruption(lend_over_the_limit, K.user_count("alice"), "count-within-limit"),
    "count over the limit": corruption(
        lambda s: s.counts.update(alice="4"), K.user_count("alice"), "count-within-limit", "count-matches-lent-books"
    ),
    "book both in storage and lent": corruption(store_a_lent_book, K.storage, "storage-not-lent"),
    "storage over its capacity": corruption(lambda s: add_stored_book(s, "b8"), K.storage, "storage-within-capacity"),
}

WHEN_QUIESCENT: dict[str, Corruption] = {
    "book handed out by shelving, neither lent nor stored (lost)": corruption(
        lambda s: s.shelving.update(b9="9-0"), K.shelving_state, "shelving-matches-library"
    ),
    "lent book unknown to shelving": corruption(forget_in_shelving("b4"), K.shelving_state, "shelving-matches-library"),
    "stored book unknown to shelving": corruption(
        forget_in_shelving("b5"), K.shelving_state, "shelving-matches-library"
    ),
    "from-shelving names another context": corruption(
        lambda s: s.from_shelving.update(b1="9-0"), K.from_shelving, "library-record-matches-shelving"
    ),
    "from-shelving misses a held book": corruption(
        lambda s: s.from_shelving.pop("b5"), K.from_shelving, "library-record-matches-shelving"
    ),
    "from-shelving holds a book the library does not": corruption(
        lambda s: s.from_shelving.update(b9="9-0"), K.from_shelving, "library-record-matches-shelving"
    ),
    "lend entry with no event": corruption(
        lambda s: s.requests["lend"].append("6-0"), K.lend_requests, "one-event-per-entry"
    ),
    "return entry with no event": corruption(
        lambda s: s.requests["return"].append("7-0"), K.return_requests, "one-event-per-entry"
    ),
    "entry with two events": corruption(
        lambda s: s.events.append(("15-0", "lend", "2-0")), K.lend_requests, "one-event-per-entry"
    ),
    "event naming no lend entry": corruption(
        lambda s: s.events.append(("15-0", "lend", "9-0")), K.events, "event-names-an-entry"
    ),
    "event naming no return entry": corruption(
        lambda s: s.events.append(("15-0", "return", "9-0")), K.events, "event-names-an-entry"
    ),
    "lend event naming an entry of the return stream": corruption(
        lambda s: s.events.append(("15-0", "lend", "3-0")), K.events, "event-names-an-entry"
    ),
    "event naming something that is no entry id": corruption(
        lambda s: s.events.append(("15-0", "lend", "not-an-id")), K.events, "event-names-an-entry"
    ),
    "event with an unknown action": corruption(
        lambda s: s.events.append(("15-0", "borrow", "1-0")), K.events, "event-names-an-entry"
    ),
    "leftover reservation": corruption(
        lambda s: s.reservations.append(K.reservation("5-0")), K.reservation("5-0"), "no-reservations"
    ),
}


def reported(violations: list[Violation]) -> frozenset[str]:
    return frozenset(v.invariant for v in violations)


def test_a_consistent_snapshot_has_no_violations() -> None:
    snapshot = consistent_snapshot()

    assert snapshot.quiescent
    assert check_state(snapshot, LIMIT, CAPACITY) == []


@pytest.mark.parametrize("quiescent", [True, False], ids=["quiescent", "in flight"])
@pytest.mark.parametrize("case", list(ALWAYS.values()), ids=list(ALWAYS))
def test_always_invariants_are_checked_quiescent_or_not(case: Corruption, quiescent: bool) -> None:
    snapshot = case.apply(consistent_snapshot())

    violations = check_state(snapshot, LIMIT, CAPACITY, quiescent=quiescent)

    assert reported(violations) == case.invariants, violations
    assert all(case.key in v.keys for v in violations), violations


@pytest.mark.parametrize("case", list(WHEN_QUIESCENT.values()), ids=list(WHEN_QUIESCENT))
def test_quiescent_invariants_are_checked_once_quiescent(case: Corruption) -> None:
    snapshot = case.apply(consistent_snapshot())

    violations = check_state(snapshot, LIMIT, CAPACITY, quiescent=True)

    assert reported(violations) == case.invariants, violations
    assert all(case.key in v.keys for v in violations), violations


@pytest.mark.parametrize("case", list(WHEN_QUIESCENT.values()), ids=list(WHEN_QUIESCENT))
def test_quiescent_invariants_are_not_reported_while_requests_are_in_flight(case: Corruption) -> None:
    snapshot = in_flight(case.apply(consistent_snapshot()))

    assert not snapshot.quiescent
    assert check_state(snapshot, LIMIT, CAPACITY) == []
    assert check_state(case.apply(consistent_snapshot()), LIMIT, CAPACITY, quiescent=False) == []


def test_a_book_the_grants_ledger_names_is_not_lost() -> None:
    """A late grant to a finished request, not yet given back: the ledger owns it."""
    snapshot = consistent_snapshot()
    snapshot.shelving["late"] = "1-0"
    snapshot.grants["late"] = "1-0"
    assert check_state(snapshot, LIMIT, CAPACITY) == []

    snapshot.grants["late"] = "2-0"  # the ledger names another request: nobody owns it
    assert reported(check_state(snapshot, LIMIT, CAPACITY)) == {"shelving-matches-library"}


def test_an_event_for_an_entry_trimmed_from_its_stream_is_not_a_violation() -> None:
    snapshot = consistent_snapshot()
    snapshot.events.insert(0, ("9-0", "lend", "0-7"))  # older than the lend stream's first entry, 1-0

    assert check_state(snapshot, LIMIT, CAPACITY) == []


@pytest.mark.parametrize(
    ("group", "reservations", "quiescent"),
    [
        (GroupState(K.lend_requests, LENDING_GROUP, 0, False), [], True),
        (GroupState(K.lend_requests, LENDING_GROUP, 1, False), [], False),
        (GroupState(K.lend_requests, LENDING_GROUP, 0, True), [], False),
        (GroupState(K.shelving_returns, SHELVING_GROUP, 2, False), [], False),
        (GroupState(K.shelving_returns, SHELVING_GROUP, 0, True), [], False),
        # Nothing in progress, so a reservation is a leftover to report, not work under way.
        (GroupState(K.lend_requests, LENDING_GROUP, 0, False), [K.reservation("5-0")], True),
    ],
    ids=["all done", "lend pending", "lend unread", "shelving pending", "shelving unread", "reservation"],
)
def test_quiescent_means_every_group_done(group: GroupState, reservations: list[str], quiescent: bool) -> None:
    snapshot = consistent_snapshot()
    snapshot.groups.append(group)
    snapshot.reservations = reservations

    assert snapshot.quiescent is quiescent


def counted(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` with Redis 7's counters: every entry ever added was answered once."""
    snapshot.entries_added = {action: len(ids) for action, ids in snapshot.requests.items()}
    snapshot.events_added = len(snapshot.events)
    return snapshot


def test_counted_entries_that_all_got_their_event_are_consistent() -> None:
    assert check_state(counted(consistent_snapshot()), LIMIT, CAPACITY) == []


def test_entries_deleted_before_they_were_answered_are_a_violation() -> None:
    """A sender's ``XADD ... MAXLEN 0`` deleted 19 queued lend requests: the stream and the
    events look consistent, only the counters show that entries vanished."""
    snapshot = counted(consistent_snapshot())
    snapshot.entries_added["lend"] += 19

    violations = check_state(snapshot, LIMIT, CAPACITY)

    assert reported(violations) == {"every-entry-answered"}
    assert "19 request entries" in violations[0].message and K.lend_requests in violations[0].keys


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.events.pop(1), id="an entry without its event"),
        pytest.param(lambda s: s.events.append(("15-0", "lend", "1-0")), id="a second event"),
        pytest.param(lambda s: s.events.append(("15-0", "lend", "99-0")), id="an event naming no entry"),
    ],
)
def test_what_other_invariants_report_is_not_counted_again(change: Callable[[Snapshot], object]) -> None:
    snapshot = counted(consistent_snapshot())
    change(snapshot)
    snapshot.events_added = len(snapshot.events)

    assert "every-entry-answered" not in reported(check_state(snapshot, LIMIT, CAPACITY))


def test_trimmed_entries_and_trimmed_events_are_answered() -> None:
    """Retention trimmed two answered lend entries (0-5, 0-7) and the events up to the
    first entry's: the counters still add up."""
    snapshot = counted(consistent_snapshot())
    snapshot.entries_added["lend"] += 2
    snapshot.events_added = len(snapshot.events) + 2
    snapshot.events = snapshot.events[1:]  # 1-0's event trimmed away too
    snapshot.events_trimmed_to = "11-0"

    assert check_state(snapshot, LIMIT, CAPACITY) == []


def test_without_counters_or_while_in_flight_vanished_entries_are_not_judged() -> None:
    no_counters = consistent_snapshot()  # Redis 6.2
    no_counters.entries_added = {"lend": 30}
    assert check_state(no_counters, LIMIT, CAPACITY) == []
    busy = counted(in_flight(consistent_snapshot()))
    busy.entries_added["lend"] += 5
    assert "every-entry-answered" not in reported(check_state(busy, LIMIT, CAPACITY))


@pytest.fixture
async def redis7(redis7_url: str, keys: Keys) -> AsyncIterator[Redis]:
    client = make_client(redis7_url)
    yield client
    async for key in client.scan_iter(match=keys.pattern("*"), count=1000):
        await client.delete(key)
    await client.aclose()


async def test_requests_deleted_from_the_queue_by_a_client_are_reported_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    """Issue 10: 20 queued requests, then one more with ``MAXLEN 1`` (what a sender with
    XADD could do): 20 vanished without an event, and ``check`` said OK."""
    for n in range(20):
        await send(redis7, keys, "lend", f"user-{n}", [f"b{n}"])
    await redis7.xadd(keys.lend_requests, {"user_id": "mallory", "book_ids": "b99"}, maxlen=1, approximate=False)
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent
    assert reported(report.violations) == {"every-entry-answered"}, report.violations
    assert "20 request entries" in report.violations[0].message


async def answer_lends(redis: Redis, keys: Keys, n: int) -> list[str]:
    """Send ``n`` lends (user-k asks for bk) and wait for each one's event; their ids."""
    sent = [await send(redis, keys, "lend", f"user-{k}", [f"b{k}"]) for k in range(n)]
    for entry in sent:
        await event_for(redis, keys, "lend", entry)
    return sent


async def test_an_answered_request_deleted_from_its_stream_is_no_violation_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    # Its event names an entry no longer there; Redis 7 says an entry that old was deleted.
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        sent = await answer_lends(redis7, keys, 5)
        assert await redis7.xdel(keys.lend_requests, sent[2]) == 1
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent and report.violations == [], report.violations


async def test_a_forged_event_is_reported_though_an_entry_after_it_was_deleted_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    # The deleted entry's excuse (an ID below max-deleted-entry-id) must not cover an
    # event naming an entry that never was: the counters show one event too many.
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        sent = await answer_lends(redis7, keys, 4)
        forged = f"{sent[0].split('-')[0]}-7"
        fields = {"request_id": forged, "action": "lend", "user_id": "x", "status": "rejected", "books": ""}
        await redis7.xadd(keys.events, xadd_fields({**fields, "skipped": "", "reason": "made up"}))
        assert await redis7.xdel(keys.lend_requests, sent[-1]) == 1
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent
    assert reported(report.violations) == {"event-names-an-entry"}, report.violations


async def test_a_request_deleted_before_it_was_answered_is_still_reported_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    sent = [await send(redis7, keys, "lend", f"user-{n}", [f"b{n}"]) for n in range(5)]
    assert await redis7.xdel(keys.lend_requests, sent[2]) == 1
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent
    assert reported(report.violations) == {"every-entry-answered"}, report.violations


@pytest.mark.parametrize("keep", [2, 0])
async def test_events_trimmed_before_retention_set_its_marker_are_no_violation_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings, keep: int
) -> None:
    # Retention trims, then sets {NS}:events:trimmed-to: a check between the two saw
    # answered requests without their event. Redis 7 says what it removed.
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        await answer_lends(redis7, keys, 6)
        assert await redis7.xtrim(keys.events, maxlen=keep, approximate=False) == 6 - keep
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent and report.violations == [], report.violations


async def test_an_event_xdeled_from_the_middle_is_a_lost_outcome_on_redis_7(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    # Retention only trims events from the start: one deleted from the middle is no trim.
    # All five are queued before the first is answered: every request is older than the
    # first event, which must not excuse the one whose event was deleted.
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        await answer_lends(redis7, keys, 5)
        second = decoded(raw_entries(await redis7.xrange(keys.events))[1][0])
        assert await redis7.xdel(keys.events, second) == 1
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent
    assert "one-event-per-entry" in reported(report.violations), report.violations


async def test_a_trimmed_to_marker_that_is_no_id_is_ignored_not_a_crash(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await lend_and_return_a_few_books(redis, keys, start_worker)
    await redis.set(keys.events_trimmed_to, "yesterday")

    report = await checker.check(redis, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent and report.violations == [], report.violations


async def test_trimming_on_redis_7_leaves_every_entry_accounted_for(
    redis7: Redis, redis7_url: str, keys: Keys, settings: Settings
) -> None:
    async with in_process_worker(settings.replace(redis_url=redis7_url)):
        for n in range(30):
            action = "lend" if n % 3 else "return"
            await event_for(redis7, keys, action, await send(redis7, keys, action, f"user-{n % 4}", [f"b{n}"]))
        assert sum((await retention.trim(redis7, keys, events_maxlen=5)).values()) > 0
        report = await checker.check(redis7, keys.namespace, wait_quiescent_s=10)

    assert report.quiescent and report.violations == [], report.violations


# -- check: a real namespace, corrupted on purpose ---------------------------------------


async def lend_and_return_a_few_books(redis: Redis, keys: Keys, start_worker: StartWorker) -> Worker:
    """Drive a real worker through accepted, denied, returned and rejected outcomes;
    storage fills up and books go back to shelving. Returns the (still running) worker."""
    worker = await start_worker(max_books_per_user=LIMIT, storage_capacity=2)

    async def outcome(action: str, user: str, *books: str) -> str:
        return (await event_for(redis, keys, action, await send(redis, keys, action, user, books))).status

    assert await outcome("lend", "alice", "b1", "b2", "b3") == "accepted"
    assert await outcome("lend", "bob", "b3", "b4") == "accepted"  # b4 only
    assert await outcome("return", "alice", "b1", "b2", "b3") == "returned"  # 2 stored, 1 to shelving
    assert await outcome("lend", "carol", "b1", "b3") == "accepted"  # from storage and shelving
    assert await outcome("lend", "dave", "b4") == "denied"  # unavailable
    assert await outcome("lend", "bob", "b5", "b6", "b7") == "denied"  # over the limit
    assert await outcome("return", "dave", "b4") == "denied"  # not his
    rejected = await send_raw(redis, keys, "lend", {"user_id": "eve"})
    assert (await event_for(redis, keys, "lend", rejected)).status == "rejected"
    return worker


async def stop(worker: Worker, redis: Redis, keys: Keys) -> None:
    """Stop an in-process worker and wait until it has let go of its id."""
    worker.stop()
    await wait_until(lambda: _released(redis, keys, worker.settings.worker_id))


async def _released(redis: Redis, keys: Keys, worker_id: str) -> bool:
    return not await redis.exists(keys.worker(worker_id))


async def a_lent_book(redis: Redis, keys: Keys) -> tuple[str, str]:
    """(book, user) of some lent book."""
    lent = await hash_of(redis, keys.lent_books)
    book, user = sorted(lent.items())[0]
    return book, user


async def incr_a_count(redis: Redis, keys: Keys) -> str:
    _, user = await a_lent_book(redis, keys)
    await redis.incr(keys.user_count(user))
    return keys.user_count(user)


async def hdel_a_lent_book(redis: Redis, keys: Keys) -> str:
    book, user = await a_lent_book(redis, keys)
    await redis.hdel(keys.lent_books, book)
    return keys.user_count(user)


async def set_a_negative_count(redis: Redis, keys: Keys) -> str:
    await redis.set(keys.user_count("erin"), -1)
    return keys.user_count("erin")


async def lend_beyond_the_limit(redis: Redis, keys: Keys) -> str:
    _, user = await a_lent_book(redis, keys)
    extra = [f"extra-{i}" for i in range(LIMIT)]
    await redis.hset(keys.lent_books, mapping=dict.fromkeys(extra, user))
    await redis.incrby(keys.user_count(user), len(extra))
    return keys.user_count(user)


async def sadd_a_lent_book_to_storage(redis: Redis, keys: Keys) -> str:
    book, _ = await a_lent_book(redis, keys)
    await redis.sadd(keys.storage, book)
    return keys.storage


async def sadd_beyond_capacity(redis: Redis, keys: Keys) -> str:
    await redis.sadd(keys.storage, *[f"extra-{i}" for i in range(CAPACITY + 1)])
    return keys.storage


async def hset_a_lost_book_in_shelving(redis: Redis, keys: Keys) -> str:
    await redis.hset(keys.shelving_state, "lost-book", "1-0")
    return keys.shelving_state


async def hdel_a_lent_book_from_shelving(redis: Redis, keys: Keys) -> str:
    book, _ = await a_lent_book(redis, keys)
    await redis.hdel(keys.shelving_state, book)
    return keys.shelving_state


async def hset_another_context_in_from_shelving(redis: Redis, keys: Keys) -> str:
    book, _ = await a_lent_book(redis, keys)
    await redis.hset(keys.from_shelving, book, "9999999999999-0")
    return keys.from_shelving


async def xadd_a_second_event(redis: Redis, keys: Keys) -> str:
    events = raw_entries(await redis.xrange(keys.events, count=1))
    _, fields = events[0]
    await redis.xadd(keys.events, xadd_fields(fields))
    return keys.events


async def xadd_an_event_naming_no_entry(redis: Redis, keys: Keys) -> str:
    await redis.xadd(
        keys.events,
        {
            "request_id": "9999999999999-0",
            "action": "lend",
            "user_id": "x",
            "status": "rejected",
            "books": "",
            "skipped": "",
            "reason": "made up",
        },
    )
    return keys.events


async def acknowledge_an_entry_without_event(redis: Redis, keys: Keys) -> str:
    # An entry read and acknowledged by someone who published no event.
    await send(redis, keys, "lend", "mallory", ["b9"])
    await redis.xreadgroup(LENDING_GROUP, "intruder", {keys.lend_requests: ">"})
    pending = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, "-", "+", 10)
    await redis.xack(keys.lend_requests, LENDING_GROUP, *[p["message_id"] for p in pending])
    return keys.lend_requests


async def leave_a_reservation(redis: Redis, keys: Keys) -> str:
    await redis.sadd(keys.reservation("x"), "b9")
    return keys.reservation("x")


Corrupt = Callable[[Redis, Keys], Awaitable[str]]  # corrupts, returns the offending key


async def replace_a_books_set_with_a_list(redis: Redis, keys: Keys) -> str:
    _, user = await a_lent_book(redis, keys)
    books = sorted(text(m) for m in await redis.smembers(keys.user_books(user)))
    await redis.delete(keys.user_books(user))
    await redis.rpush(keys.user_books(user), *books)
    return keys.user_books(user)


async def replace_lent_books_with_a_string(redis: Redis, keys: Keys) -> str:
    await redis.delete(keys.lent_books)
    await redis.set(keys.lent_books, "gone")
    return keys.lent_books


async def replace_a_count_with_a_set(redis: Redis, keys: Keys) -> str:
    _, user = await a_lent_book(redis, keys)
    await redis.delete(keys.user_count(user))
    await redis.sadd(keys.user_count(user), "1")
    return keys.user_count(user)


async def replace_a_request_stream_with_a_string(redis: Redis, keys: Keys) -> str:
    await redis.delete(keys.return_requests)
    await redis.set(keys.return_requests, "gone")
    return keys.return_requests


async def replace_the_workers_set_with_a_string(redis: Redis, keys: Keys) -> str:
    await redis.delete(keys.workers)
    await redis.set(keys.workers, "gone")  # a worker no longer starts
    return keys.workers


async def replace_the_dead_letters_with_a_hash(redis: Redis, keys: Keys) -> str:
    await redis.hset(keys.dead_letters, "x", "y")  # the dead-letter tools fail on it
    return keys.dead_letters


async def replace_the_config_with_a_list(redis: Redis, keys: Keys) -> str:
    await redis.delete(keys.config)
    await redis.rpush(keys.config, "5")
    return keys.config


CORRUPTIONS: dict[str, tuple[Corrupt, str]] = {
    "INCR a user's count": (incr_a_count, "count-matches-lent-books"),
    "a books set replaced by a list": (replace_a_books_set_with_a_list, "keys-of-their-type"),
    "lent-books replaced by a string": (replace_lent_books_with_a_string, "keys-of-their-type"),
    "a count replaced by a set": (replace_a_count_with_a_set, "keys-of-their-type"),
    "a request stream replaced by a string": (replace_a_request_stream_with_a_string, "keys-of-their-type"),
    "the workers set replaced by a string": (replace_the_workers_set_with_a_string, "keys-of-their-type"),
    "the dead letters replaced by a hash": (replace_the_dead_letters_with_a_hash, "keys-of-their-type"),
    "the config replaced by a list": (replace_the_config_with_a_list, "keys-of-their-type"),
    "HDEL a lent book": (hdel_a_lent_book, "count-matches-lent-books"),
    "SET a negative count": (set_a_negative_count, "count-not-negative"),
    "lend beyond the limit": (lend_beyond_the_limit, "count-within-limit"),
    "SADD a lent book to storage": (sadd_a_lent_book_to_storage, "storage-not-lent"),
    "SADD beyond capacity": (sadd_beyond_capacity, "storage-within-capacity"),
    "HSET a lost book in shelving:state": (hset_a_lost_book_in_shelving, "shelving-matches-library"),
    "HDEL a lent book from shelving:state": (hdel_a_lent_book_from_shelving, "shelving-matches-library"),
    "HSET another context in from-shelving": (hset_another_context_in_from_shelving, "library-record-matches-shelving"),
    "XADD a second event for an entry": (xadd_a_second_event, "one-event-per-entry"),
    "XADD an event naming no entry": (xadd_an_event_naming_no_entry, "event-names-an-entry"),
    "acknowledge a request entry with no event": (acknowledge_an_entry_without_event, "one-event-per-entry"),
    "leave a reservations key": (leave_a_reservation, "no-reservations"),
}


async def test_a_namespace_worked_by_a_real_worker_is_clean(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await lend_and_return_a_few_books(redis, keys, start_worker)

    report = await checker.check(
        redis, keys.namespace, wait_quiescent_s=10, limits=Limits(max_books_per_user=LIMIT, storage_capacity=CAPACITY)
    )

    assert report.quiescent
    assert report.violations == []
    assert report.clean


@pytest.mark.parametrize("keep", [1, 0], ids=["all but the last entry", "every entry"])
async def test_trimming_processed_entries_from_a_request_stream_is_no_violation(
    redis: Redis, keys: Keys, start_worker: StartWorker, keep: int
) -> None:
    await stop(await lend_and_return_a_few_books(redis, keys, start_worker), redis, keys)
    assert await redis.xlen(keys.lend_requests) == 6

    # Every entry is acknowledged and has its event: an operator may trim the stream.
    await redis.xtrim(keys.lend_requests, maxlen=keep, approximate=False)
    report = await checker.check(
        redis, keys.namespace, limits=Limits(max_books_per_user=LIMIT, storage_capacity=CAPACITY)
    )

    assert report.quiescent
    assert report.violations == []


@pytest.mark.parametrize(("corrupt", "invariant"), list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
async def test_the_checker_catches_a_corrupted_namespace(
    redis: Redis, keys: Keys, start_worker: StartWorker, corrupt: Corrupt, invariant: str
) -> None:
    worker = await lend_and_return_a_few_books(redis, keys, start_worker)
    assert (
        await checker.check(
            redis,
            keys.namespace,
            wait_quiescent_s=10,
            limits=Limits(max_books_per_user=LIMIT, storage_capacity=CAPACITY),
        )
    ).clean
    await stop(worker, redis, keys)

    offending_key = await corrupt(redis, keys)
    report = await checker.check(
        redis, keys.namespace, limits=Limits(max_books_per_user=LIMIT, storage_capacity=CAPACITY)
    )

    assert not report.clean
    assert any(v.invariant == invariant and offending_key in v.keys for v in report.violations), (
        f"quiescent={report.quiescent}: {report.violations}"
    )


# -- python -m lending check --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def run_check(redis_url: str, namespace: str, *args: str) -> Run:
    """``python -m lending check`` as a child process (without blocking the event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lending",
        "check",
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        *args,
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_check_command_says_ok_and_exits_0_when_consistent(
    redis: Redis, redis_url: str, keys: Keys, start_worker: StartWorker
) -> None:
    await stop(await lend_and_return_a_few_books(redis, keys, start_worker), redis, keys)

    run = await run_check(redis_url, keys.namespace)

    assert run.code == 0, run
    assert run.out.startswith("OK"), run
    assert keys.namespace in run.out
    assert "all invariants" in run.out


async def test_check_command_lists_every_violation_and_exits_1(
    redis: Redis, redis_url: str, keys: Keys, start_worker: StartWorker
) -> None:
    await stop(await lend_and_return_a_few_books(redis, keys, start_worker), redis, keys)
    count_key = await incr_a_count(redis, keys)
    await hset_a_lost_book_in_shelving(redis, keys)

    run = await run_check(redis_url, keys.namespace)

    assert run.code == 1, run
    assert run.out.startswith("FAILED: 2 violation(s)"), run
    lines = run.out.splitlines()[1:]
    assert any("[count-matches-lent-books]" in line and count_key in line for line in lines), run
    assert any("[shelving-matches-library]" in line and keys.shelving_state in line for line in lines), run


@pytest.mark.parametrize(
    ("limit", "invariant"),
    [
        ("max_books_per_user", "count-within-limit"),  # carol holds 2
        ("storage_capacity", "storage-within-capacity"),  # storage holds 2
    ],
)
async def test_check_command_checks_against_the_limits_the_workers_published(
    redis: Redis, redis_url: str, keys: Keys, start_worker: StartWorker, limit: str, invariant: str
) -> None:
    await stop(await lend_and_return_a_few_books(redis, keys, start_worker), redis, keys)
    run = json.loads((await run_check(redis_url, keys.namespace, "--json")).out)
    assert run["limits"] == {"max_books_per_user": LIMIT, "max_books_per_request": 50, "storage_capacity": 2}
    assert run["limits_published"] is True

    await redis.hset(keys.config, limit, 1)  # as if the workers had run with a limit of 1
    run_1 = await run_check(redis_url, keys.namespace, "--json")

    assert run_1.code == 1, run_1
    assert [v["invariant"] for v in json.loads(run_1.out)["violations"]] == [invariant]


async def test_check_command_assumes_the_defaults_when_no_worker_published_limits(redis_url: str, keys: Keys) -> None:
    run = await run_check(redis_url, keys.namespace)
    assert run.code == 0, run
    assert "defaults: no worker has published its limits" in run.out


@pytest.mark.parametrize("corrupt", [None, sadd_a_lent_book_to_storage], ids=["clean", "corrupt"])
async def test_check_command_json_report(
    redis: Redis, redis_url: str, keys: Keys, start_worker: StartWorker, corrupt: Corrupt | None
) -> None:
    await stop(await lend_and_return_a_few_books(redis, keys, start_worker), redis, keys)
    offending_key = await corrupt(redis, keys) if corrupt else None

    run = await run_check(redis_url, keys.namespace, "--json")

    report = json.loads(run.out)
    assert report["quiescent"] is True
    if offending_key is None:
        assert (run.code, report["clean"], report["violations"]) == (0, True, [])
    else:
        assert (run.code, report["clean"]) == (1, False)
        # Storage is full (the workers' capacity is 2), so the extra book also overfills it.
        assert sorted((v["invariant"], offending_key in v["keys"]) for v in report["violations"]) == [
            ("storage-not-lent", True),
            ("storage-within-capacity", True),
        ]
        assert all(isinstance(v["message"], str) and v["message"] for v in report["violations"])


async def test_check_command_waits_for_a_worker_to_finish_queued_requests(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    queued = [await send(redis, keys, "lend", f"user-{i}", [f"book-{i}", f"book-{i + 1}"]) for i in range(20)]
    before = json.loads((await run_check(redis_url, keys.namespace, "--json")).out)
    assert before["quiescent"] is False  # nothing has read the requests yet

    # Each shelving call takes 0.75-2.25 s: the check starts long before the worker is done.
    proc = start_worker_process("w1", redis_url, keys.namespace, "--shelving-latency-ms", "1500")
    try:
        run = await run_check(redis_url, keys.namespace, "--wait-quiescent", "5", "--json")
    finally:
        stop_process(proc)

    report = json.loads(run.out)
    assert (run.code, report["clean"], report["quiescent"]) == (0, True, True), run
    events = await stream_entries(redis, keys.events)
    assert sorted(fields["request_id"] for _, fields in events) == sorted(queued)


async def test_check_command_with_redis_unreachable_exits_1_with_a_one_line_error(keys: Keys) -> None:
    url = f"redis://127.0.0.1:{free_port()}"

    run = await run_check(url, keys.namespace)

    assert run.code == 1, run
    assert run.out == ""
    assert run.err.startswith("error:"), run
    assert len(run.err.strip().splitlines()) == 1, run


@pytest.mark.parametrize(
    ("trimmed_to", "flagged"),
    [(None, True), ("1-5", True), ("11-0", False)],
    ids=["events never trimmed", "trimmed before the entry", "trimmed past the entry's event"],
)
def test_an_entry_whose_event_was_trimmed_away(trimmed_to: str | None, flagged: bool) -> None:
    snapshot = consistent_snapshot()
    snapshot.events = [e for e in snapshot.events if e[2] != "2-0"]  # lend 2-0's event is gone
    snapshot.events_trimmed_to = trimmed_to

    violations = check_state(snapshot, LIMIT, CAPACITY)

    assert (reported(violations) == {"one-event-per-entry"}) is flagged
    assert flagged or violations == []


# -- a snapshot is one moment ----------------------------------------------------------


async def checks_while(
    work: Coroutine[Any, Any, object], check: Callable[[], Awaitable[checker.Report]]
) -> list[checker.Report]:
    """The reports of ``check`` run again and again while ``work`` runs."""
    busy = asyncio.create_task(work)
    reports = []
    try:
        while not busy.done():
            reports.append(await check())
    finally:
        await busy
    return reports


async def settle_and_give_back_grants(redis: Redis, keys: Keys, settings: Settings, context: str, n: int) -> None:
    """What a worker's periodic reconciliation and the shelving service do after a run:
    shelving hands a book to a finished request, the reconciliation gives it back, the
    shelving service takes it. At every moment the namespace is consistent: the ledger
    owns the grant, or the returns stream holds the book (not quiescent), or it is back."""
    scripts = Scripts()
    service = LendingService(redis, settings, scripts, ShelvingService(redis, keys, scripts))
    shelving = ShelvingService(redis, keys, scripts)
    for k in range(n):
        book = f"late-{k}"
        assert await shelving.get_many([(book, context)]) == [Grant.NEW]
        assert await service.reconcile([(book, context)]) == (1, 1)
        await drain_shelving_returns(redis, keys, settings)
        assert not await redis.hexists(keys.shelving_state, book)


async def test_grants_settled_while_the_checker_reads_are_never_reported(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    # A CI run reported a book "lost" that was only on its way back: the checker read the
    # shelving state, then the ledger after the reconciliation had settled the grant, then
    # the groups after shelving had taken the book back. A snapshot must be one moment.
    settings = settings.replace(storage_capacity=0)
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await ensure_group(redis, keys.return_requests, LENDING_GROUP)
    await ensure_group(redis, keys.shelving_returns, SHELVING_GROUP)
    scripts = Scripts()
    service = LendingService(redis, settings, scripts, ShelvingService(redis, keys, scripts))
    finished = await send(redis, keys, "lend", "ada", ["b0"])
    event = await process_one(service, await deliver(redis, keys, settings.worker_id, finished, claim=False))
    assert event is not None and event.status == "accepted"

    limits = Limits(storage_capacity=CAPACITY, max_books_per_user=LIMIT)
    reports = await checks_while(
        settle_and_give_back_grants(redis, keys, settings, finished, 400),
        lambda: checker.check(redis, keys.namespace, limits=limits),
    )

    assert sum(report.quiescent for report in reports) >= 5, "the checker never saw a quiescent moment"
    assert [v for report in reports for v in report.violations] == []


async def test_a_check_beside_a_live_worker_lending_to_new_users_reports_nothing(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    # Users lent to for the first time while the checker read: their count and books set,
    # read after lent-books, disagreed with it. Each check here runs while requests flow.
    async def traffic() -> None:
        for n in range(600):
            await send(redis, keys, "lend", f"new-{n}", [f"t{n}"])
            if n % 3 == 0:
                await send(redis, keys, "return", f"new-{n - 3}", [f"t{n - 3}"])
            await asyncio.sleep(0.002)

    async with in_process_worker(settings):
        # Against the limits the worker published.
        reports = await checks_while(traffic(), lambda: checker.check(redis, keys.namespace))

    assert len(reports) >= 5
    assert [v for report in reports for v in report.violations] == []
