"""Redis's eviction policy: an evicting Redis deletes keys the service cannot lose.

Under ``allkeys-*`` a full Redis deletes any key, whole request streams and the
library's state included, silently. Under ``volatile-*`` it deletes only keys with an
expiry; in a namespace those are the worker heartbeats alone. ``judge`` decides (pure);
``read_policy`` is the only Redis read, through ``INFO memory`` (``CONFIG GET`` would
also reveal passwords, so the service's ACL user does not get it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from lending.errors import LendingError

Level = Literal["ok", "warn", "refuse"]

ALLOW_FLAG = "--allow-eviction-data-loss"


@dataclass(frozen=True)
class Verdict:
    """What to do about a policy: ``message`` says why (empty when ``ok``)."""

    level: Level
    message: str = ""


class EvictionRefused(LendingError):
    """Redis may evict any key: the worker will not run on it."""

    def __init__(self, policy: str | None, message: str) -> None:
        super().__init__(message)
        self.policy = policy


def judge(policy: str | None, allow_data_loss: bool = False) -> Verdict:
    """The verdict on ``maxmemory_policy`` (``None``: it could not be read).

    :param allow_data_loss: ``--allow-eviction-data-loss``: an ``allkeys-*`` policy is
        only warned about.
    """
    if policy == "noeviction":
        return Verdict("ok")
    if policy is None:
        return Verdict(
            "warn",
            "could not check Redis's maxmemory-policy: INFO is refused (no permission, or "
            "the command is renamed or disabled); make sure it is noeviction",
        )
    if policy.startswith("allkeys-"):
        risk = (
            f"Redis's maxmemory-policy is {policy}: when memory runs out Redis deletes any key, request "
            "streams and the library's state included, losing requests and books without a trace"
        )
        if allow_data_loss:
            return Verdict("warn", f"{risk} (accepted by {ALLOW_FLAG})")
        return Verdict("refuse", f"{risk}; set it to noeviction, or accept the loss with {ALLOW_FLAG}")
    if policy.startswith("volatile-"):
        return Verdict(
            "warn",
            f"Redis's maxmemory-policy is {policy}: when memory runs out Redis deletes keys "
            "with an expiry, i.e. worker heartbeats (a live worker's id may look free); "
            "noeviction is safer",
        )
    return Verdict(
        "warn",
        f"Redis's maxmemory-policy is {policy}, unknown to this version: "
        "it may delete the library's keys; noeviction is safe",
    )


async def read_policy(client: Redis) -> str | None:
    """``maxmemory_policy`` from ``INFO memory``; ``None`` when Redis refuses INFO (no
    permission, or the command is renamed or disabled). Lost connections raise."""
    try:
        info = await client.info("memory")
    except NoPermissionError:
        return None
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():  # renamed, or disabled (rename-command INFO "")
            return None
        raise
    policy = info.get("maxmemory_policy")
    return None if policy is None else str(policy)
