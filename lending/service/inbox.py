"""The inbox relay: queues the requests that senders without XADD handed in.

Redis ACLs cannot restrict XADD's arguments (``MAXLEN 0`` trims away what others
queued, an explicit maximal ID uses up a stream's IDs), and a script or Redis Function
runs with its caller's permissions, so it cannot lend a sender an XADD it does not
have. The least-privilege sender therefore only RPUSHes a submission to
``{NS}:inbox`` (``domain.submission``); every worker runs this relay, which waits for
the inbox to fill and takes submissions off it with ``relay.lua``: bounded, appended to
their request stream with a server-generated ID, answered on a receipt. A crash at any
point loses nothing: the script is one atomic step, and a submission leaves the inbox
only in it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from lending.domain.backoff import jittered, retry_backoff_s
from lending.domain.submission import MAX_BOOKS, MAX_ID_BYTES, RECEIPT_TTL_MS, RELAY_BATCH
from lending.keys import REQUEST_TYPES, Keys
from lending.redis.replies import is_outage, is_transient
from lending.redis.scripts import Scripts

log = structlog.get_logger(__name__)


class InboxRelay:
    """Moves submissions from ``{NS}:inbox`` to the request streams until cancelled.

    :param max_books: the most book ids one submission may carry (a bound only: the
        service applies ``--max-books-per-request`` after removing duplicates).
    :param on_redis_error: called after transient Redis errors (a cluster namespace
        follows its slot).
    :param wait_s: how long one wait for the inbox to fill blocks.
    """

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts,
        *,
        max_books: int = MAX_BOOKS,
        on_redis_error: Callable[[], Awaitable[object]] | None = None,
        wait_s: float = 1.0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._scripts = scripts
        self._max_books = max(MAX_BOOKS, max_books)
        self._on_redis_error = on_redis_error
        self._wait_s = wait_s
        self._rng = random.Random()
        self.relayed = 0

    async def run(self) -> None:
        """Wait for submissions and relay them, riding out Redis errors, until cancelled."""
        failures = 0
        while True:
            try:
                await self._wait()
                while await self.relay_once() == RELAY_BATCH:
                    pass
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = jittered(retry_backoff_s(failures, base_s=0.1), self._rng)
                if not is_outage(exc):
                    log.exception("relaying the inbox failed, retrying", retry_in_s=round(delay, 2))
                elif failures == 1:
                    log.warning("redis unavailable, relaying the inbox later", error=str(exc))
                if self._on_redis_error is not None and is_transient(exc):
                    try:
                        await self._on_redis_error()
                    except Exception as hook_exc:
                        log.debug("could not find Redis again yet", error=str(hook_exc))
                await asyncio.sleep(delay)

    async def _wait(self) -> None:
        """Until the inbox holds something (or ``wait_s`` passed). A BLMOVE of the list's
        head to its own head changes nothing, and only wakes up when there is a head."""
        inbox = self._keys.inbox
        await self._client.blmove(inbox, inbox, self._wait_s, "LEFT", "LEFT")  # type: ignore[arg-type]

    async def relay_once(self) -> int:
        """Take up to ``RELAY_BATCH`` submissions off the inbox; how many it took."""
        actions = [t.action for t in REQUEST_TYPES]
        taken = await self._scripts.relay(
            self._client,
            [self._keys.inbox, *(self._keys.requests(a) for a in actions)],
            [self._keys.receipts_prefix, RECEIPT_TTL_MS, RELAY_BATCH, MAX_ID_BYTES, self._max_books, *actions],
        )
        self.relayed += int(taken)
        return int(taken)
