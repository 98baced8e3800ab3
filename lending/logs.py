"""Logging set-up: structlog, readable on a terminal or one JSON object per line.

Output can never break the service: logs and the ready line go through ``SafeStream``,
which drops what it cannot write. A worker whose log reader died (a dead log shipper,
``| head``) must still serve, and above all still stop on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO, cast

import structlog

from lending.redaction import redact


class SafeStream:
    """A text stream that never raises on ``write`` or ``flush``.

    Once the reader of the underlying pipe is gone, output is dropped for good: the
    descriptor is pointed at ``/dev/null`` (as Python's ``signal`` docs advise for
    ``BrokenPipeError``), so that whatever is still buffered, and the interpreter's own
    flush at exit, go nowhere instead of failing (a failing final flush makes the exit
    code 120). Other write errors drop that output only.

    :param stream: the stream to write to, e.g. ``sys.stderr``.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                self._stream.write(text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        return not self._gone and self._stream.isatty()

    def _failed(self, exc: OSError) -> None:
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return
        self._gone = True
        point_at_devnull(self._stream)


def point_at_devnull(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at ``/dev/null`` once writing to it failed for good, so
    that what is still buffered, and the interpreter's own flush at exit, go nowhere
    instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no descriptor (an in-memory stream): nothing is left to fail
        pass


def configure_logging(log_format: str = "console", level: str = "info") -> None:
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain tracebacks: rich's show every frame's locals, which is a lot of output and
        # may show what must stay private (a URL with its password).
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if log_format == "json" else structlog.dev.set_exc_info,
            _redacting(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # print() needs only write() and flush(), which SafeStream has.
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, SafeStream(sys.stderr))),
        cache_logger_on_first_use=True,
    )


def _redacting(renderer: structlog.types.Processor) -> structlog.types.Processor:
    """``renderer``, with every password of a URL taken out of the finished line (its
    traceback included): whatever a log call or an exception says, it is not shown."""

    def render(logger: structlog.types.WrappedLogger, name: str, event: structlog.types.EventDict) -> str:
        line = renderer(logger, name, event)
        return redact(line if isinstance(line, str) else str(line))

    return render


def announce(line: str) -> None:
    """Print ``line`` on stdout (e.g. the ready line), even if nobody reads it any more."""
    print(line, file=cast(TextIO, SafeStream(sys.stdout)), flush=True)
