"""``python -m simulator run|bench``: a thin shell over ``run`` and ``bench``."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lending.app import run_fast
from lending.cli import CommandError, FiniteFloatRange, check_namespace, check_redis_url, tls_from_options, tls_options
from lending.errors import RedisUnavailable
from lending.logs import configure_logging
from lending.settings import COUNT_BOUNDS, Settings

from .bench import BenchOptions, benchmark, render
from .run import RunOptions, memory_bytes, simulate


def _memory_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        size = memory_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size <= 0:
        raise click.BadParameter("must be more than 0 (0 means no limit)")
    return size


def _output_file(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """An output file must be writable before the run or benchmark starts: found only at
    the end, a missing folder would cost the whole run (minutes) and its results."""
    if value is None or value == "-":
        return value
    folder = Path(value).parent
    if not folder.is_dir():
        raise click.BadParameter(f"folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"folder {str(folder)!r} is not writable")
    return value


class NumberList(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on only
    """Numbers separated by commas (``1,2,4``), each finite and at least ``minimum``;
    an empty list is allowed (it skips that part of the benchmark)."""

    name = "list"

    def __init__(self, kind: Callable[[str], float], *, minimum: float) -> None:
        self.kind = kind
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        numbers = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            try:
                number = self.kind(item.strip())
            except ValueError:
                self.fail(f"{item.strip()!r} is not a number (give numbers separated by commas)", param, ctx)
            if not (math.isfinite(number) and number >= self.minimum):
                self.fail(f"{item.strip()!r} must be a finite number of at least {self.minimum:g}", param, ctx)
            numbers.append(number)
        return tuple(numbers)


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


async def reachable(run: Awaitable[T]) -> T:
    """``run``, with a Redis it cannot reach said in one line (exit 1), not a traceback."""
    try:
        return await run
    except RedisUnavailable as exc:
        raise CommandError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Drive realistic traffic at the lending service, and measure it."""


def redis_url_option(help_text: str) -> Callable[[F], F]:
    """``--redis-url`` of a simulator command: checked before anything starts."""
    return click.option("--redis-url", default=None, callback=check_redis_url, help=help_text)


@main.command()
@redis_url_option("Drive this deployment; default: start a private redis-server.")
@click.option(
    "--namespace",
    default=None,
    callback=check_namespace,
    help="Namespace [default: lending with --redis-url, else a fresh one].",
)
@click.option("--users", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--catalogue", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option(
    "--rate", type=FiniteFloatRange(min=0.1), default=200.0, show_default=True, help="Offered requests per second."
)
@click.option("--duration", type=FiniteFloatRange(min=0), default=None, help="Seconds of traffic.")
@click.option(
    "--requests", type=click.IntRange(min=1), default=None, help="Number of requests (instead of --duration)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Worker processes to spawn [default: 2 on a private Redis, 0 with --redis-url].",
)
@click.option(
    "--kill-every",
    type=FiniteFloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="SIGKILL a random spawned worker every SECONDS and restart it.",
)
@click.option(
    "--restart-redis-every",
    type=FiniteFloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="Kill and restart the private redis-server every SECONDS (appendfsync always).",
)
@click.option(
    "--pause-every",
    type=FiniteFloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="About every SECONDS (±50 %) SIGSTOP a random spawned worker for 1.5-4 s, then SIGCONT it.",
)
@click.option(
    "--maxmemory",
    default=None,
    metavar="SIZE",
    callback=_memory_size,
    help="Run the private redis-server with this maxmemory (e.g. 5mb) and noeviction; "
    "the limit is lifted when the traffic ends.",
)
# The options handed on to the workers take what a worker takes (Settings checks it), so a
# value it would refuse is a usage error here, not a worker that dies as the run starts.
@click.option("--shelving-fail-rate", type=FiniteFloatRange(0, 1), default=0.0, show_default=True)
@click.option("--shelving-latency-ms", type=FiniteFloatRange(min=0), default=0.0, show_default=True)
@click.option(
    "--max-books-per-user", type=click.IntRange(*COUNT_BOUNDS["max_books_per_user"]), default=5, show_default=True
)
@click.option(
    "--storage-capacity", type=click.IntRange(*COUNT_BOUNDS["storage_capacity"]), default=20, show_default=True
)
@click.option(
    "--claim-idle-ms",
    type=click.IntRange(*COUNT_BOUNDS["claim_idle_ms"]),
    default=3_000,
    show_default=True,
    help="The spawned workers' --claim-idle-ms.",
)
@click.option(
    "--retry-max-ms",
    # The workers keep their default --retry-base-ms (they get no LENDING_* variable), and
    # the longest wait may not be shorter than the first.
    type=click.IntRange(Settings.retry_base_ms, COUNT_BOUNDS["retry_max_ms"][1]),
    default=None,
    help="The spawned workers' --retry-max-ms [default: theirs, 60000]; with --shelving-fail-rate, "
    "keep ten retries within the run's wait for the last outcome (120 s).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default=None,
    callback=_output_file,
    help="Also write the report as JSON to this file ('-' for stdout).",
)
@tls_options
def run(
    redis_url: str | None,
    namespace: str | None,
    duration: float | None,
    requests: int | None,
    workers: int | None,
    kill_every: float | None,
    restart_redis_every: float | None,
    pause_every: float | None,
    json_path: str | None,
    **options: object,
) -> None:
    """Simulated users borrow and return books; then the invariants are checked.

    Exits non-zero if any request got no event or two events, or an invariant fails.
    """
    configure_logging("console", "warning")
    if duration is None and requests is None:
        raise click.UsageError("give --duration or --requests")
    for flag, given in (("--restart-redis-every", restart_redis_every), ("--maxmemory", options["maxmemory"])):
        if given and redis_url:
            raise click.UsageError(f"{flag} needs the simulator's own Redis (no --redis-url)")
    if workers is None:
        workers = 0 if redis_url else 2
    if (kill_every or pause_every or redis_url is None) and workers == 0:
        raise click.UsageError("--kill-every, --pause-every and a private Redis need --workers of at least 1")
    tls = tls_from_options(options)
    settings = RunOptions(
        redis_url=redis_url,
        tls=tls,
        namespace=namespace or ("lending" if redis_url else f"sim-{uuid.uuid4().hex[:8]}"),
        duration_s=duration,
        requests=requests,
        workers=workers,
        kill_every_s=kill_every,
        restart_redis_every_s=restart_redis_every,
        pause_every_s=pause_every,
        progress=True,
        **options,  # type: ignore[arg-type]
    )
    report = run_fast(reachable(simulate(settings)))
    click.echo(report.render())
    if json_path:
        text = json.dumps(report.as_json(), indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
    sys.exit(0 if report.ok else 1)


@main.command()
@redis_url_option("Benchmark against this Redis; default: a private redis-server.")
@click.option(
    "--requests", type=click.IntRange(min=1), default=20_000, show_default=True, help="Requests queued per drain."
)
@click.option("--users", type=click.IntRange(min=1), default=2_000, show_default=True)
@click.option("--catalogue", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option(
    "--workers",
    type=NumberList(int, minimum=1),
    default="1,2,4",
    show_default=True,
    help="Worker counts to drain with, separated by commas (empty: no drain).",
)
@click.option(
    "--rates",
    type=NumberList(float, minimum=0.1),
    default="200,500,1000,2000",
    show_default=True,
    help="Offered loads (requests per second) for the latency runs, separated by commas (empty: none).",
)
@click.option("--rate-duration", type=FiniteFloatRange(min=1), default=10.0, show_default=True)
@click.option(
    "--namespaces",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Also drain this many namespaces at once, one worker each (one per master in a cluster).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default="bench-results.json",
    callback=_output_file,
    show_default=True,
    help="Where to save the results as JSON.",
)
@tls_options
def bench(
    redis_url: str | None,
    requests: int,
    users: int,
    catalogue: int,
    workers: tuple[int, ...],
    rates: tuple[float, ...],
    rate_duration: float,
    namespaces: int,
    output: str,
    **tls_opts: Any,
) -> None:
    """The standard benchmark: drain throughput, latency, Redis work per request."""
    configure_logging("console", "warning")
    options = BenchOptions(
        redis_url=redis_url,
        requests=requests,
        users=users,
        catalogue=catalogue,
        workers=workers,
        rates=rates,
        rate_duration_s=rate_duration,
        namespaces=namespaces,
        tls=tls_from_options(tls_opts),
    )
    results = run_fast(reachable(benchmark(options)))
    Path(output).write_text(json.dumps(results, indent=2) + "\n")
    click.echo(render(results))
    click.echo(f"\nsaved to {output}")
