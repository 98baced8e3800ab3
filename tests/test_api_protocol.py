"""The API's transport: what one turn of the event loop writes to a connection goes out as
one write, and nothing written is lost or reordered by closing."""

from __future__ import annotations

import asyncio

from lending.api.protocol import CoalescingTransport


class RecordingTransport:
    """Stands in for the socket transport under the wrapper: records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def coalescing() -> tuple[CoalescingTransport, RecordingTransport]:
    inner = RecordingTransport()
    return CoalescingTransport(inner), inner  # type: ignore[arg-type]


async def test_writes_of_one_turn_go_out_as_one_write_at_its_end() -> None:
    transport, inner = coalescing()

    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert inner.writes == []  # not yet: the turn goes on
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)

    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert inner.writes[1:] == [b"next"]


async def test_closing_writes_what_waits_first_and_abort_drops_it() -> None:
    transport, inner = coalescing()
    transport.write(b"head")
    transport.writelines([b"body", b"!"])
    transport.close()
    assert inner.writes == [b"headbody!"] and inner.closing
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert inner.writes == [b"headbody!"]

    transport, inner = coalescing()
    transport.write(b"lost")
    transport.abort()
    await asyncio.sleep(0)
    assert inner.writes == [] and inner.aborted


async def test_write_eof_comes_after_what_waits_and_the_rest_is_the_transports() -> None:
    transport, inner = coalescing()
    transport.write(b"last")
    transport.write_eof()
    assert inner.writes == [b"last"] and inner.eof
    assert transport.get_extra_info("peername") == "info:peername"


async def test_nothing_is_written_to_a_connection_closed_meanwhile() -> None:
    transport, inner = coalescing()
    transport.write(b"late")
    inner.close()  # e.g. the peer went away
    await asyncio.sleep(0)
    assert inner.writes == []
