"""``python -m lending check`` and ``status``: look at a namespace, against the limits its
workers published (``ops.checker``, ``ops.status``)."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from lending.cli.options import CONTEXT_SETTINGS, Target, connected, connection_options
from lending.ops import checker, status
from lending.redis import eviction


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--wait-quiescent",
    "wait_s",
    type=click.FloatRange(min=0),
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
    """Check the invariants of a namespace; exit 0 when clean, 1 otherwise.

    Always: each user's count equals their books in lent-books and is within the
    limit; no book is both lent and in storage; storage within its capacity. Once
    quiescent (inbox empty, request streams all read and acknowledged, shelving returns drained):
    shelving holds exactly the lent and stored books (and the library's record of
    them agrees); every request entry has exactly one event and every event names an
    entry; no reservation is left.
    """

    async def check() -> checker.Report:
        async with connected(target) as client:
            return await checker.check(client, target.namespace, wait_s)

    report = asyncio.run(check())
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
def status_command(target: Target, as_json: bool, watch: bool) -> None:
    """Show a namespace: stream lengths, group lag and pending entries (with the oldest
    idle time), live workers, dead consumers holding entries, storage fill, books lent,
    users at their limit and dead letters. Exit 1 if Redis is unreachable."""

    async def show() -> None:
        async with connected(target) as client:
            while True:
                snapshot = await status.read_status(client, target.namespace)
                if as_json:
                    click.echo(json.dumps(snapshot))
                else:
                    if watch:
                        click.clear()
                    click.echo(status.render(snapshot))
                if not watch:
                    return
                await asyncio.sleep(1.0)

    try:
        asyncio.run(show())
    except KeyboardInterrupt:
        sys.exit(0)
