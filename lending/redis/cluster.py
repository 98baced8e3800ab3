"""Redis Cluster: a namespace lives on the one shard that owns its ``{NS}`` hash slot.

Every key of a namespace carries the hash tag ``{NS}``, so all its scripts and
transactions touch one slot. Rather than a cluster client (redis-py's asyncio cluster
client cannot run WATCH/MULTI), the service talks to the master that owns that slot
over a direct connection, and finds the owner again after ``MOVED``/``ASK`` (resharding,
failover) or a lost connection.

URLs: ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node of the
cluster; credentials and TLS apply to every node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from redis.asyncio import Redis

from lending.errors import RedisUnavailable
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.replies import text
from lending.settings import Tls

log = structlog.get_logger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _node_url(url: str, host: str, port: int) -> str:
    """``url`` (a cluster or plain URL) pointed at one node, keeping scheme and credentials."""
    scheme, _, rest = url.partition("://")
    scheme = CLUSTER_SCHEMES.get(scheme, scheme)
    credentials, at, _address = rest.rpartition("@")
    path = _address.partition("/")[2]
    return f"{scheme}://{credentials}{at}{host}:{port}" + (f"/{path}" if path else "")


class SlotOwner:
    """Finds the master owning a namespace's slot, starting from a cluster URL."""

    def __init__(self, url: str, namespace: str, tls: Tls | None = None) -> None:
        self.url = url
        self.tls = tls
        self.tag = Keys(namespace).prefix
        host_port = url.partition("://")[2].rpartition("@")[2].partition("/")[0]
        host, _, port = host_port.rpartition(":")
        self.known: list[tuple[str, int]] = [(host or "127.0.0.1", int(port or 6379))]

    async def master(self) -> tuple[str, int]:
        """Ask the known nodes, in turn, who owns the slot now."""
        errors = []
        for host, port in list(self.known):
            client = make_client(_node_url(self.url, host, port), tls=self.tls)
            try:
                slot = int(await client.execute_command("CLUSTER", "KEYSLOT", self.tag))  # type: ignore[no-untyped-call]
                ranges = cast(list[list[Any]], await client.execute_command("CLUSTER", "SLOTS"))  # type: ignore[no-untyped-call]
            except Exception as exc:  # try the next node
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                await client.aclose()
            nodes = [(text(n[0]), int(n[1])) for r in ranges for n in r[2:]]
            self.known = list(dict.fromkeys([*self.known, *nodes]))
            for start, end, primary, *_ in ranges:
                if int(start) <= slot <= int(end):
                    return text(primary[0]), int(primary[1])
            errors.append(f"{host}:{port}: slot {slot} of {self.tag} is not served")
        raise RedisUnavailable(self.url, "; ".join(errors) or "no cluster node answered")

    async def url_of_master(self) -> str:
        host, port = await self.master()
        return _node_url(self.url, host, port)

    async def follow(self, client: Redis) -> None:
        """Point ``client``'s connections at the slot's current master, if it moved."""
        host, port = await self.master()
        pool = client.connection_pool
        if (pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")) != (host, port):
            log.warning("the namespace's slot moved: following it", master=f"{host}:{port}")
            pool.connection_kwargs.update(host=host, port=port)
            # Pooled connections keep their own address and reconnect to it: repoint them
            # too (redis-py offers no public way to), then drop their sockets.
            existing = [*getattr(pool, "_available_connections", []), *getattr(pool, "_in_use_connections", [])]
            for connection in existing:
                connection.host, connection.port = host, port
            await pool.disconnect(inuse_connections=True)


async def cluster_client(
    url: str, namespace: str, tls: Tls | None = None, *, max_connections: int = 128
) -> tuple[Redis, Callable[[], Awaitable[None]]]:
    """A client on the master owning the namespace's slot, and the hook that points it
    at the slot's new master after a failover or resharding."""
    owner = SlotOwner(url, namespace, tls)
    client = make_client(await owner.url_of_master(), max_connections=max_connections, tls=tls)

    async def follow() -> None:
        await owner.follow(client)

    return client, follow


async def namespace_url(url: str, namespace: str, tls: Tls | None = None) -> str:
    """``url`` itself, or for a cluster URL the URL of the master owning the namespace."""
    return await SlotOwner(url, namespace, tls).url_of_master() if is_cluster_url(url) else url
