"""Validation of request entries (spec, Behaviour 1): pure, no Redis."""

from __future__ import annotations

import pytest

from lending.domain.requests import MAX_ID_LENGTH, BookRequest, Rejection, id_problem, parse_request

MAX_BOOKS = 50


def fields(user: str | bytes | None = "ada", books: str | bytes | None = "b1") -> dict[bytes, bytes]:
    """A raw stream entry as the worker reads it: bytes field names and values."""
    out: dict[bytes, bytes] = {}
    if user is not None:
        out[b"user_id"] = user.encode() if isinstance(user, str) else user
    if books is not None:
        out[b"book_ids"] = books.encode() if isinstance(books, str) else books
    return out


def parse(entry: dict[bytes, bytes], max_books: int = MAX_BOOKS, action: str = "lend") -> BookRequest | Rejection:
    return parse_request(action, "1-0", entry, max_books)


def rejected(entry: dict[bytes, bytes], max_books: int = MAX_BOOKS) -> Rejection:
    result = parse(entry, max_books)
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    return result


def accepted(entry: dict[bytes, bytes], max_books: int = MAX_BOOKS) -> BookRequest:
    result = parse(entry, max_books)
    assert isinstance(result, BookRequest), f"expected a request, got {result}"
    return result


# -- well-formed requests ------------------------------------------------------------


@pytest.mark.parametrize("action", ["lend", "return"])
def test_a_well_formed_entry_becomes_a_request(action: str) -> None:
    assert parse(fields("ada", "b1,b2"), action=action) == BookRequest(action, "1-0", "ada", ("b1", "b2"))


@pytest.mark.parametrize(
    ("books", "expected"),
    [
        ("b1,b1", ("b1",)),
        ("b2,b1,b2,b3,b1", ("b2", "b1", "b3")),
        ("c,b,a,a,b,c", ("c", "b", "a")),
    ],
)
def test_duplicates_are_removed_keeping_the_first_occurrences_order(books: str, expected: tuple[str, ...]) -> None:
    assert accepted(fields(books=books)).book_ids == expected


def test_extra_fields_are_ignored() -> None:
    entry = fields("ada", "b1") | {b"extra": b"\xff\xfe not utf-8", b"user": b"someone-else", b"": b""}
    assert accepted(entry) == BookRequest("lend", "1-0", "ada", ("b1",))


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "x" * MAX_ID_LENGTH,
        "é" * MAX_ID_LENGTH,  # characters, not bytes: 256 bytes of UTF-8
        "𝄞" * MAX_ID_LENGTH,  # characters outside the BMP count once each
        "of-mice_and.men:1937",
        "Ünïcödé-书",
    ],
)
def test_valid_ids_pass_as_user_and_as_book(value: str) -> None:
    assert id_problem(value, "book id") is None
    assert accepted(fields(value, value)) == BookRequest("lend", "1-0", value, (value,))


@pytest.mark.parametrize("count", [1, 2, MAX_BOOKS])
def test_up_to_max_distinct_books_are_accepted(count: int) -> None:
    books = [f"b{i}" for i in range(count)]
    assert accepted(fields(books=",".join(books))).book_ids == tuple(books)


def test_exactly_max_books_after_duplicates_are_removed_is_fine() -> None:
    books = [f"b{i}" for i in range(MAX_BOOKS)]
    request = accepted(fields(books=",".join(books + books[:10] + books)))
    assert request.book_ids == tuple(books)


# -- rejections: what is wrong, named in the reason ----------------------------------


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (fields(user=None), ["missing", "user_id"]),
        (fields(books=None), ["missing", "book_ids"]),
        ({}, ["missing", "user_id"]),
        ({b"user": b"ada", b"books": b"b1"}, ["missing", "user_id"]),
        (fields(user=b"\xff\xfe"), ["user_id", "UTF-8"]),
        (fields(user=b"ada\xc3"), ["user_id", "UTF-8"]),  # truncated sequence
        (fields(user=b"\xc0\xaf"), ["user_id", "UTF-8"]),  # overlong encoding
        (fields(user=b"\xed\xa0\x80"), ["user_id", "UTF-8"]),  # an encoded surrogate
        (fields(books=b"b1,\xff"), ["book_ids", "UTF-8"]),
        (fields(books=b"\xe2\x82"), ["book_ids", "UTF-8"]),
        (fields(user=""), ["user_id", "empty"]),
        (fields(books=""), ["book_ids", "empty"]),
    ],
)
def test_missing_undecodable_or_empty_fields_are_rejected(entry: dict[bytes, bytes], words: list[str]) -> None:
    reason = rejected(entry).reason
    for word in words:
        assert word in reason


@pytest.mark.parametrize("books", ["a,,b", "a,", ",a", ",", "a,b,,", ",,,"])
def test_empty_book_segments_are_rejected(books: str) -> None:
    reason = rejected(fields(books=books)).reason
    assert "book id" in reason and "empty" in reason


@pytest.mark.parametrize(("length", "ok"), [(MAX_ID_LENGTH, True), (MAX_ID_LENGTH + 1, False), (1000, False)])
def test_id_length_limit(length: int, ok: bool) -> None:
    value = "x" * length
    problem = id_problem(value, "book id")
    if ok:
        assert problem is None
    else:
        assert problem is not None
        assert str(length) in problem and str(MAX_ID_LENGTH) in problem


@pytest.mark.parametrize("field", ["user_id", "book_ids"])
def test_an_id_of_129_characters_is_rejected_in_either_field(field: str) -> None:
    long_id = "x" * (MAX_ID_LENGTH + 1)
    entry = fields(long_id, "b1") if field == "user_id" else fields("ada", f"b1,{long_id}")
    reason = rejected(entry).reason
    assert "129" in reason and "128" in reason


@pytest.mark.parametrize(
    ("char", "name"),
    [
        (" ", "space"),
        ("\u00a0", "no-break space"),
        ("\u2003", "em space"),
        ("\u3000", "ideographic space"),
        ("\u2028", "line separator"),
        ("\u2029", "paragraph separator"),
        ("\t", "tab"),
        ("\n", "newline"),
        ("\r", "carriage return"),
        ("\x00", "NUL"),
        ("\x07", "bell"),
        ("\x1b", "escape"),
        ("\x7f", "DEL"),
        ("\x85", "next line"),
        ("\u200b", "zero-width space"),
        ("\ufeff", "byte order mark"),
        ("\u200e", "left-to-right mark"),
        ("\u202e", "right-to-left override"),
        ("\u00ad", "soft hyphen"),
    ],
)
@pytest.mark.parametrize("where", ["start", "middle", "end", "alone"])
def test_whitespace_control_and_format_characters_are_rejected(char: str, name: str, where: str) -> None:
    value = {"start": char + "book", "middle": "bo" + char + "ok", "end": "book" + char, "alone": char}[where]
    code = f"U+{ord(char):04X}"

    problem = id_problem(value, "book id")
    assert problem is not None, name
    assert code in problem

    as_book = rejected(fields("ada", f"b1,{value}")).reason
    assert "book id" in as_book and code in as_book
    as_user = rejected(fields(value, "b1")).reason
    assert "user_id" in as_user and code in as_user


@pytest.mark.parametrize("value", ["a,b", ",", "a,"])
def test_a_comma_in_a_user_id_is_rejected(value: str) -> None:
    reason = rejected(fields(value, "b1")).reason
    assert "user_id" in reason and "comma" in reason


def test_id_problem_names_a_comma() -> None:
    problem = id_problem("a,b", "book id")
    assert problem is not None and "comma" in problem


@pytest.mark.parametrize("max_books", [1, 3, MAX_BOOKS])
def test_more_distinct_books_than_the_maximum_are_rejected(max_books: int) -> None:
    books = ",".join(f"b{i}" for i in range(max_books + 1))
    reason = rejected(fields(books=books), max_books).reason
    assert str(max_books + 1) in reason and str(max_books) in reason


def test_a_ten_thousand_book_request_is_rejected_with_the_count() -> None:
    books = ",".join(f"book-{i}" for i in range(10_000))
    reason = rejected(fields(books=books)).reason
    assert "10000" in reason or "10,000" in reason
    assert str(MAX_BOOKS) in reason


def test_first_problem_found_is_named_and_user_comes_first() -> None:
    reason = rejected(fields("a b", "c d")).reason
    assert "user_id" in reason and "book id" not in reason


# -- which user_id a rejection echoes --------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "echoed"),
    [
        # valid UTF-8 of at most 128 characters: echoed, whatever else is wrong
        (fields("ada", None), "ada"),
        (fields("ada", ""), "ada"),
        (fields("ada", "a,,b"), "ada"),
        (fields("ada", b"\xff"), "ada"),
        (fields("ada", "x" * 129), "ada"),
        (fields("ada", ",".join(f"b{i}" for i in range(MAX_BOOKS + 1))), "ada"),
        (fields("a b", "b1"), "a b"),
        (fields("a,b", "b1"), "a,b"),
        (fields("\u200bada", "b1"), "\u200bada"),
        (fields("é" * 128, "bad book"), "é" * 128),
        (fields("x" * 128, "bad book"), "x" * 128),
        # not valid UTF-8, too long, or missing: empty
        (fields(b"\xffada", "b1"), ""),
        (fields("x" * 129, "b1"), ""),
        (fields("é" * 129, "b1"), ""),
        (fields(None, "b1"), ""),
        (fields("", "b1"), ""),
    ],
)
def test_user_id_echoed_in_a_rejection(entry: dict[bytes, bytes], echoed: str) -> None:
    assert rejected(entry).user_id == echoed


def test_rejection_keeps_action_and_request_id() -> None:
    result = parse_request("return", "17-3", fields(books=""), MAX_BOOKS)
    assert isinstance(result, Rejection)
    assert (result.action, result.request_id) == ("return", "17-3")
