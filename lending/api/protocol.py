"""The API's HTTP protocol: uvicorn's httptools protocol, with one write per response and
problem details for a request it cannot parse.

uvicorn writes a response's head and its body with two ``transport.write`` calls, two
system calls that on loopback also run the receiver's TCP stack: under load they were a
fifth of the API's CPU. ``CoalescingTransport`` joins what one turn of the event loop
writes to a connection into one write, at the end of that turn.

uvicorn answers a request line or headers it cannot parse with its own plain-text 400;
``ApiHttpProtocol`` answers a problem (RFC 9457) like every other error of the API.

uvicorn sets no limit on a request's head: one connection sending headers without end
grew the API by 160 MB. ``ApiHttpProtocol`` answers a head (request line and headers)
over ``MAX_HEAD_BYTES`` with a 431 problem and closes the connection.

Nor does uvicorn limit its connections: past the process's file descriptors, new ones
were dropped without a word and Redis connections failed (500s). ``ApiHttpProtocol``
answers a connection beyond ``max_clients`` with a 503 problem at once and closes it.

Nor does uvicorn limit the time a head takes: a connection that sends nothing, or a byte
now and then ("slowloris"), stayed open for ever, and enough of them exhaust the
process's file descriptors. A head must arrive within ``HEAD_TIMEOUT_S`` of the
connection (or of the previous response): else a started one gets a 408 problem, and an
idle connection is closed. Its body, announced by the head, must then arrive within
``BODY_TIMEOUT_S`` (a 408 problem otherwise): a connection that promised 100 bytes and
sent 10 held its request, and its place, for ever too.

uvicorn closes a connection at once when the client half-closes it (``shutdown(SHUT_WR)``,
``nc -N``, ``curl`` piping a body): a request sent whole just before was queued all the
same, but its answer was dropped, and with it the request id. ``ApiHttpProtocol`` answers
what came whole, then closes; a request cut off by the half-close is not acted on.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lending.api import problems as p
from lending.api.problems import problem_body


class CoalescingTransport:
    """A transport whose writes wait for the end of the event loop's turn and go out as
    one. Closing (or ``write_eof``) writes what waits first; everything else is the
    wrapped transport's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write what waits, in one write (dropped once the connection is closing)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: The longest request head (request line and headers) the API reads, in bytes.
MAX_HEAD_BYTES = 64 * 1024
#: How long a request head may take to arrive, in seconds.
HEAD_TIMEOUT_S = 10.0
#: How long a request body may take to arrive after its head, in seconds.
BODY_TIMEOUT_S = 10.0


class HeadTooLarge(Exception):
    """Stops the parser at a head over ``MAX_HEAD_BYTES``."""


class ApiHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``, answering an
    unparsable request, an overlong head, or a head or body late to arrive with a problem."""

    #: Bytes received since the current request head began; ``None`` while a body is read.
    _head_bytes: int | None = 0
    #: The deadline of the head or of the body being received (one at a time).
    _timer: asyncio.TimerHandle | None = None
    #: The body timer's last tick found the request held up (not the sender's delay).
    _body_was_held = False
    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    #: Connections served at once at most (``limited`` makes a class with another).
    max_clients = 10_000
    #: Told the problem name of each connection refused here, below the application.
    on_refused: Callable[[str], None] | None = None

    @classmethod
    def limited(cls, max_clients: int, on_refused: Callable[[str], None] | None = None) -> type[ApiHttpProtocol]:
        """This protocol, serving at most ``max_clients`` connections at once, and telling
        ``on_refused`` of each connection it refuses (by the problem's name)."""
        hook = None if on_refused is None else staticmethod(on_refused)
        return type(cls.__name__, (cls,), {"max_clients": max_clients, "on_refused": hook})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport)))
        if len(self.connections) > self.max_clients:  # this one included
            detail = f"the API serves {self.max_clients} connections at once at most; retry in a moment"
            self._refuse(p.TOO_MANY_CONNECTIONS, b"503 Service Unavailable", detail, b"retry-after: 1\r\n")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol's signature
        """The client sends nothing more. ``True`` keeps the connection open to answer the
        last request it sent (and any before it), when that one came whole: its answer
        then closes the connection. ``False`` closes it now (a request under way gets
        ``http.disconnect``)."""
        last = self.cycle  # the latest request parsed; those before it wait in the pipeline
        if last is None or last.response_complete or last.more_body:
            return False
        last.keep_alive = False
        return True

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is None:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        # Fed first: the chunk may end the head and carry body bytes (a read is at most
        # a few hundred KiB, so the parser's buffer stays bounded meanwhile).
        super().data_received(data)
        if self._head_too_large() and not self.transport.is_closing():
            self._refuse_head()

    def on_headers_complete(self) -> None:
        # A head that came whole in one read is measured only here: the read's size may
        # count body bytes too. Raised in a parser callback, this ends the parse, and
        # uvicorn calls send_400_response, which answers the head that is too large.
        if self._parsed_head_bytes() > MAX_HEAD_BYTES:
            raise HeadTooLarge
        super().on_headers_complete()  # may fail (a URL over 64 KiB): the head is then still open
        self._head_bytes = None
        # The body's time starts now (on_message_complete follows at once without one).
        self._body_was_held = False
        self._arm(self.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # what comes next is the next request's head
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body ended (e.g. a 413): the next head's time starts now.
            self._arm_head_timer()
        else:
            self._cancel_timer()  # the request is whole: answering it takes what it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head's time starts now, unless a pipelined request is still answered.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._arm(self.head_timeout_s, self._head_timed_out)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay_s, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body or cycle.response_started:
            return  # closed, whole, or being answered (the head timer follows the answer)
        held = bool(self.pipeline) or self.flow.read_paused or cycle.waiting_for_100_continue
        if held or self._body_was_held:
            # Not the sender's delay: its request waits its turn, or the application has
            # not asked for the body yet. Its time starts again, and once more after the
            # hold ends (it ended some time since the last tick), so the sender always
            # has a whole period after it.
            self._body_was_held = held
            self._arm(self.body_timeout_s, self._body_timed_out)
            return
        detail = f"the request body did not arrive within {self.body_timeout_s:g} s of its head"
        self._refuse(p.REQUEST_TIMEOUT, b"408 Request Timeout", detail)

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed meanwhile, or a request is being answered
        if self._head_bytes:
            detail = f"the request line and headers did not arrive within {self.head_timeout_s:g} s"
            self._refuse(p.REQUEST_TIMEOUT, b"408 Request Timeout", detail)
        else:  # nothing of a request came: an idle connection, closed without a word
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large():  # the parser gave up on it
            self._refuse_head()
            return
        # Called while uvicorn handles the parser's error, which names what is wrong.
        error = sys.exception()
        reason = str(error) if isinstance(error, httptools.HttpParserError) and str(error) else msg
        self._refuse(p.MALFORMED_HTTP, b"400 Bad Request", f"the request is not valid HTTP/1.1: {reason}")

    def _head_too_large(self) -> bool:
        return self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES

    def _parsed_head_bytes(self) -> int:
        """The URL and headers parsed so far, with a colon, a space and a CRLF a header."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse_head(self) -> None:
        self._refuse(
            p.HEAD_TOO_LARGE,
            b"431 Request Header Fields Too Large",
            f"the request line and headers are over {MAX_HEAD_BYTES} bytes long",
        )

    def _refuse(self, kind: p.ProblemType, status_line: bytes, detail: str, extra_headers: bytes = b"") -> None:
        """Answer ``kind`` and close the connection (the parser cannot go on with it)."""
        if self.on_refused is not None:
            self.on_refused(kind.name)
        body = problem_body(kind, detail)
        head = (
            b"HTTP/1.1 " + status_line + b"\r\n"
            b"content-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n" + extra_headers + b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()
