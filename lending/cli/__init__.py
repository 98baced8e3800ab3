"""Command lines: a thin shell that parses options into ``Settings`` and calls in.

Every option can also come from an environment variable, shown in ``--help``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
from redis.asyncio import Redis

from lending.cli.get_books import get_books_command
from lending.cli.options import tls_from_options as tls_from_options  # for the simulator
from lending.cli.options import tls_options as tls_options
from lending.cli.worker import worker_command
from lending.errors import RedisUnavailable
from lending.keys import Keys
from lending.ops import acl, checker, dead_letters, status
from lending.redis import eviction
from lending.redis.cluster import namespace_url
from lending.redis.connection import check_reachable, make_client, redacted
from lending.settings import DEFAULT_REDIS_URL, Tls

PASSWORD_NOTE = (
    "A password in the URL is never logged; prefer the REDIS_URL environment variable, "
    "which (unlike an argument) does not show in ps output."
)

redis_url_option = click.option(
    "--redis-url", envvar="REDIS_URL", show_envvar=True, default=None,
    help=f"Redis URL [default: {DEFAULT_REDIS_URL}]. {PASSWORD_NOTE}",
)
namespace_option = click.option(
    "--namespace", envvar="LENDING_NAMESPACE", show_envvar=True, default="lending", show_default=True,
    help="Key namespace: every key starts with {NAMESPACE}.",
)


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
