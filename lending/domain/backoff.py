"""Delays between attempts: exponential, capped, with jitter. Pure."""

from __future__ import annotations

import random


def retry_backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0) -> float:
    """Delay before attempt number ``attempt + 1`` after ``attempt`` failures (1-based):
    ``base_s`` doubling each time, capped at ``cap_s``."""
    # The exponent is bounded: after hours of outage, 2 ** attempt would not fit a float.
    return float(min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 60)))


def jittered(delay_s: float, rng: random.Random) -> float:
    """Between half and all of ``delay_s``, at random ("equal jitter"), so that entries
    that failed together, or workers that lost Redis together, do not retry together."""
    return delay_s / 2 + rng.uniform(0, delay_s / 2)
