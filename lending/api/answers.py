"""The answers the submission endpoints and the request endpoint share: a request's
location, ``202 queued``, an outcome as a response (or a problem), Redis failing."""

from __future__ import annotations

import structlog
from redis.exceptions import RedisError, ResponseError
from starlette.responses import Response

from lending.api import problems as p
from lending.api.problems import JsonResponse, Problem, problem_response
from lending.api.reads import Pending, RequestState, Unavailable
from lending.domain.events import DENIED, FAILED, REJECTED, Event
from lending.redis.replies import is_refusal, is_transient, reply_text

log = structlog.get_logger(__name__)

#: The problem an outcome is, when it is not a success.
OUTCOME_PROBLEMS = {DENIED: p.DENIED, REJECTED: p.REJECTED, FAILED: p.REQUEST_FAILED}


def location(action: str, request_id: str) -> str:
    return f"/v1/requests/{action}/{request_id}"


def queued_response(action: str, request_id: str, *, replayed: bool) -> Response:
    headers = {"Location": location(action, request_id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JsonResponse(
        {"request_id": request_id, "action": action, "status": "queued"}, status_code=202, headers=headers
    )


def outcome_response(action: str, request_id: str, state: RequestState, wait_s: float) -> Response:
    """The answer to a submission that waited ``wait_s`` for ``state``."""
    where = location(action, request_id)
    if isinstance(state, Event):
        kind = OUTCOME_PROBLEMS.get(state.status)
        if kind is None:
            return JsonResponse(state.as_json(), headers={"Content-Location": where})
        raise Problem(
            kind,
            state.reason or kind.title,
            instance=where,
            headers={"Content-Location": where},
            request_id=request_id,
            action=action,
            skipped=list(state.skipped),
            event=state.as_json(),
        )
    if isinstance(state, Pending):
        why = "the API is shutting down" if state.shutting_down else f"no outcome within {wait_s:g} s"
        raise Problem(
            p.OUTCOME_TIMEOUT,
            f"{why}; the request stays queued and is processed when a worker runs: poll GET {where}",
            instance=where,
            headers={"Location": where},
            request_id=request_id,
            action=action,
            location=where,
        )
    raise state_problem(action, request_id, state)


def state_problem(action: str, request_id: str, state: Unavailable | None) -> Problem:
    where = location(action, request_id)
    if isinstance(state, Unavailable):
        return Problem(
            p.OUTCOME_UNAVAILABLE,
            f"{action} request {request_id} was processed, but its outcome event is beyond the lookup or trimmed",
            instance=where,
        )
    return Problem(p.NO_SUCH_REQUEST, f"no {action} request {request_id}", instance=where)


def redis_problem(exc: RedisError, path: str) -> Response:
    """Redis lost (503, try again) or refusing the command (503 with its reason)."""
    if is_refusal(exc) or not is_transient(exc):
        reason = reply_text(exc) if isinstance(exc, ResponseError) else str(exc) or type(exc).__name__
        log.warning("Redis refused a command", path=path, error=reason)
        return problem_response(p.REDIS_REFUSED, f"Redis refused: {reason}", instance=path)
    log.warning("Redis unavailable", path=path, error=str(exc) or type(exc).__name__)
    return problem_response(
        p.REDIS_UNAVAILABLE, "Redis did not answer; try again", instance=path, headers={"Retry-After": "1"}
    )
