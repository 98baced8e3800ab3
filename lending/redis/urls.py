"""Is a Redis URL usable? Checked once, before anything connects, so that a typo in
``--redis-url`` (or ``REDIS_URL``) is one line naming the mistake, not a traceback from
deep inside the client."""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from lending.errors import RedisUnavailable
from lending.redis.cluster import CLUSTER_SCHEMES, ClusterUrl, is_cluster_url
from lending.redis.connection import redacted, scheme_of

SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a Redis URL the package can use, or ``None`` when it is. Never
    connects; the message shows no password."""
    shown = redacted(url)
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        return f"{shown!r} is not a Redis URL: it must start with " + ", ".join(f"{s}://" for s in SCHEMES)
    if is_cluster_url(url):
        try:
            ClusterUrl.parse(url)
        except RedisUnavailable as exc:
            return f"{shown}: {exc.cause}"
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        connection = ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]  # never connects
    except TypeError as exc:  # an option the client does not take
        name = re.search(r"argument '(\w+)'", str(exc))
        option = name[1] if name else "?"
        return f"{shown}: the query names an option Redis clients do not take: {option!r}"
    except (ValueError, RedisError) as exc:  # RedisError: e.g. an unknown ssl_cert_reqs
        return f"{shown}: {exc}"
    if problem := _seconds_problem(connection) or _reply_problem(parts.query):
        return f"{shown}: {problem}"
    if port == 0:
        return f"{shown}: port 0 names no server"
    if scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"{shown}: the path must be a database number (such as /0), not {parts.path!r}"
    return None


#: The query options that are seconds, and the least each may be: a timeout of 0 (or
#: less) failed every command as "cannot reach Redis", and a negative health check
#: interval as an error about CLIENT SETINFO.
SECONDS_OPTIONS = {"socket_timeout": 0.0, "socket_connect_timeout": 0.0, "health_check_interval": -1.0}


def _reply_problem(query: str) -> str | None:
    """The package reads replies as redis-py gives them by default: bytes, in the shapes of
    its RESP2 parsers. ``protocol=3`` makes XREADGROUP a map; ``decode_responses`` makes
    entries text (which any bytes may not be), whatever its value: redis-py's asyncio
    client keeps it as a string, so even ``false`` turns decoding on."""
    options = parse_qs(query)
    if any(value != "2" for value in options.get("protocol", [])):
        return "the query option protocol is not supported (the package reads the client's default replies)"
    if "decode_responses" in options:
        return "the query option decode_responses is not supported (entries are bytes, and may not be text)"
    return None


def _seconds_problem(connection: AbstractConnection) -> str | None:
    for name, below in SECONDS_OPTIONS.items():
        value = getattr(connection, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value <= below:
            least = "more than 0" if below == 0 else "0 or more"
            return f"the query option {name} must be a number of seconds, {least}, not {value}"
    return None
