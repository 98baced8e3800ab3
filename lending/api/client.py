"""The sender's side over HTTP: ``get_books.py --api URL`` queues through the API instead
of Redis, and ends in the same outcomes as ``lending.client.send_request`` (plus
``Invalid``: the API checks a request before queuing it).

Synchronous (httpx): one request, or a few polls, per run. ``timeout_s`` bounds the run:
the API is asked to wait a little less (``?wait=``), so that its answer comes in time;
past 30 s, the request's location is polled with ``?wait=`` until the deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from lending.client import Answered, Invalid, NoOutcome, Outcome, Progress, Queued, Refused, Unreachable
from lending.domain.events import STATUSES, Event
from lending.domain.streamids import is_entry_id
from lending.keys import BY_ACTION

MAX_WAIT_S = 30.0
#: No poll is started with less time than this left.
MIN_POLL_S = 0.5


def send_via_api(
    base_url: str,
    action: str,
    user_id: str,
    book_ids: Sequence[str],
    *,
    timeout_s: float,
    wait: bool = True,
    progress: Progress | None = None,
) -> Outcome:
    """POST the request to the API at ``base_url`` and (if ``wait``) wait for its outcome,
    all within about ``timeout_s``; never raises for the API's sake. ``progress`` records
    how far it got."""
    deadline = time.monotonic() + timeout_s
    progress = progress or Progress()
    body = json.dumps({"user_id": user_id, "book_ids": list(book_ids)})
    try:
        with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as http:
            params = {"wait": wait_param(timeout_s)} if wait else {}
            progress.sent = True
            response = http.post(
                f"/v1/{BY_ACTION[action].resource}",
                content=body,
                params=params,
                headers={"Content-Type": "application/json"},
                timeout=remaining(deadline),
            )
            outcome = read_answer(response, base_url)
            while isinstance(outcome, NoOutcome) and wait and remaining(deadline) > MIN_POLL_S:
                progress.request_id = outcome.request_id
                response = http.get(
                    f"/v1/requests/{action}/{outcome.request_id}",
                    params={"wait": wait_param(remaining(deadline))},
                    timeout=remaining(deadline),
                )
                outcome = read_answer(response, base_url, request_id=outcome.request_id)
            return outcome
    except httpx.HTTPError as exc:
        return failure(exc, progress, base_url, timeout_s)


def remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def wait_param(left_s: float) -> str:
    """``?wait=`` for a run with ``left_s`` seconds left: a little less, so that the API's
    answer (an outcome or a 504) comes before the run's deadline."""
    margin = min(1.0, left_s * 0.2)
    return f"{min(MAX_WAIT_S, max(0.001, left_s - margin)):.3f}"


class NotTheApi(ValueError):
    """An answer that does not have the API's shape (something else listens at the URL)."""


def read_answer(response: httpx.Response, base_url: str, *, request_id: str | None = None) -> Outcome:
    """What the API's answer to a POST (or a poll of ``request_id``) means; an answer of
    another shape than the API's means the API cannot be trusted to be there."""
    try:
        return _read_answer(response, base_url, request_id)
    except NotTheApi as exc:
        fate = f"request {request_id} was queued" if request_id else "the request may have been queued"
        return Unreachable(f"the API at {base_url} answered {response.status_code} with {exc}; {fate}")


def _read_answer(response: httpx.Response, base_url: str, request_id: str | None) -> Outcome:
    body = _json(response)
    status = response.status_code
    kind = str(body.get("type", "")).rsplit("/", 1)[-1]
    detail = str(body.get("detail", "")) or response.reason_phrase
    if "event" in body:
        return Answered(_event(body["event"]))
    if status == 202:
        return Queued(_request_id(body))
    if status == 200 and body.get("status") == "pending" and request_id is not None:
        return NoOutcome(request_id)
    if status == 200:
        return Answered(_event(body))
    if kind == "outcome-timeout":
        return NoOutcome(_request_id(body))
    if kind in ("invalid-request", "body-too-large"):
        return Invalid(detail, by=f"the API at {base_url}")
    if kind == "redis-refused":
        return Refused(detail.removeprefix("Redis refused: "))
    if kind == "redis-unavailable":
        fate = f"; request {request_id} was queued" if request_id else ""
        return Unreachable(f"the API at {base_url} lost Redis: {detail}{fate}")
    return Unreachable(f"the API at {base_url} answered {status}: {detail}")


def failure(exc: httpx.HTTPError, progress: Progress, base_url: str, timeout_s: float) -> Outcome:
    """What a failed HTTP exchange means, given how far the run got."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) and progress.request_id is None:
        return Unreachable(f"cannot reach the API at {base_url}: {exc or type(exc).__name__}; nothing was queued")
    if progress.request_id is not None:
        if isinstance(exc, httpx.TimeoutException):
            return NoOutcome(progress.request_id)
        return Unreachable(f"lost the API at {base_url}: {exc}; request {progress.request_id} was queued")
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(
            f"the API at {base_url} did not answer within {timeout_s:g} s; the request may have been queued"
        )
    return Unreachable(f"lost the API at {base_url}: {exc or type(exc).__name__}; the request may have been queued")


def _request_id(body: dict[str, Any]) -> str:
    found = body.get("request_id")
    if not isinstance(found, str) or not is_entry_id(found):
        raise NotTheApi("no request id")
    return found


def _event(data: object) -> Event:
    """The event of an answer, checked to have the API's shape."""
    if not isinstance(data, dict):
        raise NotTheApi("an event that is not an object")
    texts = ["request_id", "action", "user_id", "status", "reason", "event_id"]
    lists = [data.get(name, []) for name in ("books", "skipped")]
    if (
        any(not isinstance(data.get(name, ""), str) for name in texts)
        or any(not isinstance(books, list) or not all(isinstance(book, str) for book in books) for books in lists)
        or data.get("status") not in STATUSES
        or not is_entry_id(str(data.get("request_id", "")))
    ):
        raise NotTheApi("an event of another shape than the API's")
    return Event.from_json(data)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
