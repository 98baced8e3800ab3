"""A submission to the API: its JSON body checked with the service's own rules, and
queued by ``api_submit.lua`` in one round trip, at most once per idempotency key.

No web framework here: the routes turn ``InvalidSubmission`` into a problem response.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from lending.domain.requests import BOOKS_FIELD, USER_FIELD, BookRequest, Rejection, id_problem, parse_request
from lending.errors import LendingError
from lending.keys import Keys
from lending.redis.replies import text
from lending.redis.scripts import Arg

#: How long an idempotency key keeps naming its request.
IDEMPOTENCY_TTL_S = 24 * 3600
IDEMPOTENCY_KEY_MAX = 255


class InvalidSubmission(LendingError):
    """A body the API does not queue.

    :param reason: what is wrong, for a human.
    :param malformed: the body is not JSON at all (rather than JSON breaking the rules).
    """

    def __init__(self, reason: str, *, malformed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.malformed = malformed


def parse_body(action: str, body: bytes, max_books: int) -> BookRequest:
    """The request that ``body`` (``{"user_id": ..., "book_ids": [...]}``) asks for, checked
    as the worker would check the entry it becomes (``parse_request``).

    :raises InvalidSubmission: not JSON, wrong types, or a rule of the service broken.
    """
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidSubmission(f"the body is not valid JSON: {exc}", malformed=True) from exc
    if not isinstance(data, dict):
        raise InvalidSubmission('the body must be a JSON object: {"user_id": "...", "book_ids": ["..."]}')
    for name in ("user_id", "book_ids"):
        if name not in data:
            raise InvalidSubmission(f"missing field {name}")
    user, books = data["user_id"], data["book_ids"]
    if not isinstance(user, str):
        raise InvalidSubmission(f"user_id must be a string, not {_json_type(user)}")
    if not isinstance(books, list):
        raise InvalidSubmission(f"book_ids must be an array of strings, not {_json_type(books)}")
    for index, book in enumerate(books):
        if not isinstance(book, str):
            raise InvalidSubmission(f"book_ids[{index}] must be a string, not {_json_type(book)}")
        # Joined with commas for the stream, one such id would become two books.
        if "," in book:
            raise InvalidSubmission(id_problem(book, "book id") or "a book id contains a comma")
    fields = {USER_FIELD: user.encode(), BOOKS_FIELD: ",".join(books).encode()}
    parsed = parse_request(action, "", fields, max_books)
    if isinstance(parsed, Rejection):
        raise InvalidSubmission(parsed.reason)
    return parsed


def idempotency_key_problem(key: str) -> str | None:
    """Why ``key`` is not a usable ``Idempotency-Key``, or ``None`` when it is."""
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        return f"the Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} characters long"
    if not all("!" <= ch <= "~" for ch in key):
        return "the Idempotency-Key must be visible ASCII characters, without spaces"
    return None


def fingerprint(request: BookRequest) -> str:
    """What a retry with the same idempotency key must repeat: the action, the user and the
    books (after duplicates are removed). Ids hold no control character, so a newline
    separates them unambiguously."""
    return hashlib.sha256("\n".join((request.action, request.user_id, *request.book_ids)).encode()).hexdigest()


@dataclass(frozen=True)
class Submitted:
    """What ``api_submit.lua`` did.

    :param request_id: the request's entry id: queued now, or earlier under the same key.
    :param replayed: the idempotency key already named this request: nothing was queued.
    :param key_reused: the idempotency key names a request with another body: nothing was
        queued, and ``request_id`` is that other request.
    """

    request_id: str
    replayed: bool = False
    key_reused: bool = False


def submit_call(
    keys: Keys, request: BookRequest, idempotency_key: str | None, ttl_s: int = IDEMPOTENCY_TTL_S
) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``api_submit.lua`` for ``request``: the script's one encoder."""
    script_keys = [keys.requests(request.action)]
    args: list[Arg] = [request.user_id, ",".join(request.book_ids)]
    if idempotency_key is not None:
        script_keys.append(keys.idempotency(idempotency_key))
        args += [fingerprint(request), ttl_s]
    return script_keys, args


def submitted(reply: list[Any]) -> Submitted:
    """The script's reply, read."""
    code, request_id = int(reply[0]), text(reply[1])
    return Submitted(request_id, replayed=code == 0, key_reused=code == -1)


#: Runs ``api_submit.lua`` with KEYS and ARGV: a ``ScriptBatcher`` of it, or the script
#: bound to a client (``functools.partial(scripts.api_submit, client)``).
Runner = Callable[[Sequence[str], Sequence[Arg]], Awaitable[Any]]


async def submit(
    run: Runner, keys: Keys, request: BookRequest, idempotency_key: str | None = None, ttl_s: int = IDEMPOTENCY_TTL_S
) -> Submitted:
    """Queue ``request`` (one EVALSHA), unless ``idempotency_key`` already names a request."""
    script_keys, args = submit_call(keys, request, idempotency_key, ttl_s)
    return submitted(await run(script_keys, args))


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else "a string"
