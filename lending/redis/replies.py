"""Reading Redis's replies: entries as redis-py parses them, and what an error means.

Everything that looks at a raw reply or an error lives here, so that the rest of the
package never parses one by hand.
"""

from __future__ import annotations

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Replies of XREADGROUP / XCLAIM as parsed by redis-py with decode_responses=False.
Entries = list[tuple[bytes | None, dict[bytes, bytes] | None]]
StreamsReply = list[tuple[bytes, Entries]]

#: Errors that say nothing about the entry itself: Redis is gone, restarting or loading
#: (LOADING is a ConnectionError), or the node we write to just became a replica.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    # Cluster: the namespace's slot moved (resharding, failover) or the cluster is down.
    MovedError,
    AskError,
    ClusterDownError,
    TryAgainError,
)
# Replies redis-py has no class for: a busy script; UNBLOCKED when the node we block on
# became a replica.
TRANSIENT_REPLIES = ("BUSY", "UNBLOCKED", "READONLY")
#: Redis refusing a write for reasons of its own: out of memory, a permission taken
#: away, a stream out of IDs (our scripts' STREAMFULL). The entry waits for an operator.
REFUSED_ERRORS: tuple[type[BaseException], ...] = (OutOfMemoryError, NoPermissionError)
# The same as error codes; Redis 6.2 reports an error inside a script as
# "ERR Error running script ... -OOM ...".
REFUSED_CODES = ("OOM", "NOPERM", "STREAMFULL")


def text(value: bytes | str | None) -> str:
    """An ID, name or field as text (``''`` for a missing one)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def reply_text(exc: ResponseError) -> str:
    """Redis's error reply, without what redis-py adds in a pipeline ("Command # 1 (EVALSHA
    ... all its arguments ...) of pipeline caused error: ('...',)"): arguments are user
    data, and must not be read as an error code."""
    message = str(exc)
    _, found, reply = message.partition(" of pipeline caused error: ")
    reply = reply.strip("(),'\"") if found else message
    # EXECABORT: a command of the transaction was refused; that refusal is the reply.
    return reply.removeprefix("Transaction discarded because of: ")


def is_transient(exc: BaseException) -> bool:
    """Redis is unreachable or not serving right now (reconnect, ask the cluster again)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, ResponseError) and reply_text(exc).startswith(TRANSIENT_REPLIES)


def is_refusal(exc: BaseException) -> bool:
    """Redis refused a write for reasons of its own (out of memory, no permission, a
    stream out of IDs)."""
    if isinstance(exc, REFUSED_ERRORS):
        return True
    if not isinstance(exc, ResponseError):
        return False
    reply = reply_text(exc)
    return reply.startswith(REFUSED_CODES) or any(f"-{code} " in reply for code in REFUSED_CODES)


def no_permission(exc: BaseException) -> str | None:
    """Redis's reply when ``exc`` says the ACL user may not run a command or touch a key
    (``this user has no permissions to run the 'scan' command``; inside a script, ``The
    user executing the script can't run this command ...``), else ``None``."""
    if isinstance(exc, NoPermissionError):
        return reply_text(exc)
    if not isinstance(exc, ResponseError):
        return None
    reply = reply_text(exc)
    if reply.startswith("NOPERM"):
        return reply.removeprefix("NOPERM").strip()
    return reply if "can't run this command" in reply or "no permissions to" in reply else None


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and (reply_text(exc).startswith("OOM") or "-OOM " in reply_text(exc))
    )


def is_outage(exc: BaseException) -> bool:
    """A failure of Redis, not of the entry: retried without counting a delivery."""
    return is_transient(exc) or is_refusal(exc)
