"""The invariant checker: reads a namespace and reports every inconsistency.

``check_state`` is pure: it takes a ``Snapshot`` and the limits to assume. Reading the
snapshot, and waiting for quiescence, are the only Redis I/O here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from lending.domain.streamids import id_key, is_id, next_id
from lending.keys import ACTIONS, Keys
from lending.redis import eviction
from lending.redis.replies import text
from lending.redis.workers import read_limits
from lending.settings import Limits

PAGE = 10_000
# Users whose keys are read per round trip (a pipeline), and per transaction when a
# disagreement is read again at one moment.
USER_PAGE = 500
# Rounds of reading a disagreeing user again, each with the books found lent to them.
CONFIRM_ROUNDS = 3


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    keys: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "message": self.message, "keys": list(self.keys)}


@dataclass
class GroupState:
    """How far one consumer group is through its stream."""

    stream: str
    group: str
    pending: int
    unread: bool  # entries added after the group's last delivered ID

    @property
    def done(self) -> bool:
        return self.pending == 0 and not self.unread


@dataclass
class Snapshot:
    """What the checker needs of one namespace, read from Redis."""

    namespace: str
    lent: dict[str, str] = field(default_factory=dict)  # book -> user
    counts: dict[str, str] = field(default_factory=dict)  # user -> raw count value
    loans: dict[str, set[str]] = field(default_factory=dict)  # user -> their books set (the index)
    # user -> the books lent-books lent them when their count and books set were read
    # again at one moment (their first reading disagreed with ``lent``); else ``lent`` says
    held_confirmed: dict[str, set[str]] = field(default_factory=dict)
    storage: set[str] = field(default_factory=set)
    shelving: dict[str, str] = field(default_factory=dict)  # book -> context
    from_shelving: dict[str, str] = field(default_factory=dict)  # book -> context, the library's record
    grants: dict[str, str] = field(default_factory=dict)  # book -> context, grants not settled yet
    reservations: list[str] = field(default_factory=list)  # keys
    requests: dict[str, list[str]] = field(default_factory=dict)  # action -> entry ids in the stream
    last_ids: dict[str, str] = field(default_factory=dict)  # action -> the stream's last generated id
    # action -> the highest ID XDELed from the stream (Redis 7's XINFO STREAM
    # max-deleted-entry-id; none on 6.2; trims are told by the first entry instead)
    max_deleted: dict[str, str] = field(default_factory=dict)
    events_trimmed_to: str | None = None  # events before this ID may have been trimmed away
    events_last_id: str = "0-0"  # the events stream's last generated id
    # Entries ever added to each request stream (action -> count), and events ever added:
    # Redis 7's XINFO STREAM entries-added (empty / None on 6.2, which does not count).
    entries_added: dict[str, int] = field(default_factory=dict)
    events_added: int | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (event id, action, request id)
    groups: list[GroupState] = field(default_factory=list)
    inbox: int = 0  # requests handed in through the inbox, not queued yet
    # key -> the type it should have, for each key found holding another (a hand edit);
    # read as if it were missing
    wrong_types: dict[str, str] = field(default_factory=dict)

    @property
    def quiescent(self) -> bool:
        """Every group has read and acknowledged its whole stream and the inbox is empty:
        nothing is in progress, so a reservation still present is a leftover, not work
        under way."""
        return all(g.done for g in self.groups) and self.inbox == 0


def check_state(
    snapshot: Snapshot, max_books_per_user: int, storage_capacity: int, *, quiescent: bool | None = None
) -> list[Violation]:
    """Every violated invariant of ``snapshot``.

    The invariants about shelving, events and reservations only hold once the service
    is quiescent; they are checked when ``quiescent`` (default: the snapshot's own
    quiescence) is true.
    """
    keys = Keys(snapshot.namespace)
    out = [
        Violation("keys-of-their-type", f"{key} holds a value of another type than a {kind}", (key,))
        for key, kind in sorted(snapshot.wrong_types.items())
    ]
    out += _check_counts(snapshot, keys, max_books_per_user)
    out += _check_loans(snapshot, keys)
    out += _check_storage(snapshot, keys, storage_capacity)
    if snapshot.quiescent if quiescent is None else quiescent:
        out += _check_shelving(snapshot, keys)
        out += _check_events(snapshot, keys)
        out += [
            Violation("no-reservations", "a reservation is left over although nothing is in progress", (key,))
            for key in snapshot.reservations
        ]
    return out


def _held(snapshot: Snapshot) -> dict[str, set[str]]:
    """User -> the books lent-books lends them, as read with their count and books set."""
    held: dict[str, set[str]] = {}
    for book, user in snapshot.lent.items():
        if user not in snapshot.held_confirmed:
            held.setdefault(user, set()).add(book)
    held.update({user: books for user, books in snapshot.held_confirmed.items() if books})
    return held


def _check_loans(snapshot: Snapshot, keys: Keys) -> list[Violation]:
    """Each user's books set is exactly their books in lent-books (written in one commit)."""
    held = _held(snapshot)
    out = []
    for user in sorted(set(held) | set(snapshot.loans)):
        indexed, lent = snapshot.loans.get(user, set()), held.get(user, set())
        if indexed != lent:
            out.append(
                Violation(
                    "loans-match-lent-books",
                    f"books set of {user!r} holds {_few(sorted(indexed))} but lent-books lends them "
                    f"{_few(sorted(lent))}",
                    (keys.user_books(user), keys.lent_books),
                )
            )
    return out


def _check_counts(snapshot: Snapshot, keys: Keys, limit: int) -> list[Violation]:
    out = []
    held = Counter({user: len(books) for user, books in _held(snapshot).items()})
    for user in sorted(set(held) | set(snapshot.counts)):
        raw = snapshot.counts.get(user, "0")
        key = keys.user_count(user)
        try:
            count = int(raw)
        except ValueError:
            out.append(Violation("count-matches-lent-books", f"count of {user!r} is not an integer: {raw!r}", (key,)))
            continue
        if count < 0:
            out.append(Violation("count-not-negative", f"count of {user!r} is negative: {count}", (key,)))
        if count != held[user]:
            out.append(
                Violation(
                    "count-matches-lent-books",
                    f"count of {user!r} is {count} but {held[user]} books in lent-books name them",
                    (key, keys.lent_books),
                )
            )
        if max(count, held[user]) > limit:
            holds = max(count, held[user])
            out.append(Violation("count-within-limit", f"{user!r} holds {holds} books (limit {limit})", (key,)))
    return out


def _check_storage(snapshot: Snapshot, keys: Keys, capacity: int) -> list[Violation]:
    out = []
    both = sorted(snapshot.storage & set(snapshot.lent))
    if both:
        out.append(
            Violation(
                "storage-not-lent", f"books both in storage and lent: {_few(both)}", (keys.storage, keys.lent_books)
            )
        )
    if len(snapshot.storage) > capacity:
        out.append(
            Violation(
                "storage-within-capacity",
                f"storage holds {len(snapshot.storage)} books (capacity {capacity})",
                (keys.storage,),
            )
        )
    return out


def _check_shelving(snapshot: Snapshot, keys: Keys) -> list[Violation]:
    out = []
    expected = set(snapshot.lent) | snapshot.storage
    handed_out = set(snapshot.shelving)
    # A grant the ledger names is owned: a worker or the reconciliation settles it.
    owned = {book for book, context in snapshot.grants.items() if snapshot.shelving.get(book) == context}
    lost = sorted(handed_out - expected - owned)
    unknown = sorted(expected - handed_out)
    if lost:
        out.append(
            Violation(
                "shelving-matches-library",
                f"{len(lost)} books handed out by shelving are neither lent, in storage nor in the grants ledger "
                f"(lost): {_few(lost)}",
                (keys.shelving_state, keys.grants),
            )
        )
    if unknown:
        out.append(
            Violation(
                "shelving-matches-library",
                f"{len(unknown)} books lent or in storage are unknown to shelving (duplicated): {_few(unknown)}",
                (keys.shelving_state, keys.lent_books, keys.storage),
            )
        )
    differ = sorted(
        book
        for book in expected | set(snapshot.from_shelving)
        if snapshot.from_shelving.get(book) != snapshot.shelving.get(book) or book not in expected
    )
    if differ:
        out.append(
            Violation(
                "library-record-matches-shelving",
                f"{len(differ)} books differ between the library's record of what it took from shelving "
                f"and shelving's own: {_few(differ)}",
                (keys.from_shelving, keys.shelving_state),
            )
        )
    return out


def _check_events(snapshot: Snapshot, keys: Keys) -> list[Violation]:
    out = []
    per_entry = Counter((action, request) for _, action, request in snapshot.events)
    for action in ACTIONS:
        entries = snapshot.requests.get(action, [])
        present = set(entries)
        for entry in entries:
            n = per_entry[(action, entry)]
            trimmed_event = (
                n == 0 and snapshot.events_trimmed_to is not None and id_key(entry) < id_key(snapshot.events_trimmed_to)
            )
            if n != 1 and not trimmed_event:
                out.append(
                    Violation(
                        "one-event-per-entry",
                        f"{action} request {entry} has {n} events",
                        (keys.requests(action), keys.events),
                    )
                )
        for event_action, request in per_entry:
            if event_action != action or request in present:
                continue
            if not _maybe_trimmed(snapshot, action, request):
                out.append(
                    Violation(
                        "event-names-an-entry", f"event for {action} request {request} names no entry", (keys.events,)
                    )
                )
    for event_id, action, _request in snapshot.events:
        if action not in ACTIONS:
            message = f"event {event_id} has unknown action {action!r}"
            out.append(Violation("event-names-an-entry", message, (keys.events,)))
    out += _check_vanished(snapshot, keys, per_entry)
    return out


def _check_vanished(snapshot: Snapshot, keys: Keys, per_entry: Counter[tuple[str, str]]) -> list[Violation]:
    """Request entries deleted before they were answered (``XADD ... MAXLEN 0`` or an
    XTRIM/XDEL by a client) leave no trace but in Redis 7's counters: every entry ever
    added gets exactly one event, so once quiescent the events ever added must account
    for the entries ever added. Trimming changes neither count (retention trims only
    answered entries, and a trimmed event was added all the same). What the other checks
    already report is taken out: entries present without their event, extra events."""
    if snapshot.events_added is None or set(snapshot.entries_added) != set(ACTIONS):
        return []  # Redis 6.2: no counters
    present = {(action, entry) for action in ACTIONS for entry in snapshot.requests.get(action, [])}
    unanswered = sum(
        1
        for action, entry in present
        if per_entry[(action, entry)] == 0
        and not (snapshot.events_trimmed_to is not None and id_key(entry) < id_key(snapshot.events_trimmed_to))
    )
    extra = sum(n - 1 for n in per_entry.values() if n > 1)
    strays = sum(1 for pair in per_entry if pair not in present and not _maybe_trimmed(snapshot, *pair))
    answered = snapshot.events_added - extra - strays
    vanished = sum(snapshot.entries_added.values()) - unanswered - answered
    if vanished < 0:
        # More events answer entries than entries were ever added: some event names an
        # entry that never was, though it looks like one deleted since (an ID below one
        # deleted from its stream).
        return [
            Violation(
                "event-names-an-entry",
                f"{-vanished} more events answer request entries than entries were ever added: "
                "an event names an entry that never was",
                (keys.events, *keys.request_streams),
            )
        ]
    if vanished == 0:
        return []
    return [
        Violation(
            "every-entry-answered",
            f"{vanished} request entries were added but are neither in their stream nor answered by an event "
            "(deleted before a worker answered them: XADD with MAXLEN or MINID, XTRIM or XDEL by a client)",
            (*keys.request_streams, keys.events),
        )
    ]


def _maybe_trimmed(snapshot: Snapshot, action: str, request: str) -> bool:
    """Is (``action``, ``request``) an entry that may have been deleted from its stream:
    no newer than the highest ID Redis 7 says was XDELed, or older than the stream's
    first entry (trimmed; or, in a stream trimmed empty, not newer than its last
    generated ID)?"""
    if action not in ACTIONS or not is_id(request):
        return False
    deleted = snapshot.max_deleted.get(action)
    if deleted is not None and id_key(request) <= id_key(deleted):
        return True
    entries = snapshot.requests.get(action, [])
    if entries:
        return id_key(request) < id_key(entries[0])
    last = snapshot.last_ids.get(action)
    return last is not None and id_key(request) <= id_key(last)


def _few(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass(frozen=True)
class Report:
    namespace: str
    quiescent: bool
    violations: list[Violation]
    maxmemory_policy: str | None = None  # Redis's eviction policy; None: INFO refused
    limits: Limits = field(default_factory=Limits)
    limits_published: bool = True  # False: no worker published limits, the defaults were assumed

    @property
    def clean(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "quiescent": self.quiescent,
            "clean": self.clean,
            "violations": [v.as_json() for v in self.violations],
            "maxmemory_policy": self.maxmemory_policy,
            "limits": dataclasses.asdict(self.limits),
            "limits_published": self.limits_published,
        }


async def check(
    client: Redis, namespace: str, wait_quiescent_s: float = 0.0, *, limits: Limits | None = None
) -> Report:
    """Read ``namespace`` (after waiting up to ``wait_quiescent_s`` for quiescence) and check it
    against the limits its workers enforce (``{NS}:config``; ``limits`` overrides them, the
    defaults stand in when no worker ever ran). The report also names Redis's eviction
    policy (an evicting Redis is no violation)."""
    published = await read_limits(client, Keys(namespace))
    used = limits or published or Limits()
    snap = await wait_quiescent(client, namespace, wait_quiescent_s)
    violations = check_state(snap, used.max_books_per_user, used.storage_capacity)
    return Report(
        namespace, snap.quiescent, violations, await eviction.read_policy(client), used, published is not None
    )


# -- reading -------------------------------------------------------------------------


async def read_snapshot(client: Redis, namespace: str) -> Snapshot:
    """The namespace at one moment.

    The state and the groups' progress are read in one transaction: read one key at a
    time, a grant settled and given back between two reads looked lost (the ledger read
    after the settling, the shelving state before its give-back). The users' counts and
    books sets are read after it, and any that disagrees with lent-books is read again
    with the books lent to that user in one transaction of its own (a user lent to in
    between is no violation). The streams are read last, up to their last IDs at that
    moment.
    """
    keys = Keys(namespace)
    users = await _scan_names(client, keys, "count") | await _scan_names(client, keys, "books")
    reservations = sorted(
        [text(raw) async for raw in client.scan_iter(match=keys.pattern("reservations:*"), count=1000)]
    )
    snap = await _read_moment(client, keys, reservations)
    everyone: dict[str, set[str]] = {user: set() for user in users | set(snap.lent.values())}
    await _read_users(client, keys, snap, everyone, confirm=False)
    await _confirm_users(client, keys, snap)
    for action in ACTIONS:
        if keys.requests(action) not in snap.wrong_types:
            snap.requests[action] = [
                entry_id for entry_id, _ in await _read_all(client, keys.requests(action), snap.last_ids[action])
            ]
    events = [] if keys.events in snap.wrong_types else await _read_all(client, keys.events, snap.events_last_id)
    for event_id, fields in events:
        snap.events.append((event_id, _field(fields, b"action"), _field(fields, b"request_id")))
    # Events trimmed since that moment answered requests older than the marker as it is
    # now (retention sets it after it trims), or, on Redis 7, than what the stream says
    # it lost: no race with that SET.
    try:
        marker = None if keys.events_trimmed_to in snap.wrong_types else await client.get(keys.events_trimmed_to)
    except ResponseError:  # made another type since the moment: the next check names it
        marker = None
    for later in (marker, await _events_removed_below(client, keys.events)):
        if later is not None and is_id(text(later)) and id_key(text(later)) > id_key(snap.events_trimmed_to or "0-0"):
            snap.events_trimmed_to = text(later)
    return snap


async def _scan_names(client: Redis, keys: Keys, kind: str) -> set[str]:
    """The users that have a ``{NS}:user:<id>:<kind>`` key."""
    prefix, suffix = f"{keys.prefix}:user:", f":{kind}"
    return {
        text(raw)[len(prefix) : -len(suffix)]
        async for raw in client.scan_iter(match=keys.pattern(f"user:*:{kind}"), count=1000)
    }


def probe_type(pipe: Pipeline, key: str, kind: str) -> None:
    """Queue a read of ``key`` that only a ``kind`` (or no key) answers, and a key of
    another type refuses with WRONGTYPE: TYPE itself is not among the operator's commands."""
    match kind:
        case "set":
            pipe.scard(key)
        case "hash":
            pipe.hlen(key)
        case "stream":
            pipe.xlen(key)
        case "list":
            pipe.llen(key)
        case _:
            pipe.get(key)


def _also_typed(keys: Keys) -> list[tuple[str, str]]:
    """Keys the invariants do not read, with the type each must have: one of another
    type stops a worker (``workers``, ``config``) or the dead-letter tools."""
    kinds = keys.fixed_types()
    return [(key, kinds[key]) for key in (keys.workers, keys.config, keys.dead_letters, keys.dead_letters_trimmed)]


async def _read_moment(client: Redis, keys: Keys, reservations: list[str]) -> Snapshot:
    """Everything but the users' keys and the streams' entries, in one MULTI/EXEC."""
    consumed = keys.consumed()
    # Each stream's XINFO once (the request streams are also consumed ones).
    streams = list(dict.fromkeys([*keys.request_streams, keys.events, *(stream for stream, _ in consumed)]))
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.lent_books)
        pipe.smembers(keys.storage)
        pipe.hgetall(keys.shelving_state)
        pipe.hgetall(keys.from_shelving)
        pipe.hgetall(keys.grants)
        pipe.get(keys.events_trimmed_to)
        pipe.llen(keys.inbox)
        for key, kind in _also_typed(keys):
            probe_type(pipe, key, kind)
        for key in reservations:
            pipe.exists(key)
        for stream in streams:
            pipe.xinfo_stream(stream)
        for stream, _ in consumed:
            pipe.xinfo_groups(stream)
        # XINFO of a stream that does not exist answers an error, in its place only.
        replies = iter(await pipe.execute(raise_on_error=False))
    snap = Snapshot(keys.namespace)
    snap.lent = _decode_map(_typed(snap, keys.lent_books, "hash", next(replies), {}))
    snap.storage = {text(m) for m in _typed(snap, keys.storage, "set", next(replies), set())}
    snap.shelving = _decode_map(_typed(snap, keys.shelving_state, "hash", next(replies), {}))
    snap.from_shelving = _decode_map(_typed(snap, keys.from_shelving, "hash", next(replies), {}))
    snap.grants = _decode_map(_typed(snap, keys.grants, "hash", next(replies), {}))
    trimmed_to = _typed(snap, keys.events_trimmed_to, "string", next(replies), None)
    # Not an ID (a hand edit): as if no event were ever trimmed.
    snap.events_trimmed_to = text(trimmed_to) if trimmed_to is not None and is_id(text(trimmed_to)) else None
    snap.inbox = int(_typed(snap, keys.inbox, "list", next(replies), 0))
    for key, kind in _also_typed(keys):
        _typed(snap, key, kind, next(replies), None)
    snap.reservations = [key for key in reservations if _ok(next(replies))]
    infos = {stream: _stream_reply(snap, stream, next(replies)) for stream in streams}
    for action in ACTIONS:
        info = _stream_info(infos[keys.requests(action)])
        snap.last_ids[action] = text(info.get("last-generated-id") or b"0-0")
        if info.get("entries-added") is not None:
            snap.entries_added[action] = int(info["entries-added"])
        if info.get("max-deleted-entry-id") is not None:
            snap.max_deleted[action] = text(info["max-deleted-entry-id"])
    events_info = _stream_info(infos[keys.events])
    snap.events_last_id = text(events_info.get("last-generated-id") or b"0-0")
    if (events_added := events_info.get("entries-added")) is not None:
        snap.events_added = int(events_added)
    for stream, group in consumed:
        snap.groups.append(_group_state(stream, group, infos[stream], next(replies)))
    return snap


async def wait_quiescent(client: Redis, namespace: str, timeout_s: float) -> Snapshot:
    """Poll until the namespace is quiescent or ``timeout_s`` passed; the last snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = await read_snapshot(client, namespace)
        if snap.quiescent or time.monotonic() >= deadline:
            return snap
        await asyncio.sleep(0.2)


async def _read_users(
    client: Redis, keys: Keys, snap: Snapshot, users: Mapping[str, set[str]], *, confirm: bool
) -> dict[str, set[str]]:
    """Each user's count and books set, a page of users per round trip. To ``confirm``,
    each page is one transaction that also reads which of the books ``users`` names for
    the user lent-books lends them: what a violation is reported on. Returns the users
    to read again: their set names books not looked up (lent to them since)."""
    again: dict[str, set[str]] = {}
    ordered = sorted(users)
    for start in range(0, len(ordered), USER_PAGE):
        page = ordered[start : start + USER_PAGE]
        async with client.pipeline(transaction=confirm) as pipe:
            for user in page:
                pipe.get(keys.user_count(user))
                pipe.smembers(keys.user_books(user))
                if confirm and users[user]:
                    pipe.hmget(keys.lent_books, sorted(users[user]))
            replies = iter(await pipe.execute(raise_on_error=False))
        for user in page:
            _set_user(snap, keys, user, next(replies), next(replies))
            if not confirm:
                continue
            books = sorted(users[user])
            holders = _typed(snap, keys.lent_books, "hash", next(replies), [None] * len(books)) if books else []
            snap.held_confirmed[user] = {
                book for book, holder in zip(books, holders, strict=True) if text(holder) == user
            }
            if not snap.loans.get(user, set()) <= users[user]:
                again[user] = users[user] | snap.loans[user]
    return again


def _set_user(snap: Snapshot, keys: Keys, user: str, count: Any, books: Any) -> None:
    count = _typed(snap, keys.user_count(user), "string", count, None)
    books = _typed(snap, keys.user_books(user), "set", books, set())
    snap.counts.pop(user, None)
    snap.loans.pop(user, None)
    if count is not None:
        snap.counts[user] = text(count)
    if books:
        snap.loans[user] = {text(m) for m in books}


def _disagreeing(snap: Snapshot) -> dict[str, set[str]]:
    """User -> the books to look up for them, for each user whose count or books set, as
    read, is not what lent-books lends them (at the moment)."""
    held = _held(snap)
    out = {}
    for user in set(held) | set(snap.counts) | set(snap.loans):
        lent = held.get(user, set())
        if snap.counts.get(user, "0") != str(len(lent)) or snap.loans.get(user, set()) != lent:
            out[user] = lent | snap.loans.get(user, set())
    return out


async def _confirm_users(client: Redis, keys: Keys, snap: Snapshot) -> None:
    """Read each user whose count or books set disagrees with lent-books again, at one
    moment with the books lent to them (up to ``CONFIRM_ROUNDS`` times while their set
    names books not looked up yet)."""
    looking = _disagreeing(snap)
    for _ in range(CONFIRM_ROUNDS):
        if not looking:
            return
        looking = await _read_users(client, keys, snap, looking, confirm=True)


async def _read_all(client: Redis, stream: str, last: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """The entries of ``stream`` up to ``last``, a page at a time."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        page = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream, min=start, max=last, count=PAGE)
        )
        out += [(entry_id.decode(), fields) for entry_id, fields in page]
        if len(page) < PAGE:
            return out
        start = "(" + page[-1][0].decode()


async def _events_removed_below(client: Redis, stream: str) -> bytes | str | None:
    """Redis 7: the first ID of ``stream`` left after retention trimmed it from its start
    (more events added than it holds, none XDELed), else ``None``. An event XDELed from
    the middle is a lost outcome, not a trim."""
    try:
        info = await client.xinfo_stream(stream)
    except ResponseError:  # no such stream, or not a stream (reported from the moment)
        return None
    added = info.get("entries-added")
    if added is None or int(added) <= int(info["length"]):
        return None  # Redis 6.2 (no counters), or nothing removed
    if text(info.get("max-deleted-entry-id") or b"0-0") != "0-0":
        # An event was XDELed (XTRIM does not set it): what was removed is no longer only
        # a trim from the start, and the first entry would excuse a lost outcome.
        return None
    if int(info["length"]) == 0:  # all removed: the first ID to come is above them all
        last = text(info["last-generated-id"])
        return next_id(last) or last
    return text(info["recorded-first-entry-id"])


def _typed(snap: Snapshot, key: str, kind: str, reply: Any, empty: Any) -> Any:
    """A reply of ``key``, which should be a ``kind``; a key of another type (a hand edit)
    is noted in the snapshot and read as ``empty``."""
    if isinstance(reply, ResponseError) and "WRONGTYPE" in str(reply):
        snap.wrong_types[key] = kind
        return empty
    return _ok(reply)


def _stream_reply(snap: Snapshot, stream: str, reply: Any) -> dict[str, Any] | None:
    """XINFO STREAM's answer for ``stream``; ``None`` when there is no such stream (or the
    key is of another type, noted)."""
    if isinstance(reply, ResponseError) and "WRONGTYPE" not in str(reply):
        return None  # no such key
    return cast(dict[str, Any] | None, _typed(snap, stream, "stream", reply, None))


def _ok(reply: Any) -> Any:
    """A reply of the transaction; a command's error is raised here."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def _stream_info(info: dict[str, Any] | None) -> dict[str, Any]:
    """XINFO STREAM's answer; a stream that does not exist never had an entry."""
    return {"last-generated-id": b"0-0", "entries-added": 0} if info is None else dict(info)


def _group_state(stream: str, group: str, info: dict[str, Any] | None, groups: Any) -> GroupState:
    if info is None:  # no such stream: nothing to do
        return GroupState(stream, group, 0, False)
    groups = _ok(groups)
    last_generated = info.get("last-generated-id") or b"0-0"
    for g in groups:
        if g["name"] == group.encode():
            last_delivered = g["last-delivered-id"]
            unread = info["length"] > 0 and id_key(last_delivered.decode()) < id_key(last_generated.decode())
            return GroupState(stream, group, int(g["pending"]), unread)
    return GroupState(stream, group, 0, info["length"] > 0)


def _decode_map(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def _field(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode("utf-8", "replace")
