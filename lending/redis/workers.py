"""The workers of a namespace in Redis: ids, liveness, and the limits they enforce.

A worker claims its id at start (``worker_claim.lua``): one liveness key with a TTL,
renewed by its heartbeat, its id in the ``{NS}:workers`` set, and its lending limits
published in ``{NS}:config``, refused when a live worker enforces other ones. Beside
the liveness key, with the same TTL, a hash says who the worker is (host, pid,
version, start time) and how it does (counters refreshed by each heartbeat). Tools
list live workers from the set (no SCAN) and read the limits to check against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.errors import LimitsChanged, LimitsDiffer, WorkerIdTaken
from lending.keys import Keys
from lending.redis.replies import text
from lending.redis.scripts import Arg, Scripts
from lending.settings import Limits

log = structlog.get_logger(__name__)


class WorkerId:
    """One process's hold on a worker id.

    :param token: tells this process from another one with the same id.
    :param info: what the worker says about itself at claim (``host``, ``pid``,
        ``version``, ``started_ms``), published in ``{NS}:worker-info:<id>``.
    """

    def __init__(
        self,
        client: Redis,
        scripts: Scripts,
        keys: Keys,
        worker_id: str,
        token: str,
        ttl_ms: int,
        info: Mapping[str, str | int] | None = None,
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self.worker_id = worker_id
        self._token = token
        self._ttl_ms = ttl_ms
        self._info = dict(info or {})
        self._claimed: Limits | None = None  # the limits published at claim

    @property
    def key(self) -> str:
        return self._keys.worker(self.worker_id)

    async def claim(self, limits: Limits, *, force: bool = False) -> None:
        """Take the id and publish ``limits``; raises ``WorkerIdTaken`` or ``LimitsDiffer``."""
        others = [w for w in await registered(self._client, self._keys) if w != self.worker_id]
        fields = _flat(limits.fields())
        # The limits in the info too: what a worker claiming next checks its own against.
        info = _flat({**self._info, **limits.fields()})
        others_args: list[Arg] = [len(others), *others]
        reply = await self._scripts.worker_claim(
            self._client,
            [
                self.key,
                self._keys.workers,
                self._keys.config,
                self._keys.worker_info(self.worker_id),
                *(self._keys.worker(w) for w in others),
                *(self._keys.worker_info(w) for w in others),
            ],
            [self._token, self._ttl_ms, 1 if force else 0, self.worker_id, *others_args, len(info), *info, *fields],
        )
        code = int(reply[0])
        if code == 0:
            raise WorkerIdTaken(self.worker_id, self.key)
        if code == -1:
            raise LimitsDiffer(*(text(value) for value in reply[1:5]))
        self._claimed = limits

    async def renew(self, counters: Mapping[str, int] | None = None) -> bool:
        """The heartbeat, which also publishes ``counters`` (``processed``, ``failed``) in the
        worker's info (with the rest of the info, should the info be gone); ``False`` when
        another process took the id over (``--force``). When the liveness key is gone (a
        Redis restart or failover lost it, or it lapsed while this worker stalled) or
        ``{NS}:config`` is not exactly this worker's limits, the id is claimed again
        (``worker_claim.lua``, which compares every live worker's own limits).

        :raises LimitsChanged: a live worker enforces other limits (the workers were
            restarted with new ones while this one stalled, or a hand edit let one start).
        """
        reply = await self._renew(counters)
        if isinstance(reply, list):
            return await self._claim_again(counters, reply)
        return int(reply) != 0

    async def _renew(self, counters: Mapping[str, int] | None) -> Any:
        limits = self._claimed.fields() if self._claimed else {}
        return await self._scripts.worker_renew(
            self._client,
            [self.key, self._keys.workers, self._keys.worker_info(self.worker_id), self._keys.config],
            [
                self._token,
                self._ttl_ms,
                self.worker_id,
                2 * len(limits),
                *_flat(limits),
                *_flat({**self._info, **limits, **(counters or {})}),
            ],
        )

    async def _claim_again(self, counters: Mapping[str, int] | None, reply: list[object]) -> bool:
        """Take the id again under this worker's limits, unless a live worker enforces
        others; then publish ``counters`` (the claim writes the info afresh)."""
        assert self._claimed is not None  # renew() comes after claim()
        try:
            await self.claim(self._claimed)
        except LimitsDiffer as exc:
            raise LimitsChanged(exc.worker_id, exc.field, exc.theirs, exc.mine) from exc
        except WorkerIdTaken:
            return False
        field, theirs, mine = (text(cast(bytes, value)) for value in reply[1:4])
        log.warning(
            "the worker id's liveness key was gone (lost by Redis, or lapsed while this worker stalled), or the "
            "namespace's limits were not this worker's (older data, a hand edit), with no live worker enforcing "
            "others: held again, with this worker's limits published",
            worker_id=self.worker_id,
            limit=field or None,
            found=theirs or None,
            mine=mine or None,
        )
        await self._renew(counters)
        return True

    async def release(self) -> None:
        await self._scripts.worker_release(
            self._client,
            [self.key, self._keys.workers, self._keys.worker_info(self.worker_id)],
            [self._token, self.worker_id],
        )


def _flat(fields: Mapping[str, str | int]) -> list[str | int]:
    return [item for pair in fields.items() for item in pair]


async def registered(client: Redis, keys: Keys) -> list[str]:
    """The ids in ``{NS}:workers``, live or not."""
    return sorted(text(member) for member in await client.smembers(keys.workers))


async def live_workers(client: Redis, keys: Keys) -> dict[str, int]:
    """Live worker id -> milliseconds its liveness key has left."""
    ids = await registered(client, keys)
    if not ids:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.pttl(keys.worker(worker_id))
        ttls = cast(list[int], await pipe.execute())
    return {worker_id: ttl for worker_id, ttl in zip(ids, ttls, strict=True) if ttl > 0}


async def worker_infos(client: Redis, keys: Keys, worker_ids: list[str]) -> dict[str, dict[str, str]]:
    """Worker id -> what it published about itself (empty for a worker that published
    nothing: one of an older version)."""
    if not worker_ids:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.hgetall(keys.worker_info(worker_id))
        replies = await pipe.execute(raise_on_error=False)
    return {
        # An info of another type (a hand edit, replaced by the worker's next heartbeat):
        # as if it published nothing.
        worker_id: {} if isinstance(reply, ResponseError) else {text(k): text(v) for k, v in reply.items()}
        for worker_id, reply in zip(worker_ids, replies, strict=True)
    }


async def read_limits(client: Redis, keys: Keys) -> Limits | None:
    """The limits the namespace's workers enforce; ``None`` when no worker ever ran (or
    ``{NS}:config`` is no hash, a hand edit the next heartbeat replaces)."""
    try:
        raw = cast(dict[bytes, bytes], await client.hgetall(keys.config))
    except ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        return None
    return Limits.from_fields(raw) if raw else None
