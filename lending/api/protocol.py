"""The API's HTTP protocol: uvicorn's httptools protocol, with one write per response and
problem details for a request it cannot parse.

uvicorn writes a response's head and its body with two ``transport.write`` calls, two
system calls that on loopback also run the receiver's TCP stack: under load they were a
fifth of the API's CPU. ``CoalescingTransport`` joins what one turn of the event loop
writes to a connection into one write, at the end of that turn.

uvicorn answers a request line or headers it cannot parse with its own plain-text 400;
``ApiHttpProtocol`` answers a problem (RFC 9457) like every other error of the API.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

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


class ApiHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``, answering an
    unparsable request with a problem."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport)))

    def send_400_response(self, msg: str) -> None:
        body = problem_body(p.MALFORMED_HTTP, f"the request is not valid HTTP/1.1: {msg}")
        head = (
            b"HTTP/1.1 400 Bad Request\r\n"
            b"content-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()
