"""The operator endpoints: the namespace's status and its dead letters.

Each needs ``Authorization: Bearer <LENDING_API_TOKEN>``; without a token configured they
are off (404).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from lending.api import problems as p
from lending.api import schemas
from lending.api.answers import location
from lending.api.problems import JsonResponse, Problem
from lending.api.routes import operator_token
from lending.api.state import Api
from lending.ops import dead_letters
from lending.ops.status import read_status

AUTH_PROBLEMS = schemas.problems(p.UNAUTHORIZED, p.OPERATOR_OFF, p.REDIS_UNAVAILABLE)


def operator_routes(api: Api) -> APIRouter:
    """The operator endpoints of ``api``."""
    router = APIRouter(prefix="/v1", tags=["operator"])

    @router.get(
        "/status",
        response_model=None,
        responses={200: schemas.json_body("What `status --json` shows, and the API's own state", {}), **AUTH_PROBLEMS},
    )
    async def get_status(request: Request) -> Response:
        """The namespace's status (``python -m lending status --json``), and the API's
        events tail under ``api``."""
        operator_token(api, request, required=True)
        snapshot = await read_status(api.client, api.settings.namespace)
        snapshot["api"] = {
            "tail": {
                "position": api.tail.position,
                "connected": api.tail.connected,
                "waiters": api.tail.waiters,
                "subscribers": api.tail.subscribers,
            },
            "limits_published": api.limits_published,
        }
        return JsonResponse(snapshot)

    @router.get(
        "/dead-letters",
        response_model=None,
        responses={200: schemas.json_body("Dead letters, oldest first", {}), **AUTH_PROBLEMS},
    )
    async def get_dead_letters(
        request: Request,
        count: Annotated[int, Query(ge=1, le=10_000, description="At most this many.")] = 100,
        user: Annotated[str | None, Query(description="Only the letters of this user's requests.")] = None,
        error: Annotated[str | None, Query(description="Only the letters whose error contains this.")] = None,
    ) -> Response:
        """Dead letters, oldest first (``python -m lending dead-letters list --json``), and
        how many older ones the workers dropped to keep the stream capped."""
        operator_token(api, request, required=True)
        where = dead_letters.Filter(user, error)
        return JsonResponse(
            {
                "dead_letters": await dead_letters.list_letters(api.client, api.keys, count, where),
                "trimmed": await dead_letters.trimmed(api.client, api.keys),
            }
        )

    @router.post(
        "/dead-letters/{letter_id}/retry",
        response_model=None,
        status_code=202,
        responses={
            202: schemas.json_body("Queued again as a new entry; Location: the new request", {}),
            **schemas.problems(p.NO_SUCH_LETTER, p.LETTER_NOT_RETRYABLE),
            **AUTH_PROBLEMS,
        },
    )
    async def retry_dead_letter(request: Request, letter_id: str) -> Response:
        """Queue a dead letter's original entry again, as a new entry (a new request id),
        and delete the letter, in one step (``dead-letters retry ID``): of operators retrying
        one letter at once, one queues it and the others get 404."""
        operator_token(api, request, required=True)
        try:
            (letter,) = await dead_letters.find(api.client, api.keys, [letter_id])
        except dead_letters.LetterError as exc:
            raise Problem(p.NO_SUCH_LETTER, str(exc)) from None
        if isinstance(why := dead_letters.replay(api.keys, letter), str):
            raise Problem(p.LETTER_NOT_RETRYABLE, f"dead letter {letter_id} cannot be queued again: {why}")
        try:
            (done,) = await dead_letters.retry(api.client, api.scripts, api.keys, [letter_id])
        except dead_letters.LetterError as exc:  # gone meanwhile (another operator)
            raise Problem(p.NO_SUCH_LETTER, str(exc)) from None
        body: dict[str, Any] = {"letter_id": done["id"], "stream": done["stream"], "request_id": done["queued_as"]}
        headers = {}
        if done["stream"] in api.keys.request_streams:
            action = api.keys.action_of(done["stream"])
            body["action"] = action
            headers["Location"] = location(action, done["queued_as"])
        return JsonResponse(body, status_code=202, headers=headers)

    return router
