"""The API's Prometheus metrics, served at ``GET /metrics`` on the API's own port.

``Measured`` (ASGI middleware, outside everything, so the submission fast path is
counted too) counts each response by route, method and status, and times it from the
request's arrival at the application to its response head: a ``?wait=`` is included, an
event stream counts until it opens. The gauges are read at each scrape from the
process's state. Each API has its own registry (several may live in one test process).

Labels stay bounded whatever clients send: a route is its template
(``/v1/users/{user_id}/loans``), ``other`` when none matched; an unusual method is
``other``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from starlette.types import ASGIApp, Receive, Scope, Send

from lending.metrics import package_version

UNMATCHED = "other"
#: The problems the HTTP protocol answers with before a request reaches the application.
REFUSALS = ("too-many-connections", "head-too-large", "request-timeout", "malformed-http")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class FastRoute:
    """What an endpoint served outside FastAPI's router puts in ``scope["route"]``, as
    FastAPI's routes put themselves: its path template."""

    path: str


@dataclass(frozen=True)
class Readings:
    """Where the gauges read the process's state, at each scrape."""

    waiting: Callable[[], int]
    event_streams: Callable[[], int]
    dashboard_streams: Callable[[], int]
    tail_up: Callable[[], bool]


class ApiMetrics:
    def __init__(self, readings: Readings) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter(
            "lending_api_responses",
            "HTTP responses, by route (its template; other: none matched), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.response_seconds = Histogram(
            "lending_api_response_seconds",
            "Time from a request's arrival at the application to its response head, by route "
            "(a ?wait= included; an event stream until it opens)",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        Gauge("lending_api_waiting_requests", "Requests waiting for their outcome (?wait=)", registry=r).set_function(
            readings.waiting
        )
        streams = Gauge(
            "lending_api_event_streams",
            "Server-Sent Events streams open: outcomes (/v1/events) and dashboards",
            ["stream"],
            registry=r,
        )
        streams.labels("events").set_function(readings.event_streams)
        streams.labels("dashboard").set_function(readings.dashboard_streams)
        Gauge(
            "lending_api_events_tail_up",
            "1 while the events tail reads {NS}:events, 0 while it has lost Redis (waiters then get no outcome)",
            registry=r,
        ).set_function(lambda: float(readings.tail_up()))
        self.refused = Counter(
            "lending_api_refused_connections",
            "Connections answered with a problem and closed below the application, by problem: too many "
            "connections (--max-clients), a head too large, a head or body too late, not HTTP",
            ["problem"],
            registry=r,
        )
        for problem in REFUSALS:
            self.refused.labels(problem)
        self.open_connections = Gauge("lending_api_open_connections", "HTTP connections open", registry=r)
        self.max_clients = Gauge(
            "lending_api_max_clients", "HTTP connections served at once at most (--max-clients)", registry=r
        )
        Info("lending_api_build", "The version of the lending package this API runs", registry=r).info(
            {"version": package_version()}
        )
        ProcessCollector(registry=r)
        # Children looked up once: ``labels()`` takes a lock and builds a key each call.
        self._counts: dict[tuple[str, str, int], Counter] = {}
        self._times: dict[str, Histogram] = {}

    def watch_connections(self, count: Callable[[], int], limit: int) -> None:
        """Read the open connections from ``count`` at each scrape; ``limit``: the cap."""
        self.open_connections.set_function(count)
        self.max_clients.set(limit)

    def refuse(self, problem: str) -> None:
        """Count a connection refused below the application (``ApiHttpProtocol.on_refused``)."""
        self.refused.labels(problem).inc()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one response of ``route`` and its time to the response head."""
        key = (route, method, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.responses.labels(route, method, str(status))
        count.inc()
        timer = self._times.get(route)
        if timer is None:
            timer = self._times[route] = self.response_seconds.labels(route)
        timer.observe(seconds)


def route_of(scope: Scope) -> str:
    """The template of the route that served ``scope`` (FastAPI's route, without its
    converters, or a ``FastRoute``), ``other`` when none did."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class Measured:
    """ASGI middleware: every HTTP response, counted and timed in ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def measured_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                method = scope["method"] if scope["method"] in METHODS else UNMATCHED
                self.metrics.observe(route_of(scope), method, message["status"], time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, measured_send)
