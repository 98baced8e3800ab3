"""``Api``: what one API process shares between its requests, and how it starts and stops."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from lending.api.config import ApiSettings
from lending.api.dashboard import Dashboard
from lending.api.metrics import ApiMetrics, Readings
from lending.api.reads import Pending, RequestState, request_state
from lending.api.tail import EventTail
from lending.keys import Keys
from lending.redis.batching import ScriptBatcher
from lending.redis.replies import is_transient
from lending.redis.scripts import Scripts
from lending.redis.tasks import cancel_and_wait
from lending.redis.workers import read_limits
from lending.settings import Limits

log = structlog.get_logger(__name__)

#: Points the clients at the namespace's current master (a cluster's failover); ``True``
#: when it moved.
FindRedis = Callable[[], Awaitable[bool]]


class Api:
    """The front door's state: the Redis client, the scripts, the events tail, and the
    limits the workers publish (read at start, then every ``limits_refresh_s``).

    :param settings: the API's settings.
    :param client: the client of the namespace's Redis, shared by every request.
    :param tail_client: a client for the events tail alone (its ``XREAD BLOCK`` holds a
        connection).
    :param find_redis: for a cluster, points both clients at the namespace's current
        master; run when a command fails for Redis's sake (``redis_failed``).
    """

    def __init__(
        self, settings: ApiSettings, client: Redis, tail_client: Redis, find_redis: FindRedis | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace)
        self.scripts = Scripts()
        #: Runs api_submit.lua: the submissions of one turn of the event loop in one pipeline.
        self.submitter = ScriptBatcher(client, self.scripts.api_submit)
        self.tail = EventTail(tail_client, self.keys, recent=settings.recent_outcomes, on_error=self.redis_failed)
        self.dashboard = Dashboard(
            client,
            self.keys,
            self.tail,
            window_s=settings.dashboard_window_s,
            outcomes=settings.dashboard_outcomes,
            refresh_s=settings.dashboard_refresh_s,
        )
        self.metrics = ApiMetrics(
            Readings(
                waiting=lambda: self.tail.waiters,
                event_streams=lambda: self.tail.subscribers,
                dashboard_streams=lambda: self.dashboard.watchers,
                tail_up=lambda: self.tail.connected,
            )
        )
        self.limits = Limits()
        self.limits_published = False
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._find_redis = find_redis
        self._finding: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.scripts.api_submit.load(self.client)
        await self.refresh_limits()
        self.dashboard.start()
        await self.tail.start()
        self._refresher = asyncio.create_task(self._refresh_limits_periodically(), name="limits-refresh")
        log.info(
            "API started",
            namespace=self.settings.namespace,
            max_books_per_request=self.limits.max_books_per_request,
            limits_published=self.limits_published,
            operator_endpoints=self.settings.token is not None,
            max_clients=self.settings.client_limit(),
        )

    async def close(self) -> None:
        """Stop the tail, the dashboard and the refresher (idempotent); the clients are the caller's."""
        if self._closed:
            return
        self._closed = True
        # Cancelled again while one lingers: a cancellation can be lost inside a Redis call.
        await cancel_and_wait([task for task in (self._refresher, self._finding) if task is not None])
        await self.dashboard.close()
        await self.tail.close()

    def release_all(self) -> None:
        """Answer every waiter and end every stream (events and dashboard) at once, e.g. on
        shutdown, so that no open request holds the server up."""
        self.tail.release_all()
        self.dashboard.release()

    def redis_failed(self, exc: BaseException) -> None:
        """A command failed: when Redis itself is at fault (a connection lost, ``MOVED``,
        ``READONLY``, ...) on a cluster, look for the namespace's master again, one search at
        a time, while the failed request gets its 503 at once."""
        if self._find_redis is None or self._closed or not is_transient(exc):
            return
        if self._finding is None or self._finding.done():
            self._finding = asyncio.create_task(self._find(self._find_redis), name="find-redis")

    async def _find(self, find_redis: FindRedis) -> None:
        try:
            await find_redis()  # it logs a move
        except Exception as exc:  # the next failure searches again
            log.warning("could not find the namespace's master yet", error=str(exc) or type(exc).__name__)

    async def refresh_limits(self) -> None:
        """Read the limits the workers published (the defaults while none ever did). Gone
        again (a Redis that lost its data: the next heartbeat publishes them again), the
        last ones read still hold, rather than the defaults."""
        published = await read_limits(self.client, self.keys)
        if published is not None:
            self.limits = published
        self.limits_published = published is not None

    async def _refresh_limits_periodically(self) -> None:
        failing = False
        while not self._closed:
            await asyncio.sleep(self.settings.limits_refresh_s)
            try:
                await self.refresh_limits()
            except (RedisError, OSError) as exc:
                self.redis_failed(exc)
                if not failing:
                    log.warning("could not read the published limits; keeping the last ones", error=str(exc))
                failing = True
            else:
                failing = False

    def token_matches(self, presented: str) -> bool:
        """Is ``presented`` the operator token? (Compared in constant time.)"""
        token = self.settings.token
        return token is not None and hmac.compare_digest(presented.encode(), token.encode())

    async def outcome(self, action: str, request_id: str, wait_s: float, *, look_up: bool) -> RequestState:
        """The outcome of (``action``, ``request_id``), waiting up to ``wait_s`` for it.

        :param look_up: the request may be old (a replayed idempotency key, a GET): read
            its state before waiting. A request queued just now needs no lookup: its
            event cannot have gone by before the tail's recent window.
        :returns: its event; ``Pending()`` when none came in time; for a lookup, also
            ``Unavailable()`` or ``None`` (no such request).
        """
        # Registered before the lookup: an event arriving meanwhile wakes the waiter.
        with self.tail.waiting(action, request_id) as future:
            if look_up and not future.done():
                state = await request_state(
                    self.client, self.keys, self.tail, action, request_id, lookup_limit=self.settings.lookup_limit
                )
                if not isinstance(state, Pending):
                    return state
            try:
                async with asyncio.timeout(wait_s):
                    event = await future
            except TimeoutError:
                return Pending()
            return Pending(shutting_down=True) if event is None else event  # None: released
