"""Bad input on the request streams: property-based fuzzing of entries sent to a real
worker, extreme entries, and a bulk run of malformed ones.

Whatever an entry holds, it gets exactly one event: ``rejected`` when the README's
validation rules say so, a valid outcome of its action otherwise. The worker keeps
running, and the namespace stays consistent (the invariant checker is clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.domain.events import Event
from lending.keys import ACTIONS, LEND, Keys
from lending.ops import checker
from lending.redis.connection import make_client
from lending.settings import Limits, Settings
from lending.worker import Worker

from .support import decoded, event_for, raw_entries, send, wait_until, xadd_fields

MAX_BOOKS_PER_REQUEST = 50
MEGABYTE = 1 << 20

# -- the rules, as the README states them -----------------------------------------------


def valid_id(value: str) -> bool:
    """1-128 characters, no comma, no Unicode whitespace, control or format character."""
    return 1 <= len(value) <= 128 and not any(
        ch == "," or ch.isspace() or unicodedata.category(ch) in ("Zs", "Zl", "Zp", "Cc", "Cf") for ch in value
    )


def requested_books(fields: Mapping[bytes, bytes]) -> tuple[str, ...] | None:
    """The distinct books of a valid request, in order; ``None`` if it must be rejected."""
    raw_user, raw_books = fields.get(b"user_id"), fields.get(b"book_ids")
    if raw_user is None or raw_books is None:
        return None
    try:
        user, books = raw_user.decode("utf-8"), raw_books.decode("utf-8")
    except UnicodeDecodeError:
        return None
    distinct = tuple(dict.fromkeys(books.split(",")))
    if not valid_id(user) or not 1 <= len(distinct) <= MAX_BOOKS_PER_REQUEST or not all(map(valid_id, distinct)):
        return None
    return distinct


OUTCOMES = {"lend": {"accepted", "denied"}, "return": {"returned", "denied"}}


def assert_valid_outcome(action: str, fields: Mapping[bytes, bytes], event: Event) -> None:
    books = requested_books(fields)
    if books is None:
        assert event.status == "rejected", (fields, event)
        assert event.reason, event
        return
    assert event.status in OUTCOMES[action], (fields, event)
    assert event.user_id == fields[b"user_id"].decode()
    assert set(event.books) | set(event.skipped) == set(books), event
    assert not set(event.books) & set(event.skipped), event
    assert bool(event.books) == (event.status != "denied"), event


# -- a worker that the tests can watch ----------------------------------------------------


@dataclass
class RunningWorker:
    worker: Worker
    task: asyncio.Task[int]
    client: Redis

    @property
    def running(self) -> bool:
        return not self.task.done()

    @property
    def failures(self) -> int:
        return sum(c.failures for c in self.worker.consumers)


RunWorker = Callable[..., Awaitable[RunningWorker]]


@pytest.fixture
async def run_worker(redis_url: str, settings: Settings) -> AsyncIterator[RunWorker]:
    """Start in-process workers and keep their tasks, to tell whether they still run."""
    started: list[RunningWorker] = []

    async def start(**overrides: object) -> RunningWorker:
        worker_settings = settings.replace(**overrides)
        # The pool size ``python main.py`` gives its client (lending/app.py).
        client = make_client(redis_url, max_connections=worker_settings.concurrency * 2 + 16)
        worker = Worker(worker_settings, client, handle_signals=False)
        running = RunningWorker(worker, asyncio.create_task(worker.run()), client)
        started.append(running)
        await wait_until(lambda: not running.running or all(c.connected for c in worker.consumers))
        if not running.running:
            running.task.result()  # raise its error
        return running

    yield start
    for running in started:
        running.worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running.task, 10)
        await running.client.aclose()


@pytest.fixture
async def worker(run_worker: RunWorker) -> RunningWorker:
    return await run_worker(max_books_per_request=MAX_BOOKS_PER_REQUEST)


# -- sending entries and collecting their events --------------------------------------------

Entry = tuple[str, dict[bytes, bytes]]  # (action, fields)


async def last_event_id(redis: Redis, keys: Keys) -> str:
    last = raw_entries(await redis.xrevrange(keys.events, count=1))
    return last[0][0] if last else "0-0"


async def xadd_all(redis: Redis, keys: Keys, entries: Sequence[Entry]) -> list[str]:
    """XADD every entry in one round trip; their ids, in order."""
    async with redis.pipeline(transaction=False) as pipe:
        for action, fields in entries:
            pipe.xadd(keys.requests(action), xadd_fields(fields))
        ids = await pipe.execute()
    return [decoded(entry_id) for entry_id in ids]


async def events_for(
    redis: Redis, keys: Keys, sent: Sequence[tuple[str, str]], after: str, timeout_s: float = 20.0
) -> dict[tuple[str, str], list[Event]]:
    """Wait until each (action, entry id) of ``sent`` has an event after ``after``; all
    their events, by entry."""
    found: dict[tuple[str, str], list[Event]] = {}

    async def all_answered() -> bool:
        raw = raw_entries(await redis.xrange(keys.events, min=f"({after}"))
        found.clear()
        for event_id, fields in raw:
            event = Event.from_fields(fields, event_id)
            found.setdefault((event.action, event.request_id), []).append(event)
        return all(entry in found for entry in sent)

    await wait_until(all_answered, timeout_s=timeout_s, interval_s=0.02)
    return {entry: found[entry] for entry in sent}


async def assert_consistent(redis: Redis, keys: Keys, settings: Settings) -> None:
    report = await checker.check(
        redis,
        keys.namespace,
        wait_quiescent_s=10,
        limits=Limits(max_books_per_user=settings.max_books_per_user, storage_capacity=settings.storage_capacity),
    )
    assert report.quiescent
    assert report.violations == []


async def assert_each_gets_one_valid_outcome(
    redis: Redis, keys: Keys, worker: RunningWorker, entries: Sequence[Entry]
) -> list[Event]:
    """Send ``entries`` at once and check their outcomes and the namespace; their events."""
    after = await last_event_id(redis, keys)
    ids = await xadd_all(redis, keys, entries)
    sent = [(action, entry_id) for (action, _), entry_id in zip(entries, ids, strict=True)]
    events = await events_for(redis, keys, sent, after)

    for (action, fields), entry_id in zip(entries, ids, strict=True):
        answers = events[(action, entry_id)]
        assert len(answers) == 1, answers
        assert_valid_outcome(action, fields, answers[0])
    assert worker.running
    assert worker.failures == 0
    await assert_consistent(redis, keys, worker.worker.settings)
    assert worker.running
    return [events[(action, entry_id)][0] for (action, _), entry_id in zip(entries, ids, strict=True)]


# -- property-based fuzzing -----------------------------------------------------------------

# Valid ids, some of them awkward inside key names and glob patterns.
USERS = ["ada", "bob", "x:count", "{lending}", "*", "[a-z]?", "ñandú", "u" * 128]
BOOKS = [f"book-{i}" for i in range(30)]
BAD_CHARACTERS = st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf"])
ID_CHARACTERS = st.characters(exclude_categories=["Zs", "Zl", "Zp", "Cc", "Cf", "Cs"], exclude_characters=",")
NOT_UTF8 = [b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"]

short_id = st.one_of(st.sampled_from(BOOKS), st.text(ID_CHARACTERS, min_size=1, max_size=12))
good_id = st.one_of(short_id, short_id, st.text(ID_CHARACTERS, min_size=126, max_size=128))
bad_id = st.one_of(
    st.just(""),
    st.builds(lambda a, bad, b: a + bad + b, short_id, BAD_CHARACTERS, st.one_of(st.just(""), short_id)),
    st.builds(lambda a, b: f"{a},{b}", short_id, short_id),
    st.integers(129, 300).map(lambda n: "x" * n),
)
any_id = st.one_of(good_id, good_id, bad_id)
junk = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda text, bad: text.encode() + bad, short_id, st.sampled_from(NOT_UTF8)),
)

user_value = st.one_of(st.sampled_from(USERS).map(str.encode), any_id.map(str.encode), junk)
books_value = st.one_of(
    st.lists(st.one_of(st.sampled_from(BOOKS), any_id), min_size=1, max_size=6).map(lambda ids: ",".join(ids).encode()),
    st.lists(st.sampled_from(BOOKS), min_size=1, max_size=4).map(lambda ids: ",".join(ids).encode()),
    # Around the per-request limit of distinct books.
    st.integers(MAX_BOOKS_PER_REQUEST - 2, MAX_BOOKS_PER_REQUEST + 2).map(
        lambda n: ",".join(f"many-{i}" for i in range(n)).encode()
    ),
    st.sampled_from([b",", b"book-1,", b",book-1", b"book-1,,book-2", b" book-1", b"book-1 "]),
    junk,
)
field_name = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"User_Id", b"user_id ", b"userid", b"book_id", b"books", b"user_id\x00"]),
)


def entry_fields(main: dict[bytes, bytes], extra: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {**extra, **main} or {b"": b""}  # XADD needs at least one field


extra_fields = st.dictionaries(field_name, st.binary(max_size=40), max_size=3)
fuzzed_fields = st.builds(
    entry_fields,
    st.fixed_dictionaries({}, optional={b"user_id": user_value, b"book_ids": books_value}),
    extra_fields,
)
# Well-formed requests among the fuzzed ones, on a few users and books, so that lends
# are accepted and denied, and returns give books back.
well_formed_fields = st.builds(
    entry_fields,
    st.fixed_dictionaries(
        {
            b"user_id": st.sampled_from(USERS).map(str.encode),
            b"book_ids": st.lists(st.sampled_from(BOOKS), min_size=1, max_size=3).map(
                lambda ids: ",".join(ids).encode()
            ),
        }
    ),
    extra_fields,
)
entries = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.one_of(well_formed_fields, fuzzed_fields)),
    min_size=1,
    max_size=10,
)


@hypothesis_settings(
    max_examples=75,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=entries)
async def test_every_fuzzed_entry_gets_exactly_one_valid_outcome(
    redis: Redis, keys: Keys, worker: RunningWorker, batch: list[Entry]
) -> None:
    # One worker serves every example; state from earlier examples carries over.
    for event in await assert_each_gets_one_valid_outcome(redis, keys, worker, batch):
        hypothesis.event(f"{event.action} {event.status}")


# -- extreme entries ----------------------------------------------------------------------

TEN_THOUSAND = ",".join(f"book-{i}" for i in range(10_000)).encode()

EXTREMES: dict[str, Entry] = {
    "10,000 distinct books to lend": ("lend", {b"user_id": b"ada", b"book_ids": TEN_THOUSAND}),
    "10,000 distinct books to return": ("return", {b"user_id": b"ada", b"book_ids": TEN_THOUSAND}),
    "10,000 times the same book": ("lend", {b"user_id": b"ada", b"book_ids": b",".join([b"solo"] * 10_000)}),
    "a megabyte user_id": ("lend", {b"user_id": b"u" * MEGABYTE, b"book_ids": b"book-1"}),
    "a megabyte book id": ("lend", {b"user_id": b"ada", b"book_ids": b"b" * MEGABYTE}),
    "a megabyte of commas": ("return", {b"user_id": b"ada", b"book_ids": b"," * MEGABYTE}),
    "a megabyte of bytes that are not UTF-8": ("lend", {b"user_id": b"ada", b"book_ids": b"\xff" * MEGABYTE}),
    "a megabyte extra field": ("lend", {b"user_id": b"ada", b"book_ids": b"book-2", b"note": b"n" * MEGABYTE}),
    "a megabyte field name": ("lend", {b"user_id": b"bob", b"book_ids": b"book-3", b"k" * MEGABYTE: b"v"}),
}


@pytest.mark.parametrize("entry", list(EXTREMES.values()), ids=list(EXTREMES))
async def test_an_extreme_entry_gets_exactly_one_valid_outcome(
    redis: Redis, keys: Keys, worker: RunningWorker, entry: Entry
) -> None:
    await assert_each_gets_one_valid_outcome(redis, keys, worker, [entry])


async def test_a_10000_book_request_is_rejected_for_its_number_of_books(
    redis: Redis, keys: Keys, worker: RunningWorker
) -> None:
    entry_id = (await xadd_all(redis, keys, [EXTREMES["10,000 distinct books to lend"]]))[0]

    event = await event_for(redis, keys, "lend", entry_id)

    assert (event.status, event.user_id) == ("rejected", "ada")
    assert "10000" in event.reason and str(MAX_BOOKS_PER_REQUEST) in event.reason, event.reason


# -- a bulk run of malformed entries -------------------------------------------------------

MALFORMED: list[Callable[[int], dict[bytes, bytes]]] = [
    lambda i: {b"book_ids": f"book-{i}".encode()},  # no user_id
    lambda i: {b"user_id": f"user-{i}".encode()},  # no book_ids
    lambda i: {b"user_id": b"", b"book_ids": b"book-1"},
    lambda i: {b"user_id": b"ada", b"book_ids": b""},
    lambda i: {b"user_id": b"a,b", b"book_ids": b"book-1"},
    lambda i: {b"user_id": b"ada", b"book_ids": f"book {i}".encode()},
    lambda i: {b"user_id": b"ada", b"book_ids": f"book-1,book\x00{i}".encode()},
    lambda i: {b"user_id": "ada\u200b".encode(), b"book_ids": b"book-1"},
    lambda i: {b"user_id": "ada\u2028".encode(), b"book_ids": b"book-1"},
    lambda i: {b"user_id": b"\xff\xfe", b"book_ids": b"book-1"},
    lambda i: {b"user_id": b"ada", b"book_ids": b"book-\xc3("},
    lambda i: {b"user_id": b"x" * 129, b"book_ids": b"book-1"},
    lambda i: {b"user_id": b"ada", b"book_ids": ",".join(f"b{n}" for n in range(i % 50 + 51)).encode()},
    lambda i: {b"user_id": b"ada", b"book_ids": b"book-1,"},
    lambda i: {b"foo": b"bar", b"number": str(i).encode()},
]


def malformed_batch(n: int) -> list[Entry]:
    """``n`` malformed entries of every kind, on both request streams."""
    batch = [(ACTIONS[i % 2], MALFORMED[i % len(MALFORMED)](i)) for i in range(n)]
    assert all(requested_books(fields) is None for _, fields in batch)  # malformed indeed
    return batch


async def test_a_thousand_malformed_entries_are_all_rejected_by_the_same_worker(
    redis: Redis, keys: Keys, run_worker: RunWorker
) -> None:
    batch = malformed_batch(1000)

    with capture_logs() as logs:
        worker = await run_worker()
        after = await last_event_id(redis, keys)
        ids = await xadd_all(redis, keys, batch)
        sent = [(action, entry_id) for (action, _), entry_id in zip(batch, ids, strict=True)]
        events = await events_for(redis, keys, sent, after)
        accepted = await event_for(redis, keys, LEND, await send(redis, keys, LEND, "ada", ["book-1"]))

    assert [len(answers) for answers in events.values()] == [1] * 1000
    assert {answers[0].status for answers in events.values()} == {"rejected"}
    assert (accepted.status, accepted.books) == ("accepted", ("book-1",))
    assert worker.running
    lending = worker.worker.consumers[0]
    await wait_until(lambda: lending.processed == 1001)  # counted just after the event is written
    assert worker.failures == 0
    await assert_consistent(redis, keys, worker.worker.settings)
    assert sum(e["event"] == "worker started" for e in logs) == 1
    # Redis was up all along and every entry was well-formed for Redis: nothing to warn about.
    complaints = [f"{e['log_level']}: {e['event']} {e.get('error', '')}" for e in logs if e["log_level"] != "info"]
    assert complaints == []


async def test_a_bulk_of_entries_is_processed_at_most_concurrency_at_a_time(
    redis: Redis, keys: Keys, run_worker: RunWorker
) -> None:
    worker = await run_worker(concurrency=16)
    lending = worker.worker.consumers[0]
    peak, done = 0, asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, lending.inflight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    batch = malformed_batch(200)  # 100 on each request stream
    after = await last_event_id(redis, keys)
    ids = await xadd_all(redis, keys, batch)
    await events_for(redis, keys, [(action, entry_id) for (action, _), entry_id in zip(batch, ids, strict=True)], after)
    done.set()
    await watcher

    assert 0 < peak <= 16, f"{peak} entries in flight at once (--concurrency 16)"
