"""Prometheus metrics and a health check, served on ``--metrics-port``.

``GET /metrics`` answers in the Prometheus text format; ``GET /healthz`` answers 200
while the worker is connected and consuming, 503 otherwise. Each worker has its own
registry, so several workers (or tests) can live in one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis

from .keys import Keys
from .status import consumed_streams, read_group


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lending_requests", "Requests processed, by action and status",
                                ["action", "status"], registry=r)
        self.batch_seconds = Histogram(
            "lending_batch_seconds", "Time to process one batch of requests", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.retries = Counter("lending_retries", "Entries whose processing failed and will be retried",
                               ["consumer"], registry=r)
        self.reclaims = Counter("lending_reclaims", "Entries taken over from other consumers",
                                ["consumer"], registry=r)
        self.dead_letters = Counter("lending_dead_letters", "Entries dead-lettered", ["consumer"], registry=r)
        self.watch_conflicts = Counter("lending_watch_conflicts", "Commits aborted by a WATCH conflict", registry=r)
        self.reconnects = Counter("lending_redis_reconnects", "Times a consumer got Redis back after losing it",
                                  ["consumer"], registry=r)
        self.lag = Gauge("lending_stream_lag", "Entries not yet read by the group", ["stream", "group"], registry=r)
        self.pending = Gauge("lending_stream_pending", "Entries read but not acknowledged", ["stream", "group"],
                             registry=r)
        self.storage_books = Gauge("lending_storage_books", "Books in automated storage", registry=r)
        self.books_lent = Gauge("lending_books_lent", "Books lent", registry=r)

    async def refresh(self, client: Redis, keys: Keys) -> None:
        """Update the gauges from Redis: the group reads of ``status``, without its scans
        of workers and user counts (this runs every few seconds in every worker)."""
        for stream, group in consumed_streams(keys):
            state = await read_group(client, stream, group, live=set())
            self.lag.labels(stream, group).set(state["lag"])
            self.pending.labels(stream, group).set(state["pending"])
        self.storage_books.set(await client.scard(keys.storage))
        self.books_lent.set(await client.hlen(keys.lent_books))


async def serve(metrics: Metrics, port: int, healthy: Callable[[], bool], host: str = "0.0.0.0") -> asyncio.Server:
    """A minimal HTTP/1.0 server for ``/metrics`` and ``/healthz``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/metrics"):
                status, body, ctype = "200 OK", generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                ok = healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                body, ctype = (b"ok\n" if ok else b"unavailable\n"), "text/plain"
            else:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
