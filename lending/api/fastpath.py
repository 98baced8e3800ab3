"""The submission hot path: ``POST /v1/lends`` and ``/v1/returns``, served by a bare ASGI
application in front of FastAPI.

A submission reads its body (at most 64 KiB), parses it with orjson, checks it with the
service's rules, queues it in one round trip (``api_submit.lua``) and answers, or waits
for its outcome through the events tail (no Redis call). FastAPI's routing, dependency
solving and middleware would cost as much CPU again as all of that: ``Submissions``
answers these two endpoints itself and hands everything else to FastAPI. FastAPI keeps
routes for them too (``submission``, the same code), which document them in OpenAPI.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lending.api import problems as p
from lending.api.answers import outcome_response, queued_response, redis_problem
from lending.api.metrics import FastRoute
from lending.api.problems import Problem, problem_response
from lending.api.state import Api
from lending.api.submission import InvalidSubmission, idempotency_key_problem, parse_body, submit
from lending.keys import REQUEST_TYPES

log = structlog.get_logger(__name__)


def wait_param(query_string: bytes, max_wait_s: float) -> float | None:
    """``?wait=`` in seconds, ``None`` without one; read as FastAPI reads the query of the
    other endpoints (``GET /v1/requests/...``): given twice, the last one counts, and
    ``?wait`` without a value is an empty one.

    :raises Problem: not a number, or not within 0 < wait <= ``max_wait_s`` (422).
    """
    if b"wait" not in query_string and b"%" not in query_string:
        return None
    query = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    values = [value for name, value in query if name == "wait"]
    if not values:
        return None
    text = values[-1]
    try:
        wait = float(text)
    except ValueError:
        raise Problem(p.INVALID_PARAMETER, f"query parameter wait: {text[:40]!r} is not a number") from None
    if not (0 < wait <= max_wait_s) or math.isnan(wait):
        raise Problem(p.INVALID_PARAMETER, f"query parameter wait: must be more than 0 and at most {max_wait_s:g}")
    return wait


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of header ``name`` (lower case), decoded as HTTP says (Latin-1)."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


#: The codings a body may be sent with, by header: none but these.
READABLE_CODINGS = {b"content-encoding": {"identity"}, b"transfer-encoding": {"chunked"}}


def unsupported_coding(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """``Content-Encoding: gzip`` (say) when the body is sent with a coding the API does
    not read; ``None`` when it comes as it is (or merely chunked)."""
    for name, value in headers:
        readable = READABLE_CODINGS.get(name)
        if readable is None:
            continue
        codings = {coding.strip().lower() for coding in value.decode("latin-1").split(",")} - {""}
        if codings - readable:
            return f"{name.decode().title()}: {value.decode('latin-1')[:60]}"
    return None


async def receive_body(receive: Receive, headers: Iterable[tuple[bytes, bytes]], limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to be over ``limit`` bytes:
    from its Content-Length, or while it streams in (chunked).

    :raises ClientDisconnect: the client went away before the whole body came: what came
        is not acted on (a cut-off request may be retried, and queued twice).
    """
    length = header(headers, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Problem(p.BODY_TOO_LARGE, f"the body is {length} bytes long (at most {limit})")
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > limit:
            raise Problem(p.BODY_TOO_LARGE, f"the body is over {limit} bytes long")
        if not message.get("more_body", False):
            return body


async def submission(api: Api, action: str, scope: Scope, receive: Receive) -> Response:
    """Serve a ``POST`` of an ``action`` request: 202 queued, or with ``?wait=`` the outcome.

    :raises Problem: the request is not queued (or no outcome came in time).
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    wait = wait_param(scope["query_string"], api.settings.max_wait_s)
    key = header(headers, b"idempotency-key")
    if key is not None and (problem := idempotency_key_problem(key)):
        raise Problem(p.INVALID_IDEMPOTENCY_KEY, problem)
    if key is not None and sum(name == b"idempotency-key" for name, _value in headers) > 1:
        raise Problem(p.INVALID_IDEMPOTENCY_KEY, "the Idempotency-Key header is given more than once")
    if coding := unsupported_coding(headers):
        raise Problem(p.UNSUPPORTED_ENCODING, f"the body is sent with {coding}: send it as plain JSON")
    body = await receive_body(receive, headers, api.settings.max_body_bytes)
    try:
        request = parse_body(action, body, api.limits.max_books_per_request)
    except InvalidSubmission as exc:
        raise Problem(p.MALFORMED_BODY if exc.malformed else p.INVALID_REQUEST, exc.reason) from None
    try:
        done = await submit(api.submitter, api.keys, request, key)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # OSError: no connection could be opened
        api.redis_failed(exc)
        retry = " (retrying with the same Idempotency-Key is safe)" if key else ""
        raise Problem(
            p.REDIS_UNAVAILABLE,
            f"lost Redis while queuing: the request may have been queued{retry}",
            headers={"Retry-After": "1"},
        ) from exc
    if done.key_reused:
        raise Problem(
            p.IDEMPOTENCY_KEY_REUSED,
            "this Idempotency-Key names a request with another action, user or books; nothing was queued",
        )
    if wait is None:
        return queued_response(action, done.request_id, replayed=done.replayed)
    state = await api.outcome(action, done.request_id, wait, look_up=done.replayed)
    return outcome_response(action, done.request_id, state, wait)


class Submissions:
    """ASGI application: the submission endpoints served directly, everything else (and
    the lifespan) by ``app``.

    Errors end as FastAPI's handlers would end them: a problem, Redis's failure as a
    503 problem, anything unexpected as a 500 problem, logged with its traceback.
    """

    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.app = app
        self.api = api
        self._actions = {f"/v1/{t.resource}": t.action for t in REQUEST_TYPES}
        self._routes = {path: FastRoute(path) for path in self._actions}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        action = self._actions.get(scope.get("path", "")) if scope["type"] == "http" else None
        if action is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self._routes[scope["path"]]  # as FastAPI's router does, for the metrics
        response: Response
        try:
            response = await submission(self.api, action, scope, receive)
        except ClientDisconnect:  # nothing queued, and nobody to answer
            log.info("client went away before its body was complete; nothing queued", path=scope["path"])
            return
        except Problem as exc:
            response = exc.response(scope["path"])
        except RedisError as exc:
            self.api.redis_failed(exc)
            response = redis_problem(exc, scope["path"])
        except Exception:
            log.exception("unexpected error", method="POST", path=scope["path"])
            response = problem_response(
                p.INTERNAL_ERROR, "an unexpected error; it is logged on the server", instance=scope["path"]
            )
        await response(scope, receive, send)


def describe(max_wait_s: float, **extra: Any) -> dict[str, Any]:
    """``openapi_extra`` of the submission routes: their parameters, which FastAPI does not
    parse (``submission`` does)."""
    return {
        "parameters": [
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_wait_s},
                "description": f"Wait up to this many seconds for the outcome (0 < wait <= {max_wait_s:g}).",
            },
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "A retry with the same key within 24 h queues nothing new and gets the same request.",
            },
        ],
        **extra,
    }
