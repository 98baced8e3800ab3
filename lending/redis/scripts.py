"""The Lua scripts of ``lua/``, loaded once and run with EVALSHA.

We keep our own small wrapper rather than ``register_script``: inside a pipeline,
redis-py's ``AsyncScript`` sends ``SCRIPT EXISTS`` before every ``EXEC``, an extra round
trip on the hot path. Here a script's SHA1 is computed locally; a ``NOSCRIPT`` answer
(a restarted or flushed Redis) reloads every script and the caller's step is retried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from lending.redis.wire import Command, call

Arg = str | bytes | int | float


class Script:
    """One script of ``lua/``, with its SHA1.

    A file may start with a Redis 7 shebang (``#!lua flags=...``): Redis then checks the
    flags before running the script (without ``allow-oom`` it refuses a writing script
    as a whole while out of memory). Redis 6.2 does not know the shebang; for it the
    line is blanked out (``flagged=False``), keeping line numbers in error messages.
    """

    def __init__(self, name: str, text: str, *, flagged: bool = True) -> None:
        self.name = name
        self.text = text
        self.use_flags(flagged)

    def use_flags(self, flagged: bool) -> None:
        self.flagged = flagged
        if flagged or not self.text.startswith("#!"):
            self.source = self.text
        else:
            self.source = "--" + self.text[2:]
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, client: Redis) -> None:
        """SCRIPT LOAD it; a server that fails to compile the shebang (Redis 6.2) gets it
        without. (Finding out this way needs no ``INFO``, which a least-privilege user
        may not have.)"""
        # What is loaded is decided once here: another task may switch the flags meanwhile.
        source, flagged = self.source, self.flagged
        try:
            await client.script_load(source)
        except ResponseError as exc:
            if not flagged or "compil" not in str(exc).lower():
                raise
            self.use_flags(False)
            await client.script_load(self.source)

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run the script, loading it first if Redis does not know it."""
        try:
            return await call(client, *self.command(keys, args))
        except NoScriptError:
            await self.load(client)
            return await call(client, *self.command(keys, args))

    def command(self, keys: Sequence[str], args: Sequence[Arg]) -> Command:
        """The ``EVALSHA`` that runs it."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def _lua_dir() -> Traversable:
    """``lua/`` beside the package in a checkout; packaged as ``lending.lua`` in a wheel."""
    checkout = Path(__file__).resolve().parents[2] / "lua"
    return checkout if checkout.is_dir() else resources.files("lending.lua")


def read_script(name: str) -> Script:
    """``lua/<name>.lua``."""
    return Script(name, _lua_dir().joinpath(f"{name}.lua").read_text(encoding="utf-8"))


class Scripts:
    """Every script of ``lua/``, by name."""

    def __init__(self) -> None:
        self.reserve = read_script("reserve")
        self.commit = read_script("commit")
        self.finish = read_script("finish")
        self.reconcile = read_script("reconcile")
        self.renew = read_script("renew")
        self.autoclaim = read_script("autoclaim")
        self.claim = read_script("claim")
        self.dead_letter = read_script("dead_letter")
        self.shelving_get = read_script("shelving_get")
        self.shelving_release = read_script("shelving_release")
        self.worker_claim = read_script("worker_claim")
        self.worker_renew = read_script("worker_renew")
        self.worker_release = read_script("worker_release")
        self.forget_consumers = read_script("forget_consumers")
        self.relay = read_script("relay")
        self.api_submit = read_script("api_submit")
        self.retry_letter = read_script("retry_letter")

    def all(self) -> list[Script]:
        return [value for value in vars(self).values() if isinstance(value, Script)]

    async def load(self, client: Redis) -> None:
        """SCRIPT LOAD every script: at start, and after Redis forgot them."""
        for script in self.all():
            await script.load(client)
