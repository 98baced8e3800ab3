"""The Lua scripts of ``lua/``, loaded once and run with EVALSHA.

We keep our own small wrapper rather than ``register_script``: inside a pipeline,
redis-py's ``AsyncScript`` sends ``SCRIPT EXISTS`` before every ``EXEC``, an extra round
trip on the hot path. Here a script's SHA1 is computed locally; a ``NOSCRIPT`` answer
(a restarted or flushed Redis) reloads every script and the caller's step is retried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run the script, loading it first if Redis does not know it."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue the script in a transaction; the caller handles ``NoScriptError``."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def _lua_dir() -> Traversable:
    """``lua/`` beside the package in a checkout; packaged as ``lending.lua`` in a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "lua"
    return checkout if checkout.is_dir() else resources.files("lending.lua")


def _read(name: str) -> Script:
    return Script(name, _lua_dir().joinpath(f"{name}.lua").read_text(encoding="utf-8"))


class Scripts:
    """Every script of ``lua/``, by name."""

    def __init__(self) -> None:
        self.reserve = _read("reserve")
        self.commit = _read("commit")
        self.record_grants = _read("record_grants")
        self.finish = _read("finish")
        self.shelving_get = _read("shelving_get")
        self.shelving_release = _read("shelving_release")
        self.worker_claim = _read("worker_claim")
        self.worker_release = _read("worker_release")

    def all(self) -> list[Script]:
        return [value for value in vars(self).values() if isinstance(value, Script)]

    async def load(self, client: Redis) -> None:
        """SCRIPT LOAD every script: at start, and after Redis forgot them."""
        for script in self.all():
            await client.script_load(script.source)
