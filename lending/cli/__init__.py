"""The command lines: ``python -m lending worker|get-books|api|check|status|dead-letters|acl``,
and the console scripts ``lending-worker`` (``main.py``), ``get-books`` (``get_books.py``)
and ``lending-api``.

A thin shell: each command group's module parses options, builds objects, calls into
``lending.app``, ``lending.api``, ``lending.client`` or ``lending.ops`` and prints; ``options`` holds what
they share.
"""

from __future__ import annotations

import os
import sys

import click

from lending import interrupts
from lending.cli.acl import acl_command
from lending.cli.api import api_command
from lending.cli.dead_letters import dead_letters_group
from lending.cli.get_books import get_books_command
from lending.cli.inspect import check_command, status_command
from lending.cli.options import (
    CommandError,
    FiniteFloatRange,
    check_namespace,
    check_redis_url,
    discard_stdout,
    tls_from_options,
    tls_options,
)
from lending.cli.worker import worker_command

# For the simulator's command line: the TLS options, the checks of its --redis-url and
# --namespace, the number type of its durations and rates, and its one-line errors.
__all__ = [
    "CommandError",
    "FiniteFloatRange",
    "api_main",
    "check_namespace",
    "check_redis_url",
    "get_books_main",
    "lending_main",
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


def run(command: click.Command, prog_name: str) -> None:
    """Run ``command``; output that cannot be written (stdout full, or closed) ends it with
    one line on stderr and exit 1, not a traceback."""
    interrupts.restore()  # KeyboardInterrupt from here on, where the entry script quieted it
    open_standard_streams()
    try:
        command.main(prog_name=prog_name)
    except OSError as exc:
        if not in_echo(exc):
            raise  # not the output's fault: another error, with its own traceback
        discard_stdout()
        click.echo(f"error: cannot write the output: {exc.strerror or exc}", err=True)
        sys.exit(1)


def open_standard_streams() -> None:
    """A standard stream the process was started without (``>&-``) is opened on
    /dev/null, as a daemon's are: what is written to it is dropped, and no socket gets
    its number (uvloop aborts on one numbered 0 to 2, and a stray print would go to it)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False, encoding="utf-8"))  # noqa: SIM115


def in_echo(exc: BaseException) -> bool:
    """Was ``exc`` raised writing output (in ``click.echo``)?"""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code is click.echo.__code__


def lending_main() -> None:
    run(main, "python -m lending")


def worker_main() -> None:
    run(worker_command, "main.py")


def get_books_main() -> None:
    run(get_books_command, "get_books.py")


def api_main() -> None:
    run(api_command, "lending-api")
