"""A request handed in through the inbox: the one encoder of its wire format.

A sender that may not XADD (the least-privilege get_books user: Redis ACLs cannot
restrict XADD's arguments, so a sender with XADD could trim the request streams or use
up their IDs) RPUSHes one submission per request to ``{NS}:inbox``. A worker takes it
off with ``relay.lua``, which bounds its size and appends it to the request stream with
a server-generated ID, then answers on ``{NS}:receipts:<nonce>``.

A submission is five lines: the format version, the sender's nonce (lowercase hex, the
name of its receipt), the action, ``user_id`` and ``book_ids`` (comma-separated), as in
a request entry. No valid id holds a line break (a control character).
"""

from __future__ import annotations

from collections.abc import Sequence

from lending.domain.requests import MAX_ID_LENGTH

FORMAT = "1"
#: The longest id the relay takes, in bytes: 128 characters of UTF-8.
MAX_ID_BYTES = 4 * MAX_ID_LENGTH
#: The most book ids the relay takes in one submission (before duplicates are removed);
#: the service's own limit (``--max-books-per-request``) is checked by the service.
MAX_BOOKS = 1000
#: Receipts expire: a sender waits seconds, not minutes.
RECEIPT_TTL_MS = 300_000
#: Submissions one relay call takes off the inbox at most.
RELAY_BATCH = 100


def encode_submission(nonce: str, action: str, user_id: str, book_ids: Sequence[str]) -> str:
    """One inbox element; ``nonce`` names its receipt (16 to 64 lowercase hex digits)."""
    return "\n".join((FORMAT, nonce, action, user_id, ",".join(book_ids)))
