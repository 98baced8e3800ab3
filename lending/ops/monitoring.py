"""Serving a worker's metrics and probes on ``--metrics-host``:``--metrics-port``.

``GET /metrics`` answers in the Prometheus text format. The probes answer 200 or 503:
``/livez`` while the process and its loops are alive (a Redis outage does not fail it:
restarting the worker would not bring Redis back), ``/readyz`` (and ``/healthz``, its
older name) while the worker is connected and consuming. The gauges are read from
Redis by ``refresh``, every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis

from lending.domain.streamids import id_ms
from lending.errors import MetricsUnavailable
from lending.keys import Keys
from lending.metrics import Metrics
from lending.ops.status import read_group

Probe = Callable[[], bool]


async def refresh(metrics: Metrics, client: Redis, keys: Keys) -> None:
    """Update the gauges from Redis: the group reads of ``status``, without its scans
    of workers and user counts (this runs every few seconds in every worker)."""
    for stream, group in keys.consumed():
        state = await read_group(client, stream, group, live=set())
        metrics.lag.labels(stream, group).set(state["lag"])
        metrics.pending.labels(stream, group).set(state["pending"])
        oldest = state["oldest_pending_id"]
        # From the entry's ID, not its idle time: a worker renews the entries it holds.
        age_s = max(0.0, time.time() * 1000 - id_ms(oldest)) / 1000 if oldest else 0.0
        metrics.oldest_pending_age.labels(stream, group).set(age_s)
    metrics.storage_books.set(await client.scard(keys.storage))
    metrics.books_lent.set(await client.hlen(keys.lent_books))
    metrics.dead_letters_waiting.set(await client.xlen(keys.dead_letters))


async def serve(metrics: Metrics, host: str, port: int, *, live: Probe, ready: Probe) -> asyncio.Server:
    """A minimal HTTP/1.0 server for ``/metrics``, ``/livez``, ``/readyz`` and ``/healthz``.

    :raises MetricsUnavailable: it cannot listen on ``host:port`` (say, the port is taken).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/metrics"):
                status, body, ctype = "200 OK", generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif path.startswith(("/livez", "/readyz", "/healthz")):
                ok = live() if path.startswith("/livez") else ready()
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

    try:
        return await asyncio.start_server(handle, host, port)
    except OSError as exc:
        raise MetricsUnavailable(host, port, exc) from exc
