"""``python -m lending dead-letters list|retry|purge`` (``ops.dead_letters``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import click
from redis.asyncio import Redis

from lending.cli.options import CONTEXT_SETTINGS, Target, connected, connection_options
from lending.keys import Keys
from lending.ops import dead_letters


@click.group("dead-letters", context_settings=CONTEXT_SETTINGS)
def dead_letters_group() -> None:
    """Inspect and replay entries that failed --max-deliveries times."""


@connection_options
@dead_letters_group.command("list")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help="One JSON object per line."
)
def list_command(target: Target, count: int, as_json: bool) -> None:
    """List dead letters, oldest first."""

    async def show() -> None:
        async with connected(target) as client:
            letters = await dead_letters.list_letters(client, target.keys, count)
        for letter in letters:
            click.echo(json.dumps(letter) if as_json else format_letter(letter))

    asyncio.run(show())


def format_letter(letter: Mapping[str, Any]) -> str:
    return (
        f"{letter['id']}  {letter.get('stream')} {letter.get('request_id') or letter.get('entry_id')}"
        f"  user={letter.get('user_id', '')} books={letter.get('book_ids', '')}"
        f"  deliveries={letter.get('deliveries')}  error: {letter.get('error')}"
    )


Act = Callable[[Redis, Keys, list[str]], Awaitable[None]]


def selection_command(name: str, all_help: str) -> Callable[[Act], click.Command]:
    """A dead-letters command on LETTER_IDS..., or on every letter with --all (``all_help``
    says what that does): the decorated ``act`` does it, and its docstring is the help."""

    def decorate(act: Act) -> click.Command:
        @connection_options
        @dead_letters_group.command(name, help=act.__doc__)
        @click.argument("letter_ids", nargs=-1)
        @click.option("--all", "everything", is_flag=True, help=all_help)
        def command(target: Target, letter_ids: tuple[str, ...], everything: bool) -> None:
            async def run() -> None:
                async with connected(target) as client:
                    ids = await dead_letters.all_ids(client, target.keys) if everything else list(letter_ids)
                    await act(client, target.keys, ids)

            asyncio.run(run())

        return command

    return decorate


@selection_command("retry", "Retry every dead letter.")
async def retry_command(client: Redis, keys: Keys, letter_ids: list[str]) -> None:
    """Queue the original entries of LETTER_IDS again (as new entries) and delete the letters."""
    for letter_id, new_id in (await dead_letters.retry(client, keys, letter_ids)).items():
        click.echo(f"{letter_id} -> queued again as {new_id}")


@selection_command("purge", "Delete every dead letter.")
async def purge_command(client: Redis, keys: Keys, letter_ids: list[str]) -> None:
    """Delete dead letters (the original entries stay in their streams)."""
    click.echo(f"purged {await dead_letters.purge(client, keys, letter_ids)}")
