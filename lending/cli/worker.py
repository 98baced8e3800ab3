"""``python main.py WORKER_ID`` (``python -m lending worker``): options → ``Settings`` → ``app.run_sync``."""

from __future__ import annotations

import sys
from typing import Any

import click
from redis.exceptions import ResponseError

from lending import app
from lending.cli.options import (
    CONTEXT_SETTINGS,
    CommandError,
    F,
    FiniteFloatRange,
    FolderPath,
    Target,
    check_host,
    connection_options,
    setting_option,
)
from lending.errors import ConfigError, LendingError
from lending.logs import configure_logging
from lending.redis.replies import no_permission
from lending.settings import COUNT_BOUNDS, Settings

#: The whole-number settings, in their --help order, with their help.
COUNTS = {
    "storage-capacity": "Books the automated storage holds.",
    "max-books-per-user": "Books one user may hold at once.",
    "max-books-per-request": "Distinct books one request may name.",
    "claim-idle-ms": "Take over entries idle this long on another consumer (a live worker renews the entries it "
    "holds every third of it).",
    "max-deliveries": "Deliveries before an entry is dead-lettered.",
    "retry-base-ms": "Wait before a failed entry's first retry; it doubles with each failure.",
    "retry-max-ms": "Longest wait between two attempts of a failed entry.",
    "reconcile-interval-ms": "How often to give back shelving grants of finished requests.",
    "concurrency": "Requests processed at once by this worker.",
    "max-batches": "Batches this worker starts before it waits for one to finish (or to have run for "
    "--batch-patience-ms): requests arriving meanwhile join the next, bigger batch, which costs less per request.",
    "batch-patience-ms": "How long a batch holds back the next one at most (a batch slower than this, e.g. on a "
    "slow shelving call, no longer counts against --max-batches).",
    "worker-ttl-ms": "Lifetime of the worker-id heartbeat key.",
    "events-maxlen": "About how many events {NS}:events keeps (request streams are trimmed only below what every "
    "group has read and acknowledged).",
    "dead-letters-maxlen": "How many dead letters {NS}:dead-letters keeps: the oldest beyond it are dropped (and "
    "counted in {NS}:dead-letters:trimmed).",
}


def count_options(command: F) -> F:
    """An option for each of ``COUNTS``."""
    for name, text in reversed(COUNTS.items()):
        least, most = COUNT_BOUNDS[name.replace("-", "_")]
        command = setting_option(f"--{name}", type=click.IntRange(least, most), help=text)(command)
    return command


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("worker_id", envvar="LENDING_WORKER_ID")
@count_options
@setting_option("--force", is_flag=True, help="Start even if another live worker holds WORKER_ID.")
@setting_option(
    "--allow-eviction-data-loss",
    is_flag=True,
    help="Run even if Redis's maxmemory-policy is allkeys-*: a full Redis then deletes requests "
    "and the library's state, losing books.",
)
@setting_option(
    "--data-dir",
    type=FolderPath(),
    help="Data folder of the embedded redis-server (used when no Redis is configured).",
)
# Hidden: tests try the embedded default on a free port instead of 6379.
@setting_option("--embedded-port", type=click.IntRange(1, 65535), hidden=True)
@setting_option("--log-format", type=click.Choice(["console", "json"]))
@setting_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@setting_option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus /metrics and the probes /livez, /readyz (and /healthz, the same as /readyz) on this "
    "port [default: off].",
)
@setting_option(
    "--metrics-host",
    callback=check_host,
    help="Address to serve --metrics-port on (0.0.0.0: every address of the host).",
)
@setting_option("--uvloop/--no-uvloop", help="Run on uvloop's faster event loop (when installed).")
@setting_option(
    "--shelving-fail-rate",
    type=FiniteFloatRange(0, 1),
    help="Share of shelving calls that fail (simulating the remote service).",
)
@setting_option(
    "--shelving-latency-ms",
    type=FiniteFloatRange(min=0),
    help="Mean latency added to each shelving call (simulating the remote service).",
)
def worker_command(worker_id: str, target: Target, **options: Any) -> None:
    """Run lending worker WORKER_ID: the lending service and the shelving mock.

    Without --redis-url (or REDIS_URL) it uses redis://localhost:6379, and if nothing
    listens there it starts the embedded redis-server on 127.0.0.1:6379 with its data
    in --data-dir (workers with the same --data-dir share it; the one that started it
    stops it on exit). Stop with Ctrl-C or SIGTERM; a second signal exits at once.
    """
    configure_logging(options["log_format"], options["log_level"])
    try:
        settings = Settings(
            worker_id=worker_id, redis_url=target.redis_url, namespace=target.namespace, tls=target.tls, **options
        )
        code = app.run_sync(settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except LendingError as exc:
        raise CommandError(str(exc)) from exc
    except ResponseError as exc:
        if (refusal := no_permission(exc)) is None:
            raise
        raise CommandError(f"no permission: {refusal}") from exc
    sys.exit(code)
