"""All configuration of an API process in one place."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from lending.errors import ConfigError
from lending.keys import namespace_problem
from lending.settings import DEFAULT_REDIS_URL, Tls

#: An operator token: visible ASCII, as an ``Authorization: Bearer`` header carries it.
_TOKEN = re.compile(r"[\x21-\x7e]+")

#: HTTP connections served at once by default, when the open-file limit allows.
DEFAULT_MAX_CLIENTS = 10_000
#: File descriptors kept beside the clients and the Redis pool: the listening socket,
#: the events tail, logs, the dashboard's files.
FD_MARGIN = 64


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
    :param max_clients: HTTP connections served at once; more get a 503 problem at once.
        ``None``: what the process's open-file limit leaves beside the Redis connections
        (``client_limit``).
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
    max_clients: int | None = None
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
        if self.max_clients is not None and self.max_clients < 1:
            problems.append("max-clients must be at least 1")
        if self.token is not None and not _TOKEN.fullmatch(self.token):
            # Anything else could never be presented as it was set: a header carries
            # Latin-1, and the spaces around a value are not part of it.
            problems.append("LENDING_API_TOKEN must be printable ASCII without spaces (it is sent in an HTTP header)")
        if problems:
            raise ConfigError("; ".join(problems))

    def client_limit(self) -> int:
        """HTTP connections served at once: ``max_clients``, else as many as the open-file
        limit leaves beside a margin (files, the tail) and the Redis connections, between
        16 and 10,000. A client holds at most one Redis connection at a time, so the two
        share what is left when the pool could take more than half. Past the file limit a
        connection was dropped without a word, and the Redis connections opened meanwhile
        failed."""
        if self.max_clients is not None:
            return self.max_clients
        try:
            import resource
        except ImportError:  # not a Unix
            return DEFAULT_MAX_CLIENTS
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return DEFAULT_MAX_CLIENTS
        available = soft - FD_MARGIN
        clients = max(available - self.max_connections, available // 2)
        return max(16, min(DEFAULT_MAX_CLIENTS, clients))

    def replace(self, **changes: Any) -> ApiSettings:
        return dataclasses.replace(self, **changes)
