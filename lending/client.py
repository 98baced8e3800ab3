"""The sender's side: queue a request and wait for its outcome event.

``send_request`` is a whole get_books run, bounded by one deadline: it never raises for
Redis' sake but says how the run ended, as one of the outcomes below.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from lending.domain.events import Event
from lending.domain.submission import encode_submission
from lending.errors import LendingError, RedisUnavailable, RequestRefused
from lending.keys import Keys
from lending.redaction import redact
from lending.redis.cluster import namespace_url
from lending.redis.connection import check_reachable, make_client
from lending.redis.replies import Entries, StreamsReply, text
from lending.settings import Tls


@dataclass(frozen=True)
class Answered:
    """The request's outcome event came."""

    event: Event


@dataclass(frozen=True)
class Queued:
    """The request was queued, and the caller did not want to wait."""

    request_id: str


@dataclass(frozen=True)
class NoOutcome:
    """The request was queued, but no outcome came before the deadline.

    :param request_id: ``None`` for a request handed in through the inbox that no
        worker queued yet: it waits there.
    """

    request_id: str | None


@dataclass(frozen=True)
class Unreachable:
    """Redis could not be reached, was lost, or did not answer in time."""

    message: str


@dataclass(frozen=True)
class Refused:
    """Redis answered with an error (OOM, NOPERM, a stream out of IDs, ...)."""

    reason: str


@dataclass(frozen=True)
class Invalid:
    """The request was refused as invalid before it was queued (by the API, or by the
    inbox relay for a sender without XADD): nothing was queued.

    :param by: who refused it (``the API at URL``, ``the inbox``).
    """

    reason: str
    by: str


@dataclass(frozen=True)
class Interrupted:
    """The sender stopped the run (Ctrl-C): how far it got, for the sender to know."""

    request_id: str | None = None
    sent: bool = False
    handed_in: bool = False


Outcome = Answered | Queued | NoOutcome | Unreachable | Refused | Invalid | Interrupted


@dataclass
class Progress:
    """How far a run got: a failure means something else before and after queuing.

    :param sent: the XADD (or the hand-in through the inbox) was sent (its reply may
        never have come).
    :param request_id: the id of the queued request, once Redis gave it.
    :param handed_in: the request is in the inbox, for a worker to queue it.
    """

    sent: bool = False
    request_id: str | None = None
    handed_in: bool = False

    def interrupted(self) -> Interrupted:
        return Interrupted(self.request_id, self.sent, self.handed_in)


async def send_request(
    url: str,
    tls: Tls,
    keys: Keys,
    action: str,
    user_id: str,
    book_ids: Sequence[str],
    *,
    timeout_s: float,
    wait: bool = True,
    progress: Progress | None = None,
) -> Outcome:
    """Connect, queue the request and (if ``wait``) wait for its outcome, all within ``timeout_s``.

    The deadline holds even when Redis stalls: a socket timeout would not (it is longer,
    and restarts with every retry). ``progress`` records how far it got (for a caller
    that is interrupted).
    """
    progress = progress or Progress()
    client: Redis | None = None
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            client = make_client(await namespace_url(url, keys.namespace, tls), tls=tls)
            await check_reachable(client, url)
            # The deadline, not the wait for a receipt, ends a run whose request no worker queues.
            request_id, after = await submit(
                client, keys, action, user_id, book_ids, progress, receipt_timeout_s=timeout_s + 1
            )
            if not wait:
                return Queued(request_id)
            event = await wait_for_event(client, keys, action, request_id, after, timeout_s)
            return Answered(event) if event else NoOutcome(request_id)
    except (LendingError, RedisError, OSError) as exc:  # OSError includes the deadline's TimeoutError
        return failure_outcome(exc, progress, url=redact(url), timeout_s=timeout_s, expired=deadline.expired())
    finally:
        if client is not None:
            await client.aclose()


def failure_outcome(exc: BaseException, progress: Progress, *, url: str, timeout_s: float, expired: bool) -> Outcome:
    """What ``exc``, raised when the run got as far as ``progress``, means for the sender.

    :param expired: the run's deadline passed (``exc`` is then its ``TimeoutError``).
    """
    if expired:
        if progress.request_id is not None or progress.handed_in:
            return NoOutcome(progress.request_id)
        fate = "the request may have been queued (no id came back)" if progress.sent else "nothing was queued"
        return Unreachable(f"Redis at {url} did not answer within {timeout_s:g} s; {fate}")
    if isinstance(exc, RedisUnavailable):
        return Unreachable(str(exc))
    if isinstance(exc, RequestRefused):
        if exc.reason.startswith("STREAMFULL"):  # Redis's refusal, relayed: as an XADD gets it
            return Refused(exc.reason)
        return Invalid(exc.reason, by="the inbox")  # out of the inbox's bounds: the request is at fault
    if isinstance(exc, ResponseError):
        return Refused(str(exc) or type(exc).__name__)
    message = f"lost Redis at {url}: {(str(exc) or type(exc).__name__).rstrip('.')}"
    if progress.request_id is not None:
        return Unreachable(f"{message}; request {progress.request_id} was queued")
    return Unreachable(f"{message}; the request may have been queued" if progress.sent else message)


async def submit(
    client: Redis,
    keys: Keys,
    action: str,
    user_id: str,
    book_ids: Sequence[str],
    progress: Progress | None = None,
    *,
    receipt_timeout_s: float = 10.0,
) -> tuple[str, str]:
    """Queue a request; returns its id and the events-stream id to read events after.

    The last event id is taken before the request is added, so its event cannot be
    missed however fast a worker answers. ``progress`` records how far it got.

    A sender that may not XADD (the least-privilege user of ``python -m lending acl``)
    hands the request in through the inbox instead, and waits up to
    ``receipt_timeout_s`` for a worker to queue it (``TimeoutError`` if none did).

    :raises RequestRefused: the inbox relay refused the request (out of bounds).
    """
    progress = progress or Progress()
    last = cast(Entries, await client.xrevrange(keys.events, count=1))
    after = text(last[0][0]) if last else "0-0"
    progress.sent = True
    try:
        request_id = text(
            await client.xadd(keys.requests(action), {"user_id": user_id, "book_ids": ",".join(book_ids)})
        )
    except NoPermissionError as refused:
        request_id = await hand_in(client, keys, action, user_id, book_ids, progress, refused, receipt_timeout_s)
    progress.request_id = request_id
    return request_id, after


async def hand_in(
    client: Redis,
    keys: Keys,
    action: str,
    user_id: str,
    book_ids: Sequence[str],
    progress: Progress,
    refused: NoPermissionError,
    timeout_s: float,
) -> str:
    """Hand the request in through ``{NS}:inbox`` (after the XADD was ``refused``) and wait
    for the worker's receipt; the queued request's id."""
    nonce = secrets.token_hex(16)
    try:
        await client.rpush(keys.inbox, encode_submission(nonce, action, user_id, book_ids))
    except NoPermissionError as exc:
        raise NoPermissionError(f"{refused}; nor through the inbox: {exc}") from exc
    progress.handed_in = True
    receipt = await wait_for_receipt(client, keys, nonce, timeout_s)
    if receipt is None:
        raise TimeoutError(f"no worker queued the request handed in through {keys.inbox} within {timeout_s:g} s")
    if b"request_id" not in receipt:
        raise RequestRefused(text(receipt.get(b"error")) or "no reason given")
    return text(receipt[b"request_id"])


async def wait_for_receipt(client: Redis, keys: Keys, nonce: str, timeout_s: float) -> dict[bytes, bytes] | None:
    """The fields of the receipt of inbox submission ``nonce``, or ``None`` if none came in time."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = await client.xread(
            {keys.receipt(nonce): "0-0"}, count=1, block=max(1, int(min(5000.0, remaining * 1000)))
        )
        for _stream, entries in cast(StreamsReply, reply or []):
            for _entry_id, fields in entries:
                return fields
    return None


async def wait_for_event(
    client: Redis, keys: Keys, action: str, request_id: str, after: str, timeout_s: float
) -> Event | None:
    """The event of (``action``, ``request_id``), or ``None`` if none came in time."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = await client.xread({keys.events: after}, count=500, block=max(1, int(min(5000.0, remaining * 1000))))
        for _stream, entries in cast(StreamsReply, reply or []):
            for event_id, fields in entries:
                after = text(event_id)
                if fields and (fields.get(b"request_id"), fields.get(b"action")) == (
                    request_id.encode(),
                    action.encode(),
                ):
                    return Event.from_fields(fields, after)
    return None
