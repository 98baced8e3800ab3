"""The lending service: turns request entries into exactly one outcome each.

Entries are processed in batches: ``WATCH`` on the count of each user in the batch;
one script (``reserve.lua``) reserves the batch's books from storage and reads those
counts and the holders of returned books; one call asks the shelving service for the
other books; the decisions are pure (``policy.py``); then ``MULTI`` + one script
(``commit.lua``) + ``EXEC`` commits every outcome: state change, acknowledgement and
event together, for the whole batch. The script commits only entries still pending on this consumer,
so when two workers process the same entry, only one commits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, WatchError

from .errors import Contention
from .events import ACCEPTED, DENIED, FAILED, REJECTED, RETURNED, Event
from .faults import fault_point
from .keys import LEND, LENDING_GROUP, RETURN, Keys
from .metrics import Metrics
from .policy import decide_loan, nothing_to_return_reason
from .requests import BookRequest, Rejection, parse_request
from .scripts import Arg, Scripts
from .settings import Settings
from .shelving import Grant, ShelvingService
from .stream import Delivery, text

log = structlog.get_logger(__name__)

# Conflicts are resolved by retrying; these bound the retries (then the batch is
# retried later as failed deliveries, and dead-lettered if it never gets through).
MAX_WATCH_RETRIES = 50
# Lua's unpack() takes at most ~8,000 values: keep a batch's books well below.
MAX_BATCH_BOOKS = 1_000

# reserve.lua's codes per book ("0": lent to someone; an empty string: not our entry)
RESERVED, ASK_SHELVING = "1", "2"
FIXED_COMMIT_KEYS = 7


@dataclass
class Lend:
    """A lend request on its way through a batch."""

    request: BookRequest
    delivery: Delivery
    stored: list[str] = field(default_factory=list)  # reserved from storage
    ask: list[str] = field(default_factory=list)  # neither lent nor in storage: ask shelving
    new: list[str] = field(default_factory=list)  # handed out anew by shelving
    held: list[str] = field(default_factory=list)  # shelving already held for this request

    @property
    def reserved(self) -> list[str]:
        mine = set(self.stored) | set(self.new) | set(self.held)
        return [book for book in self.request.book_ids if book in mine]


class CommitBuilder:
    """Builds commit.lua's KEYS and ARGV, numbering the extra keys once each."""

    def __init__(self, keys: Keys) -> None:
        self.keys: list[str] = [
            keys.lend_requests, keys.return_requests, keys.events, keys.lent_books,
            keys.storage, keys.shelving_returns, keys.from_shelving,
        ]
        self.records: list[Arg] = []
        self._index: dict[str, int] = {}

    def key(self, name: str) -> int:
        if name not in self._index:
            self.keys.append(name)
            self._index[name] = len(self.keys) - FIXED_COMMIT_KEYS
        return self._index[name]


class LendingService:
    """Processes entries of ``{NS}:lend-requests`` and ``{NS}:return-requests``."""

    def __init__(
        self, client: Redis, settings: Settings, scripts: Scripts, shelving: ShelvingService,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics or Metrics()
        self._settings = settings
        self._scripts = scripts
        self._shelving = shelving
        self._keys = Keys(settings.namespace)

    async def handle(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        """Process a batch and log one line per outcome; ``None``: finished elsewhere."""
        started = time.perf_counter()
        events = await self.process_batch(deliveries)
        fault_point("after_exec")
        duration = time.perf_counter() - started
        self._metrics.batch_seconds.observe(duration)
        duration_ms = round(duration * 1000, 2)
        for delivery, event in zip(deliveries, events):
            if event is None:
                log.info("request finished by another worker", request_id=delivery.entry_id)
            else:
                self._metrics.requests.labels(event.action, event.status).inc()
                log.info("processed", request_id=event.request_id, action=event.action, user=event.user_id,
                         status=event.status, books=",".join(event.books), duration_ms=duration_ms)
        return events

    async def process(self, delivery: Delivery) -> Event | None:
        """Process one entry (a batch of one)."""
        return (await self.process_batch([delivery]))[0]

    async def process_batch(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        out: list[Event | None] = []
        for chunk in _chunks(deliveries):
            out += await self._process_chunk(chunk)
        return out

    async def _process_chunk(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        # Decisions follow arrival order across both streams (entry IDs are times).
        order = sorted(range(len(deliveries)), key=lambda k: _id_key(deliveries[k].entry_id))
        batch = [deliveries[k] for k in order]
        parsed = [self._parse(d) for d in batch]
        events = await self._run(parsed, batch)
        result: list[Event | None] = [None] * len(deliveries)
        for k, event in zip(order, events):
            result[k] = event
        return result

    def _parse(self, delivery: Delivery) -> BookRequest | Rejection:
        action = self._keys.action_of(delivery.stream)
        return parse_request(action, delivery.entry_id, delivery.fields, self._settings.max_books_per_request)

    async def _run(self, parsed: list[BookRequest | Rejection], batch: list[Delivery]) -> list[Event | None]:
        """WATCH the counts, reserve and read, ask shelving, decide, commit; retry on conflict.

        Round trips: WATCH, reserve.lua, the shelving call (if any book needs it), and
        MULTI + commit.lua + EXEC. Every step before the commit can be repeated safely:
        reservations are found again, and shelving answers the same request again.
        """
        valid = [r for r in parsed if isinstance(r, BookRequest)]
        watched = sorted({self._keys.user_count(r.user_id) for r in valid})
        return_books = sorted({b for r in valid if r.action == RETURN for b in r.book_ids})
        retry = False
        for _ in range(MAX_WATCH_RETRIES):
            lends = [Lend(r, d) for r, d in zip(parsed, batch) if isinstance(r, BookRequest) and r.action == LEND]
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    counts: dict[str, int] = {}
                    holders: dict[str, str] = {}
                    if watched:
                        await pipe.watch(*watched)
                        counts, holders = await self._reserve(pipe, lends, watched, return_books, retry=retry)
                        await self._ask_shelving(lends)
                    events, builder = self._decide(parsed, {l.request.request_id: l for l in lends}, counts, holders)
                    if watched:
                        pipe.multi()  # type: ignore[no-untyped-call]
                        self._scripts.commit.queue(pipe, builder.keys, builder.records)
                        fault_point("before_exec")
                        (results,) = await pipe.execute()
                    else:  # only rejections: nothing to watch
                        fault_point("before_exec")
                        results = await self._scripts.commit(self._client, builder.keys, builder.records)
            except WatchError:
                self._metrics.watch_conflicts.inc()
                retry = True
                continue
            except NoScriptError:
                await self._scripts.load(self._client)
                retry = True
                continue
            if results == -1:  # another worker added to a reservation: decide again
                retry = True
                continue
            return [event if int(ok) == 1 else None for event, ok in zip(events, results)]
        raise Contention(batch[0].entry_id, MAX_WATCH_RETRIES)

    # -- reserving -------------------------------------------------------------------

    async def _reserve(
        self, pipe: Pipeline, lends: list[Lend], watched: list[str], return_books: list[str], *, retry: bool
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Take from storage what it has of the lends' books, note what shelving must give,
        and read the watched counts and the holders of ``return_books``."""
        keys = self._keys
        args: list[Arg] = [
            LENDING_GROUP, self._settings.worker_id, *_id_range([l.request.request_id for l in lends]), len(lends),
        ]
        for lend in lends:
            again = retry or lend.delivery.deliveries > 1
            args += [lend.request.request_id, 1 if again else 0, len(lend.request.book_ids), *lend.request.book_ids]
        codes, raw_counts, raw_holders = await self._scripts.reserve(
            pipe,
            [keys.lend_requests, keys.lent_books, keys.storage,
             *(keys.reservation(l.request.request_id) for l in lends), *watched],
            [*args, *return_books],
        )
        fault_point("after_reserve")
        for lend, reply in zip(lends, codes):
            books = lend.request.book_ids
            lend.stored = [book for book, code in zip(books, text(reply)) if code == RESERVED]
            lend.ask = [book for book, code in zip(books, text(reply)) if code == ASK_SHELVING]
        counts = {key: int(text(v) or 0) for key, v in zip(watched, raw_counts)}
        holders = {book: text(v) for book, v in zip(return_books, raw_holders)}
        return counts, holders

    async def _ask_shelving(self, lends: list[Lend]) -> None:
        asks = [(book, lend.request.request_id, lend) for lend in lends for book in lend.ask]
        if not asks:
            return
        grants = await self._shelving.get_many([(book, context) for book, context, _ in asks])
        fault_point("after_shelving")
        for (book, _, lend), grant in zip(asks, grants):
            if grant is Grant.NEW:
                lend.new.append(book)
            elif grant is Grant.HELD:
                lend.held.append(book)

    # -- committing ------------------------------------------------------------------

    def _decide(
        self,
        parsed: list[BookRequest | Rejection],
        lends: dict[str, Lend],
        counts: dict[str, int],
        holders: dict[str, str],
    ) -> tuple[list[Event], CommitBuilder]:
        """Each entry's outcome, in order, as events and as commit.lua records."""
        keys = self._keys
        builder = CommitBuilder(keys)
        lend_ids = [r.request_id for r in parsed if r.action == LEND]
        return_ids = [r.request_id for r in parsed if r.action == RETURN]
        builder.records += [LENDING_GROUP, self._settings.worker_id, self._settings.storage_capacity,
                            *_id_range(lend_ids), *_id_range(return_ids)]
        events: list[Event] = []
        for r in parsed:
            if isinstance(r, Rejection):
                event = Event(r.request_id, r.action, r.user_id, REJECTED, reason=r.reason)
                builder.records += ["X", r.action, r.request_id, r.user_id, r.reason]
            elif r.action == LEND:
                event = self._decide_lend(r, lends[r.request_id], counts, builder)
            else:
                event = self._decide_return(r, counts, holders, builder)
            events.append(event)
        return events, builder

    def _decide_lend(self, r: BookRequest, lend: Lend, counts: dict[str, int], builder: CommitBuilder) -> Event:
        count_key = self._keys.user_count(r.user_id)
        reserved = lend.reserved
        decision = decide_loan(counts.get(count_key, 0), len(reserved), self._settings.max_books_per_user)
        if decision.allowed:
            counts[count_key] = counts.get(count_key, 0) + len(reserved)
            chosen = set(reserved)
            event = Event(r.request_id, LEND, r.user_id, ACCEPTED, tuple(reserved),
                          tuple(b for b in r.book_ids if b not in chosen))
        else:
            event = Event(r.request_id, LEND, r.user_id, DENIED, (), r.book_ids, decision.reason)
        builder.records += [
            "L", r.request_id, r.user_id, builder.key(count_key), builder.key(self._keys.reservation(r.request_id)),
            event.status, ",".join(event.books), ",".join(event.skipped), event.reason,
            len(lend.stored), *lend.stored, len(lend.new), *lend.new, len(lend.held), *lend.held,
        ]
        return event

    def _decide_return(
        self, r: BookRequest, counts: dict[str, int], holders: dict[str, str], builder: CommitBuilder
    ) -> Event:
        count_key = self._keys.user_count(r.user_id)
        returned = tuple(book for book in r.book_ids if holders.get(book) == r.user_id)
        for book in returned:
            holders[book] = ""
        skipped = tuple(book for book in r.book_ids if book not in set(returned))
        if returned:
            counts[count_key] = counts.get(count_key, 0) - len(returned)
            event = Event(r.request_id, RETURN, r.user_id, RETURNED, returned, skipped)
        else:
            event = Event(r.request_id, RETURN, r.user_id, DENIED, (), skipped, nothing_to_return_reason(r.user_id))
        builder.records += ["T", r.request_id, r.user_id, builder.key(count_key), ",".join(returned),
                            ",".join(skipped), event.reason]
        return event

    # -- dead letters ----------------------------------------------------------------

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Finish a poison entry: ``failed`` event, a dead letter, reservation given back."""
        action = self._keys.action_of(delivery.stream)
        request = self._parse(delivery)
        books = request.book_ids if isinstance(request, BookRequest) else ()
        event = Event(delivery.entry_id, action, request.user_id, FAILED, skipped=books,
                      reason=f"processing failed: {error}")
        letter: dict[str, Arg] = {
            "stream": delivery.stream,
            "request_id": delivery.entry_id,
            "action": action,
            "error": error,
            "deliveries": delivery.deliveries,
        }
        for name in ("user_id", "book_ids"):
            if name.encode() in delivery.fields:
                letter[name] = delivery.fields[name.encode()]
        if action == LEND and books:
            await self._collect_unrecorded_grants(delivery.entry_id, books)
        keys = self._keys
        args: list[Arg] = [
            LENDING_GROUP, delivery.entry_id, self._settings.storage_capacity, 1 if action == LEND else 0,
            len(event.fields()), *event.flat_fields(),
        ]
        for name, value in letter.items():
            args += [name, value]
        await self._scripts.finish(
            self._client,
            [keys.requests(action), keys.events, keys.storage, keys.reservation(delivery.entry_id),
             keys.shelving_returns, keys.dead_letters, keys.from_shelving],
            args,
        )

    async def _collect_unrecorded_grants(self, request_id: str, books: Sequence[str]) -> None:
        """Put into the reservation the books shelving handed to this request that no
        attempt recorded (they are recorded at commit), so that finishing gives them back."""
        try:
            held = await self._shelving.held_for(books, request_id)
            if held:
                keys = self._keys
                await self._scripts.record_grants(
                    self._client,
                    [keys.lend_requests, keys.reservation(request_id), keys.shelving_returns, keys.from_shelving],
                    [LENDING_GROUP, request_id, 0, *held],
                )
        except Exception as exc:  # best effort: the dead letter matters more
            log.warning("could not look for unrecorded shelving grants", request_id=request_id, error=str(exc))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _id_range(ids: Sequence[str]) -> tuple[str, str]:
    """The lowest and highest of ``ids`` ('' and '' when there are none)."""
    if not ids:
        return "", ""
    ordered = sorted(ids, key=_id_key)
    return ordered[0], ordered[-1]


def _chunks(deliveries: Sequence[Delivery]) -> list[Sequence[Delivery]]:
    """Split a batch so that no chunk names more than MAX_BATCH_BOOKS books."""
    chunks: list[Sequence[Delivery]] = []
    start, books = 0, 0
    for k, delivery in enumerate(deliveries):
        n = delivery.fields.get(b"book_ids", b"").count(b",") + 1
        if k > start and books + n > MAX_BATCH_BOOKS:
            chunks.append(deliveries[start:k])
            start, books = k, 0
        books += n
    chunks.append(deliveries[start:])
    return chunks
