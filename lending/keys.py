"""Key names of one namespace: the contract other programs rely on.

Every key starts with the hash tag ``{NS}`` so that a namespace lives in one Redis
Cluster slot, and its scripts and transactions may touch any of its keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LENDING_GROUP = "lending-service"
SHELVING_GROUP = "shelving-service"

LEND = "lend"
RETURN = "return"
ACTIONS = (LEND, RETURN)

# The characters SCAN MATCH (Redis's stringmatch) gives a meaning: a namespace such as
# ``lib?`` must match only itself, not ``libX``.
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


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
        return f"{self.prefix}:lend-requests"

    @property
    def return_requests(self) -> str:
        return f"{self.prefix}:return-requests"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

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

    def user_count(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}:count"

    def reservation(self, request_id: str) -> str:
        return f"{self.prefix}:reservations:{request_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:workers:{worker_id}"

    def requests(self, action: str) -> str:
        """The request stream of ``action`` (``lend`` or ``return``)."""
        return self.lend_requests if action == LEND else self.return_requests

    def action_of(self, stream: str) -> str:
        return LEND if stream == self.lend_requests else RETURN
