"""Redis Cluster: a namespace lives on the one shard that owns its ``{NS}`` hash slot.

Every key of a namespace carries the hash tag ``{NS}``, so all its scripts and
transactions touch one slot. Rather than a cluster client (redis-py's asyncio cluster
client cannot run WATCH/MULTI), the service talks to the master that owns that slot
over a direct connection, and finds the owner again after ``MOVED``/``ASK`` (resharding,
failover) or a lost connection.

URLs: ``redis+cluster://host:port`` (or ``rediss+cluster://``) names one node of the
cluster, ``redis+cluster://user:password@h1:p1,h2:p2`` several (seeds, asked in turn);
credentials, TLS and the rest of the URL apply to every node.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from lending.errors import RedisUnavailable
from lending.keys import Keys
from lending.redis.connection import make_client, redacted
from lending.redis.replies import text
from lending.settings import Tls

log = structlog.get_logger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379

Node = tuple[str, int]


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterUrl:
    """A cluster URL, parsed once: its seed nodes, and what applies to every node.

    :param scheme: the scheme of a node's URL, ``redis`` or ``rediss``.
    :param userinfo: ``user:password@`` as given (percent-encoded), or ``""``.
    :param seeds: the nodes named, in order.
    :param tail: the path and query, as given (``/0``, ``?...``), or ``""``.
    :param redacted: the URL without its password, for messages.
    """

    scheme: str
    userinfo: str
    seeds: tuple[Node, ...]
    tail: str
    redacted: str

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        """:raises RedisUnavailable: ``url`` names no usable node (the message hides the password)."""
        scheme, _, rest = url.partition("://")
        credentials, at, location = rest.rpartition("@")
        end = min((i for i in map(location.find, "/?#") if i >= 0), default=len(location))
        hosts = location[:end].split(",")
        try:
            if len(hosts) > 1 and "" in hosts:
                raise ValueError("an empty seed (host:port, separated by commas)")
            seeds = tuple(_seed(seed) for seed in hosts)
        except ValueError as exc:
            raise RedisUnavailable(redacted(url), str(exc)) from None
        return cls(CLUSTER_SCHEMES.get(scheme, scheme), credentials + at, seeds, location[end:], redacted(url))

    def node_url(self, host: str, port: int) -> str:
        """The URL of one node: this URL's scheme, credentials, path and query."""
        address = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{self.userinfo}{address}:{port}{self.tail}"


def _seed(seed: str) -> Node:
    """``host:port``, ``[IPv6]:port`` or ``host`` (port 6379) as a node; no host is 127.0.0.1."""
    match = re.fullmatch(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))(?::(?P<port>.*))?", seed)
    if match is None:
        raise ValueError(f"seed {seed!r} is not host:port ([address]:port for IPv6)")
    host, port = match["v6"] or match["host"], match["port"]
    if not port:
        return host or "127.0.0.1", DEFAULT_PORT
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"seed {seed!r} has no valid port (host:port, separated by commas)")
    return host or "127.0.0.1", int(port)


def slot_owner(ranges: Sequence[Sequence[Any]], slot: int, asked: str) -> Node | None:
    """The master serving ``slot`` in a ``CLUSTER SLOTS`` reply of node ``asked``."""
    for start, end, primary, *_ in ranges:
        if int(start) <= slot <= int(end):
            return text(primary[0]) or asked, int(primary[1])
    return None


class SlotOwner:
    """Finds the master owning a namespace's slot, starting from a cluster URL's seeds."""

    def __init__(self, url: str | ClusterUrl, namespace: str, tls: Tls | None = None) -> None:
        self.url = url if isinstance(url, ClusterUrl) else ClusterUrl.parse(url)
        self.tls = tls
        self.tag = Keys(namespace).prefix
        self.slot = key_slot(self.tag.encode())
        self.known: list[Node] = list(self.url.seeds)

    async def master(self) -> Node:
        """Ask the known nodes in turn (the seeds first) who owns the slot now, and check
        with the owner named: after a failover a node may not have heard of the new master
        yet, while the new master knows at once. If no owner agrees (it may be down, being
        failed over), the first answer stands.

        :raises RedisUnavailable: no node answered, or none knows a master of the slot.
        """
        errors: list[str] = []
        first: Node | None = None
        for node in list(self.known):
            owner = await self._owner_by(node, errors)
            for _ in range(2):  # the owner named, and the one it names in turn
                if owner is None or owner == node:
                    break
                first = first or owner
                node, owner = owner, await self._owner_by(owner, errors)
            if owner is not None and owner == node:
                return owner
        if first is not None:
            return first
        raise RedisUnavailable(self.url.redacted, "; ".join(dict.fromkeys(errors)) or "no cluster node answered")

    async def _owner_by(self, node: Node, errors: list[str]) -> Node | None:
        """The master of the slot according to ``node`` (``None``: no answer, noted in ``errors``);
        the nodes it knows become known."""
        host, port = node
        client = make_client(self.url.node_url(host, port), max_connections=1, tls=self.tls)
        try:
            ranges = cast(list[list[Any]], await client.execute_command("CLUSTER", "SLOTS"))  # type: ignore[no-untyped-call]
        except Exception as exc:
            errors.append(f"{host}:{port}: {exc}")
            return None
        finally:
            await client.aclose()
        nodes = [(text(n[0]) or host, int(n[1])) for r in ranges for n in r[2:]]
        self.known = list(dict.fromkeys([*self.known, *nodes]))
        owner = slot_owner(ranges, self.slot, host)
        if owner is None:
            errors.append(f"{host}:{port}: slot {self.slot} of {self.tag} is not served")
        return owner

    async def url_of_master(self) -> str:
        host, port = await self.master()
        return self.url.node_url(host, port)


class FollowingPool(ConnectionPool):
    """A connection pool that can be pointed at another server: the slot's new master.

    Idle connections move at once. A connection in use is left alone until it comes back
    to the pool: what runs on it goes on with the old master and fails there (``MOVED``,
    ``UNBLOCKED``, a connection gone) rather than on the new one unawares; a transaction
    that WATCHed keys on the old master must not commit on the new one without its WATCH.
    (Closing it under its user would not do: redis-py reconnects a closed connection
    silently, and a write under way on it fails with an ``AttributeError``.)
    """

    def address(self) -> Node:
        return str(self.connection_kwargs.get("host")), int(self.connection_kwargs.get("port", DEFAULT_PORT))

    async def move_to(self, host: str, port: int) -> bool:
        """Point the pool at ``host:port``; ``False`` when it already was."""
        if self.address() == (host, port):
            return False
        self.connection_kwargs.update(host=host, port=port)
        idle = list(self._available_connections)
        for connection in idle:
            _point(connection, host, port)
        await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
        return True

    async def release(self, connection: AbstractConnection) -> None:
        host, port = self.address()
        if (getattr(connection, "host", host), getattr(connection, "port", port)) != (host, port):
            await connection.disconnect()
            _point(connection, host, port)
        await super().release(connection)


def _point(connection: AbstractConnection, host: str, port: int) -> None:
    # redis-py offers no public way to move a connection: host and port are plain attributes.
    connection.host, connection.port = host, port  # type: ignore[attr-defined]


async def cluster_client(
    url: str, namespace: str, tls: Tls | None = None, *, max_connections: int = 128
) -> tuple[Redis, Callable[[], Awaitable[bool]]]:
    """A client on the master owning the namespace's slot, and the hook that points it at
    the slot's current master (after a failover or resharding); the hook returns ``True``
    when the master changed."""
    owner = SlotOwner(url, namespace, tls)
    client = make_client(
        await owner.url_of_master(), max_connections=max_connections, tls=tls, pool_class=FollowingPool
    )
    pool = cast(FollowingPool, client.connection_pool)

    async def follow() -> bool:
        host, port = await owner.master()
        moved = await pool.move_to(host, port)
        if moved:
            log.warning("the namespace's slot moved: following it", master=f"{host}:{port}")
        return moved

    return client, follow


async def namespace_url(url: str, namespace: str, tls: Tls | None = None) -> str:
    """``url`` itself, or for a cluster URL the URL of the master owning the namespace."""
    return await SlotOwner(url, namespace, tls).url_of_master() if is_cluster_url(url) else url
