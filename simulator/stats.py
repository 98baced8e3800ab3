"""Latency percentiles and the run report."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of already sorted values; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    values = sorted(latencies_ms)
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "p95_ms": round(percentile(values, 95), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "max_ms": round(values[-1], 3) if values else 0.0,
    }


@dataclass
class RunReport:
    sent: int = 0  # requests added to the request streams: each is due one event
    refused: int = 0  # requests Redis refused to add (out of memory): no event due
    outcomes: Counter[str] = field(default_factory=Counter)
    missing: int = 0  # requests that never got an event
    duplicated: int = 0  # requests that got more than one
    unknown_events: int = 0
    duration_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    chaos: dict[str, int] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # under a maxmemory limit
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and bool(self.check.get("clean", False))

    def as_json(self) -> dict[str, Any]:
        finished = sum(self.outcomes.values())
        return {
            "requests": self.sent,
            "refused_out_of_memory": self.refused,
            "outcomes": dict(sorted(self.outcomes.items())),
            "missing_events": self.missing,
            "duplicate_events": self.duplicated,
            "unknown_events": self.unknown_events,
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": round(finished / self.duration_s, 1) if self.duration_s else 0.0,
            "latency": latency_summary(self.latencies_ms),
            "chaos": self.chaos,
            **({"memory": self.memory} if self.memory else {}),
            "check": self.check,
            "ok": self.ok,
        }

    def render(self) -> str:
        data = self.as_json()
        lat = data["latency"]
        lines = [
            f"requests      {data['requests']}",
            "outcomes      " + ", ".join(f"{k} {v}" for k, v in data["outcomes"].items()),
            f"missing       {self.missing} (no event)   duplicated {self.duplicated} (two or more events)",
            f"throughput    {data['throughput_rps']} req/s over {data['duration_s']} s",
            f"latency       p50 {lat['p50_ms']} ms  p95 {lat['p95_ms']} ms  p99 {lat['p99_ms']} ms  "
            f"max {lat['max_ms']} ms",
        ]
        if self.refused or self.memory:
            lines.append(f"refused       {self.refused} (by Redis: out of memory; never queued, no event due)")
        if self.memory:
            memory = self.memory
            full = (
                f"full for about {memory['full_s']} s from {memory['first_full_at_s']} s into the run"
                if memory["first_full_at_s"] is not None
                else "never full"
            )
            lines.append(
                f"memory        maxmemory {memory['maxmemory_bytes']} bytes (noeviction): {full}; "
                "limit lifted after the traffic"
            )
        if self.chaos:
            lines.append("chaos         " + ", ".join(f"{k} {v}" for k, v in self.chaos.items()))
        check = self.check
        if check:
            verdict = "clean" if check.get("clean") else f"{len(check.get('violations', []))} violation(s)"
            lines.append(f"invariants    {verdict} (quiescent: {check.get('quiescent')})")
            lines += [f"  [{v['invariant']}] {v['message']}" for v in check.get("violations", [])]
        lines.append("RESULT        " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)
