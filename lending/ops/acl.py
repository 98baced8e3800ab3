"""Least-privilege Redis ACL users for a namespace (Redis 6.2+).

``python -m lending acl`` prints the ``ACL SETUSER`` commands; the README explains them.
The service user may touch only ``{NS}:*`` keys with only the commands the worker (and
its scripts) use; the sender user may only add requests and read events.
"""

from __future__ import annotations

from lending.keys import Keys

# Connection housekeeping redis-py does on its own. (Its CLIENT SETINFO is optional:
# redis-py ignores a refusal, and Redis 7.0 does not know the subcommand in ACL rules.)
CONNECTION_COMMANDS = ("ping", "hello", "auth", "select")

WORKER_COMMANDS = (
    *CONNECTION_COMMANDS,
    # streams: consuming, claiming, trimming, events, dead letters
    "xreadgroup",
    "xack",
    "xadd",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xrange",
    "xrevrange",
    "xlen",
    "xinfo|groups",
    "xinfo|stream",
    "xinfo|consumers",
    "xgroup|create",
    # removing dead consumers that hold nothing (forget_consumers.lua)
    "xgroup|delconsumer",
    "xtrim",
    "xdel",
    # scripts and the per-user limit transaction
    "evalsha",
    "script|load",
    "watch",
    "unwatch",
    "multi",
    "exec",
    "discard",
    # inside the scripts (their checks: exists, type), the ledger's reconciliation
    # (hscan), the heartbeat (pexpire), and status/metrics reads
    "exists",
    "type",
    "get",
    "set",
    "mget",
    "del",
    "incrby",
    "pexpire",
    "pttl",
    "scan",
    "hget",
    "hmget",
    "hset",
    "hsetnx",
    "hdel",
    "hexists",
    "hlen",
    "hgetall",
    "hkeys",
    "hscan",
    "sadd",
    "smove",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    # the eviction-policy check (INFO memory; never CONFIG, which reveals passwords)
    "info",
)

SENDER_COMMANDS = (*CONNECTION_COMMANDS, "xadd", "xread", "xrevrange")


def worker_user_rules(namespace: str) -> list[str]:
    """``ACL SETUSER <name> ...`` rules for the service (add ``on`` and ``>password``)."""
    return ["resetkeys", "resetchannels", f"~{Keys(namespace).prefix}:*", "-@all", *(f"+{c}" for c in WORKER_COMMANDS)]


def sender_user_rules(namespace: str) -> list[str]:
    """Rules for get_books: add requests, read events, nothing else."""
    keys = Keys(namespace)
    return [
        "resetkeys",
        "resetchannels",
        *(f"~{stream}" for stream in keys.request_streams),
        f"~{keys.events}",
        "-@all",
        *(f"+{c}" for c in SENDER_COMMANDS),
    ]


def setuser_command(name: str, rules: list[str], password_placeholder: str = "<password>") -> str:
    return " ".join(["ACL", "SETUSER", name, "reset", "on", f">{password_placeholder}", *rules])
