"""The lending service: turns request entries into exactly one outcome each.

Entries are processed in batches: ``WATCH`` on the count of each user in the batch,
sent in one write with one script (``reserve.lua``) that reserves the batch's books
from storage and reads those counts and the holders of returned books; one call asks
the shelving service for the other books; the decisions are pure
(``policy.decide_batch``); then ``MULTI`` + one script (``commit.lua``) + ``EXEC``
commits every outcome: state change, acknowledgement and event together, for the whole
batch. The script commits only entries still pending
on this consumer, so when two workers process the same entry, only one commits.

Shelving grants are recorded in the grants ledger when they are handed out; the commit
settles them. Grants of an entry this worker did not commit are settled by
``reconcile``: at once here, and by every worker now and then for the whole ledger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, WatchError
from structlog.contextvars import bound_contextvars

from lending.domain.commit import Fail, Lend, Record, encode_commit, encode_finish
from lending.domain.events import FAILED, STATUSES, Event
from lending.domain.policy import decide_batch
from lending.domain.requests import BookRequest, Rejection, parse_request
from lending.domain.streamids import id_key, id_ms, id_range
from lending.errors import Contention, StaleLimits
from lending.faults import fault_point
from lending.keys import ACTIONS, LEND, LENDING_GROUP, RETURN, Keys
from lending.metrics import Metrics
from lending.redis.consumer import Delivery
from lending.redis.replies import text
from lending.redis.scripts import Arg, Scripts
from lending.redis.transaction import Transaction
from lending.service.shelving import Grant, Shelving
from lending.settings import Settings

log = structlog.get_logger(__name__)

# Conflicts are resolved by retrying; these bound the retries (then the batch is
# retried later as failed deliveries, and dead-lettered if it never gets through).
MAX_WATCH_RETRIES = 50
# Lua's unpack() takes at most ~8,000 values: keep a batch's books well below.
MAX_BATCH_BOOKS = 1_000
# Ledger entries read per reconciliation call.
RECONCILE_PAGE = 200

# reserve.lua's codes per book ("0": lent to someone; an empty string: not our entry)
RESERVED, ASK_SHELVING = "1", "2"


@dataclass
class LendInProgress:
    """A lend request on its way through a batch. Grants outlive a WATCH retry: what
    shelving handed to the request is not asked for again, and never forgotten."""

    request: BookRequest
    redelivered: bool  # an earlier delivery may have reserved books already
    stored: list[str] = field(default_factory=list)  # reserved from storage (this attempt)
    ask: list[str] = field(default_factory=list)  # neither lent nor in storage: ask shelving
    granted: list[str] = field(default_factory=list)  # handed to this request by shelving

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def granted_only(self) -> list[str]:
        """Grants that are not also reserved from storage (which would lend a book twice)."""
        stored = set(self.stored)
        return [book for book in self.granted if book not in stored]


class LendingService:
    """Processes entries of ``{NS}:lend-requests`` and ``{NS}:return-requests``."""

    def __init__(
        self,
        client: Redis,
        settings: Settings,
        scripts: Scripts,
        shelving: Shelving,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics or Metrics()
        self._metrics.add_outcomes(ACTIONS, STATUSES)
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
        committed_ms = time.time() * 1000
        self._metrics.batch_seconds.observe(duration)
        self._metrics.batch_size.observe(len(deliveries))
        for event in events:
            if event is not None:
                self._count(event, committed_ms)
        # One line per outcome, each with its request bound; skipped whole when info lines
        # are filtered out (the per-request work shows in the throughput).
        if log.is_enabled_for(logging.INFO):
            duration_ms = round(duration * 1000, 2)
            for delivery, event in zip(deliveries, events, strict=True):
                with bound_contextvars(request_id=delivery.entry_id, action=self._keys.action_of(delivery.stream)):
                    if event is None:
                        log.info("request finished by another worker")
                    else:
                        books = ",".join(event.books)
                        log.info(
                            "processed", user=event.user_id, status=event.status, books=books, duration_ms=duration_ms
                        )
        return events

    def _count(self, event: Event, committed_ms: float) -> None:
        """Count an outcome committed by this worker, and how long its sender waited for it
        (since the request's entry ID; clamped at 0 should Redis's clock be ahead)."""
        self._metrics.outcome(event.action, event.status).inc()
        waited_s = max(0.0, committed_ms - id_ms(event.request_id)) / 1000
        self._metrics.latency(event.action).observe(waited_s)

    async def process_batch(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        out: list[Event | None] = []
        for chunk in _chunks(deliveries):
            out += await self._process_chunk(chunk)
        return out

    async def _process_chunk(self, deliveries: Sequence[Delivery]) -> list[Event | None]:
        # Decisions follow arrival order across both streams (entry IDs are times).
        order = sorted(range(len(deliveries)), key=lambda k: id_key(deliveries[k].entry_id))
        parsed = [self._parse(deliveries[k]) for k in order]
        events = await self._run(parsed, deliveries)
        result: list[Event | None] = [None] * len(deliveries)
        for k, event in zip(order, events, strict=True):
            result[k] = event
        return result

    def _parse(self, delivery: Delivery) -> BookRequest | Rejection:
        action = self._keys.action_of(delivery.stream)
        return parse_request(action, delivery.entry_id, delivery.fields, self._settings.max_books_per_request)

    async def _run(self, parsed: list[BookRequest | Rejection], deliveries: Sequence[Delivery]) -> list[Event | None]:
        """WATCH the counts, reserve and read, ask shelving, decide, commit; retry on conflict.

        Round trips: WATCH + reserve.lua, the shelving call (if any book needs it), and
        MULTI + commit.lua + EXEC (``redis.transaction``). Every step before the commit
        can be repeated safely: reservations are found again, and grants are kept from
        one attempt to the next.
        """
        valid = [r for r in parsed if isinstance(r, BookRequest)]
        users = sorted({r.user_id for r in valid})
        watched = [self._keys.user_count(user) for user in users]
        return_books = sorted({b for r in valid if r.action == RETURN for b in r.book_ids})
        redelivered = {d.entry_id for d in deliveries if d.deliveries > 1}
        lends = [LendInProgress(r, r.request_id in redelivered) for r in valid if r.action == LEND]
        try:
            for attempt in range(MAX_WATCH_RETRIES):
                results = await self._attempt(parsed, lends, users, watched, return_books, retry=attempt > 0)
                if results is not None:
                    return results
            raise Contention(parsed[0].request_id, MAX_WATCH_RETRIES)
        finally:
            # Grants of lends not committed here (finished by another worker, or this
            # batch failed) are settled now rather than at the next periodic pass.
            await self._settle([(book, lend.request_id) for lend in lends for book in lend.granted])

    async def _attempt(
        self,
        parsed: list[BookRequest | Rejection],
        lends: list[LendInProgress],
        users: list[str],
        watched: list[str],
        return_books: list[str],
        *,
        retry: bool,
    ) -> list[Event | None] | None:
        """One WATCH/MULTI round; ``None`` when it must be repeated."""
        try:
            if watched:
                async with Transaction(self._client) as tx:
                    counts, holders = await self._reserve(tx, lends, users, watched, return_books, retry=retry)
                    await self._ask_shelving(lends)
                    records, keys, args = self._decide(parsed, lends, counts, holders)
                    fault_point("before_exec")
                    results = await tx.commit(self._scripts.commit, keys, args)
            else:  # only rejections: nothing to watch
                records, keys, args = self._decide(parsed, lends, {}, {})
                fault_point("before_exec")
                results = await self._scripts.commit(self._client, keys, args)
        except WatchError:
            self._metrics.watch_conflicts.inc()
            return None
        except NoScriptError:
            await self._scripts.load(self._client)
            return None
        if results == -1:  # another process added to a reservation: decide again
            return None
        if results and results[0] == -2:  # {-2, field, theirs, mine}: nothing written
            raise StaleLimits(*(text(value) for value in results[1:4]))
        committed = [int(ok) == 1 for ok in results]
        done = {
            record.event.request_id
            for record, ok in zip(records, committed, strict=True)
            if ok and isinstance(record, Lend)
        }
        for lend in lends:
            if lend.request_id in done:
                lend.granted = []  # settled by the commit
        return [record.event if ok else None for record, ok in zip(records, committed, strict=True)]

    def _decide(
        self,
        parsed: list[BookRequest | Rejection],
        lends: list[LendInProgress],
        counts: dict[str, int],
        holders: dict[str, str],
    ) -> tuple[list[Record], list[str], list[Arg]]:
        """Every entry's outcome (``policy.decide_batch``), and commit.lua's KEYS and ARGV."""
        reserved = {lend.request_id: (lend.stored, lend.granted_only) for lend in lends}
        records = decide_batch(parsed, reserved, counts, holders, self._settings.max_books_per_user)
        settings = self._settings
        keys, args = encode_commit(self._keys, LENDING_GROUP, settings.worker_id, settings.limits, records, counts)
        return records, keys, args

    # -- reserving -------------------------------------------------------------------

    async def _reserve(
        self,
        tx: Transaction,
        lends: list[LendInProgress],
        users: list[str],
        watched: list[str],
        return_books: list[str],
        *,
        retry: bool,
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Take from storage what it has of the lends' books, note what shelving must give,
        and read the users' counts and the holders of ``return_books``."""
        keys = self._keys
        args: list[Arg] = [
            LENDING_GROUP,
            self._settings.worker_id,
            *id_range(lend.request_id for lend in lends),
            len(lends),
        ]
        for lend in lends:
            books = lend.request.book_ids
            args += [lend.request_id, 1 if retry or lend.redelivered else 0, len(books), *books]
        codes, raw_counts, raw_holders = await tx.watch_and_run(
            watched,
            self._scripts.reserve,
            [
                keys.lend_requests,
                keys.lent_books,
                keys.storage,
                *(keys.reservation(lend.request_id) for lend in lends),
                *watched,
            ],
            [*args, *return_books],
        )
        fault_point("after_reserve")
        for lend, reply in zip(lends, codes, strict=True):
            code_of = dict(zip(lend.request.book_ids, text(reply), strict=False))
            granted = set(lend.granted)
            lend.stored = [book for book, code in code_of.items() if code == RESERVED]
            lend.ask = [book for book, code in code_of.items() if code == ASK_SHELVING and book not in granted]
        counts = {user: int(text(v) or 0) for user, v in zip(users, raw_counts, strict=True)}
        holders = {book: text(v) for book, v in zip(return_books, raw_holders, strict=True)}
        return counts, holders

    async def _ask_shelving(self, lends: list[LendInProgress]) -> None:
        asks = [(book, lend) for lend in lends for book in lend.ask]
        if not asks:
            return
        grants = await self._shelving.get_many([(book, lend.request_id) for book, lend in asks])
        fault_point("after_shelving")
        for (book, lend), grant in zip(asks, grants, strict=True):
            if grant is not Grant.REFUSED:
                lend.granted.append(book)

    # -- grants of requests finished elsewhere ---------------------------------------

    async def _settle(self, pairs: list[tuple[str, str]]) -> None:
        """Best effort: the ledger keeps the grants until somebody settles them."""
        if not pairs:
            return
        try:
            await self.reconcile(pairs)
        except Exception as exc:
            log.warning(
                "could not settle shelving grants yet; the periodic reconciliation will",
                error=str(exc),
                grants=len(pairs),
            )

    async def reconcile(self, pairs: Sequence[tuple[str, str]]) -> tuple[int, int]:
        """Settle ledger entries ``(book, context)`` whose request is finished: give back to
        shelving those the library does not hold. Returns (settled, given back)."""
        keys = self._keys
        settled, back = await self._scripts.reconcile(
            self._client,
            [keys.lend_requests, keys.grants, keys.from_shelving, keys.shelving_returns],
            [LENDING_GROUP, *(item for pair in pairs for item in pair)],
        )
        return int(settled), int(back)

    async def reconcile_ledger(self, cursor: int = 0) -> tuple[int, int]:
        """One page of the periodic reconciliation; returns the next cursor (0: the whole
        ledger was seen) and how many books went back to shelving."""
        cursor, page = await self._client.hscan(self._keys.grants, cursor, count=RECONCILE_PAGE)
        pairs = [(text(book), text(context)) for book, context in cast(dict[bytes, bytes], page).items()]
        back = (await self.reconcile(pairs))[1] if pairs else 0
        if back:
            log.info("gave back shelving grants of finished requests", books=back)
        return int(cursor), back

    # -- dead letters ----------------------------------------------------------------

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Finish a poison entry: ``failed`` event, a dead letter, and whatever the request
        holds (reserved books, shelving grants) given back."""
        action = self._keys.action_of(delivery.stream)
        request = self._parse(delivery)
        books = request.book_ids if isinstance(request, BookRequest) else ()
        event = Event(
            delivery.entry_id, action, request.user_id, FAILED, skipped=books, reason=f"processing failed: {error}"
        )
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
        keys, args = encode_finish(
            self._keys,
            LENDING_GROUP,
            self._settings.storage_capacity,
            self._settings.dead_letters_maxlen,
            # An entry without fields is one deleted from its stream while pending.
            Fail(event, books, letter, gone=not delivery.fields),
        )
        if int(await self._scripts.finish(self._client, keys, args)) == 1:  # 0: finished elsewhere
            self._count(event, time.time() * 1000)


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
