"""The lending rules (spec, Behaviour 3-4) and the retry delay: pure functions."""

from __future__ import annotations

import itertools
import re

import pytest

from lending.domain.backoff import retry_backoff_s
from lending.domain.policy import NOTHING_AVAILABLE, LoanDecision, decide_loan, nothing_to_return_reason


@pytest.mark.parametrize(("held", "limit"), [(0, 5), (3, 5), (5, 5), (9, 5), (0, 1)])
def test_nothing_reserved_is_not_allowed_whatever_the_user_holds(held: int, limit: int) -> None:
    assert decide_loan(held, 0, limit) == LoanDecision(False, NOTHING_AVAILABLE)


def test_nothing_available_reason_text() -> None:
    assert NOTHING_AVAILABLE == "none of the requested books is available"


@pytest.mark.parametrize(
    ("held", "reserved", "limit"),
    [(0, 1, 5), (0, 5, 5), (4, 1, 5), (2, 3, 5), (0, 1, 1), (99, 1, 100)],
)
def test_up_to_the_limit_is_allowed(held: int, reserved: int, limit: int) -> None:
    assert decide_loan(held, reserved, limit) == LoanDecision(True, "")


@pytest.mark.parametrize(
    ("held", "reserved", "limit"),
    [(0, 6, 5), (5, 1, 5), (4, 2, 5), (1, 5, 5), (3, 7, 5), (0, 2, 1), (7, 1, 5)],
)
def test_over_the_limit_is_denied_with_the_numbers(held: int, reserved: int, limit: int) -> None:
    decision = decide_loan(held, reserved, limit)
    assert not decision.allowed
    assert decision.reason != NOTHING_AVAILABLE
    numbers = [int(n) for n in re.findall(r"\d+", decision.reason)]
    assert numbers == [held, reserved, limit]
    assert "limit" in decision.reason


@pytest.mark.parametrize(("held", "word"), [(0, "books"), (1, "book;"), (2, "books")])
def test_over_limit_reason_reads_well(held: int, word: str) -> None:
    reason = decide_loan(held, 9, 5).reason
    assert reason == f"user holds {held} {word.rstrip(';')}; 9 more would exceed the limit of 5 per user"


def test_nothing_to_return_reason_names_the_user() -> None:
    assert nothing_to_return_reason("ada") == "none of the requested books is lent to ada"


# -- retry delay ---------------------------------------------------------------------


def test_backoff_starts_at_the_base() -> None:
    assert retry_backoff_s(1) == pytest.approx(0.05)
    assert retry_backoff_s(1, base_s=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_backoff_before_the_first_attempt_is_the_base(attempt: int) -> None:
    assert retry_backoff_s(attempt) == pytest.approx(0.05)


@pytest.mark.parametrize(("base", "cap"), [(0.05, 5.0), (0.1, 5.0), (1.0, 30.0)])
def test_backoff_doubles_until_capped(base: float, cap: float) -> None:
    delays = [retry_backoff_s(attempt, base_s=base, cap_s=cap) for attempt in range(1, 40)]
    for before, after in itertools.pairwise(delays):
        assert after == pytest.approx(min(cap, 2 * before))
    assert delays[-1] == cap
    assert all(0 < d <= cap for d in delays)


@pytest.mark.parametrize("attempt", [10, 100, 1_000, 1_025, 1_100, 10_000, 1_000_000])
def test_backoff_stays_capped_however_many_attempts(attempt: int) -> None:
    # A consumer counts its failures while Redis is down (5 s apart once capped):
    # attempt 1,025 comes after about 85 minutes of outage.
    assert retry_backoff_s(attempt) == 5.0
    assert isinstance(retry_backoff_s(attempt), float)
