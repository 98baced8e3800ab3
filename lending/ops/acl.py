"""Least-privilege Redis ACL users for a namespace: the service, the sender, the operator,
the HTTP API.

``python -m lending acl`` prints their ``ACL SETUSER`` commands; the README explains
them. Each may touch only keys of its namespace (the namespace's glob characters
escaped, as in ``Keys.pattern``) and run only the commands it uses, and each may ask a
cluster which node owns the namespace's slot.

- The service runs the worker: no SCAN (it never lists keys: the workers are in the
  ``{NS}:workers`` set) and no SELECT (database 0 only), no CONFIG (it reveals
  passwords).
- The sender (get_books) gets no XADD: Redis ACLs cannot restrict XADD's arguments, and
  a script runs with its caller's permissions. It hands requests in through the inbox
  (RPUSH, which cannot remove or reorder anything) and reads events and its receipts.
- The operator reads (``status``, ``check``, ``dead-letters list``), SCAN included.
- The HTTP API (``python -m lending api``; printed on request) is the trusted front door: it checks a
  request with the service's rules and queues it itself (``api_submit.lua``: XADD to
  the request streams, SET of idempotency keys), reads what its endpoints show, and
  for its operator endpoints runs ``status`` (SCAN included) and retries dead letters
  (``retry_letter.lua``: XADD + XDEL). It writes no lending state: on Redis 7 it may write only the
  request streams, its idempotency keys and the dead letters.

Redis 7 can also make a key pattern read-only (``%R~``) or write-only (``%W~``);
``key_permissions=False`` gives the rules for Redis 6.2, which cannot.
"""

from __future__ import annotations

import re

from lending.keys import REQUEST_TYPES, Keys

# Connection housekeeping redis-py does on its own. (Its CLIENT SETINFO is optional:
# redis-py ignores a refusal, and Redis 7.0 does not know the subcommand in ACL rules.)
CONNECTION_COMMANDS = ("ping", "hello", "auth")
# How the client finds the node that owns a namespace's slot (``redis.cluster.SlotOwner``).
CLUSTER_COMMANDS = ("cluster|keyslot", "cluster|slots")

# What redis-cli reads as more than a character of an argument: whitespace ends one, a
# quote opens a quoted part.
_REDIS_CLI_SPECIAL = re.compile(r"""[\s"']""")

WORKER_COMMANDS = (
    *CONNECTION_COMMANDS,
    *CLUSTER_COMMANDS,
    # streams: consuming, claiming, trimming, events, dead letters
    "xreadgroup",
    "xack",
    "xadd",
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
    # (hscan), the heartbeat and the worker set (pexpire, srem), the metrics' reads
    "exists",
    "type",
    "get",
    "set",
    "mget",
    "del",
    "incrby",
    "pexpire",
    "pttl",
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
    "srem",
    "smove",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    # the inbox relay: waiting for submissions, taking them off (relay.lua)
    "blmove",
    "lrange",
    "ltrim",
    "llen",
    # the eviction-policy check (INFO memory; never CONFIG, which reveals passwords)
    "info",
)

SENDER_COMMANDS = (*CONNECTION_COMMANDS, *CLUSTER_COMMANDS, "rpush", "xread", "xrevrange")

OPERATOR_COMMANDS = (
    *CONNECTION_COMMANDS,
    *CLUSTER_COMMANDS,
    # check reads the state at one moment (MULTI), the keys it found by SCAN first
    "multi",
    "exec",
    "discard",
    "exists",
    "scan",
    "xlen",
    "xrange",
    "xinfo|stream",
    "xinfo|groups",
    "xpending",
    "get",
    "pttl",
    "hgetall",
    # check reads a user whose count or books set disagrees again, with their books
    "hmget",
    "hlen",
    "smembers",
    "scard",
    "llen",
    "info",
)


API_COMMANDS = (
    *CONNECTION_COMMANDS,
    *CLUSTER_COMMANDS,
    # queuing (api_submit.lua: GET and SET of the idempotency key, XADD), retrying a
    # dead letter (retry_letter.lua: XRANGE, XADD, XDEL), consistent reads (MULTI)
    "evalsha",
    "script|load",
    "get",
    "set",
    "xadd",
    "xdel",
    "multi",
    "exec",
    "discard",
    # the events tail, SSE resumption, request lookups
    "xread",
    "xrange",
    "xrevrange",
    # loans, books, limits, the dashboard and /v1/status
    "smembers",
    "sismember",
    "scard",
    "hget",
    "hgetall",
    "hlen",
    "pttl",
    "xlen",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
    "llen",
    "scan",
    "info",
)


def _commands(commands: tuple[str, ...]) -> list[str]:
    return ["-@all", *(f"+{c}" for c in commands)]


def worker_user_rules(namespace: str) -> list[str]:
    """``ACL SETUSER <name> ...`` rules for the service (add ``on`` and ``>password``)."""
    keys = Keys(namespace)
    return ["resetkeys", "resetchannels", f"~{keys.pattern('*')}", *_commands(WORKER_COMMANDS)]


def sender_user_rules(namespace: str, *, key_permissions: bool = True) -> list[str]:
    """Rules for get_books: hand requests in through the inbox, read events and receipts.

    :param key_permissions: Redis 7's write-only and read-only key patterns; without
        them (Redis 6.2) the commands alone keep the sender from writing events.
    """
    keys = Keys(namespace)
    write, read = ("%W~", "%R~") if key_permissions else ("~", "~")
    return [
        "resetkeys",
        "resetchannels",
        f"{write}{keys.pattern('inbox')}",
        f"{read}{keys.pattern('events')}",
        f"{read}{keys.pattern('receipts:*')}",
        *_commands(SENDER_COMMANDS),
    ]


def operator_user_rules(namespace: str, *, key_permissions: bool = True) -> list[str]:
    """Rules for an operator's reads: ``status``, ``check``, ``dead-letters list``."""
    keys = Keys(namespace)
    return [
        "resetkeys",
        "resetchannels",
        f"{'%R~' if key_permissions else '~'}{keys.pattern('*')}",
        *_commands(OPERATOR_COMMANDS),
    ]


def api_user_rules(namespace: str, *, key_permissions: bool = True) -> list[str]:
    """Rules for the HTTP API: reads all of the namespace; writes (Redis 7) only the
    request streams, its idempotency keys and the dead letters.

    :param key_permissions: Redis 7's read-only key patterns; without them (Redis 6.2)
        the commands alone keep it from changing lending state: it has no HSET, SADD,
        DEL, XACK or XGROUP, and EVALSHA runs only the scripts whose commands it may run.
    """
    keys = Keys(namespace)
    if not key_permissions:
        return ["resetkeys", "resetchannels", f"~{keys.pattern('*')}", *_commands(API_COMMANDS)]
    writable = [*(t.stream for t in REQUEST_TYPES), "dead-letters", "idempotency:*"]
    return [
        "resetkeys",
        "resetchannels",
        f"%R~{keys.pattern('*')}",
        # Redis wants one pattern granting all a command needs: RW, not %R~ and %W~.
        *(f"~{keys.pattern(suffix)}" for suffix in writable),
        *_commands(API_COMMANDS),
    ]


def namespace_acl_problem(namespace: str) -> str | None:
    """Why no ACL user can be limited to ``namespace``, or ``None``: Redis refuses a key
    pattern holding whitespace (``ACL SETUSER`` answers a syntax error), and no glob can
    stand for a space without matching other namespaces' keys too."""
    if any(c.isspace() for c in namespace):
        return f"namespace {namespace!r} holds whitespace, which Redis refuses in an ACL key pattern"
    return None


def user_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a user in a printed ``ACL SETUSER``, or ``None``: an empty
    name leaves ``reset`` in its place (redis-cli would create a user named ``reset``), and
    whitespace or a control character would split the command, or name a user no one can
    type."""
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        return f"user name {name!r} must be non-empty, without whitespace or control characters"
    if name == "default":
        # Its reset would leave every client that does not authenticate (redis-cli
        # without --user, backups, monitoring) with one role's rights in one namespace.
        return (
            "'default' is Redis's user for every connection that does not authenticate: "
            "restricting it to one role of one namespace locks the others out; name a user of its own"
        )
    return None


def redis_cli_argument(argument: str) -> str:
    r"""``argument`` written so that redis-cli reads it back as one argument: as it is when
    it can be, else in double quotes with backslash escapes (``"~{a b}:*"``).

    redis-cli splits a line at whitespace, and a quote anywhere in an argument opens a
    quoted part; inside double quotes it reads ``\\``, ``\"`` and ``\xHH`` (one byte).
    """
    if argument and argument.isprintable() and not _REDIS_CLI_SPECIAL.search(argument):
        return argument
    escaped = []
    for char in argument:
        if char in '\\"':
            escaped.append("\\" + char)
        elif char.isprintable():
            escaped.append(char)
        else:
            escaped.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogateescape"))
    return '"' + "".join(escaped) + '"'


def setuser_command(name: str, rules: list[str], password_placeholder: str = "<password>") -> str:
    """The ``ACL SETUSER`` line for redis-cli that makes user ``name`` with ``rules``."""
    arguments = ["ACL", "SETUSER", name, "reset", "on", f">{password_placeholder}", *rules]
    return " ".join(redis_cli_argument(argument) for argument in arguments)
