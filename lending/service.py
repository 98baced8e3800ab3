"""The lending service: turns one request entry into exactly one outcome.

Every path ends in one atomic step that changes the state, acknowledges the entry and
publishes its event together (a Lua script, for a lend inside WATCH/MULTI on the
user's count). Each of those scripts first acknowledges the entry and does nothing if
it was already acknowledged: when two workers process the same entry, only one commits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, WatchError

from .errors import Contention
from .events import ACCEPTED, DENIED, FAILED, REJECTED, Event
from .faults import fault_point
from .keys import LEND, LENDING_GROUP, Keys
from .policy import NOTHING_AVAILABLE, decide_loan, nothing_to_return_reason
from .requests import BookRequest, Rejection, parse_request
from .scripts import Arg, Scripts
from .settings import Settings
from .shelving import Grant, ShelvingService
from .stream import Delivery

log = structlog.get_logger(__name__)

# Conflicts are resolved by retrying; these bound the retries (then the entry is
# retried later as a failed delivery, and dead-lettered if it never gets through).
MAX_WATCH_RETRIES = 50
MAX_RESERVATION_ROUNDS = 10

# reserve.lua's codes
LENT, RESERVED, ASK_SHELVING = 0, 1, 2


class Stale(Exception):
    """The entry was finished by another worker while this one processed it."""


class ReservationChanged(Exception):
    """Another worker processing the same entry added to its reservation: decide again."""


class LendingService:
    """Processes entries of ``{NS}:lend-requests`` and ``{NS}:return-requests``."""

    def __init__(self, client: Redis, settings: Settings, scripts: Scripts, shelving: ShelvingService) -> None:
        self._client = client
        self._settings = settings
        self._scripts = scripts
        self._shelving = shelving
        self._keys = Keys(settings.namespace)

    async def handle(self, delivery: Delivery) -> Event | None:
        """Process one delivery; returns its event, or ``None`` if finished elsewhere."""
        started = time.perf_counter()
        event = await self.process(delivery)
        fault_point("after_exec")
        if event is None:
            log.info("request already finished by another worker", request_id=delivery.entry_id)
            return None
        log.info(
            "processed",
            request_id=event.request_id,
            action=event.action,
            user=event.user_id,
            status=event.status,
            books=",".join(event.books),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return event

    async def process(self, delivery: Delivery) -> Event | None:
        action = self._keys.action_of(delivery.stream)
        request = parse_request(action, delivery.entry_id, delivery.fields, self._settings.max_books_per_request)
        if isinstance(request, Rejection):
            event = Event(request.request_id, action, request.user_id, REJECTED, reason=request.reason)
            return event if await self._finish(action, delivery.entry_id, event) else None
        if action == LEND:
            return await self._lend(request)
        return await self._return(request)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Finish a poison entry: ``failed`` event, a dead letter, reservation given back."""
        action = self._keys.action_of(delivery.stream)
        request = parse_request(action, delivery.entry_id, delivery.fields, self._settings.max_books_per_request)
        user = request.user_id
        books = request.book_ids if isinstance(request, BookRequest) else ()
        event = Event(delivery.entry_id, action, user, FAILED, skipped=books, reason=f"processing failed: {error}")
        letter: dict[str, Arg] = {
            "stream": delivery.stream,
            "request_id": delivery.entry_id,
            "action": action,
            "error": error,
            "deliveries": delivery.deliveries,
        }
        for name in (b"user_id", b"book_ids"):
            if name in delivery.fields:
                letter[name.decode()] = delivery.fields[name]
        if action == LEND and books:
            await self._collect_unrecorded_grants(delivery.entry_id, books)
        await self._finish(action, delivery.entry_id, event, letter)

    async def _collect_unrecorded_grants(self, request_id: str, books: Sequence[str]) -> None:
        """Put into the reservation the books shelving handed to this request that a
        crashed attempt never recorded, so that finishing gives them back too."""
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

    # -- lend -------------------------------------------------------------------

    async def _lend(self, request: BookRequest) -> Event | None:
        for _ in range(MAX_RESERVATION_ROUNDS):
            try:
                reserved = await self._reserve(request)
            except Stale:
                return None
            skipped = tuple(book for book in request.book_ids if book not in reserved)
            if not reserved:
                event = Event(request.request_id, LEND, request.user_id, DENIED, (), skipped, NOTHING_AVAILABLE)
                return event if await self._finish(LEND, request.request_id, event) else None
            try:
                return await self._commit_lend(request, reserved, skipped)
            except ReservationChanged:
                continue
        raise Contention(request.request_id, MAX_RESERVATION_ROUNDS)

    async def _reserve(self, request: BookRequest) -> list[str]:
        """Reserve what storage and shelving can give; the reserved books in request order."""
        keys = self._keys
        reservation = keys.reservation(request.request_id)
        codes = await self._scripts.reserve(
            self._client,
            [keys.lend_requests, keys.lent_books, keys.storage, reservation],
            [LENDING_GROUP, request.request_id, *request.book_ids],
        )
        if codes == -1:
            raise Stale
        fault_point("after_reserve")
        reserved = {book for book, code in zip(request.book_ids, codes) if code == RESERVED}
        ask = [book for book, code in zip(request.book_ids, codes) if code == ASK_SHELVING]
        if ask:
            grants = await self._shelving.get_books(ask, context_id=request.request_id)
            fault_point("after_shelving")
            new = [book for book in ask if grants[book] is Grant.NEW]
            held = [book for book in ask if grants[book] is Grant.HELD]
            if new or held:
                recorded = await self._scripts.record_grants(
                    self._client,
                    [keys.lend_requests, reservation, keys.shelving_returns, keys.from_shelving],
                    [LENDING_GROUP, request.request_id, len(new), *new, *held],
                )
                if not recorded:
                    raise Stale
                fault_point("after_record")
                reserved.update(new, held)
        return [book for book in request.book_ids if book in reserved]

    async def _commit_lend(self, request: BookRequest, reserved: list[str], skipped: tuple[str, ...]) -> Event | None:
        """Apply the per-user limit under WATCH and commit the loan or the denial."""
        keys = self._keys
        count_key = keys.user_count(request.user_id)
        for _ in range(MAX_WATCH_RETRIES):
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    await pipe.watch(count_key)
                    held = int(await pipe.get(count_key) or 0)
                    decision = decide_loan(held, len(reserved), self._settings.max_books_per_user)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if decision.allowed:
                        event = Event(request.request_id, LEND, request.user_id, ACCEPTED, tuple(reserved), skipped)
                        self._scripts.lend.queue(
                            pipe,
                            [keys.lend_requests, keys.events, keys.lent_books, count_key, keys.reservation(request.request_id)],
                            [LENDING_GROUP, request.request_id, request.user_id, ",".join(skipped), *reserved],
                        )
                    else:
                        event = Event(request.request_id, LEND, request.user_id, DENIED, (), request.book_ids, decision.reason)
                        self._queue_finish(pipe, LEND, request.request_id, event)
                    fault_point("before_exec")
                    (result,) = await pipe.execute()
            except WatchError:
                continue
            except NoScriptError:
                await self._scripts.load(self._client)
                continue
            if result == -1:
                raise ReservationChanged
            return event if result == 1 else None
        raise Contention(request.request_id, MAX_WATCH_RETRIES)

    # -- return -----------------------------------------------------------------

    async def _return(self, request: BookRequest) -> Event | None:
        keys = self._keys
        result = await self._scripts.return_books(
            self._client,
            [
                keys.return_requests,
                keys.events,
                keys.lent_books,
                keys.user_count(request.user_id),
                keys.storage,
                keys.shelving_returns,
                keys.from_shelving,
            ],
            [
                LENDING_GROUP,
                request.request_id,
                request.user_id,
                self._settings.storage_capacity,
                nothing_to_return_reason(request.user_id),
                *request.book_ids,
            ],
        )
        if result == 0:
            return None
        status, books, skipped = (value.decode() for value in result)
        reason = "" if books else nothing_to_return_reason(request.user_id)
        return Event(request.request_id, "return", request.user_id, status, _split(books), _split(skipped), reason)

    # -- finishing without lending ----------------------------------------------

    def _finish_args(
        self, action: str, entry_id: str, event: Event, letter: dict[str, Arg] | None
    ) -> tuple[list[str], list[Arg]]:
        keys = self._keys
        args: list[Arg] = [
            LENDING_GROUP,
            entry_id,
            self._settings.storage_capacity,
            1 if action == LEND else 0,
            len(event.fields()),
            *event.flat_fields(),
        ]
        for name, value in (letter or {}).items():
            args += [name, value]
        return (
            [
                keys.requests(action),
                keys.events,
                keys.storage,
                keys.reservation(entry_id),
                keys.shelving_returns,
                keys.dead_letters,
                keys.from_shelving,
            ],
            args,
        )

    async def _finish(self, action: str, entry_id: str, event: Event, letter: dict[str, Arg] | None = None) -> bool:
        keys, args = self._finish_args(action, entry_id, event, letter)
        return bool(await self._scripts.finish(self._client, keys, args))

    def _queue_finish(self, pipe: Pipeline, action: str, entry_id: str, event: Event) -> None:
        keys, args = self._finish_args(action, entry_id, event, None)
        self._scripts.finish.queue(pipe, keys, args)


def _split(csv: str) -> tuple[str, ...]:
    return tuple(csv.split(",")) if csv else ()
