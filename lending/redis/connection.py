"""Redis clients built from a URL, and the start-up reachability check."""

from __future__ import annotations

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lending.errors import RedisRefusedConnection, RedisUnavailable
from lending.redaction import redact
from lending.redis.wire import use_lean_connections
from lending.settings import Tls


def make_client(
    url: str,
    *,
    max_connections: int = 128,
    tls: Tls | None = None,
    pool_class: type[ConnectionPool] = ConnectionPool,
) -> Redis:
    """An asyncio client for ``url``; bytes in and out, since entries may hold any bytes.
    ``tls`` applies to ``rediss://`` URLs; ``pool_class`` makes its connection pool."""
    extra = tls.options() if tls and scheme_of(url) == "rediss" else {}
    pool = pool_class.from_url(
        url,
        **extra,
        decode_responses=False,
        socket_connect_timeout=3.0,
        # Above the XREADGROUP block time, so a blocked read never times out by itself.
        socket_timeout=10.0,
        max_connections=max_connections,
        # No periodic PING before commands: it costs CPU on every call, and a broken
        # connection fails the command, which the callers retry anyway.
        health_check_interval=0,
        # No silent resending either: an XADD whose reply was lost would be queued
        # twice. Every caller decides itself what a lost connection means.
        retry=Retry(NoBackoff(), 0),
    )
    use_lean_connections(pool)
    return Redis.from_pool(pool)


def scheme_of(url: str) -> str:
    """The scheme of ``url``, lower case as redis-py reads it (``""`` for none)."""
    return url.partition("://")[0].lower() if "://" in url else ""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs (``lending.redaction.redact``)."""
    return redact(url)


async def check_reachable(client: Redis, url: str) -> None:
    """Raise ``RedisUnavailable`` with a one-line reason if ``client`` cannot PING."""
    try:
        await client.ping()
    except InvalidResponse as exc:  # something answers, in another protocol (HTTP, ...)
        raise RedisUnavailable(url, f"not a Redis server ({exc})") from exc
    except (AuthenticationError, ResponseError) as exc:  # (a ConnectionError: before it)
        raise RedisRefusedConnection(url, str(exc) or type(exc).__name__) from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise RedisUnavailable(url, str(exc) or type(exc).__name__) from exc
