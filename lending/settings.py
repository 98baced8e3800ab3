"""All configuration of a worker in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lending.errors import ConfigError
from lending.keys import namespace_problem

DEFAULT_PORT = 6379
DEFAULT_REDIS_URL = f"redis://localhost:{DEFAULT_PORT}"
MIN_CLAIM_IDLE_MS = 100
#: The longest duration a setting in milliseconds may name: a day. Redis refuses a TTL or
#: an idle time past its 64-bit clock, and any longer wait is a mistyped number.
MAX_DURATION_MS = 86_400_000
#: Counts Redis takes (MAXLEN, COUNT) are signed 64-bit.
MAX_REDIS_COUNT = 2**63 - 1
#: The most books one request may name: the scripts hand a request's books to one Redis
#: command (Lua's ``unpack`` takes at most about 8,000 values, some commands twice as
#: many), and a batch holds at most 1,000 books (``service.lending.MAX_BATCH_BOOKS``).
MAX_BOOKS_PER_REQUEST = 1_000
#: The bounds of the whole-number settings, both included: ``Settings`` checks them (the
#: one place), and ``--help`` shows them.
COUNT_BOUNDS = {
    "storage_capacity": (0, MAX_REDIS_COUNT),
    "max_books_per_user": (1, MAX_REDIS_COUNT),
    "max_books_per_request": (1, MAX_BOOKS_PER_REQUEST),
    "claim_idle_ms": (MIN_CLAIM_IDLE_MS, MAX_DURATION_MS),
    "max_deliveries": (1, MAX_REDIS_COUNT),
    "retry_base_ms": (1, MAX_DURATION_MS),
    "retry_max_ms": (1, MAX_DURATION_MS),
    "reconcile_interval_ms": (1, MAX_DURATION_MS),
    "concurrency": (1, 1_000_000),
    "max_batches": (1, 1_000_000),
    "batch_patience_ms": (0, MAX_DURATION_MS),
    "worker_ttl_ms": (1_000, MAX_DURATION_MS),
    "events_maxlen": (1, MAX_REDIS_COUNT),
    "dead_letters_maxlen": (1, MAX_REDIS_COUNT),
    "read_count": (1, MAX_REDIS_COUNT),
}
#: Why a least bound is what it is, where that is not plain.
WHY_LEAST = {"claim_idle_ms": " (a worker renews the entries it holds every third of it)"}
#: Why a greatest bound is what it is, where that is not plain.
WHY_MOST = {"max_books_per_request": " (a request's books go to Redis in one command)"}


@dataclass(frozen=True)
class Tls:
    """Files for ``rediss://`` connections: the CA to trust, and a client certificate
    and key when the server asks for one."""

    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ca_cert:
            out["ssl_ca_certs"] = self.ca_cert
        if self.cert:
            out["ssl_certfile"] = self.cert
        if self.key:
            out["ssl_keyfile"] = self.key
        return out

    def env(self) -> dict[str, str]:
        """The same, as the environment variables the command lines read."""
        names = {"LENDING_TLS_CA_CERT": self.ca_cert, "LENDING_TLS_CERT": self.cert, "LENDING_TLS_KEY": self.key}
        return {name: value for name, value in names.items() if value}


@dataclass(frozen=True)
class Limits:
    """The lending limits: what every worker of a namespace enforces, and what the tools
    (``check``, ``status``, the simulator) check against. Published in ``{NS}:config``."""

    storage_capacity: int = 20
    max_books_per_user: int = 5
    max_books_per_request: int = 50

    def fields(self) -> dict[str, str]:
        return {name: str(value) for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: Mapping[bytes, bytes]) -> Limits:
        """The limits a hash holds; a missing or unreadable field keeps its default."""
        values: dict[str, int] = {}
        for field in dataclasses.fields(cls):
            value = raw.get(field.name.encode(), b"")
            if value.isdigit():
                values[field.name] = int(value)
        return cls(**values)


@dataclass(frozen=True)
class Settings:
    """Settings of a lending worker; the CLI builds one, tests build their own.

    :param redis_url: Redis to use; ``None`` means the default URL, falling back to the
        embedded redis-server when nothing listens there.
    :param embedded_port: the port of the default URL and of the embedded redis-server
        (6379; only tests choose another, to try the default beside other servers).
    :param namespace: prefix of every key, inside a ``{}`` hash tag (one cluster slot).
    :param storage_capacity: how many books the automated storage holds.
    :param max_books_per_user: how many books one user may hold at once.
    :param max_books_per_request: how many distinct books one request may name.
    :param claim_idle_ms: entries pending on another consumer for longer are taken over.
    :param max_deliveries: deliveries after which an entry is dead-lettered.
    :param worker_ttl_ms: lifetime of the worker-id key, renewed while the worker lives.
    :param read_count: entries read per XREADGROUP call.
    :param concurrency: requests processed at the same time by one worker.
    :param max_batches: batches one worker starts before it waits for one to finish
        (or to have run for ``batch_patience_ms``): what arrives meanwhile is read as
        one bigger batch, which costs Redis and the worker less per request.
    :param batch_patience_ms: how long a batch holds back the next read at most. A batch
        takes a few milliseconds; one slower than this (a slow shelving call) should
        not hold back the requests behind it.
    :param request_timeout_s: a request taking longer is abandoned and retried.
    :param retry_base_ms: how long a failed entry waits before its first retry; the wait
        doubles with each failure (with jitter), up to ``retry_max_ms``.
    :param retry_max_ms: the longest wait between two attempts of an entry.
    :param reconcile_interval_ms: how often the worker settles the shelving grants of
        finished requests (``{NS}:grants``).
    :param shutdown_grace_s: how long in-flight work may take to finish on SIGTERM.
    :param metrics_port: serve ``/metrics``, ``/livez``, ``/readyz`` and ``/healthz`` on this
        port (``None``: off).
    :param metrics_host: the address to serve them on (``127.0.0.1``: this host only).
    :param liveness_timeout_s: ``/livez`` fails when a consumer's read loop has been in one
        round for longer (it is stuck: a round takes seconds, even while Redis is away).
    :param events_maxlen: about how many events ``{NS}:events`` keeps.
    :param dead_letters_maxlen: how many dead letters ``{NS}:dead-letters`` keeps (the
        writers drop the oldest beyond it, and count them).
    :param trim_interval_s: how often the worker trims the namespace's streams.
    :param tls: CA and client certificate files for ``rediss://`` URLs.
    :param uvloop: run on uvloop's event loop when it is installed (less CPU per request).
    :param allow_eviction_data_loss: run even on a Redis whose maxmemory-policy may evict
        any key (``allkeys-*``), which loses requests and books when memory runs out.
    """

    worker_id: str = "worker-1"
    redis_url: str | None = None
    namespace: str = "lending"
    storage_capacity: int = Limits.storage_capacity
    max_books_per_user: int = Limits.max_books_per_user
    max_books_per_request: int = Limits.max_books_per_request
    claim_idle_ms: int = 30_000
    max_deliveries: int = 10
    force: bool = False
    data_dir: Path = Path(".lending-data")
    embedded_port: int = DEFAULT_PORT
    log_format: str = "console"
    log_level: str = "info"
    worker_ttl_ms: int = 10_000
    read_count: int = 100
    concurrency: int = 64
    max_batches: int = 2
    batch_patience_ms: int = 50
    request_timeout_s: float = 10.0
    retry_base_ms: int = 1_000
    retry_max_ms: int = 60_000
    reconcile_interval_ms: int = 1_000
    shutdown_grace_s: float = 8.0
    shelving_fail_rate: float = 0.0
    shelving_latency_ms: float = 0.0
    uvloop: bool = True
    tls: Tls = Tls()
    events_maxlen: int = 1_000_000
    dead_letters_maxlen: int = 100_000
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    liveness_timeout_s: float = 60.0
    trim_interval_s: float = 10.0
    allow_eviction_data_loss: bool = False

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError("; ".join(problems))

    def _problems(self) -> list[str]:
        out = []
        if problem := namespace_problem(self.namespace):
            out.append(problem)
        if not self.worker_id or len(self.worker_id) > 128 or not self.worker_id.isprintable():
            out.append(f"worker id {self.worker_id!r} must be 1-128 printable characters")
        for name, (least, most) in COUNT_BOUNDS.items():
            value, option = getattr(self, name), name.replace("_", "-")
            if value < least:
                out.append(f"{option} must be at least {least}{WHY_LEAST.get(name, '')}")
            elif value > most:
                out.append(f"{option} must be at most {most}{WHY_MOST.get(name, '')}")
        if self.liveness_timeout_s <= 0:
            out.append("the liveness timeout must be positive")
        if self.trim_interval_s <= 0:
            out.append("the trim interval must be positive")
        if self.retry_base_ms > self.retry_max_ms:
            out.append("retry-base-ms must be at most retry-max-ms")
        if not 0.0 <= self.shelving_fail_rate <= 1.0:
            out.append("shelving fail rate must be between 0 and 1")
        if self.log_format not in ("console", "json"):
            out.append("log format must be console or json")
        return out

    def warnings(self) -> list[str]:
        """Settings that work, but not well."""
        out = []
        # The mock's calls take up to 1.5 times the mean latency.
        if self.claim_idle_ms < 1.5 * self.shelving_latency_ms:
            out.append(
                f"claim-idle-ms ({self.claim_idle_ms}) is shorter than a shelving call may take "
                f"({1.5 * self.shelving_latency_ms:g} ms): should this worker stall during one, another "
                "worker takes its entries over and the work is done twice"
            )
        return out

    @property
    def limits(self) -> Limits:
        return Limits(self.storage_capacity, self.max_books_per_user, self.max_books_per_request)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def effective_redis_url(self) -> str:
        """The URL given, else the default one (``DEFAULT_REDIS_URL`` unless tests moved its port)."""
        return self.redis_url or f"redis://localhost:{self.embedded_port}"
