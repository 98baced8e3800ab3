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
from lending.cli.inspect import check_command, status_command
from lending.cli.options import tls_from_options as tls_from_options  # for the simulator
from lending.cli.options import tls_options as tls_options
from lending.cli.worker import worker_command
from lending.errors import RedisUnavailable
from lending.keys import Keys
from lending.ops import acl, dead_letters
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
