"""OpenAPI descriptions of the bodies. Documentation only: the API parses its bodies with
orjson and checks them with the service's own rules, with no per-request model."""

from __future__ import annotations

from typing import Any

from lending.api.problems import PROBLEM_MEDIA_TYPE, ProblemType
from lending.domain.events import STATUSES
from lending.domain.requests import MAX_ID_LENGTH

ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}

SUBMISSION = {
    "type": "object",
    "required": ["user_id", "book_ids"],
    "properties": {
        "user_id": {**ID, "description": "no comma, whitespace, control or format character"},
        "book_ids": {
            "type": "array",
            "items": ID,
            "minItems": 1,
            "description": "duplicates are removed; at most max_books_per_request distinct books",
        },
    },
    "example": {"user_id": "Salvatore", "book_ids": ["ofmiceandmen"]},
}

QUEUED = {
    "type": "object",
    "properties": {
        "request_id": {"type": "string", "example": "1764085231452-0"},
        "action": {"type": "string", "enum": ["lend", "return"]},
        "status": {"type": "string", "enum": ["queued"]},
    },
}

EVENT = {
    "type": "object",
    "properties": {
        "request_id": {"type": "string"},
        "action": {"type": "string", "enum": ["lend", "return"]},
        "user_id": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "books": {"type": "array", "items": {"type": "string"}},
        "skipped": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": "string"},
        "event_id": {"type": "string", "description": "the event's id in {NS}:events"},
    },
}

PENDING = {
    "type": "object",
    "properties": {
        "request_id": {"type": "string"},
        "action": {"type": "string"},
        "status": {"type": "string", "enum": ["pending"]},
    },
}

PROBLEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string", "format": "uri-reference"},
    },
}


def json_body(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def problems(*kinds: ProblemType) -> dict[int | str, dict[str, Any]]:
    """The responses of ``kinds``, by status (kinds sharing one are listed together)."""
    out: dict[int | str, dict[str, Any]] = {}
    for kind in kinds:
        entry = out.setdefault(kind.status, {"description": "", "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM}}})
        entry["description"] = "; ".join(filter(None, [entry["description"], f"{kind.uri}: {kind.title}"]))
    return out
