"""Command lines: a thin shell that parses options into ``Settings`` and calls in.

Every option can also come from an environment variable, shown in ``--help``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from redis.asyncio import Redis

from lending.ops import acl

from lending import app

from lending.ops import checker

from lending.ops import dead_letters

from lending.redis import eviction

from lending.ops import status
from lending.client import Answered, NoOutcome, Outcome, Queued, Refused, Unreachable, send_request
from lending.redis.cluster import namespace_url
from lending.cli.options import tls_from_options as tls_from_options  # for the simulator
from lending.cli.options import tls_options as tls_options
from lending.settings import Tls
from lending.redis.connection import check_reachable, make_client, redacted
from lending.errors import ConfigError, LendingError, RedisUnavailable
from lending.domain.events import ACCEPTED, DENIED, FAILED, REJECTED, RETURNED, Event
from lending.keys import LEND, RETURN, Keys
from lending.logs import configure_logging
from lending.domain.requests import id_problem
from lending.settings import DEFAULT_PORT, DEFAULT_REDIS_URL, Settings

F = TypeVar("F", bound=Callable[..., Any])

PASSWORD_NOTE = (
    "A password in the URL is never logged; prefer the REDIS_URL environment variable, "
    "which (unlike an argument) does not show in ps output."
)
EXIT_BY_STATUS = {ACCEPTED: 0, RETURNED: 0, DENIED: 1, REJECTED: 2, FAILED: 4}
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 5
EXIT_REFUSED = 6

redis_url_option = click.option(
    "--redis-url", envvar="REDIS_URL", show_envvar=True, default=None,
    help=f"Redis URL [default: {DEFAULT_REDIS_URL}]. {PASSWORD_NOTE}",
)
namespace_option = click.option(
    "--namespace", envvar="LENDING_NAMESPACE", show_envvar=True, default="lending", show_default=True,
    help="Key namespace: every key starts with {NAMESPACE}.",
)


def _int_option(name: str, default: int, help_text: str) -> Callable[[F], F]:
    env = "LENDING_" + name.upper().replace("-", "_")
    return click.option(f"--{name}", type=click.IntRange(min=0), envvar=env, show_envvar=True,
                        default=default, show_default=True, help=help_text)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("worker_id", envvar="LENDING_WORKER_ID")
@redis_url_option
@namespace_option
@_int_option("storage-capacity", 20, "Books the automated storage holds.")
@_int_option("max-books-per-user", 5, "Books one user may hold at once.")
@_int_option("max-books-per-request", 50, "Distinct books one request may name.")
@_int_option("claim-idle-ms", 30_000, "Take over entries idle this long on another consumer (a live worker "
             "renews the entries it holds every third of it).")
@_int_option("max-deliveries", 10, "Deliveries before an entry is dead-lettered.")
@_int_option("retry-base-ms", 1_000, "Wait before a failed entry's first retry; it doubles with each failure.")
@_int_option("retry-max-ms", 60_000, "Longest wait between two attempts of a failed entry.")
@_int_option("reconcile-interval-ms", 1_000, "How often to give back shelving grants of finished requests.")
@_int_option("concurrency", 64, "Requests processed at once by this worker.")
@_int_option("worker-ttl-ms", 10_000, "Lifetime of the worker-id heartbeat key.")
@_int_option("events-maxlen", 1_000_000, "About how many events {NS}:events keeps (request streams are "
             "trimmed only below what every group has read and acknowledged).")
@click.option("--force", is_flag=True, envvar="LENDING_FORCE", show_envvar=True,
              help="Start even if another live worker holds WORKER_ID.")
@click.option("--allow-eviction-data-loss", is_flag=True, envvar="LENDING_ALLOW_EVICTION_DATA_LOSS",
              show_envvar=True,
              help="Run even if Redis's maxmemory-policy is allkeys-*: a full Redis then deletes requests "
                   "and the library's state, losing books.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LENDING_DATA_DIR",
              show_envvar=True, default=Path(".lending-data"), show_default=True,
              help="Data folder of the embedded redis-server (used when no Redis is configured).")
# Hidden: tests try the embedded default on a free port instead of 6379.
@click.option("--embedded-port", type=click.IntRange(1, 65535), envvar="LENDING_EMBEDDED_PORT", default=DEFAULT_PORT,
              hidden=True)
@click.option("--log-format", type=click.Choice(["console", "json"]), envvar="LENDING_LOG_FORMAT",
              show_envvar=True, default="console", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), envvar="LENDING_LOG_LEVEL",
              show_envvar=True, default="info", show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="LENDING_METRICS_PORT", show_envvar=True,
              default=None, help="Serve Prometheus /metrics and /healthz on this port [default: off].")
@click.option("--uvloop/--no-uvloop", envvar="LENDING_UVLOOP", show_envvar=True, default=True, show_default=True,
              help="Run on uvloop's faster event loop (when installed).")
@click.option("--shelving-fail-rate", type=click.FloatRange(0, 1), envvar="LENDING_SHELVING_FAIL_RATE",
              show_envvar=True, default=0.0, show_default=True,
              help="Share of shelving calls that fail (simulating the remote service).")
@click.option("--shelving-latency-ms", type=click.FloatRange(min=0), envvar="LENDING_SHELVING_LATENCY_MS",
              show_envvar=True, default=0.0, show_default=True,
              help="Mean latency added to each shelving call (simulating the remote service).")
@tls_options
def worker_command(worker_id: str, **options: Any) -> None:
    """Run lending worker WORKER_ID: the lending service and the shelving mock.

    Without --redis-url (or REDIS_URL) it uses redis://localhost:6379, and if nothing
    listens there it starts the embedded redis-server on 127.0.0.1:6379 with its data
    in --data-dir (workers with the same --data-dir share it; the one that started it
    stops it on exit). Stop with Ctrl-C or SIGTERM; a second signal exits at once.
    """
    configure_logging(options["log_format"], options["log_level"])
    try:
        settings = Settings(worker_id=worker_id, tls=tls_from_options(options), **options)
        code = app.run_sync(settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except LendingError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _check_user(_ctx: click.Context, _param: click.Parameter, user: str) -> str:
    """Refuse a user id the service would reject, before anything is queued."""
    if problem := id_problem(user, "user_id"):
        raise click.BadParameter(f"{problem}; nothing was queued")
    return user


def _check_books(_ctx: click.Context, _param: click.Parameter, books: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse book ids the service would reject: a comma would even split one into two."""
    for book in books:
        if problem := id_problem(book, "book id"):
            raise click.BadParameter(f"{problem}; nothing was queued")
    return books


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("action", type=click.Choice(["request", "return"]))
@click.argument("user", callback=_check_user)
@click.argument("books", nargs=-1, required=True, callback=_check_books)
@redis_url_option
@namespace_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), envvar="LENDING_TIMEOUT", show_envvar=True,
              default=10.0, show_default=True,
              help="Seconds the whole run may take: connecting, queuing and waiting for the outcome.")
@click.option("--no-wait", is_flag=True, envvar="LENDING_NO_WAIT", show_envvar=True,
              help="Queue the request and exit without waiting.")
@click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True,
              help="Print the event as one JSON object.")
@tls_options
def get_books_command(
    action: str, user: str, books: tuple[str, ...], redis_url: str | None, namespace: str,
    timeout: float, no_wait: bool, as_json: bool, **tls_opts: Any,
) -> None:
    """Ask the library to lend (request) or take back (return) BOOKS for USER.

    Prints the outcome: ACCEPTED, DENIED, RETURNED, REJECTED or FAILED, the request
    id, the books and the reason. USER and BOOKS are checked first with the service's
    own rules (1-128 characters, no comma, no whitespace or control character).

    Exit codes: 0 accepted/returned (or queued with --no-wait), 1 denied, 2 rejected
    or usage error (an invalid USER or BOOK: nothing is queued), 3 no outcome within
    --timeout (the request stays queued), 4 failed, 5 Redis unreachable, lost, or
    silent for --timeout before the request was queued, 6 Redis refused the request
    (out of memory, no permission, stream out of IDs, ...).
    """
    stream_action = LEND if action == "request" else RETURN
    url = redis_url or DEFAULT_REDIS_URL
    outcome = asyncio.run(send_request(
        url, tls_from_options(tls_opts), Keys(namespace), stream_action, user, books, timeout_s=timeout, wait=not no_wait
    ))
    sys.exit(report(outcome, stream_action, timeout, as_json))


def report(outcome: Outcome, action: str, timeout: float, as_json: bool) -> int:
    """Print ``outcome`` (results on stdout, errors as one line on stderr); returns the exit code."""
    match outcome:
        case Answered(event):
            click.echo(json.dumps(event.as_json()) if as_json else format_event(event))
            return EXIT_BY_STATUS.get(event.status, 4)
        case Queued(request_id):
            click.echo(json.dumps({"status": "queued", "action": action, "request_id": request_id})
                       if as_json else f"QUEUED {request_id}")
            return 0
        case NoOutcome(request_id):
            click.echo(
                f"no outcome for {action} request {request_id} within {timeout:g} s; "
                f"the request stays queued (id {request_id}) and will be processed when a worker runs",
                err=True,
            )
            return EXIT_TIMEOUT
        case Unreachable(message):
            click.echo(f"error: {message}", err=True)
            return EXIT_UNREACHABLE
        case Refused(reason):
            click.echo(f"error: Redis refused the request: {reason}", err=True)
            return EXIT_REFUSED


def format_event(event: Event) -> str:
    parts = [event.status.upper(), event.request_id, "books=" + ",".join(event.books)]
    if event.skipped:
        parts.append("skipped=" + ",".join(event.skipped))
    line = " ".join(parts)
    return f"{line} reason: {event.reason}" if event.reason else line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@redis_url_option
@namespace_option
@click.option("--wait-quiescent", "wait_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS", envvar="LENDING_WAIT_QUIESCENT", show_envvar=True,
              help="First wait up to SECONDS for the namespace to become quiescent.")
@click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True,
              help="Print the report as JSON.")
@tls_options
def check_command(
    redis_url: str | None, namespace: str, wait_s: float, as_json: bool, **tls_opts: Any,
) -> None:
    """Check the invariants of a namespace; exit 0 when clean, 1 otherwise.

    Always: each user's count equals their books in lent-books and is within the
    limit; no book is both lent and in storage; storage within its capacity. Once
    quiescent (request streams all read and acknowledged, shelving returns drained):
    shelving holds exactly the lent and stored books (and the library's record of
    them agrees); every request entry has exactly one event and every event names an
    entry; no reservation is left.
    """
    url = redis_url or DEFAULT_REDIS_URL
    sys.exit(asyncio.run(_check(url, tls_from_options(tls_opts), namespace, wait_s, as_json)))


async def _check(url: str, tls: Tls, namespace: str, wait_s: float, as_json: bool) -> int:
    client = await _connect(url, tls, namespace)
    if client is None:
        return 1
    try:
        report = await checker.check(client, namespace, wait_s)
    finally:
        await client.aclose()
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        click.echo(format_report(report))
    return 0 if report.clean else 1


def format_report(report: checker.Report) -> str:
    scope = "all invariants" if report.quiescent else "not quiescent: only the always-invariants"
    if report.clean:
        lines = [f"OK: namespace {report.namespace!r} is consistent ({scope} checked)"]
    else:
        lines = [f"FAILED: {len(report.violations)} violation(s) in namespace {report.namespace!r} ({scope} checked)"]
        lines += [f"  [{v.invariant}] {v.message}  keys: {', '.join(v.keys)}" for v in report.violations]
    lines.append(f"maxmemory-policy: {report.maxmemory_policy or 'unknown'}")
    limits = report.limits
    lines.append(f"limits: {limits.max_books_per_user} books per user, storage capacity {limits.storage_capacity}"
                 + ("" if report.limits_published else " (defaults: no worker has published its limits)"))
    verdict = eviction.judge(report.maxmemory_policy)
    if verdict.level != "ok":
        lines.append(f"warning: {verdict.message}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@redis_url_option
@namespace_option
@click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help="Print as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted.")
@tls_options
def status_command(
    redis_url: str | None, namespace: str, as_json: bool, watch: bool, **tls_opts: Any,
) -> None:
    """Show a namespace: stream lengths, group lag and pending entries (with the oldest
    idle time), live workers, dead consumers holding entries, storage fill, books lent,
    users at their limit and dead letters. Exit 1 if Redis is unreachable."""
    url = redis_url or DEFAULT_REDIS_URL
    try:
        sys.exit(asyncio.run(_status(url, tls_from_options(tls_opts), namespace, as_json, watch)))
    except KeyboardInterrupt:
        sys.exit(0)


async def _status(url: str, tls: Tls, namespace: str, as_json: bool, watch: bool) -> int:
    client = await _connect(url, tls, namespace)
    if client is None:
        return 1
    try:
        while True:
            snapshot = await status.read_status(client, namespace)
            if as_json:
                click.echo(json.dumps(snapshot))
            else:
                if watch:
                    click.clear()
                click.echo(status.render(snapshot))
            if not watch:
                return 0
            await asyncio.sleep(1.0)
    finally:
        await client.aclose()


@click.group("dead-letters", context_settings={"help_option_names": ["-h", "--help"]})
def dead_letters_group() -> None:
    """Inspect and replay entries that failed --max-deliveries times."""


@dead_letters_group.command("list")
@redis_url_option
@namespace_option
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help="One JSON object per line.")
@tls_options
def dead_letters_list(redis_url: str | None, namespace: str, count: int, as_json: bool, **tls_opts: Any) -> None:
    """List dead letters, oldest first."""

    async def show(client: Redis) -> None:
        for letter in await dead_letters.list_letters(client, Keys(namespace), count):
            if as_json:
                click.echo(json.dumps(letter))
            else:
                books = letter.get("book_ids", "")
                click.echo(f"{letter['id']}  {letter.get('stream')} {letter.get('request_id') or letter.get('entry_id')}"
                           f"  user={letter.get('user_id', '')} books={books}"
                           f"  deliveries={letter.get('deliveries')}  error: {letter.get('error')}")

    sys.exit(asyncio.run(_with_client(redis_url, tls_from_options(tls_opts), namespace, show)))


@dead_letters_group.command("retry")
@redis_url_option
@namespace_option
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Retry every dead letter.")
@tls_options
def dead_letters_retry(
    redis_url: str | None, namespace: str, letter_ids: tuple[str, ...], everything: bool, **tls_opts: Any
) -> None:
    """Queue the original entries of LETTER_IDS again (as new entries) and delete the letters."""

    async def replay(client: Redis) -> None:
        keys = Keys(namespace)
        ids = await dead_letters.all_ids(client, keys) if everything else list(letter_ids)
        for letter_id, new_id in (await dead_letters.retry(client, keys, ids)).items():
            click.echo(f"{letter_id} -> queued again as {new_id}")

    sys.exit(asyncio.run(_with_client(redis_url, tls_from_options(tls_opts), namespace, replay)))


@dead_letters_group.command("purge")
@redis_url_option
@namespace_option
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Delete every dead letter.")
@tls_options
def dead_letters_purge(
    redis_url: str | None, namespace: str, letter_ids: tuple[str, ...], everything: bool, **tls_opts: Any
) -> None:
    """Delete dead letters (the original entries stay in their streams)."""

    async def remove(client: Redis) -> None:
        keys = Keys(namespace)
        ids = await dead_letters.all_ids(client, keys) if everything else list(letter_ids)
        click.echo(f"purged {await dead_letters.purge(client, keys, ids)}")

    sys.exit(asyncio.run(_with_client(redis_url, tls_from_options(tls_opts), namespace, remove)))


async def _connect(url: str, tls: Tls, namespace: str) -> Redis | None:
    """A checked client for ``url`` (for a cluster, the master owning the namespace);
    ``None`` after saying why on stderr."""
    try:
        target = await namespace_url(url, namespace, tls)
    except RedisUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        return None
    client = make_client(target, tls=tls)
    try:
        await check_reachable(client, redacted(url))
    except RedisUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        await client.aclose()
        return None
    return client


async def _with_client(
    redis_url: str | None, tls: Tls, namespace: str, action: Callable[[Redis], Awaitable[None]]
) -> int:
    url = redis_url or DEFAULT_REDIS_URL
    client = await _connect(url, tls, namespace)
    if client is None:
        return 1
    try:
        await action(client)
        return 0
    finally:
        await client.aclose()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@namespace_option
@click.option("--service-user", default="lending", show_default=True)
@click.option("--sender-user", default="get-books", show_default=True)
def acl_command(namespace: str, service_user: str, sender_user: str) -> None:
    """Print ACL SETUSER commands for least-privilege users of NAMESPACE: the service
    (only {NAMESPACE}:* keys, only the commands it uses) and get_books (add requests,
    read events). Replace <password> before running them; never put it in a command
    line that others can see in ps."""
    click.echo(acl.setuser_command(service_user, acl.worker_user_rules(namespace)))
    click.echo(acl.setuser_command(sender_user, acl.sender_user_rules(namespace)))


@click.group()
def main() -> None:
    """The lending service's commands."""


main.add_command(worker_command, "worker")
main.add_command(get_books_command, "get-books")
main.add_command(check_command, "check")
main.add_command(status_command, "status")
main.add_command(dead_letters_group, "dead-letters")
main.add_command(acl_command, "acl")


def worker_main() -> None:
    worker_command(prog_name="main.py")


def get_books_main() -> None:
    get_books_command(prog_name="get_books.py")
