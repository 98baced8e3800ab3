"""Redis stream entry IDs (``<ms>-<seq>``): parsing, ordering and ranges. Pure."""

from __future__ import annotations

from collections.abc import Iterable

# The largest ID a stream can hold: a stream whose last ID is this takes no more entries.
MAX_ID = "18446744073709551615-18446744073709551615"
_MAX_PART = 2**64 - 1


def is_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and (seq.isdigit() or not seq)


def is_entry_id(value: str) -> bool:
    """A whole entry ID, ``<ms>-<seq>`` with each part at most 2**64 - 1 (as ``XADD`` gives
    them): unlike a bare ``<ms>``, it names one entry, never a range."""
    ms, dash, seq = value.partition("-")
    return bool(dash) and all(
        0 < len(part) <= 20 and part.isascii() and part.isdigit() and int(part) <= _MAX_PART for part in (ms, seq)
    )


def canonical_id(value: str) -> str | None:
    """``value`` as Redis writes the entry ID it names (``007-0`` is ``7-0``); ``None``
    when it is not a whole entry ID. IDs are compared as text, where Redis reads numbers."""
    if not is_entry_id(value):
        return None
    ms, seq = id_key(value)
    return f"{ms}-{seq}"


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an ID (a bare ``<ms>`` means sequence 0)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str | None:
    """The smallest ID greater than ``entry_id``; ``None`` after ``MAX_ID``, the last."""
    ms, seq = id_key(entry_id)
    if seq < _MAX_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < _MAX_PART else None


def id_range(ids: Iterable[str]) -> tuple[str, str]:
    """The lowest and highest of ``ids`` (``''`` and ``''`` when there are none)."""
    ordered = sorted(ids, key=id_key)
    return (ordered[0], ordered[-1]) if ordered else ("", "")


def id_ms(entry_id: str) -> int:
    """The millisecond timestamp part of an ID: when the entry was added."""
    return id_key(entry_id)[0]
