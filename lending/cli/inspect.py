"""``python -m lending check`` and ``status``: look at a namespace, against the limits its
workers published (``ops.checker``, ``ops.status``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

import click

from lending.cli.options import CONTEXT_SETTINGS, FiniteFloatRange, Target, connected, connection_options
from lending.domain.requests import is_utf8
from lending.ops import checker, status
from lending.redis import eviction


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--wait-quiescent",
    "wait_s",
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    envvar="LENDING_WAIT_QUIESCENT",
    show_envvar=True,
    help="First wait up to SECONDS for the namespace to become quiescent.",
)
@click.option(
    "--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help="Print the report as JSON."
)
def check_command(target: Target, wait_s: float, as_json: bool) -> None:
    """Check the invariants of a namespace; exit 0 when clean, 1 otherwise (130: Ctrl-C).

    It may run beside live workers: the library's state and the groups are read in one
    transaction, and a user whose count or books set disagrees with it is read again in
    one of its own. Always: every key holds its type (a hash, a set, ...); each user's
    count equals their books in lent-books and is within the limit; no book is both lent
    and in storage; storage within its capacity. Once quiescent (inbox empty, request
    streams all read and acknowledged, shelving returns drained): shelving holds exactly
    the lent and stored books (and the library's record of them agrees); every request
    entry has exactly one event and every event names an entry; no reservation is left.
    """

    async def check() -> checker.Report:
        async with connected(target) as client:
            return await checker.check(client, target.namespace, wait_s)

    try:
        report = asyncio.run(check())
    except KeyboardInterrupt:  # not a violation (1): as a shell reports Ctrl-C
        click.echo("interrupted: no verdict", err=True)
        sys.exit(130)
    click.echo(json.dumps(report.as_json()) if as_json else format_report(report))
    sys.exit(0 if report.clean else 1)


def format_report(report: checker.Report) -> str:
    scope = "all invariants" if report.quiescent else "not quiescent: only the always-invariants"
    if report.clean:
        lines = [f"OK: namespace {report.namespace!r} is consistent ({scope} checked)"]
    else:
        lines = [f"FAILED: {len(report.violations)} violation(s) in namespace {report.namespace!r} ({scope} checked)"]
        lines += [f"  [{v.invariant}] {v.message}  keys: {', '.join(v.keys)}" for v in report.violations]
    lines.append(f"maxmemory-policy: {report.maxmemory_policy or 'unknown'}")
    limits = report.limits
    lines.append(
        f"limits: {limits.max_books_per_user} books per user, storage capacity {limits.storage_capacity}"
        + ("" if report.limits_published else " (defaults: no worker has published its limits)")
    )
    verdict = eviction.judge(report.maxmemory_policy)
    if verdict.level != "ok":
        lines.append(f"warning: {verdict.message}")
    return "\n".join(lines)


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, envvar="LENDING_JSON", show_envvar=True, help="Print as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted.")
@click.option(
    "--pending",
    "consumer",
    metavar="CONSUMER",
    help="Instead, list the entries pending on CONSUMER (a worker id): id, stream, deliveries, idle time, age.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Health check: print one line per threshold broken and exit 1, or one OK line and exit 0.",
)
@click.option("--max-lag", type=click.IntRange(min=0), help="With --check: entries any group may have left to read.")
@click.option(
    "--max-pending-age",
    type=FiniteFloatRange(min=0),
    metavar="SECONDS",
    help="With --check: how old (since it was queued, by its ID) the oldest pending entry of a group may be.",
)
@click.option("--max-dead-letters", type=click.IntRange(min=0), help="With --check: dead letters that may wait.")
@click.option(
    "--min-workers",
    type=click.IntRange(min=0),
    help="With --check: live workers there must be  [default: 1].",
)
def status_command(
    target: Target,
    as_json: bool,
    watch: bool,
    consumer: str | None,
    check: bool,
    max_lag: int | None,
    max_pending_age: float | None,
    max_dead_letters: int | None,
    min_workers: int | None,
) -> None:
    """Show a namespace: stream lengths, group lag and pending entries (with the oldest
    idle time and age), live workers (host, pid, version, uptime, counts), dead
    consumers holding entries, storage fill, books lent, users at their limit and dead
    letters. Exit 1 if Redis is unreachable.

    With --check, judge it instead against the thresholds given (--max-lag,
    --max-pending-age, --max-dead-letters, --min-workers, which is 1 unless given):
    one line per breach and exit 1, or one OK line and exit 0.

    With --pending CONSUMER, list the entries pending on that consumer instead.
    """
    given = {
        "--max-lag": max_lag,
        "--max-pending-age": max_pending_age,
        "--max-dead-letters": max_dead_letters,
        "--min-workers": min_workers,
    }
    if not check and any(value is not None for value in given.values()):
        options = ", ".join(name for name, value in given.items() if value is not None)
        raise click.UsageError(f"{options}: thresholds are for --check")
    if check and watch:
        raise click.UsageError("--check and --watch do not go together")
    if check and consumer is not None:
        raise click.UsageError("--check and --pending do not go together")
    if consumer is not None and not is_utf8(consumer):
        raise click.BadParameter(f"{consumer!a} is not valid UTF-8", param_hint="'--pending'")
    thresholds = status.Thresholds(
        max_lag, max_pending_age, max_dead_letters, 1 if min_workers is None else min_workers
    )

    async def show() -> int:
        async with connected(target) as client:
            while True:
                if consumer is not None:
                    entries = await status.read_pending(client, target.keys, consumer)
                    shown = {"consumer": consumer, "entries": entries}
                    rendered = status.render_pending(consumer, entries)
                else:
                    shown = await status.read_status(client, target.namespace)
                    if check:
                        return report_check(shown, thresholds, as_json)
                    rendered = status.render(shown)
                if as_json:
                    click.echo(json.dumps(shown))
                else:
                    if watch:
                        click.clear()
                    click.echo(rendered)
                if not watch:
                    return 0
                await asyncio.sleep(1.0)

    try:
        sys.exit(asyncio.run(show()))
    except KeyboardInterrupt:  # the way to end --watch; otherwise no verdict (0 would say healthy)
        sys.exit(0 if watch else 130)


def report_check(snapshot: dict[str, Any], thresholds: status.Thresholds, as_json: bool) -> int:
    """Print the verdict of ``status --check``; its exit code."""
    found = status.breaches(snapshot, thresholds)
    if as_json:
        breaches = [dataclasses.asdict(b) for b in found]
        click.echo(json.dumps({"namespace": snapshot["namespace"], "ok": not found, "breaches": breaches}))
    else:
        click.echo("\n".join(b.message for b in found) if found else status.ok_line(snapshot))
    return 1 if found else 0
