"""The operator endpoints: the namespace's status and its dead letters.

Each needs ``Authorization: Bearer <LENDING_API_TOKEN>``; without a token configured they
are off (404).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.

from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from lending.api import problems as p
from lending.api import schemas
from lending.api.answers import location
from lending.api.problems import JsonResponse, Problem
from lending.api.routes import operator_token
from lending.api.state import Api
from lending.domain.streamids import is_entry_id
from lending.ops import dead_letters
from lending.ops.status import read_status
from lending.redis.replies import Entries

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
        request: Request, count: Annotated[int, Query(ge=1, le=10_000, description="At most this many.")] = 100
    ) -> Response:
        """Dead letters, oldest first (``python -m lending dead-letters list --json``)."""
        operator_token(api, request, required=True)
        return JsonResponse({"dead_letters": await dead_letters.list_letters(api.client, api.keys, count)})

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
        and delete the letter, in one transaction."""
        operator_token(api, request, required=True)
        found: Entries = []
        if is_entry_id(letter_id):
            found = cast(Entries, await api.client.xrange(api.keys.dead_letters, letter_id, letter_id))
        if not found:
            raise Problem(p.NO_SUCH_LETTER, f"no dead letter {letter_id}")
        queued = await dead_letters.retry(api.client, api.keys, [letter_id])
        if letter_id not in queued:
            raise Problem(p.LETTER_NOT_RETRYABLE, f"dead letter {letter_id} cannot be queued again")
        new_id = queued[letter_id]
        stream = (found[0][1] or {}).get(b"stream", b"").decode("utf-8", "replace")
        body: dict[str, Any] = {"letter_id": letter_id, "stream": stream, "request_id": new_id}
        headers = {}
        if stream in api.keys.request_streams:
            action = api.keys.action_of(stream)
            body["action"] = action
            headers["Location"] = location(action, new_id)
        return JsonResponse(body, status_code=202, headers=headers)

    return router
