"""``python -m lending dead-letters list|show|retry|purge`` (``ops.dead_letters``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from redis.asyncio import Redis

from lending.cli.options import (
    CONTEXT_SETTINGS,
    CommandError,
    F,
    Target,
    connected,
    connection_options,
    print_result,
)
from lending.domain.streamids import id_ms
from lending.keys import Keys
from lending.ops import dead_letters
from lending.redis.scripts import Scripts

T = TypeVar("T")


@click.group("dead-letters", context_settings=CONTEXT_SETTINGS)
def dead_letters_group() -> None:
    """Inspect and replay entries that failed --max-deliveries times."""


def json_option(help_text: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help=help_text)


def filter_options(command: F) -> F:
    """--user and --error, handed to the command as one ``where: Filter``."""
    command = click.option("--error", metavar="TEXT", help="Only letters whose error contains TEXT.")(command)
    return click.option("--user", metavar="USER", help="Only letters of requests by USER.")(command)


def run(target: Target, work: Callable[[Redis], Coroutine[Any, Any, T]]) -> T:
    """``work`` on a client of ``target``; a ``LetterError`` ends the command with one line, exit 1."""

    async def go() -> T:
        async with connected(target) as client:
            return await work(client)

    try:
        return asyncio.run(go())
    except dead_letters.LetterError as exc:
        raise CommandError(str(exc)) from exc


@connection_options
@dead_letters_group.command("list")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True, help="Show at most this many.")
@filter_options
@json_option("One JSON object per line.")
def list_command(target: Target, count: int, user: str | None, error: str | None, as_json: bool) -> None:
    """List dead letters, oldest first; say when the workers dropped older ones (the
    stream keeps at most --dead-letters-maxlen letters)."""

    async def read(client: Redis) -> tuple[list[dict[str, Any]], int]:
        where = dead_letters.Filter(user, error)
        return await dead_letters.list_letters(client, target.keys, count, where), await dead_letters.trimmed(
            client, target.keys
        )

    letters, dropped = run(target, read)
    if dropped:
        # In --json on stderr: stdout stays one letter per line.
        click.echo(capped_note(dropped), err=as_json)
    for letter in letters:
        click.echo(json.dumps(letter) if as_json else format_letter(letter))


def capped_note(dropped: int) -> str:
    return (
        f"note: the stream was capped: {dropped} older dead letter{'' if dropped == 1 else 's'} dropped "
        "(the workers keep at most --dead-letters-maxlen)"
    )


def format_letter(letter: Mapping[str, Any]) -> str:
    return (
        f"{letter['id']}  {letter.get('stream')} {letter.get('request_id') or letter.get('entry_id')}"
        f"  user={letter.get('user_id', '')} books={letter.get('book_ids', '')}"
        f"  deliveries={letter.get('deliveries')}  error: {letter.get('error')}"
    )


@connection_options
@dead_letters_group.command("show")
@click.argument("letter_id")
@json_option("Print the letter as a JSON object.")
def show_command(target: Target, letter_id: str, as_json: bool) -> None:
    """Show dead letter LETTER_ID, every field of it."""

    async def read(client: Redis) -> dict[str, Any]:
        (letter,) = await dead_letters.find(client, target.keys, [letter_id])
        return letter

    letter = run(target, read)
    if as_json:
        click.echo(json.dumps(letter))
        return
    written = datetime.fromtimestamp(id_ms(letter["id"]) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    width = max(len(name) for name in letter)
    click.echo(f"{'id':<{width}}  {letter['id']} (dead-lettered {written})")
    for name, value in letter.items():
        if name != "id":
            click.echo(f"{name:<{width}}  {value}")


Act = Callable[[Redis, Keys, list[str], bool], Awaitable[None]]


def selection_command(name: str, all_help: str) -> Callable[[Act], click.Command]:
    """A dead-letters command on LETTER_IDS..., or on every letter with --all (``all_help``
    says what that does), narrowed by --user/--error: the decorated ``act`` does it, and
    its docstring is the help."""

    def decorate(act: Act) -> click.Command:
        @connection_options
        @dead_letters_group.command(name, help=act.__doc__)
        @click.argument("letter_ids", nargs=-1)
        @click.option("--all", "everything", is_flag=True, help=all_help)
        @filter_options
        @json_option("Print the result as one JSON object.")
        def command(
            target: Target,
            letter_ids: tuple[str, ...],
            everything: bool,
            user: str | None,
            error: str | None,
            as_json: bool,
        ) -> None:
            where = dead_letters.Filter(user, error)
            if everything and letter_ids:
                raise click.UsageError("give LETTER_IDS or --all, not both")
            if not everything and not letter_ids:
                raise click.UsageError("give LETTER_IDS, or --all for every letter")
            if where and not everything:
                raise click.UsageError("--user and --error narrow --all")

            async def work(client: Redis) -> None:
                ids = await dead_letters.all_ids(client, target.keys, where) if everything else list(letter_ids)
                await act(client, target.keys, ids, as_json)

            run(target, work)

        return command

    return decorate


@selection_command("retry", "Retry every dead letter (that --user/--error take).")
async def retry_command(client: Redis, keys: Keys, letter_ids: list[str], as_json: bool) -> None:
    """Queue the original entries of LETTER_IDS again (as new entries) and delete the letters.
    An id that names no letter (or a letter that cannot be retried) stops it before it queues anything."""
    retried = await dead_letters.retry(client, Scripts(), keys, letter_ids)
    if as_json:
        print_result(json.dumps({"retried": retried}))
    elif retried:
        print_result("\n".join(f"{done['id']} -> queued again as {done['queued_as']}" for done in retried))


@selection_command("purge", "Delete every dead letter (that --user/--error take).")
async def purge_command(client: Redis, keys: Keys, letter_ids: list[str], as_json: bool) -> None:
    """Delete dead letters (the original entries stay in their streams). An id that names
    no letter stops it before it deletes anything."""
    purged = await dead_letters.purge(client, keys, letter_ids)
    print_result(json.dumps({"purged": purged, "ids": letter_ids}) if as_json else f"purged {purged}")
