"""The FastAPI application: the routes of an ``Api``, and every error as a problem.

Errors of every origin end as problem details: ``Problem`` raised by an endpoint, the
router's 404 and 405, a query parameter or header FastAPI refuses, Redis lost or
refusing, and any unexpected exception (500, logged with its traceback, nothing of it
in the body).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lending import __version__
from lending.api import problems as p
from lending.api.answers import redis_problem
from lending.api.dashboard import dashboard_routes
from lending.api.operator import operator_routes
from lending.api.problems import JsonResponse, Problem, ProblemType, problem_response
from lending.api.routes import public_routes
from lending.api.state import Api

log = structlog.get_logger(__name__)

DESCRIPTION = """The front door of the lending service: lend and return books, follow the outcomes,
and ask who holds what. Errors are problem details (RFC 9457); each `type` is documented at
`GET /problems/<name>`. Operator endpoints need `Authorization: Bearer <LENDING_API_TOKEN>`."""


def build_app(api: Api) -> FastAPI:
    """The application serving ``api``; its lifespan starts and closes ``api``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await api.start()
        try:
            yield
        finally:
            await api.close()

    app = FastAPI(
        title="lending",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        default_response_class=JsonResponse,
        # A trailing slash is a 404 problem: the redirect's Location took the client's Host.
        redirect_slashes=False,
    )
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_parameter)

    async def redis_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RedisError)  # registered for RedisError only
        api.redis_failed(exc)
        return redis_problem(exc, request.url.path)

    app.add_exception_handler(RedisError, redis_error)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(HeadAsGet)
    app.add_middleware(Utf8Urls)
    app.include_router(public_routes(api))
    app.include_router(operator_routes(api))
    app.include_router(dashboard_routes(api.dashboard))

    @app.get("/metrics", response_model=None, include_in_schema=False)
    async def metrics() -> Response:
        """The API's Prometheus metrics (``lending.api.metrics``)."""
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/problems/{name}", response_model=None, tags=["problems"])
    async def get_problem_type(name: str) -> Response:
        """What a problem ``type`` means."""
        kind = p.PROBLEMS.get(name)
        if kind is None:
            raise Problem(p.NOT_FOUND, f"no problem type {name!r}")
        return JsonResponse(kind.as_json())

    return app


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)  # registered for Problem only
    return exc.response(request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    """The router's 404 and 405, and any other ``HTTPException``."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    path = request.url.path
    if exc.status_code == 404:
        return problem_response(p.NOT_FOUND, f"no endpoint {request.method} {path}", instance=path, headers=exc.headers)
    if exc.status_code == 405:
        return problem_response(
            p.METHOD_NOT_ALLOWED, f"{path} does not take {request.method}", instance=path, headers=exc.headers
        )
    phrase = _phrase(exc.status_code)
    kind = ProblemType("about:blank", exc.status_code, phrase, "")
    return problem_response(kind, str(exc.detail) or phrase, instance=path, headers=exc.headers)


async def _invalid_parameter(request: Request, exc: Exception) -> Response:
    """A query parameter, header or path segment FastAPI refused: 422, saying which and why."""
    assert isinstance(exc, RequestValidationError)  # registered for RequestValidationError only
    errors = [
        {"in": str(error["loc"][0]), "name": ".".join(str(part) for part in error["loc"][1:]), "message": error["msg"]}
        for error in exc.errors()
    ]
    detail = "; ".join(f"{e['in']} parameter {e['name']}: {e['message']}" for e in errors)
    return problem_response(p.INVALID_PARAMETER, detail, instance=request.url.path, errors=errors)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class UnexpectedErrors:
    """ASGI middleware: an exception no handler took becomes a 500 problem (when the
    response has not started), logged once with its traceback; the body tells nothing of it.

    (Starlette's own last resort re-raises the exception after answering, for the server
    to log it again, in its own format.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error", method=scope.get("method"), path=scope.get("path"))
            if not started:
                response = problem_response(
                    p.INTERNAL_ERROR, "an unexpected error; it is logged on the server", instance=scope.get("path")
                )
                await response(scope, receive, send)


#: Responses that never end: a HEAD of them would never end either (it stays a 405).
EVENT_STREAMS = frozenset({"/v1/events", "/v1/dashboard/stream"})


class HeadAsGet:
    """ASGI middleware: ``HEAD`` of a ``GET`` endpoint is answered as the ``GET`` would be,
    as HTTP asks of every server; uvicorn sends the head of the answer only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"] in EVENT_STREAMS:
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}

        async def send_with_route(message: Message) -> None:
            # The route that served it, for the metrics (they count the method as HEAD).
            if message["type"] == "http.response.start" and "route" in as_get:
                scope["route"] = as_get["route"]
            await send(message)

        await self.app(as_get, receive, send_with_route)


class Utf8Urls:
    """ASGI middleware: a path or query string whose %-escapes do not decode as UTF-8
    (``/v1/books/%ff``, ``?user_id=%ff``) is a 422 problem. The server and the framework
    decode them leniently, into U+FFFD, and the API would answer about another id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if "\ufffd" in scope["path"] and not _utf8(scope.get("raw_path") or b""):
                part = "the path"
            elif b"%" in scope["query_string"] and not _utf8(scope["query_string"]):
                part = "the query string"
            else:
                part = ""
            if part:
                detail = f"{part} is not valid UTF-8 once its %-escapes are decoded"
                path = (scope.get("raw_path") or b"").decode("latin-1") or scope["path"]  # as sent, escapes and all
                await problem_response(p.INVALID_PARAMETER, detail, instance=path)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _utf8(escaped: bytes) -> bool:
    try:
        unquote_to_bytes(escaped).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
