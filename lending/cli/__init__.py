"""The command lines: ``python -m lending worker|get-books|api|check|status|dead-letters|acl``,
and the console scripts ``lending-worker`` (``main.py``), ``get-books`` (``get_books.py``)
and ``lending-api``.

A thin shell: each command group's module parses options, builds objects, calls into
``lending.app``, ``lending.api``, ``lending.client`` or ``lending.ops`` and prints; ``options`` holds what
they share.
"""

from __future__ import annotations

import click

from lending.cli.acl import acl_command
from lending.cli.api import api_command
from lending.cli.dead_letters import dead_letters_group
from lending.cli.get_books import get_books_command
from lending.cli.inspect import check_command, status_command
from lending.cli.options import FiniteFloatRange, check_namespace, check_redis_url, tls_from_options, tls_options
from lending.cli.worker import worker_command

# For the simulator's command line: the TLS options, the checks of its --redis-url and
# --namespace, and the number type of its durations and rates.
__all__ = [
    "FiniteFloatRange",
    "api_main",
    "check_namespace",
    "check_redis_url",
    "get_books_main",
    "main",
    "tls_from_options",
    "tls_options",
    "worker_main",
]


@click.group()
def main() -> None:
    """The lending service's commands."""


main.add_command(worker_command, "worker")
main.add_command(get_books_command, "get-books")
main.add_command(api_command, "api")
main.add_command(check_command, "check")
main.add_command(status_command, "status")
main.add_command(dead_letters_group, "dead-letters")
main.add_command(acl_command, "acl")


def worker_main() -> None:
    worker_command(prog_name="main.py")


def get_books_main() -> None:
    get_books_command(prog_name="get_books.py")


def api_main() -> None:
    api_command(prog_name="lending-api")
