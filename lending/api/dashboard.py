"""The live dashboard (``GET /``): one page, and the aggregated snapshots it is fed.

The page (``static/``: plain HTML, CSS and a script, no build step, nothing from
another host) opens ``GET /v1/dashboard/stream``, Server-Sent Events with one
``snapshot`` a second. No event goes to the browser as it is: the events tail's
listener feeds the ``Aggregates`` (per-second counts and latency percentiles, a bounded
tail of the latest outcomes) in O(1) per event, and once a second one snapshot is
built, encoded once, and sent to every browser watching. The status part (storage,
books lent, workers, groups, dead letters) is read from Redis by ``read_overview`` at
most once per ``refresh_s`` per API process, however many browsers watch, and only
while one does.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from functools import cache
from importlib import resources
from typing import Any

import orjson
import structlog
from fastapi import APIRouter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response, StreamingResponse

from lending.api import problems as p
from lending.api import schemas, sse
from lending.api.aggregate import Aggregates, Heartbeats
from lending.api.problems import JsonResponse, Problem
from lending.api.tail import EventTail
from lending.domain.events import Event
from lending.keys import Keys
from lending.ops.status import read_overview
from lending.redis.replies import is_transient
from lending.redis.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

#: Completed seconds a per-second snapshot carries (the first one a browser gets carries
#: the whole window): a browser that missed a snapshot still gets every second.
RECENT_SECONDS = 5
#: Latest outcomes a snapshot carries.
SNAPSHOT_OUTCOMES = 25
#: The page may load its own script, style and stream, and nothing from anywhere else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: The page's files: name -> media type.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}


class Dashboard:
    """What one API process's dashboard knows, and the snapshots it sends.

    :param client: the namespace's Redis (the status reads).
    :param keys: the namespace.
    :param tail: the process's events tail: the dashboard listens to it.
    :param window_s: seconds of rates and latencies kept (and drawn).
    :param outcomes: latest outcomes kept.
    :param refresh_s: the status is read at most once per this many seconds, and a
        snapshot sent as often.
    :param clock: Unix time in seconds (tests pass their own).
    """

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        tail: EventTail,
        *,
        window_s: int = 300,
        outcomes: int = 50,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._keys = keys
        self._tail = tail
        self.refresh_s = refresh_s
        self._clock = clock
        self.aggregates = Aggregates(window_s, outcomes)
        self.heartbeats = Heartbeats()
        #: How many times the status was read from Redis.
        self.status_reads = 0
        self._status: dict[str, Any] | None = None
        self._status_error: str | None = None
        self._status_at = -math.inf  # time.monotonic() of the last read's start
        self._reading = asyncio.Lock()
        self._frame = b""
        self._version = 0
        self._published = asyncio.Event()
        self._watchers = 0
        self._ticker: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._closed = False

    def start(self) -> None:
        """Listen to the events tail (before it starts, so that no event is missed)."""
        self._remove_listener = self._tail.add_listener(self.observe)

    def observe(self, event: Event) -> None:
        """The tail's listener: count ``event`` in the aggregates."""
        self.aggregates.observe(event, self._clock())

    @property
    def watchers(self) -> int:
        """Browsers (streams) watching now."""
        return self._watchers

    def release(self) -> None:
        """End every stream (on shutdown, so that none holds the server up)."""
        self._closed = True
        self._published.set()

    async def close(self) -> None:
        """Stop listening and sending (idempotent)."""
        self.release()
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])  # again while it lingers (a lost cancellation)
            self._ticker = None

    # -- the snapshot --------------------------------------------------------------------

    async def status(self) -> tuple[dict[str, Any] | None, str | None]:
        """The status part of a snapshot and the error of its last read (``None``: read
        fine): read again when the last read started ``refresh_s`` ago or more, by one
        caller at a time; the others get what it read."""
        if time.monotonic() - self._status_at < self.refresh_s:
            return self._status, self._status_error
        async with self._reading:
            if time.monotonic() - self._status_at < self.refresh_s:
                return self._status, self._status_error  # read while this caller waited
            self._status_at = time.monotonic()
            self.status_reads += 1
            try:
                overview = await read_overview(self._client, self._keys, self._clock() * 1000)
            except (RedisError, OSError) as exc:
                # The page is public: it says what kind of failure, the log says the rest
                # (Redis's address, a key or a command name), once per kind of failure.
                shown = _public_error(exc)
                if shown != self._status_error:
                    log.warning("dashboard: could not read the status", error=str(exc) or type(exc).__name__)
                self._status_error = shown
            else:
                self._status = self._shown(overview)
                self._status_error = None
        return self._status, self._status_error

    def _shown(self, overview: dict[str, Any]) -> dict[str, Any]:
        """What of ``read_overview`` the page shows: no host or process id of a worker
        (the page is public, as ``/v1/events`` is; ``/v1/status`` needs the token)."""
        ages = self.heartbeats.observe({w["worker_id"]: w["ttl_ms"] for w in overview["workers"]})
        prefix = self._keys.prefix + ":"
        return {
            "storage": overview["storage"],
            "books_lent": overview["books_lent"],
            "dead_letters": overview["dead_letters"],
            "workers": [
                {
                    "worker_id": w["worker_id"],
                    "heartbeat_age_ms": ages.get(w["worker_id"]),
                    "ttl_ms": w["ttl_ms"],
                    "uptime_s": w["uptime_s"],
                    "processed": w["processed"],
                    "failed": w["failed"],
                    "version": w["version"],
                }
                for w in overview["workers"]
            ],
            "groups": [
                {
                    "stream": g["stream"].removeprefix(prefix),
                    "group": g["group"],
                    "exists": g["exists"],
                    "lag": g["lag"],
                    "pending": g["pending"],
                    "oldest_pending_age_ms": g["oldest_pending_age_ms"],
                    "dead_consumers": len(g["dead_consumers"]),
                }
                for g in overview["groups"]
            ],
        }

    async def snapshot(self, *, history: bool = True) -> dict[str, Any]:
        """The dashboard's state now: the status (read at most once per ``refresh_s``), the
        rates and latencies of the completed seconds (the whole window with ``history``,
        else the last few), the latest outcomes."""
        status, error = await self.status()
        now = self._clock()
        seconds = self.aggregates.throughput.seconds(now)
        return {
            "at_ms": int(now * 1000),
            "namespace": self._keys.namespace,
            "refresh_s": self.refresh_s,
            "window_s": self.aggregates.throughput.window_s,
            "status": status,
            "status_error": error,
            "tail_connected": self._tail.connected,
            "seconds": [s.as_json() for s in (seconds if history else seconds[-RECENT_SECONDS:])],
            "outcomes_seen": self.aggregates.seen,
            "totals": dict(self.aggregates.totals),
            "outcomes": self.aggregates.latest(SNAPSHOT_OUTCOMES),
        }

    # -- the stream ----------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[bytes]:
        """The SSE frames of one browser: the whole snapshot at once, then the snapshot
        every browser gets, once per ``refresh_s``. A browser slower than that skips
        snapshots (it gets the latest), nothing queues up for it."""
        self._watchers += 1
        self._ensure_ticker()
        try:
            yield sse.RETRY_FRAME
            version = self._version
            yield sse.frame(orjson.dumps(await self.snapshot(history=True)), event="snapshot")
            while not self._closed:
                if self._version == version:
                    await self._published.wait()
                    continue
                version = self._version
                yield self._frame
            yield sse.comment("closing; reconnect to go on")
        finally:
            self._watchers -= 1

    def _ensure_ticker(self) -> None:
        if self._ticker is None and not self._closed:
            self._ticker = asyncio.create_task(self._tick(), name="dashboard-ticker")

    async def _tick(self) -> None:
        """While a browser watches: just after each second, when the status may be read
        again, build the snapshot and wake every stream."""
        try:
            while self._watchers > 0 and not self._closed:
                now = self._clock()
                to_next_second = math.floor(now) + 1.02 - now
                until_readable = self._status_at + self.refresh_s - time.monotonic()
                await asyncio.sleep(max(to_next_second, until_readable, 0.0))
                if self._watchers == 0:  # the last one left meanwhile
                    break
                try:
                    snapshot = await self.snapshot(history=False)
                except Exception:
                    log.exception("dashboard: could not build a snapshot")
                    continue
                self._publish(sse.frame(orjson.dumps(snapshot), event="snapshot"))
        finally:
            self._ticker = None

    def _publish(self, data: bytes) -> None:
        self._frame = data
        self._version += 1
        published, self._published = self._published, asyncio.Event()
        published.set()


@cache
def asset(name: str) -> bytes:
    """A file of the page, read from the package once."""
    return resources.files("lending.api").joinpath("static", name).read_bytes()


def dashboard_routes(dashboard: Dashboard) -> APIRouter:
    """The page (``GET /`` and its files) and its data (``/v1/dashboard``, ``/v1/dashboard/stream``)."""
    router = APIRouter(tags=["dashboard"])
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY}

    @router.get("/", response_model=None, include_in_schema=False)
    async def get_page() -> Response:
        return Response(asset("index.html"), media_type=ASSETS["index.html"], headers=page_headers)

    @router.get("/dashboard/{name}", response_model=None, include_in_schema=False)
    async def get_asset(name: str) -> Response:
        if name == "index.html" or name not in ASSETS:
            raise Problem(p.NOT_FOUND, f"no dashboard file {name[:60]!r}")
        return Response(asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @router.get(
        "/v1/dashboard",
        response_model=None,
        responses={200: schemas.json_body("The dashboard's snapshot: what the page shows", {"type": "object"})},
    )
    async def get_snapshot() -> Response:
        """What the dashboard shows now: storage, books lent, workers, groups, dead letters
        (read at most once a second), outcomes and latencies per second over the window,
        the latest outcomes."""
        return JsonResponse(await dashboard.snapshot(history=True))

    @router.get(
        "/v1/dashboard/stream",
        response_model=None,
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `event: snapshot` once a second; the first one carries "
                "every second of the window, the next ones the last few",
                "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    async def get_stream() -> Response:
        """The dashboard's snapshots, one a second, as Server-Sent Events."""
        return StreamingResponse(
            dashboard.frames(),
            media_type=sse.MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


def _public_error(exc: BaseException) -> str:
    """What the public page may say about a failed status read."""
    if is_transient(exc):  # as redis_problem tells a 503 from a refusal
        return "Redis did not answer; trying again"
    return f"Redis refused the status read ({type(exc).__name__}); the API's log says why"
