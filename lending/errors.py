"""The package's errors: one root, subclasses that carry what went wrong."""

from __future__ import annotations

import os
import socket

from lending.redaction import redact


class LendingError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(LendingError):
    """A setting has a value the service cannot work with."""


class RedisUnavailable(LendingError):
    """Redis did not answer at ``url``.

    Whatever it is given, it keeps and says only with passwords redacted: callers may
    pass a raw URL (a cluster's, several seeds) or a cause that quotes one.
    """

    said = "cannot reach Redis at {url}: {cause}"

    def __init__(self, url: str, cause: str) -> None:
        self.url = redact(url)
        self.cause = redact(cause)
        super().__init__(self.said.format(url=self.url, cause=self.cause))


class RedisRefusedConnection(RedisUnavailable):
    """Redis answered at ``url``, but would not serve this connection: a wrong user or
    password, a database number it does not have, a user without PING."""

    said = "Redis at {url} refused the connection: {cause}"


class RequestRefused(LendingError):
    """The inbox relay refused a request handed in through the inbox (out of bounds)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the inbox refused the request: {reason}")
        self.reason = reason


class WorkerIdTaken(LendingError):
    """Another live process holds this worker id."""

    def __init__(self, worker_id: str, key: str) -> None:
        super().__init__(
            f"worker id {worker_id!r} is held by another live worker ({key} exists); "
            "pick another id, wait for its heartbeat to expire, or pass --force"
        )
        self.worker_id = worker_id
        self.key = key


class KeyOfWrongType(LendingError):
    """A key of the namespace holds another type than the service keeps in it."""

    def __init__(self, key: str, found: str, kind: str) -> None:
        super().__init__(f"{key} holds a {found}, not a {kind}: move it away or delete it")
        self.key = key


class StartRefused(LendingError):
    """Redis refused what a worker does at start; the worker stops (its id released)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot start: {reason}")


class Contention(LendingError):
    """A request could not be committed after repeated conflicts with concurrent work."""

    def __init__(self, request_id: str, attempts: int) -> None:
        super().__init__(f"request {request_id} still conflicted after {attempts} attempts")
        self.request_id = request_id
        self.attempts = attempts


class LimitsDiffer(LendingError):
    """A live worker of the namespace enforces other lending limits."""

    def __init__(self, worker_id: str, field: str, theirs: str, mine: str) -> None:
        super().__init__(self.describe(worker_id, field.replace("_", "-"), theirs, mine))
        self.worker_id = worker_id
        self.field = field
        self.theirs = theirs
        self.mine = mine

    @staticmethod
    def describe(worker_id: str, limit: str, theirs: str, mine: str) -> str:
        return (
            f"live worker {worker_id!r} runs with {limit} {theirs}, this one with {mine}: "
            "every worker of a namespace must enforce the same limits (stop the others first to change them)"
        )


class LimitsChanged(LimitsDiffer):
    """The namespace's workers were restarted with other lending limits while this one
    stalled past its heartbeat's time to live: it must stop, not come back with its own."""

    @staticmethod
    def describe(worker_id: str, limit: str, theirs: str, mine: str) -> str:
        return (
            f"live worker {worker_id!r} now runs with {limit} {theirs}, this one with {mine} "
            "(the workers were restarted with new limits while this worker's id had lapsed)"
        )


class Deferred(LendingError):
    """Entries that cannot be processed now for a reason outside them: they stay pending,
    uncharged, and are tried again."""


class StaleLimits(Deferred):
    """The namespace's limits (``{NS}:config``) are no longer those this worker decided
    under: its commit wrote nothing. Its heartbeat tells whether it stalled while the
    workers were restarted with new limits (it stops) or Redis came back with older data
    (it publishes its own again)."""

    def __init__(self, field: str, theirs: str, mine: str) -> None:
        super().__init__(
            f"the namespace's workers enforce {field.replace('_', '-')} {theirs or '(none published)'}, "
            f"this one {mine}: its decisions are not committed"
        )
        self.field = field
        self.theirs = theirs
        self.mine = mine


class CannotListen(LendingError):
    """A server could not listen on ``host:port``: the port taken, an address not of this
    host, no such host. The message names what would have been served and the options
    that say where.

    :param exc: the binding's (or the address lookup's) error.
    """

    serving = "a server"
    options = ""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        self.host = host
        self.port = port
        self.cause = listen_cause(exc)
        super().__init__(f"cannot serve {self.serving} on {host}:{port}: {self.cause} ({self.options})")


def listen_cause(exc: OSError) -> str:
    """Why binding failed, in a few words (asyncio words it "error while attempting to
    bind on address ...", getaddrinfo with a negative errno)."""
    if isinstance(exc, socket.gaierror):
        return f"no such host ({exc.strerror})"
    return os.strerror(exc.errno).lower() if exc.errno and exc.errno > 0 else str(exc)


class ApiPortUnavailable(CannotListen):
    """The API could not listen on ``--host``:``--port``."""

    serving = "the API"
    options = "--host, --port"


class MetricsUnavailable(CannotListen):
    """The worker's metrics server could not listen on ``--metrics-host``:``--metrics-port``."""

    serving = "metrics"
    options = "--metrics-host, --metrics-port"
