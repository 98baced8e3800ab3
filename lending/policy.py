"""The lending rules as pure functions: no Redis, easy to test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoanDecision:
    allowed: bool
    reason: str = ""


NOTHING_AVAILABLE = "none of the requested books is available"


def decide_loan(held: int, reserved: int, limit: int) -> LoanDecision:
    """May a user holding ``held`` books take ``reserved`` more under ``limit``?"""
    if reserved == 0:
        return LoanDecision(False, NOTHING_AVAILABLE)
    if held + reserved > limit:
        return LoanDecision(
            False,
            f"user holds {held} book{'s' if held != 1 else ''}; {reserved} more would exceed "
            f"the limit of {limit} per user",
        )
    return LoanDecision(True)


def nothing_to_return_reason(user_id: str) -> str:
    return f"none of the requested books is lent to {user_id}"


def retry_backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0) -> float:
    """Delay before reconnect or retry number ``attempt`` (1-based): exponential, capped."""
    # The exponent is bounded: after hours of outage, 2 ** attempt would not fit a float.
    return float(min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 60)))
