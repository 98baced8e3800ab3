"""One reader of ``{NS}:events`` per API process, shared by everything that waits for
outcomes: waiters (``POST ...?wait=``), live streams (``GET /v1/events``) and listeners
(e.g. a dashboard's aggregates).

A waiter costs no Redis call: the tail's one ``XREAD BLOCK``, on a connection of its own,
wakes it by (action, request id). A short window of recent outcomes answers a waiter that
registers a moment after its event went by. A subscriber gets a bounded queue: one that
does not keep up is dropped (it may resume from its last event id), never allowed to
grow memory. A listener is called with every event, in the reader's task: it must be
quick and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from lending.domain.backoff import retry_backoff_s
from lending.domain.events import Event
from lending.keys import Keys
from lending.redis.replies import Entries, StreamsReply, text
from lending.redis.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

RequestKey = tuple[str, str]  # (action, request id)
Listener = Callable[[Event], None]


class Subscription:
    """A live feed of the tail's events (those ``accept`` lets through), in a bounded queue.

    Iterate it with ``next()``; it ends (``None``) once closed: by ``close()``, by the
    tail's shutdown, or because it fell ``maxsize`` events behind (``dropped``).
    """

    def __init__(
        self,
        accept: Callable[[Event], bool] | None,
        maxsize: int,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.accept = accept
        self.dropped = False
        self.closed = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self._on_close = on_close

    def offer(self, event: Event) -> None:
        """Queue ``event`` if accepted; a full queue drops the subscription."""
        if self.closed or (self.accept is not None and not self.accept(event)):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            self.close()

    async def next(self, timeout_s: float | None = None) -> Event | None:
        """The next event; ``None`` once closed.

        :raises TimeoutError: none came within ``timeout_s`` (the subscription goes on).
        """
        if self.closed and self._queue.empty():
            return None
        async with asyncio.timeout(timeout_s):
            return await self._queue.get()

    def close(self) -> None:
        """End the feed: what is queued is discarded, a pending ``next()`` returns ``None``."""
        if self.closed:
            return
        self.closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        if self._on_close is not None:
            self._on_close(self)


class EventTail:
    """The API process's one reader of ``{NS}:events``.

    :param client: a client for the tail alone: its ``XREAD BLOCK`` holds a connection.
    :param keys: the namespace.
    :param recent: how many recent outcomes are kept for late waiters.
    :param block_ms: how long one ``XREAD`` blocks.
    :param count: events read per ``XREAD`` at most.
    :param on_error: told of each failed read (e.g. to find a cluster's new master).
    """

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        *,
        recent: int = 10_000,
        block_ms: int = 1_000,
        count: int = 1_000,
        on_error: Callable[[BaseException], None] | None = None,
    ):
        self._client = client
        self._keys = keys
        self._recent_max = recent
        self._block_ms = block_ms
        self._count = count
        self._on_error = on_error
        self._recent: OrderedDict[RequestKey, Event] = OrderedDict()
        self._waiters: dict[RequestKey, list[asyncio.Future[Event | None]]] = {}
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: The id of the last event read: the stream's end when the tail started, then
        #: each event's as it goes by.
        self.position = "0-0"
        self.connected = False

    async def start(self) -> None:
        """Start reading at the stream's current end (``$``, made a fixed id so that no
        event is missed between two reads or across a reconnect)."""
        last = cast(Entries, await self._client.xrevrange(self._keys.events, count=1))
        self.position = text(last[0][0]) if last else "0-0"
        self.connected = True
        self._task = asyncio.create_task(self._run(), name="events-tail")

    async def close(self) -> None:
        """Stop reading; waiters get ``None``, subscriptions end."""
        self._closing = True
        self.release_all()
        if self._task is not None:
            # redis-py may turn the cancellation of a blocked read into a ConnectionError,
            # or lose it: the loop then sees ``_closing`` and returns, or is cancelled again.
            await cancel_and_wait([self._task])
            self._task = None

    def release_all(self) -> None:
        """Answer every waiter with ``None`` and end every subscription, e.g. on shutdown, so
        that no open request holds the server up."""
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._waiters.clear()
        for subscription in list(self._subscribers):
            subscription.close()

    # -- waiters -----------------------------------------------------------------------

    def recent(self, action: str, request_id: str) -> Event | None:
        """The outcome of (``action``, ``request_id``) if it went by lately."""
        return self._recent.get((action, request_id))

    def expect(self, action: str, request_id: str) -> asyncio.Future[Event | None]:
        """A future for the outcome of (``action``, ``request_id``): already done when it went
        by lately, else done when it comes (``None``: the tail stopped). Call ``forget``
        when no longer interested (``waiting`` does)."""
        future: asyncio.Future[Event | None] = asyncio.get_running_loop().create_future()
        if (event := self._recent.get((action, request_id))) is not None:
            future.set_result(event)
        else:
            self._waiters.setdefault((action, request_id), []).append(future)
        return future

    def forget(self, action: str, request_id: str, future: asyncio.Future[Event | None]) -> None:
        futures = self._waiters.get((action, request_id))
        if futures is None:
            return
        with contextlib.suppress(ValueError):
            futures.remove(future)
        if not futures:
            del self._waiters[(action, request_id)]

    @contextlib.contextmanager
    def waiting(self, action: str, request_id: str) -> Iterator[asyncio.Future[Event | None]]:
        """``expect``, and ``forget`` on leaving."""
        future = self.expect(action, request_id)
        try:
            yield future
        finally:
            self.forget(action, request_id, future)

    @property
    def waiters(self) -> int:
        return sum(len(futures) for futures in self._waiters.values())

    # -- subscribers and listeners -----------------------------------------------------

    def subscribe(self, accept: Callable[[Event], bool] | None = None, *, maxsize: int = 1_000) -> Subscription:
        """A live feed of the events from now on that ``accept`` lets through (all without)."""
        subscription = Subscription(accept, maxsize, on_close=self._subscribers.discard)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every event from now on; returns the function removing it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- reading -----------------------------------------------------------------------

    def dispatch(self, event: Event) -> None:
        """Hand one event to its waiters, the subscribers and the listeners, and keep it in
        the recent window. (The reader calls it; tests may too.)"""
        key = (event.action, event.request_id)
        self._recent[key] = event
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(event)
        for subscription in list(self._subscribers):
            subscription.offer(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an events listener failed", listener=repr(listener))

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                reply = await self._client.xread(
                    {self._keys.events: self.position}, count=self._count, block=self._block_ms
                )
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                if self._on_error is not None:
                    self._on_error(exc)
                failures += 1
                if failures == 1:
                    self.connected = False
                    log.warning("events tail: lost Redis, retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(retry_backoff_s(failures, base_s=0.05, cap_s=2.0))
                continue
            if failures:
                failures = 0
                self.connected = True
                log.info("events tail: reading again", position=self.position)
            for _stream, entries in cast(StreamsReply, reply or []):
                for event_id, fields in entries:
                    self.position = text(event_id)
                    if fields:
                        self.dispatch(Event.from_fields(fields, self.position))
