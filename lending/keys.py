"""Key names of one namespace: the contract other programs rely on.

Every key starts with the hash tag ``{NS}`` so that a namespace lives in one Redis
Cluster slot, and its scripts and transactions may touch any of its keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

LENDING_GROUP = "lending-service"
SHELVING_GROUP = "shelving-service"


@dataclass(frozen=True)
class RequestType:
    """A kind of request the library takes.

    :param action: its name in events (``action``) and in the code.
    :param stream: the suffix of its request stream, ``{NS}:<stream>``.
    :param verb: what a sender types (``get_books.py <verb> USER BOOK...``).
    :param resource: its collection in the HTTP API (``POST /v1/<resource>``).
    """

    action: str
    stream: str
    verb: str
    resource: str


LEND = "lend"
RETURN = "return"
#: Every request type, in the order the streams are read. The one list that the worker,
#: the sender, the checker, status, retention and the ACL rules all go through.
REQUEST_TYPES = (
    RequestType(LEND, "lend-requests", "request", "lends"),
    RequestType(RETURN, "return-requests", "return", "returns"),
)
ACTIONS = tuple(t.action for t in REQUEST_TYPES)
BY_VERB = {t.verb: t for t in REQUEST_TYPES}
BY_ACTION = {t.action: t for t in REQUEST_TYPES}

# The characters SCAN MATCH (Redis's stringmatch) gives a meaning: a namespace such as
# ``lib?`` must match only itself, not ``libX``.
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def namespace_problem(namespace: str) -> str | None:
    """Why ``namespace`` cannot name key namespace, or ``None``: a brace would end the
    hash tag early (the keys would spread over cluster slots), an empty or padded one
    is a typo waiting to split the library in two, and a control character (a newline)
    would split the lines that name its keys: logs, and the ``ACL SETUSER`` commands
    ``acl`` prints for redis-cli."""
    if (
        not namespace
        or any(c in namespace for c in "{}")
        or namespace.strip() != namespace
        or not namespace.isprintable()
    ):
        return f"namespace {namespace!r} must be non-empty, without braces or outer spaces, and printable"
    return None


@dataclass(frozen=True)
class Keys:
    """Builds the key names of namespace ``namespace``."""

    namespace: str

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}"

    def pattern(self, suffix_glob: str) -> str:
        """A SCAN MATCH pattern for keys ``{NS}:<suffix_glob>`` of this namespace only:
        the namespace is matched literally (its glob characters escaped), the suffix is
        a glob (``keys.pattern("user:*:count")``)."""
        return _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + ":" + suffix_glob

    @property
    def lend_requests(self) -> str:
        return self.requests(LEND)

    @property
    def return_requests(self) -> str:
        return self.requests(RETURN)

    @cached_property
    def _streams(self) -> dict[str, str]:
        # action -> stream, built once: the hot path asks for these per request.
        return {t.action: f"{self.prefix}:{t.stream}" for t in REQUEST_TYPES}

    @cached_property
    def _actions(self) -> dict[str, str]:
        return {stream: action for action, stream in self._streams.items()}

    def requests(self, action: str) -> str:
        """The request stream of ``action``."""
        return self._streams[action]

    @property
    def request_streams(self) -> list[str]:
        """Every request stream, in the registry's order."""
        return list(self._streams.values())

    def action_of(self, stream: str) -> str:
        """The action whose request stream ``stream`` is (``KeyError`` for another key)."""
        return self._actions[stream]

    def consumed(self) -> list[tuple[str, str]]:
        """Each stream the workers consume, with the consumer group that reads it."""
        return [(stream, LENDING_GROUP) for stream in self.request_streams] + [(self.shelving_returns, SHELVING_GROUP)]

    @property
    def config(self) -> str:
        """The lending limits the workers run with (hash: ``storage_capacity``,
        ``max_books_per_user``, ``max_books_per_request``), for tools to check against."""
        return f"{self.prefix}:config"

    @property
    def workers(self) -> str:
        """The ids of the workers that started in this namespace (set); a worker is live
        while its ``worker(id)`` key exists."""
        return f"{self.prefix}:workers"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def inbox(self) -> str:
        """Requests handed in by senders that may not XADD (list of submissions,
        ``domain.submission``); the workers queue them on their request streams."""
        return f"{self.prefix}:inbox"

    @property
    def receipts_prefix(self) -> str:
        return f"{self.prefix}:receipts:"

    def receipt(self, nonce: str) -> str:
        """Where a worker answers the inbox submission ``nonce``: a stream of one entry,
        ``request_id`` (or ``error``), that expires."""
        return self.receipts_prefix + nonce

    @property
    def events_trimmed_to(self) -> str:
        """The first event ID left after the last trim of ``{NS}:events`` (for the checker:
        older requests may have lost their event to trimming)."""
        return f"{self.prefix}:events:trimmed-to"

    @property
    def lent_books(self) -> str:
        return f"{self.prefix}:lent-books"

    @property
    def storage(self) -> str:
        return f"{self.prefix}:storage"

    @property
    def shelving_state(self) -> str:
        return f"{self.prefix}:shelving:state"

    @property
    def shelving_returns(self) -> str:
        return f"{self.prefix}:shelving:returns"

    @property
    def from_shelving(self) -> str:
        """book -> shelving context, for every book the library holds (lent, stored, reserved).

        The library's own record of what it took from the shelving service: it lets a
        worker that lost a race tell a book nobody took from one the winner took."""
        return f"{self.prefix}:from-shelving"

    @property
    def grants(self) -> str:
        """book -> context: books the shelving service handed to a lend request that the
        library has not settled yet (lent, stored or given back).

        Written by the shelving service in the same atomic step as the hand-out, so no
        grant exists without a record; cleared by the commit that settles it, or by the
        reconciliation that gives back the grants of finished requests."""
        return f"{self.prefix}:grants"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    @property
    def dead_letters_trimmed(self) -> str:
        """How many dead letters the workers dropped, oldest first, to keep
        ``{NS}:dead-letters`` within ``--dead-letters-maxlen`` (string, a count)."""
        return f"{self.prefix}:dead-letters:trimmed"

    def fixed_types(self) -> dict[str, str]:
        """Each key of the namespace that has one name, and the type it holds (the
        contract's table): what names the key of the wrong type Redis refused a command on."""
        return {
            self.lend_requests: "stream",
            self.return_requests: "stream",
            self.events: "stream",
            self.inbox: "list",
            self.lent_books: "hash",
            self.storage: "set",
            self.shelving_state: "hash",
            self.shelving_returns: "stream",
            self.from_shelving: "hash",
            self.grants: "hash",
            self.dead_letters: "stream",
            self.dead_letters_trimmed: "string",
            self.events_trimmed_to: "string",
            self.workers: "set",
            self.config: "hash",
        }

    def user_count(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}:count"

    def user_books(self, user_id: str) -> str:
        """The books the user holds (set): an index of ``lent-books`` by user, written in the
        same commit, so that "which books do I hold?" reads one key."""
        return f"{self.prefix}:user:{user_id}:books"

    def reservation(self, request_id: str) -> str:
        return f"{self.prefix}:reservations:{request_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:workers:{worker_id}"

    def worker_info(self, worker_id: str) -> str:
        """What a live worker says about itself (hash: ``host``, ``pid``, ``version``,
        ``started_ms``, ``processed``, ``failed``), with the TTL of its liveness key.

        Not ``{NS}:workers:<id>:info``: that is the liveness key of worker ``<id>:info``."""
        return f"{self.prefix}:worker-info:{worker_id}"

    def idempotency(self, key: str) -> str:
        """The request an HTTP API client's ``Idempotency-Key`` queued (string
        ``<request_id> <fingerprint>``, kept 24 h): a retried POST queues nothing new."""
        return f"{self.prefix}:idempotency:{key}"
