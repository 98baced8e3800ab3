"""Running the API: connect to Redis, then serve the application on uvicorn until a signal.

The first SIGINT or SIGTERM stops accepting connections, answers every waiter at once
(504: the request stays queued), ends the SSE streams and lets open requests finish (up
to ``shutdown_grace_s``); the exit code is then 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import structlog
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from lending.api.app import build_app
from lending.api.config import ApiSettings
from lending.api.fastpath import Submissions
from lending.api.metrics import Measured
from lending.api.protocol import ApiHttpProtocol
from lending.api.state import Api, FindRedis
from lending.app import run_fast
from lending.errors import ApiPortUnavailable
from lending.interrupts import stop_signals
from lending.logs import announce
from lending.redis.cluster import cluster_client, is_cluster_url
from lending.redis.connection import check_reachable, make_client, redacted

log = structlog.get_logger(__name__)

READY_MESSAGE = "API ready on"


class ApiServer(uvicorn.Server):
    """uvicorn's server, with the package's way of stopping (SIGINT/SIGTERM through the
    event loop, and the waiters released at once) and its ready line.

    :param handle_signals: install the signal handlers (off for tests and embedding; they
        call ``handle_sig`` or set ``should_exit`` themselves).
    """

    def __init__(self, config: uvicorn.Config, api: Api, *, handle_signals: bool = True) -> None:
        super().__init__(config)
        self.api = api
        self._handle_signals = handle_signals
        self._signals = 0

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        signals = stop_signals()
        for sig in signals:
            loop.add_signal_handler(sig, partial(self.handle_sig, sig))
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def handle_sig(self, signum: int) -> None:
        """First signal: stop, releasing the waiters and SSE streams. Second: at once."""
        self._signals += 1
        if self._signals > 1:
            self.force_exit = True
            log.warning("second signal: exiting now", signal=signum)
            return
        self.should_exit = True
        self.api.release_all()
        log.info("stopping: finishing open requests", signal=signal.Signals(signum).name)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            announce(f"{READY_MESSAGE} {self.url}")

    @property
    def url(self) -> str:
        """The address served (the port the system chose, for port 0)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def front_door(app: FastAPI, api: Api) -> ASGIApp:
    """What uvicorn serves: ``app``, behind the submission fast path, every response measured."""
    return Measured(Submissions(app, api), api.metrics)


def api_server(app: FastAPI, api: Api, settings: ApiSettings, *, handle_signals: bool = True) -> ApiServer:
    """The server of ``app`` (``build_app(api)``, perhaps with more routes) on ``settings``,
    its connections counted in ``api.metrics``."""
    limit = settings.client_limit()
    server = ApiServer(
        uvicorn_config(front_door(app, api), settings, limit, api.metrics.refuse), api, handle_signals=handle_signals
    )
    api.metrics.watch_connections(lambda: len(server.server_state.connections), limit)
    return server


def uvicorn_config(
    app: object, settings: ApiSettings, max_clients: int, on_refused: Callable[[str], None] | None = None
) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]  # an ASGI application; uvicorn's own type names a few
        host=settings.host,
        port=settings.port,
        http=ApiHttpProtocol.limited(max_clients, on_refused),
        lifespan="on",
        access_log=settings.access_log,
        # Our logging: uvicorn's records go to structlog (``forward_uvicorn_logs``).
        log_config=None,
        server_header=False,
        ws="none",  # no WebSocket endpoint: an Upgrade request is served as plain HTTP
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        backlog=4096,
    )


def serve(settings: ApiSettings) -> int:
    """Run the API until stopped; returns the exit code.

    :raises ApiPortUnavailable: it cannot listen on ``--host``:``--port`` (checked first,
        before Redis is reached).
    :raises RedisUnavailable: Redis does not answer at start.
    """
    listeners = listen(settings.host, settings.port)
    try:
        return run_fast(_serve(settings, listeners), use_uvloop=settings.uvloop)
    finally:
        for sock in listeners:
            sock.close()


def listen(host: str, port: int) -> list[socket.socket]:
    """The API's listening sockets, bound before anything starts: a port taken, or an
    address that is not this host's, is one error line rather than a log line once the
    API has reached Redis (uvicorn binds last). Bound as asyncio's ``create_server``
    binds: every address ``host`` names (``""``: every interface), IPv6 sockets IPv6
    only, and with port 0 the one port the first bind got.

    :raises ApiPortUnavailable: one of them cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:  # no such host
        raise ApiPortUnavailable(host, port, exc) from exc
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:  # the same free port on every address
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise ApiPortUnavailable(host, port, exc) from exc
    return bound


async def _serve(settings: ApiSettings, listeners: list[socket.socket]) -> int:
    forward_uvicorn_logs(settings.log_level)
    find_redis: FindRedis | None = None
    if is_cluster_url(settings.redis_url):
        # Both clients follow the namespace's slot to its new master after a failover.
        client, follow = await cluster_client(
            settings.redis_url, settings.namespace, settings.tls, max_connections=settings.max_connections
        )
        tail_client, follow_tail = await cluster_client(
            settings.redis_url, settings.namespace, settings.tls, max_connections=2
        )

        async def follow_both() -> bool:
            moved = await follow()
            return await follow_tail() or moved

        find_redis = follow_both
    else:
        client = make_client(settings.redis_url, max_connections=settings.max_connections, tls=settings.tls)
        tail_client = make_client(settings.redis_url, max_connections=2, tls=settings.tls)
    try:
        await check_reachable(client, redacted(settings.redis_url))
        api = Api(settings, client, tail_client, find_redis)
        server = api_server(build_app(api), api, settings)
        await server.serve(sockets=listeners)
        return 0 if server.started else 1
    finally:
        await tail_client.aclose()
        await client.aclose()


class _ToStructlog(logging.Handler):
    """uvicorn logs with the standard library: its records, through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        method = getattr(logger, record.levelname.lower(), logger.info)
        method(record.getMessage(), exc_info=record.exc_info or False)


def forward_uvicorn_logs(level: str) -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [_ToStructlog()]
        logger.setLevel(level.upper())
        logger.propagate = False
