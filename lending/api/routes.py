"""The public endpoints: submissions (served by ``fastpath``; described here), a
request's outcome, loans, books, the live events."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations,
# and some are built at run time (the ?wait= limit comes from the settings).
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from lending.api import problems as p
from lending.api import reads, schemas, sse
from lending.api.answers import state_problem
from lending.api.fastpath import describe, submission
from lending.api.problems import JsonResponse, Problem
from lending.api.reads import Pending
from lending.api.state import Api
from lending.domain.events import Event
from lending.domain.requests import id_problem
from lending.domain.streamids import canonical_id, is_entry_id
from lending.keys import ACTIONS, REQUEST_TYPES, RequestType

WAIT_HELP = "Wait up to this many seconds for the outcome (0 < wait <= {max:g})."


def checked_id(value: str, what: str) -> str:
    if problem := id_problem(value, what):
        raise Problem(p.INVALID_PARAMETER, problem)
    return value


Endpoint = Callable[..., Awaitable[Response]]


def public_routes(api: Api) -> APIRouter:
    """The public endpoints of ``api``."""
    router = APIRouter(prefix="/v1")
    max_wait = api.settings.max_wait_s
    Wait = Annotated[float | None, Query(gt=0, le=max_wait, description=WAIT_HELP.format(max=max_wait))]

    def submission_endpoint(request_type: RequestType) -> Endpoint:
        action = request_type.action

        async def post(request: Request) -> Response:
            # Reached only without the ``Submissions`` front (which answers these paths itself).
            return await submission(api, action, request.scope, request.receive)

        post.__name__ = f"post_{request_type.resource}"
        post.__doc__ = (
            f"Queue a {action} request, checked first with the service's own rules (422: nothing queued).\n\n"
            "202 with its id and Location; with ?wait=, its outcome: 200 (the event), 409 denied, "
            "422 rejected, 502 failed, 504 none in time (it stays queued)."
        )
        return post

    submission_responses: dict[int | str, dict[str, Any]] = {
        202: schemas.json_body("Queued (or queued earlier under the same Idempotency-Key)", schemas.QUEUED),
        200: schemas.json_body("With ?wait=: accepted or returned, the outcome event", schemas.EVENT),
        **schemas.problems(
            p.MALFORMED_BODY,
            p.INVALID_IDEMPOTENCY_KEY,
            p.DENIED,
            p.BODY_TOO_LARGE,
            p.UNSUPPORTED_ENCODING,
            p.INVALID_REQUEST,
            p.IDEMPOTENCY_KEY_REUSED,
            p.REJECTED,
            p.INVALID_PARAMETER,
            p.REQUEST_FAILED,
            p.REDIS_UNAVAILABLE,
            p.OUTCOME_TIMEOUT,
        ),
    }
    for request_type in REQUEST_TYPES:
        router.add_api_route(
            f"/{request_type.resource}",
            submission_endpoint(request_type),
            methods=["POST"],
            status_code=202,
            response_model=None,
            responses=submission_responses,
            openapi_extra=describe(
                max_wait,
                requestBody={"required": True, "content": {"application/json": {"schema": schemas.SUBMISSION}}},
            ),
            tags=["requests"],
        )

    @router.get(
        "/requests/{action}/{request_id}",
        response_model=None,
        responses={
            200: schemas.json_body(
                "The outcome event, or {status: pending}", {"oneOf": [schemas.EVENT, schemas.PENDING]}
            ),
            **schemas.problems(p.NO_SUCH_REQUEST, p.OUTCOME_UNAVAILABLE, p.INVALID_PARAMETER, p.REDIS_UNAVAILABLE),
        },
        tags=["requests"],
    )
    async def get_request(action: str, request_id: str, wait: Wait = None) -> Response:
        """A request's outcome event, or ``{"status": "pending"}`` while it is queued or
        being processed; with ?wait=, waits up to that long for the outcome first."""
        canonical = canonical_id(request_id) if action in ACTIONS else None
        if canonical is None:
            raise Problem(p.NO_SUCH_REQUEST, f"no {action[:20]!r} request {request_id[:60]!r}")
        request_id = canonical  # as the outcome event names it (``007-0`` is ``7-0``)
        if wait is None:
            state = await reads.request_state(
                api.client, api.keys, api.tail, action, request_id, lookup_limit=api.settings.lookup_limit
            )
        else:
            state = await api.outcome(action, request_id, wait, look_up=True)
        if isinstance(state, Event):
            return JsonResponse(state.as_json())
        if isinstance(state, Pending):
            return JsonResponse({"request_id": request_id, "action": action, "status": "pending"})
        raise state_problem(action, request_id, state)

    @router.get(
        "/users/{user_id:path}/loans",
        response_model=None,
        responses={
            200: schemas.json_body(
                "The books the user holds",
                {
                    "type": "object",
                    "properties": {"user_id": schemas.ID, "books": {"type": "array", "items": schemas.ID}},
                },
            ),
            **schemas.problems(p.INVALID_PARAMETER, p.REDIS_UNAVAILABLE),
        },
        tags=["library"],
    )
    async def get_loans(user_id: str) -> Response:
        """The books a user holds: kept by the same commit as the outcome, so a book is
        listed as soon as its ``accepted`` outcome is out (read-your-writes)."""
        checked_id(user_id, "user_id")
        return JsonResponse({"user_id": user_id, "books": await reads.loans(api.client, api.keys, user_id)})

    @router.get(
        "/books/{book_id:path}",
        response_model=None,
        responses={
            200: schemas.json_body(
                "Where the book is; user_id (who holds it) only for an operator token",
                {
                    "type": "object",
                    "properties": {
                        "book_id": schemas.ID,
                        "where": {"type": "string", "enum": [reads.LENT, reads.IN_STORAGE, reads.ON_THE_SHELVES]},
                        "user_id": schemas.ID,
                    },
                },
            ),
            **schemas.problems(p.UNAUTHORIZED, p.INVALID_PARAMETER, p.REDIS_UNAVAILABLE),
        },
        tags=["library"],
    )
    async def get_book(request: Request, book_id: str) -> Response:
        """Where a book is: lent, in the automated storage, or on the shelves (neither).
        To whom it is lent is shown only with the operator token."""
        checked_id(book_id, "book id")
        operator = operator_token(api, request, required=False)
        where, holder = await reads.whereabouts(api.client, api.keys, book_id)
        body = {"book_id": book_id, "where": where}
        if operator and holder is not None:
            body["user_id"] = holder
        return JsonResponse(body)

    @router.get(
        "/events",
        response_model=None,
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `event: outcome`, `id:` the event's stream id, `data:` the event",
                "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
            },
            **schemas.problems(p.INVALID_PARAMETER),
        },
        tags=["events"],
    )
    async def get_events(
        user_id: Annotated[str | None, Query(description="Only this user's outcomes.")] = None,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", description="Resume after this event (EventSource sends it).")
        ] = None,
        after: Annotated[str | None, Query(description="Resume after this event id (as Last-Event-ID).")] = None,
    ) -> Response:
        """The outcomes as they come, as Server-Sent Events (optionally one user's). With
        Last-Event-ID (or ?after=), the events after that one are sent first."""
        if user_id is not None:
            checked_id(user_id, "user_id")
        resume = last_event_id or after
        if resume is not None and not is_entry_id(resume):
            raise Problem(p.INVALID_PARAMETER, f"Last-Event-ID {resume[:60]!r} is not an event id")
        return await sse.outcome_stream(
            api.client,
            api.keys,
            api.tail,
            accept=(lambda event: event.user_id == user_id) if user_id is not None else None,
            last_event_id=resume,
            keep_alive_s=api.settings.keep_alive_s,
            queue_size=api.settings.subscriber_queue,
        )

    return router


def operator_token(api: Api, request: Request, *, required: bool) -> bool:
    """Does ``request`` carry the operator token? A wrong token is refused (401); so is none
    when ``required``, and then, with no token configured, the endpoint is off (404)."""
    if api.settings.token is None:
        if required:
            raise Problem(p.OPERATOR_OFF, "operator endpoints are off: the API runs without LENDING_API_TOKEN")
        return False
    header = request.headers.get("authorization")
    if header is None and not required:
        return False
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not api.token_matches(presented.strip()):
        raise Problem(
            p.UNAUTHORIZED,
            "a missing or wrong operator token" if header else "operator endpoints need Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="lending"'},
        )
    return True
