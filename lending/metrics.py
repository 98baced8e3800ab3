"""The worker's Prometheus metrics: what they are and their labels.

The hot path counts on them directly; ``ops.monitoring`` fills the gauges from Redis
and serves them. Each worker has its own registry, so several workers (or tests) can
live in one process.

The gauges read from Redis describe the whole namespace, not the worker that serves
them: every worker of a namespace reports the same values, so they are aggregated with
``max()``, never ``sum()``. The counters and histograms are the worker's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

NAMESPACE_WIDE = " (namespace-wide: aggregate with max() across workers)"


def package_version() -> str:
    """The installed version of the ``lending`` package (``unknown`` when it is not installed)."""
    try:
        return version("lending")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self._outcomes: dict[tuple[str, str], Counter] = {}
        self._latencies: dict[str, Histogram] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lending_requests", "Requests processed, by action and status", ["action", "status"], registry=r
        )
        self.request_latency = Histogram(
            "lending_request_latency_seconds",
            "Time from a request's entry ID (when it was queued) to the commit of its outcome, every outcome "
            "(failed ones included), on the worker's clock",
            ["action"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.batch_seconds = Histogram(
            "lending_batch_seconds",
            "Time to process one batch of requests",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.batch_size = Histogram(
            "lending_batch_size",
            "Requests in one batch",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        )
        self.retries = Counter(
            "lending_retries", "Entries whose processing failed and will be retried", ["consumer"], registry=r
        )
        self.reclaims = Counter("lending_reclaims", "Entries taken over from other consumers", ["consumer"], registry=r)
        self.dead_letters = Counter("lending_dead_letters", "Entries dead-lettered", ["consumer"], registry=r)
        self.watch_conflicts = Counter("lending_watch_conflicts", "Commits aborted by a WATCH conflict", registry=r)
        self.reconnects = Counter(
            "lending_redis_reconnects", "Times a consumer got Redis back after losing it", ["consumer"], registry=r
        )
        self.lag = Gauge(
            "lending_stream_lag", "Entries not yet read by the group" + NAMESPACE_WIDE, ["stream", "group"], registry=r
        )
        self.pending = Gauge(
            "lending_stream_pending",
            "Entries read but not acknowledged" + NAMESPACE_WIDE,
            ["stream", "group"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "lending_oldest_pending_age_seconds",
            "Age of the group's oldest entry read but not acknowledged, from its entry ID; 0 when none is"
            + NAMESPACE_WIDE,
            ["stream", "group"],
            registry=r,
        )
        self.storage_books = Gauge("lending_storage_books", "Books in automated storage" + NAMESPACE_WIDE, registry=r)
        self.books_lent = Gauge("lending_books_lent", "Books lent" + NAMESPACE_WIDE, registry=r)
        self.dead_letters_waiting = Gauge(
            "lending_dead_letters_waiting", "Entries in {NS}:dead-letters" + NAMESPACE_WIDE, registry=r
        )
        self.redis_up = Gauge(
            "lending_redis_up",
            "1 while this worker reads the namespace's state from Redis (every 2 s), 0 while Redis does not "
            "answer or refuses it: the namespace-wide gauges then keep their last values",
            registry=r,
        )
        self.gauges_read = Gauge(
            "lending_gauges_read_timestamp_seconds",
            "Unix time the namespace-wide gauges were last read from Redis (0: not yet)",
            registry=r,
        )
        self.build = Info("lending_build", "The version of the lending package this worker runs", registry=r)
        self.build.info({"version": package_version()})
        ProcessCollector(registry=r)

    def add_outcomes(self, actions: Iterable[str], statuses: Iterable[str]) -> None:
        """Create the outcome series at 0, so that ``increase()`` and ``rate()`` see the
        first request of each kind (a series born at 1 shows no increase)."""
        statuses = list(statuses)
        for action in actions:
            self.request_latency.labels(action)
            for status in statuses:
                self.requests.labels(action, status)

    def outcome(self, action: str, status: str) -> Counter:
        """The outcome counter of (``action``, ``status``), looked up once (``labels()``
        takes a lock and builds a key each call: this runs once per request)."""
        key = (action, status)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.requests.labels(action, status)
        return child

    def latency(self, action: str) -> Histogram:
        """The latency histogram of ``action``, looked up once (see ``outcome``)."""
        child = self._latencies.get(action)
        if child is None:
            child = self._latencies[action] = self.request_latency.labels(action)
        return child

    def add_consumer(self, consumer: str) -> None:
        """Create a consumer's counters at 0 (see ``add_outcomes``)."""
        for counter in (self.retries, self.reclaims, self.dead_letters, self.reconnects):
            counter.labels(consumer)
