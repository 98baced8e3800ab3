"""Outcome events on ``{NS}:events`` (spec, The contract: event fields)."""

from __future__ import annotations

import pytest

from lending.domain.events import ACCEPTED, DENIED, FAILED, REJECTED, RETURNED, STATUSES, Event

CONTRACT_FIELDS = ["request_id", "action", "user_id", "status", "books", "skipped", "reason"]

EVENTS = [
    Event("1-0", "lend", "ada", ACCEPTED, ("b1", "b2"), ("b3",)),
    Event("2-5", "lend", "ada", DENIED, (), ("b1",), "none of the requested books is available"),
    Event("3-0", "return", "bob", RETURNED, ("b1",), ()),
    Event("4-0", "return", "", REJECTED, (), (), "user_id is not valid UTF-8"),
    Event("5-0", "lend", "Ünïcödé", FAILED, (), ("书", "𝄞"), "processing failed: ValueError: é"),
    Event("6-0", "lend", "ada", ACCEPTED, tuple(f"b{i}" for i in range(50)), ()),
]


def as_stream_fields(event: Event) -> dict[bytes, bytes]:
    """The fields as a client reading the stream gets them back."""
    return {name.encode(): value.encode() for name, value in event.fields().items()}


def test_statuses() -> None:
    assert STATUSES == ("accepted", "denied", "returned", "rejected", "failed")


def test_fields_in_contract_order_with_comma_separated_lists() -> None:
    event = Event("1-0", "lend", "ada", ACCEPTED, ("b1", "b2"), ("b3", "b4"), "")
    assert list(event.fields().items()) == [
        ("request_id", "1-0"),
        ("action", "lend"),
        ("user_id", "ada"),
        ("status", "accepted"),
        ("books", "b1,b2"),
        ("skipped", "b3,b4"),
        ("reason", ""),
    ]


@pytest.mark.parametrize("event", EVENTS)
def test_fields_are_the_contract_fields_all_text(event: Event) -> None:
    fields = event.fields()
    assert list(fields) == CONTRACT_FIELDS
    assert all(isinstance(value, str) for value in fields.values())


def test_empty_lists_are_empty_strings() -> None:
    fields = Event("1-0", "return", "ada", DENIED, reason="none").fields()
    assert (fields["books"], fields["skipped"]) == ("", "")


def test_event_id_is_not_a_field() -> None:
    assert "event_id" not in Event("1-0", "lend", "ada", ACCEPTED, ("b",), event_id="9-9").fields()


@pytest.mark.parametrize("event", EVENTS)
def test_flat_fields_pair_names_and_values_in_order(event: Event) -> None:
    flat = event.flat_fields()
    assert flat[0::2] == CONTRACT_FIELDS
    assert flat[1::2] == list(event.fields().values())


@pytest.mark.parametrize("event", EVENTS)
def test_from_fields_round_trip(event: Event) -> None:
    back = Event.from_fields(as_stream_fields(event), "1700000000000-0")
    assert back == event
    assert (back.books, back.skipped, back.reason) == (event.books, event.skipped, event.reason)
    assert back.event_id == "1700000000000-0"


def test_from_fields_tolerates_missing_fields_and_bad_bytes() -> None:
    event = Event.from_fields({b"request_id": b"1-0", b"user_id": b"\xffada"})
    assert event.request_id == "1-0"
    assert event.user_id == "\ufffdada"
    assert (event.action, event.status, event.books, event.skipped, event.reason) == ("", "", (), (), "")
    assert event.event_id == ""


def test_from_fields_splits_lists() -> None:
    event = Event.from_fields({b"books": b"a,b,c", b"skipped": b"d"})
    assert (event.books, event.skipped) == (("a", "b", "c"), ("d",))


def test_as_json_gives_lists() -> None:
    event = Event("1-0", "lend", "ada", ACCEPTED, ("b1", "b2"), ("b3",), "", event_id="5-1")
    assert event.as_json() == {
        "request_id": "1-0",
        "action": "lend",
        "user_id": "ada",
        "status": "accepted",
        "books": ["b1", "b2"],
        "skipped": ["b3"],
        "reason": "",
        "event_id": "5-1",
    }


def test_as_json_empty_lists_and_no_event_id() -> None:
    out = Event("1-0", "return", "ada", DENIED, reason="none of the requested books is lent to ada").as_json()
    assert out["books"] == [] and out["skipped"] == []
    assert "event_id" not in out
    assert out["reason"] == "none of the requested books is lent to ada"


def test_as_json_does_not_change_fields() -> None:
    event = Event("1-0", "lend", "ada", ACCEPTED, ("b1",))
    event.as_json()
    assert event.fields()["books"] == "b1"
