"""A process group that ends with the simulator, however the simulator ends.

A SIGKILL (a test's timeout, the OOM killer, ``kill -9``) gives the simulator no chance to
stop the redis-server and workers it started, and they would run on, holding a port and a
core. So they join a process group led by a small reaper process that waits on a pipe
only the simulator holds: the kernel closes the pipe when the simulator exits, in any
way, and the reaper then kills the whole group.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Reads until the simulator's end of the pipe closes, then SIGKILLs its own group, itself
# included. SIGINT from a terminal does not reach it: it leads its own group. SIGHUP is
# ignored: when the simulator dies while a worker of the group is stopped (a pause), the
# kernel hangs up the whole orphaned group, which would kill the reaper before it reaps.
_REAPER = (
    "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "sys.stdin.buffer.read(); os.killpg(0, signal.SIGKILL)"
)


class Reaper:
    """Leads a process group; every process started with ``process_group=reaper.group``
    is killed when this process exits or calls ``close``."""

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()  # not inherited by later children (PEP 446)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _REAPER], stdin=read_end, close_fds=True, process_group=0
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    @property
    def group(self) -> int:
        """The process group to start children in."""
        return self._process.pid

    def close(self, timeout_s: float = 5.0) -> None:
        """Kill what is left of the group now (idempotent)."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
