"""Outcome events published on ``{NS}:events``: one per request entry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ACCEPTED = "accepted"
DENIED = "denied"
RETURNED = "returned"
REJECTED = "rejected"
FAILED = "failed"
STATUSES = (ACCEPTED, DENIED, RETURNED, REJECTED, FAILED)


@dataclass(frozen=True)
class Event:
    """The outcome of one request entry, identified by (``action``, ``request_id``)."""

    request_id: str
    action: str
    user_id: str
    status: str
    books: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    reason: str = ""
    event_id: str = field(default="", compare=False)

    def fields(self) -> dict[str, str]:
        """The stream fields, in the contract's order."""
        return {
            "request_id": self.request_id,
            "action": self.action,
            "user_id": self.user_id,
            "status": self.status,
            "books": ",".join(self.books),
            "skipped": ",".join(self.skipped),
            "reason": self.reason,
        }

    def flat_fields(self) -> list[str]:
        """Field/value pairs as one flat list, the form XADD takes inside a script."""
        return [item for pair in self.fields().items() for item in pair]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.fields()
        out["books"] = list(self.books)
        out["skipped"] = list(self.skipped)
        if self.event_id:
            out["event_id"] = self.event_id
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        """The event ``as_json`` gave (read back by the API's clients)."""
        return cls(
            request_id=str(data.get("request_id", "")),
            action=str(data.get("action", "")),
            user_id=str(data.get("user_id", "")),
            status=str(data.get("status", "")),
            books=tuple(str(book) for book in data.get("books") or ()),
            skipped=tuple(str(book) for book in data.get("skipped") or ()),
            reason=str(data.get("reason", "")),
            event_id=str(data.get("event_id", "")),
        )

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes], event_id: str = "") -> Event:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        def items(name: str) -> tuple[str, ...]:
            value = text(name)
            return tuple(value.split(",")) if value else ()

        return cls(
            request_id=text("request_id"),
            action=text("action"),
            user_id=text("user_id"),
            status=text("status"),
            books=items("books"),
            skipped=items("skipped"),
            reason=text("reason"),
            event_id=event_id,
        )
