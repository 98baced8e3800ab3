"""Fault points: places where a test can make the process die on purpose.

Set ``LENDING_FAULT`` to a point's name (or several, comma-separated) and the process
calls ``os._exit(FAULT_EXIT_CODE)`` when it reaches that point: no cleanup, no
``finally``, exactly like a ``kill -9`` at that step. Points:

- ``after_reserve``: a batch's lends took their books from storage into reservations.
- ``after_shelving``: the shelving service handed out books (recorded only at commit).
- ``before_exec``: the batch is decided; its commit (MULTI, commit.lua, EXEC) is not sent yet.
- ``after_exec``: the commit is done, the worker has not logged it yet.
- ``before_release``: the shelving consumer read a returns entry, not yet applied.
"""

from __future__ import annotations

import os

FAULT_ENV = "LENDING_FAULT"
FAULT_EXIT_CODE = 86


def fault_point(name: str) -> None:
    points = os.environ.get(FAULT_ENV)
    if points and name in points.split(","):
        os._exit(FAULT_EXIT_CODE)
