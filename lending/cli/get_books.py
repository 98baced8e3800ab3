"""``python get_books.py request|return USER BOOK...`` (``python -m lending get-books``):
queue a request with ``client.send_request`` and print its outcome."""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import urlsplit

import click

from lending.cli.options import (
    CONTEXT_SETTINGS,
    FiniteFloatRange,
    Target,
    connection_options,
    host_problem,
    print_result,
)
from lending.client import (
    Answered,
    Interrupted,
    Invalid,
    NoOutcome,
    Outcome,
    Progress,
    Queued,
    Refused,
    Unreachable,
    send_request,
)
from lending.domain.events import ACCEPTED, DENIED, FAILED, REJECTED, RETURNED, Event
from lending.domain.requests import id_problem
from lending.keys import BY_VERB
from lending.redaction import redact

EXIT_BY_STATUS = {ACCEPTED: 0, RETURNED: 0, DENIED: 1, REJECTED: 2, FAILED: 4}
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 5
EXIT_REFUSED = 6
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)


def _check_user(_ctx: click.Context, _param: click.Parameter, user: str) -> str:
    """Refuse a user id the service would reject, before anything is queued."""
    if problem := id_problem(user, "user_id"):
        raise click.BadParameter(f"{problem}; nothing was queued")
    return user


def _check_books(_ctx: click.Context, _param: click.Parameter, books: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse book ids the service would reject: a comma would even split one into two."""
    for book in books:
        if problem := id_problem(book, "book id"):
            raise click.BadParameter(f"{problem}; nothing was queued")
    return books


#: The longest --timeout: a day (socket timeouts have a ceiling; a longer wait is a
#: poll loop's job).
MAX_TIMEOUT_S = 86_400.0


def _check_api_url(_ctx: click.Context, _param: click.Parameter, url: str | None) -> str | None:
    """An --api URL must be http(s)://host[:port][/prefix]: a usage error otherwise, before
    anything is sent."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise click.BadParameter(f"{redact(url)!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{redact(url)!r} must be http://HOST[:PORT] or https://HOST[:PORT]")
    if problem := host_problem(parts.hostname):
        raise click.BadParameter(f"{redact(url)!r}: {problem}")
    if port == 0 or parts.query or parts.fragment:
        raise click.BadParameter(f"{redact(url)!r} must be http(s)://HOST[:PORT], without port 0, query or fragment")
    return url


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("action", type=click.Choice(list(BY_VERB)))
@click.argument("user", callback=_check_user)
@click.argument("books", nargs=-1, required=True, callback=_check_books)
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0, min_open=True, max=MAX_TIMEOUT_S),
    envvar="LENDING_TIMEOUT",
    show_envvar=True,
    default=10.0,
    show_default=True,
    help="Seconds the whole run may take: connecting, queuing and waiting for the outcome (at most a day).",
)
@click.option(
    "--no-wait",
    is_flag=True,
    envvar="LENDING_NO_WAIT",
    show_envvar=True,
    help="Queue the request and exit without waiting.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="LENDING_JSON",
    show_envvar=True,
    help="Print the event as one JSON object.",
)
@click.option(
    "--api",
    "api_url",
    metavar="URL",
    callback=_check_api_url,
    envvar="LENDING_API_URL",
    show_envvar=True,
    default=None,
    help="Go through the HTTP API at URL (python -m lending api) instead of Redis; "
    "--redis-url, --namespace and the TLS options are then the API's business.",
)
def get_books_command(
    action: str,
    user: str,
    books: tuple[str, ...],
    target: Target,
    timeout: float,
    no_wait: bool,
    as_json: bool,
    api_url: str | None,
) -> None:
    """Ask the library to lend (request) or take back (return) BOOKS for USER.

    Prints the outcome: ACCEPTED, DENIED, RETURNED, REJECTED or FAILED, the request
    id, the books and the reason. USER and BOOKS are checked first with the service's
    own rules (1-128 characters, no comma, no whitespace or control character).

    Exit codes: 0 accepted/returned (or queued with --no-wait), 1 denied, 2 rejected
    or usage error (an invalid USER or BOOK: nothing is queued), 3 no outcome within
    --timeout (the request stays queued; for a user without XADD, also: no worker took
    it from the inbox yet), 4 failed, 5 Redis unreachable, lost, or
    silent for --timeout before the request was queued, 6 Redis refused the request
    (out of memory, no permission, stream out of IDs, ...), 130 interrupted (Ctrl-C;
    it says whether the request was queued). A request the inbox refuses (a sender without
    XADD, over 1,000 books) is invalid: 2. With --api, the same: 2 also when the API finds
    the request invalid (a body over 64 KiB, more books than the workers allow: nothing is
    queued), 5 when the API is unreachable or lost.
    """
    stream_action = BY_VERB[action].action
    progress = Progress()
    outcome: Outcome
    try:
        if api_url is not None:
            # httpx is imported only for --api runs.
            from lending.api.client import send_via_api

            outcome = send_via_api(
                api_url, stream_action, user, books, timeout_s=timeout, wait=not no_wait, progress=progress
            )
        else:
            outcome = asyncio.run(
                send_request(
                    target.url,
                    target.tls,
                    target.keys,
                    stream_action,
                    user,
                    books,
                    timeout_s=timeout,
                    wait=not no_wait,
                    progress=progress,
                )
            )
    except KeyboardInterrupt:
        outcome = progress.interrupted()
    sys.exit(report(outcome, stream_action, timeout, as_json))


def report(outcome: Outcome, action: str, timeout: float, as_json: bool) -> int:
    """Print ``outcome`` (results on stdout, errors as one line on stderr); returns the exit code."""
    match outcome:
        case Answered(event):
            print_result(json.dumps(event.as_json()) if as_json else format_event(event))
            return EXIT_BY_STATUS.get(event.status, 4)
        case Queued(request_id):
            print_result(
                json.dumps({"status": "queued", "action": action, "request_id": request_id})
                if as_json
                else f"QUEUED {request_id}"
            )
            return 0
        case NoOutcome(None):
            click.echo(
                f"no worker took the {action} request from the inbox within {timeout:g} s; "
                "it waits there and is queued when a worker runs",
                err=True,
            )
            return EXIT_TIMEOUT
        case NoOutcome(request_id):
            click.echo(
                f"no outcome for {action} request {request_id} within {timeout:g} s; "
                f"the request stays queued (id {request_id}) and will be processed when a worker runs",
                err=True,
            )
            return EXIT_TIMEOUT
        case Unreachable(message):
            click.echo(redact(f"error: {message}"), err=True)
            return EXIT_UNREACHABLE
        case Refused(reason):
            click.echo(redact(f"error: Redis refused the request: {reason}"), err=True)
            return EXIT_REFUSED
        case Invalid(reason, by):
            click.echo(redact(f"error: {by} refused the request: {reason}; nothing was queued"), err=True)
            return EXIT_BY_STATUS[REJECTED]
        case Interrupted(request_id, sent, handed_in):
            click.echo(f"interrupted: {_fate(action, request_id, sent, handed_in)}", err=True)
            return EXIT_INTERRUPTED


def _fate(action: str, request_id: str | None, sent: bool, handed_in: bool) -> str:
    """What became of a request whose run was interrupted."""
    if request_id is not None:
        return f"{action} request {request_id} was queued; interrupting does not withdraw it"
    if handed_in:
        return f"the {action} request is in the inbox; a worker queues it"
    return "the request may have been queued (no id came back)" if sent else "nothing was queued"


def format_event(event: Event) -> str:
    parts = [event.status.upper(), event.request_id, "books=" + ",".join(event.books)]
    if event.skipped:
        parts.append("skipped=" + ",".join(event.skipped))
    line = " ".join(parts)
    return f"{line} reason: {event.reason}" if event.reason else line
