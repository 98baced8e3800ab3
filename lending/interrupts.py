"""Interrupts. Ctrl-C while a tool is still starting: the entry scripts (``main.py``,
``get_books.py``, ``python -m lending``) import the package under
``quiet_while_importing``, so that an interrupt during those imports (a few tenths of a
second) exits 130 as it would later, without Python's KeyboardInterrupt traceback. And
which signals stop a server. Standard library only: it runs first."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def quiet_while_importing() -> None:
    """Exit 130 on SIGINT until ``restore``. A SIGINT ignored by whoever started the
    process (a background job of a non-interactive shell) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_130)


def restore() -> None:
    """Python's own handler again (KeyboardInterrupt), where ``quiet_while_importing`` put its."""
    if signal.getsignal(signal.SIGINT) is _exit_130:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a worker or the API: SIGINT and SIGTERM, but not one that
    whoever started the process ignores (a background job of a non-interactive shell
    ignores SIGINT; an event loop's handler would make it listen again)."""
    return [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]


def _exit_130(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(130)
