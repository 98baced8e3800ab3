"""``python -m lending api`` (``lending-api``): options → ``ApiSettings`` → ``api.server.serve``.

The web stack is imported only when the command runs: the other commands (the worker,
get_books) start without it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from lending.cli.options import (
    CONTEXT_SETTINGS,
    CommandError,
    Target,
    check_host,
    connection_options,
    setting_option,
)
from lending.errors import ConfigError, LendingError
from lending.logs import configure_logging

TOKEN_ENV = "LENDING_API_TOKEN"


@connection_options
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--host",
    envvar="LENDING_API_HOST",
    show_envvar=True,
    default="127.0.0.1",
    show_default=True,
    callback=check_host,
    help="Address to listen on.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    envvar="LENDING_API_PORT",
    show_envvar=True,
    default=8080,
    show_default=True,
    help="Port to listen on (0: any free port, shown in the ready line).",
)
@click.option(
    "--access-log/--no-access-log",
    envvar="LENDING_API_ACCESS_LOG",
    show_envvar=True,
    default=False,
    show_default=True,
    help="Log every request (costly at thousands of requests a second).",
)
@click.option(
    "--max-clients",
    type=click.IntRange(min=1),
    envvar="LENDING_API_MAX_CLIENTS",
    show_envvar=True,
    default=None,
    help="HTTP connections served at once; more get a 503 problem at once "
    "[default: what the open-file limit leaves beside the Redis connections, at most 10000].",
)
@setting_option("--log-format", type=click.Choice(["console", "json"]))
@setting_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@setting_option("--uvloop/--no-uvloop", help="Run on uvloop's faster event loop (when installed).")
def api_command(target: Target, **options: Any) -> None:
    """Serve the HTTP API of a namespace: lend and return books (POST /v1/lends,
    /v1/returns), follow outcomes (GET /v1/requests/..., /v1/events as Server-Sent
    Events), loans and books; OpenAPI at /openapi.json, docs at /docs.

    The operator endpoints (/v1/status, /v1/dead-letters) need the bearer token in the
    LENDING_API_TOKEN environment variable (never an option: ps would show it); without
    it they are off. Prints "API ready on http://HOST:PORT" once serving. Stop with
    Ctrl-C or SIGTERM. Exit 1 if it cannot listen on --host:--port (checked first) or
    Redis is unreachable at start.
    """
    configure_logging(options["log_format"], options["log_level"])
    from lending.api.config import ApiSettings
    from lending.api.server import serve

    try:
        settings = ApiSettings(
            redis_url=target.url,
            namespace=target.namespace,
            tls=target.tls,
            token=os.environ.get(TOKEN_ENV) or None,
            **options,
        )
        code = serve(settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except LendingError as exc:
        raise CommandError(str(exc)) from exc
    sys.exit(code)
