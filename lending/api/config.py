"""All configuration of an API process in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lending.errors import ConfigError
from lending.keys import namespace_problem
from lending.settings import DEFAULT_REDIS_URL, Tls


@dataclass(frozen=True)
class ApiSettings:
    """Settings of an API process; the CLI builds one, tests build their own.

    :param redis_url: the Redis of the namespace (the API never starts one).
    :param namespace: the key namespace, as the workers'.
    :param tls: CA and client certificate files for ``rediss://`` URLs.
    :param host: the address to listen on.
    :param port: the port to listen on (0: any free one, announced at start).
    :param token: the operator token (``LENDING_API_TOKEN``); ``None``: the operator
        endpoints are off.
    :param limits_refresh_s: how often the limits the workers publish are read again.
    :param max_wait_s: the longest ``?wait=`` a client may ask for.
    :param max_body_bytes: larger bodies get 413.
    :param recent_outcomes: how many recent outcomes the events tail keeps for late waiters.
    :param lookup_limit: events a request's lookup reads at most after the request.
    :param subscriber_queue: events an SSE client may fall behind before it is dropped.
    :param keep_alive_s: an SSE comment after this many seconds without an event.
    :param dashboard_window_s: seconds of outcome rates and latencies the dashboard keeps.
    :param dashboard_outcomes: latest outcomes the dashboard keeps.
    :param dashboard_refresh_s: the dashboard reads the status at most this often, and
        sends a snapshot as often.
    :param max_connections: Redis connections at most (the events tail has its own).
    :param shutdown_grace_s: how long open requests may take to finish on SIGTERM.
    :param uvloop: run on uvloop's event loop when it is installed.
    :param log_format: ``console`` or ``json``.
    :param log_level: ``debug``, ``info``, ``warning`` or ``error``.
    :param access_log: log every request (costly at thousands of requests a second).
    """

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = "lending"
    tls: Tls = field(default_factory=Tls)
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)
    limits_refresh_s: float = 5.0
    max_wait_s: float = 30.0
    max_body_bytes: int = 64 * 1024
    recent_outcomes: int = 10_000
    lookup_limit: int = 10_000
    subscriber_queue: int = 1_000
    keep_alive_s: float = 15.0
    dashboard_window_s: int = 300
    dashboard_outcomes: int = 50
    dashboard_refresh_s: float = 1.0
    max_connections: int = 512
    shutdown_grace_s: int = 5
    uvloop: bool = True
    log_format: str = "console"
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        problems = []
        if problem := namespace_problem(self.namespace):
            problems.append(problem)
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} must be between 0 and 65535")
        if min(self.max_wait_s, self.limits_refresh_s, self.keep_alive_s, self.dashboard_refresh_s) <= 0:
            problems.append("max wait, limits refresh, keep-alive and dashboard refresh times must be positive")
        for name in (
            "max_body_bytes",
            "recent_outcomes",
            "lookup_limit",
            "subscriber_queue",
            "max_connections",
            "dashboard_window_s",
            "dashboard_outcomes",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems))

    def replace(self, **changes: Any) -> ApiSettings:
        return dataclasses.replace(self, **changes)
