"""``simulator bench``: the standard benchmark.

1. drain throughput: N requests queued first, then W workers started; requests per
   second from the first event to the last (worker start-up is not counted);
2. the same for each W of ``workers``;
3. latency under a fixed offered load, open loop, one worker, ``rate_duration_s`` each;
4. Redis commands (scripts' inner commands included) and Redis CPU per request, from
   ``INFO commandstats`` / ``INFO cpu`` deltas over each drain; worker CPU and memory.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from lending.keys import Keys
from lending.ops import checker
from lending.redis.cluster import namespace_url
from lending.redis.connection import check_reachable, make_client, redacted
from lending.redis.replies import Entries, text
from lending.settings import Tls

from .deployment import Deployment, process_cpu_s, process_rss_mb
from .driver import Driver
from .stats import latency_summary
from .workload import Workload


@dataclass(frozen=True)
class BenchOptions:
    redis_url: str | None = None
    requests: int = 20_000
    users: int = 2_000
    catalogue: int = 50_000
    workers: tuple[int, ...] = (1, 2, 4)
    rates: tuple[float, ...] = (200, 500, 1000, 2000)
    rate_duration_s: float = 10.0
    seed: int = 1
    tls: Tls = field(default_factory=Tls)
    namespaces: int = 1  # > 1: also drain that many namespaces at once (one per master in a cluster)


async def benchmark(options: BenchOptions) -> dict[str, Any]:
    server = Deployment("bench", redis_url=options.redis_url)
    await asyncio.to_thread(server.start)
    client = make_client(await namespace_url(server.redis_url, "bench", options.tls), tls=options.tls)
    try:
        await check_reachable(client, redacted(server.redis_url))
        info = await client.info("server")
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": (
                f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
            ),
            "redis_version": info.get("redis_version"),
            "options": {k: v for k, v in asdict(options).items() if k not in ("redis_url", "tls")},
            "drain": [],
            "latency": [],
        }
        for workers in options.workers:
            results["drain"].append(await _drain(server.redis_url, options, workers))
        for rate in options.rates:
            results["latency"].append(await _latency(server.redis_url, options, rate))
        if options.namespaces > 1:
            results["namespaces"] = await _drain_namespaces(server.redis_url, options)
        return results
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def _namespace_client(url: str, namespace: str, options: BenchOptions) -> Redis:
    """A client on the Redis serving ``namespace`` (its slot's master, in a cluster)."""
    return make_client(await namespace_url(url, namespace, options.tls), tls=options.tls)


async def _in_fresh_namespace(
    url: str, name: str, options: BenchOptions, run: Callable[[Redis, str], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``run(client, namespace)`` in a new namespace, with a client on its Redis."""
    namespace = f"{name}-{uuid.uuid4().hex[:6]}"
    client = await _namespace_client(url, namespace, options)
    try:
        return await run(client, namespace)
    finally:
        await client.aclose()


async def _drain(url: str, options: BenchOptions, workers: int) -> dict[str, Any]:
    return await _in_fresh_namespace(
        url, f"bench-drain-{workers}", options, lambda c, ns: _drain_on(c, url, ns, options, workers)
    )


async def _drain_on(client: Redis, url: str, namespace: str, options: BenchOptions, workers: int) -> dict[str, Any]:
    keys = Keys(namespace)
    await queue_requests(
        client, keys, Workload(users=options.users, catalogue=options.catalogue, seed=options.seed), options.requests
    )
    before = await _redis_counters(client)
    deployment = Deployment(
        namespace, redis_url=url, workers=workers, worker_args=("--log-level", "warning"), worker_env=options.tls.env()
    )
    await asyncio.to_thread(deployment.start)
    try:
        cpu_start = {pid: process_cpu_s(pid) for pid in deployment.worker_pids()}
        rss = 0.0
        deadline = time.monotonic() + 600
        while await client.xlen(keys.events) < options.requests and time.monotonic() < deadline:
            rss = max([rss] + [process_rss_mb(pid) for pid in deployment.worker_pids()])
            await asyncio.sleep(0.1)
        after = await _redis_counters(client)
        worker_cpu = sum(process_cpu_s(pid) - cpu_start.get(pid, 0.0) for pid in deployment.worker_pids())
        first = cast(Entries, await client.xrange(keys.events, count=1))
        last = cast(Entries, await client.xrevrange(keys.events, count=1))
        span_ms = max(1, _ms(text(last[0][0])) - _ms(text(first[0][0])))
        report = await checker.check(client, namespace, wait_quiescent_s=60)
    finally:
        await asyncio.to_thread(deployment.stop)
    n = options.requests
    return {
        "workers": workers,
        "requests": n,
        "events": await client.xlen(keys.events),
        "throughput_rps": round(n / (span_ms / 1000.0), 1),
        "redis_commands_per_request": round((after["calls"] - before["calls"]) / n, 2),
        "redis_cpu_us_per_request": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / n, 1),
        "worker_cpu_ms_per_request": round(worker_cpu * 1000 / n, 3),
        "worker_rss_mb_max": round(rss, 1),
        "commands": _top_commands(before["by_command"], after["by_command"], n),
        "check_clean": report.clean,
    }


async def queue_requests(client: Redis, keys: Keys, workload: Workload, n: int) -> None:
    """XADD ``n`` requests of ``workload``, 1,000 per pipeline."""
    for start in range(0, n, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(min(1000, n - start)):
                request = workload.next_request()
                pipe.xadd(
                    keys.requests(request.action), {"user_id": request.user_id, "book_ids": ",".join(request.book_ids)}
                )
            await pipe.execute()


async def _drain_namespaces(url: str, options: BenchOptions) -> dict[str, Any]:
    """Drain ``options.namespaces`` namespaces at once, one worker each; in a cluster the
    namespaces are picked so that each lives on a different master (as far as there are)."""
    by_master: dict[str, str] = {}
    for _ in range(200):
        if len(by_master) == options.namespaces:
            break
        namespace = f"bench-ns-{uuid.uuid4().hex[:6]}"
        by_master.setdefault(await namespace_url(url, namespace, options.tls), namespace)
    namespaces = list(by_master.values())
    while len(namespaces) < options.namespaces:  # fewer masters than namespaces
        namespaces.append(f"bench-ns-{uuid.uuid4().hex[:6]}")
    clients = [await _namespace_client(url, ns, options) for ns in namespaces]
    try:
        runs = await asyncio.gather(
            *(_drain_on(c, url, ns, options, 1) for c, ns in zip(clients, namespaces, strict=True))
        )
        spans = [await _event_span(c, Keys(ns)) for c, ns in zip(clients, namespaces, strict=True)]
    finally:
        for c in clients:
            await c.aclose()
    total = sum(run["requests"] for run in runs)
    span_s = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1000.0
    return {
        "namespaces": len(namespaces),
        "masters": len(by_master),
        "requests": total,
        "throughput_rps": round(total / max(span_s, 0.001), 1),
        "per_namespace": runs,
    }


async def _event_span(client: Redis, keys: Keys) -> tuple[int, int]:
    first = cast(Entries, await client.xrange(keys.events, count=1))
    last = cast(Entries, await client.xrevrange(keys.events, count=1))
    return _ms(text(first[0][0])), _ms(text(last[0][0]))


async def _latency(url: str, options: BenchOptions, rate: float) -> dict[str, Any]:
    return await _in_fresh_namespace(
        url, f"bench-latency-{int(rate)}", options, lambda c, ns: _latency_on(c, url, ns, options, rate)
    )


async def _latency_on(client: Redis, url: str, namespace: str, options: BenchOptions, rate: float) -> dict[str, Any]:
    deployment = Deployment(
        namespace, redis_url=url, workers=1, worker_args=("--log-level", "warning"), worker_env=options.tls.env()
    )
    await asyncio.to_thread(deployment.start)
    try:
        driver = Driver(
            client,
            Keys(namespace),
            Workload(users=options.users, catalogue=options.catalogue, seed=options.seed),
            rate=rate,
            duration_s=options.rate_duration_s,
        )
        rss = [0.0]

        async def sample() -> None:
            while True:
                rss[0] = max([rss[0]] + [process_rss_mb(pid) for pid in deployment.worker_pids()])
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        report = await driver.run(drain_timeout_s=60)
        sampler.cancel()
    finally:
        await asyncio.to_thread(deployment.stop)
    return {
        "offered_rps": rate,
        "requests": report.sent,
        "missing": report.missing,
        "duplicated": report.duplicated,
        **latency_summary(report.latencies_ms),
        "worker_rss_mb_max": round(rss[0], 1),
    }


async def _redis_counters(client: Redis) -> dict[str, Any]:
    stats = await client.info("commandstats")
    cpu = await client.info("cpu")
    by_command = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    return {
        "calls": sum(by_command.values()),
        "by_command": by_command,
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
    }


def _top_commands(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: round(calls / n, 3) for name, calls in sorted(delta.items(), key=lambda kv: -kv[1]) if calls > 0}


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def render(results: dict[str, Any]) -> str:
    lines = [
        f"date {results['date']}  machine {results['machine']}  redis {results['redis_version']}",
        "",
        "drain  workers  requests  req/s     cmds/req  redis µs/req  worker ms/req  worker RSS MB  check",
    ]
    for d in results["drain"]:
        lines.append(
            f"       {d['workers']:<8} {d['requests']:<9} {d['throughput_rps']:<9} "
            f"{d['redis_commands_per_request']:<9} "
            f"{d['redis_cpu_us_per_request']:<13} {d['worker_cpu_ms_per_request']:<14} {d['worker_rss_mb_max']:<14} "
            f"{'clean' if d['check_clean'] else 'VIOLATIONS'}"
        )
    lines += ["", "latency  offered/s  requests  p50 ms  p95 ms  p99 ms  max ms  missing  worker RSS MB"]
    for lat in results["latency"]:
        lines.append(
            f"         {lat['offered_rps']:<10} {lat['requests']:<9} {lat['p50_ms']:<7} {lat['p95_ms']:<7} "
            f"{lat['p99_ms']:<7} {lat['max_ms']:<7} {lat['missing']:<8} {lat['worker_rss_mb_max']}"
        )
    if "namespaces" in results:
        many = results["namespaces"]
        lines += [
            "",
            f"namespaces at once: {many['namespaces']} on {many['masters']} master(s), one worker each: "
            f"{many['requests']} requests at {many['throughput_rps']} req/s in all",
        ]
        lines += [
            f"  {run['throughput_rps']} req/s, {run['redis_commands_per_request']} cmds/req, "
            f"{run['redis_cpu_us_per_request']} Redis µs/req, checker {'clean' if run['check_clean'] else 'VIOLATIONS'}"
            for run in many["per_namespace"]
        ]
    if results["drain"]:
        lines += [
            "",
            "commands per request (first drain): "
            + ", ".join(f"{name} {calls}" for name, calls in list(results["drain"][0]["commands"].items())[:12]),
        ]
    return "\n".join(lines)
