"""Parsing and validation of request stream entries: pure, no Redis."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

MAX_ID_LENGTH = 128
# Entries are read as bytes: field names and values are whatever the sender wrote.
USER_FIELD = b"user_id"
BOOKS_FIELD = b"book_ids"


@dataclass(frozen=True)
class BookRequest:
    """A valid lend or return request."""

    action: str
    request_id: str
    user_id: str
    book_ids: tuple[str, ...]


@dataclass(frozen=True)
class Rejection:
    """An entry that cannot be processed; ``user_id`` is echoed when it is presentable."""

    action: str
    request_id: str
    user_id: str
    reason: str


def is_utf8(value: str) -> bool:
    """``value`` came from UTF-8: a byte that is not (in a command-line argument) is kept
    by Python as a lone surrogate, which no Redis command or JSON body can carry."""
    return not any("\ud800" <= ch <= "\udfff" for ch in value)


def id_problem(value: str, what: str) -> str | None:
    """Why ``value`` is not a valid user or book id, or ``None`` when it is."""
    if not value:
        return f"{what} is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"{what} is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    for ch in value:
        if ch == ",":
            return f"{what} {_show(value)} contains a comma"
        category = unicodedata.category(ch)
        if category == "Cs":
            return f"{what} {_show(value)} is not valid UTF-8"
        if category[0] == "Z" or category in ("Cc", "Cf") or ch.isspace():
            return f"{what} {_show(value)} contains whitespace, control or format character U+{ord(ch):04X}"
    return None


def parse_request(
    action: str, request_id: str, fields: Mapping[bytes, bytes], max_books: int
) -> BookRequest | Rejection:
    """Turn a raw stream entry into a request, or say why it is rejected.

    Duplicate book ids are removed, keeping the first occurrence's order; the limit
    ``max_books`` applies after that.
    """
    raw_user = fields.get(USER_FIELD)
    user = _decode(raw_user)
    shown_user = user if user is not None and len(user) <= MAX_ID_LENGTH else ""

    def reject(reason: str) -> Rejection:
        return Rejection(action, request_id, shown_user, reason)

    if raw_user is None:
        return reject("missing field user_id")
    if user is None:
        return reject("user_id is not valid UTF-8")
    problem = id_problem(user, "user_id")
    if problem:
        return reject(problem)

    raw_books = fields.get(BOOKS_FIELD)
    if raw_books is None:
        return reject("missing field book_ids")
    books_text = _decode(raw_books)
    if books_text is None:
        return reject("book_ids is not valid UTF-8")
    if not books_text:
        return reject("book_ids is empty")

    books = list(dict.fromkeys(books_text.split(",")))
    # Checking the count first keeps a 10,000-book request from costing 10,000 checks.
    if len(books) > max_books:
        return reject(f"{len(books)} distinct books requested (at most {max_books} per request)")
    for book in books:
        problem = id_problem(book, "book id")
        if problem:
            return reject(problem)
    return BookRequest(action, request_id, user, tuple(books))


def _decode(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _show(value: str) -> str:
    """A short, printable rendering of an offending id for a human-readable reason."""
    shown = ascii(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
