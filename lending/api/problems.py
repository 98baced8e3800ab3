"""Errors as problem details (RFC 9457): one stable ``type`` per kind of problem.

Every kind is in ``PROBLEMS``; its ``type`` is ``/problems/<name>``, which the API serves
(``GET /problems/<name>``: the kind's title, status and meaning). The README lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from lending.errors import LendingError

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "/problems/"


class JsonResponse(Response):
    """A JSON response encoded with orjson (about ten times faster than the standard library's)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True)
class ProblemType:
    """A kind of problem.

    :param name: the last part of its ``type`` URI.
    :param status: the HTTP status it comes with.
    :param title: a short summary that does not change from one occurrence to the next.
    :param meaning: when it happens and what to do, for ``GET /problems/<name>``.
    """

    name: str
    status: int
    title: str
    meaning: str

    @property
    def uri(self) -> str:
        """``/problems/<name>``; a name that is a URI already (``about:blank``) as it is."""
        return self.name if ":" in self.name else TYPE_PREFIX + self.name

    def as_json(self) -> dict[str, Any]:
        return {"type": self.uri, "title": self.title, "status": self.status, "meaning": self.meaning}


def _kind(name: str, status: int, title: str, meaning: str) -> ProblemType:
    return ProblemType(name, status, title, meaning)


MALFORMED_BODY = _kind("malformed-body", 400, "Malformed body", "The body is not JSON. Nothing was queued.")
MALFORMED_HTTP = _kind(
    "malformed-http",
    400,
    "Malformed HTTP request",
    "The request line or headers are not valid HTTP/1.1 (detail gives the parser's reason). Nothing was "
    "queued, and the server closes the connection.",
)
HEAD_TOO_LARGE = _kind(
    "head-too-large",
    431,
    "Request head too large",
    "The request line and headers are over 64 KiB. Nothing was queued, and the server closes the connection.",
)
REQUEST_TIMEOUT = _kind(
    "request-timeout",
    408,
    "Request timeout",
    "The request line and headers did not arrive within 10 s, or the body they announce not within 10 s of them. "
    "Nothing was queued, and the server closes the connection.",
)
INVALID_REQUEST = _kind(
    "invalid-request",
    422,
    "Invalid request",
    "The body is JSON but not a request the service takes: a field missing or of the wrong type, or an id or "
    "the number of books breaking the service's rules (detail says which). Nothing was queued.",
)
INVALID_PARAMETER = _kind(
    "invalid-parameter",
    422,
    "Invalid parameter",
    "A query parameter, header or path segment has a value the API does not take (detail says which).",
)
INVALID_IDEMPOTENCY_KEY = _kind(
    "invalid-idempotency-key",
    400,
    "Invalid Idempotency-Key",
    "The Idempotency-Key header must be 1-255 visible ASCII characters. Nothing was queued.",
)
IDEMPOTENCY_KEY_REUSED = _kind(
    "idempotency-key-reused",
    422,
    "Idempotency-Key reused",
    "The Idempotency-Key already names a request with another action, user or books (keys are kept 24 h). "
    "Nothing was queued: use a new key for a new request.",
)
BODY_TOO_LARGE = _kind("body-too-large", 413, "Body too large", "The body is over 64 KiB. Nothing was queued.")
UNSUPPORTED_ENCODING = _kind(
    "unsupported-encoding",
    415,
    "Unsupported encoding",
    "The body is sent compressed or otherwise encoded (a Content-Encoding other than identity, a "
    "Transfer-Encoding other than chunked); the API reads plain JSON. Nothing was queued.",
)
DENIED = _kind(
    "denied",
    409,
    "Request denied",
    "The request was processed and denied (detail gives the reason, skipped the books not lent or returned; "
    "event is the outcome event).",
)
REJECTED = _kind(
    "rejected",
    422,
    "Request rejected",
    "The request was queued, and the worker rejected it (e.g. the limits changed in between); event is the "
    "outcome event.",
)
REQUEST_FAILED = _kind(
    "request-failed",
    502,
    "Request failed",
    "The worker could not process the request (e.g. the shelving service kept failing): it is a dead letter "
    "now, which an operator may retry. detail gives the error; event is the outcome event.",
)
OUTCOME_TIMEOUT = _kind(
    "outcome-timeout",
    504,
    "No outcome in time",
    "The request is queued, but no outcome came within ?wait seconds (no worker running, or a backlog). It "
    "stays queued: poll its location (GET /v1/requests/{action}/{request_id}).",
)
NOT_FOUND = _kind("not-found", 404, "Not found", "No such endpoint.")
NO_SUCH_REQUEST = _kind(
    "no-such-request",
    404,
    "No such request",
    "No request with this action and id is in its stream, nor its outcome in the events (or it is older than "
    "what the streams keep).",
)
OUTCOME_UNAVAILABLE = _kind(
    "outcome-unavailable",
    410,
    "Outcome no longer available",
    "The request was processed, but its outcome event is beyond what a lookup reads (too many events after "
    "it) or was trimmed away.",
)
METHOD_NOT_ALLOWED = _kind(
    "method-not-allowed", 405, "Method not allowed", "The endpoint exists, but not with this method (see Allow)."
)
UNAUTHORIZED = _kind(
    "unauthorized",
    401,
    "Unauthorized",
    "Operator endpoints need an Authorization header with the bearer token the API runs with "
    "(LENDING_API_TOKEN); the one given is missing or wrong.",
)
OPERATOR_OFF = _kind(
    "operator-endpoints-off",
    404,
    "Operator endpoints are off",
    "The API runs without LENDING_API_TOKEN, so its operator endpoints are off.",
)
NO_SUCH_LETTER = _kind("no-such-dead-letter", 404, "No such dead letter", "No dead letter has this id.")
LETTER_NOT_RETRYABLE = _kind(
    "dead-letter-not-retryable",
    409,
    "Dead letter not retryable",
    "The dead letter names no stream of this namespace, or keeps no fields to queue again; it is left for a human.",
)
TOO_MANY_CONNECTIONS = _kind(
    "too-many-connections",
    503,
    "Too many connections",
    "The API holds as many connections as it serves at once (--max-clients); it answered this one at once and "
    "closed it. Nothing was read or queued: retry after Retry-After seconds.",
)
REDIS_UNAVAILABLE = _kind(
    "redis-unavailable",
    503,
    "Redis unavailable",
    "The API lost Redis or Redis did not answer. For a submission, detail says whether it may have been "
    "queued: retrying with the same Idempotency-Key is safe.",
)
REDIS_REFUSED = _kind(
    "redis-refused",
    503,
    "Redis refused the request",
    "Redis refused the command: out of memory, no permission, a request stream out of IDs, a key of the "
    "wrong type... (detail gives Redis's reason). Nothing was queued.",
)
INTERNAL_ERROR = _kind(
    "internal-error",
    500,
    "Internal error",
    "An unexpected error; it is logged with its traceback on the server.",
)

#: Every kind of problem, by name.
PROBLEMS: dict[str, ProblemType] = {
    kind.name: kind
    for kind in (
        MALFORMED_BODY,
        MALFORMED_HTTP,
        HEAD_TOO_LARGE,
        REQUEST_TIMEOUT,
        INVALID_REQUEST,
        INVALID_PARAMETER,
        INVALID_IDEMPOTENCY_KEY,
        IDEMPOTENCY_KEY_REUSED,
        BODY_TOO_LARGE,
        UNSUPPORTED_ENCODING,
        DENIED,
        REJECTED,
        REQUEST_FAILED,
        OUTCOME_TIMEOUT,
        NOT_FOUND,
        NO_SUCH_REQUEST,
        OUTCOME_UNAVAILABLE,
        METHOD_NOT_ALLOWED,
        UNAUTHORIZED,
        OPERATOR_OFF,
        NO_SUCH_LETTER,
        LETTER_NOT_RETRYABLE,
        REDIS_UNAVAILABLE,
        REDIS_REFUSED,
        INTERNAL_ERROR,
    )
}


class Problem(LendingError):
    """Ends a request with a problem response.

    :param kind: the kind of problem.
    :param detail: what happened this time, for a human.
    :param instance: the URI of this occurrence (the request's path when not given).
    :param headers: extra response headers (``Location``, ``Allow``, ``WWW-Authenticate``).
    :param extensions: extra members of the body (``request_id``, ``event``...).
    """

    def __init__(
        self,
        kind: ProblemType,
        detail: str,
        *,
        instance: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.instance = instance
        self.headers = dict(headers or {})
        self.extensions = extensions

    def response(self, path: str) -> Response:
        """The response, ``path`` being the request's (the default ``instance``)."""
        return problem_response(
            self.kind, self.detail, instance=self.instance or path, headers=self.headers, **self.extensions
        )


def problem_response(
    kind: ProblemType,
    detail: str,
    *,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body = problem_body(kind, detail, instance=instance, **extensions)
    return Response(body, status_code=kind.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_body(kind: ProblemType, detail: str, *, instance: str | None = None, **extensions: Any) -> bytes:
    """The JSON body of a problem response."""
    body: dict[str, Any] = {"type": kind.uri, "title": kind.title, "status": kind.status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return orjson.dumps(body)
