"""The HTTP API with a real Redis and a real in-process worker, over real HTTP (uvicorn on
a free port in this process): submissions and their outcomes, idempotency, the read
model, bad input, Redis failing, and the operator endpoints."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import resource
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import ANY

import httpx
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.api.app import build_app
from lending.api.config import ApiSettings
from lending.api.problems import PROBLEMS
from lending.api.protocol import ApiHttpProtocol
from lending.api.state import Api
from lending.domain.streamids import MAX_ID, id_key
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Limits

from .api_support import LiveApi, closing_problem, problem, raw_connection, raw_exchange, send_in_two, serving
from .conftest import StartWorker
from .support import ROOT, decoded, event_for, raw_entries, send, stream_entries, wait_until, xadd_fields

TOKEN = "s3cret-operator-token"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api_settings(redis_url: str, namespace: str) -> ApiSettings:
    return ApiSettings(redis_url=redis_url, namespace=namespace, limits_refresh_s=0.2, keep_alive_s=0.5)


@pytest.fixture
async def live(api_settings: ApiSettings, redis: Redis) -> AsyncIterator[LiveApi]:
    async with serving(api_settings) as live:
        yield live


async def forget_recent(live: LiveApi, event_id: str) -> None:
    """Once the tail has read ``event_id``, empty its recent window: as if the outcomes were
    long gone by, so that they must be looked up in the stream."""
    await wait_until(lambda: id_key(live.api.tail.position) >= id_key(event_id))
    live.api.tail._recent.clear()


async def queued_count(redis: Redis, keys: Keys) -> int:
    return int(await redis.xlen(keys.lend_requests)) + int(await redis.xlen(keys.return_requests))


# -- submissions ---------------------------------------------------------------------------


async def test_a_lend_is_queued_with_its_location(live: LiveApi, redis: Redis, keys: Keys) -> None:
    response = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1", "b2", "b1"]})

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["action"] == "lend" and body["status"] == "queued"
    assert response.headers["location"] == f"/v1/requests/lend/{body['request_id']}"
    assert response.headers["content-type"] == "application/json"
    # Queued as the worker reads it, duplicates removed.
    assert await stream_entries(redis, keys.lend_requests) == [
        (body["request_id"], {"user_id": "ada", "book_ids": "b1,b2"})
    ]
    # No worker: the request is pending.
    pending = await live.http.get(response.headers["location"])
    assert pending.status_code == 200
    assert pending.json() == {"request_id": body["request_id"], "action": "lend", "status": "pending"}


async def test_waiting_for_an_accepted_lend_then_the_loans_list_it(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()

    lent = await live.http.post("/v1/lends?wait=10", json={"user_id": "ada", "book_ids": ["b1", "b2"]})

    assert lent.status_code == 200, lent.text
    event = lent.json()
    assert (event["status"], event["books"], event["user_id"]) == ("accepted", ["b1", "b2"], "ada")
    assert event["event_id"]
    # Read-your-writes: the loans kept by the commit that wrote the event.
    loans = await live.http.get("/v1/users/ada/loans")
    assert loans.json() == {"user_id": "ada", "books": ["b1", "b2"]}
    # The request's location answers with its event.
    outcome = await live.http.get(lent.headers["content-location"])
    assert outcome.json() == event

    returned = await live.http.post("/v1/returns?wait=10", json={"user_id": "ada", "book_ids": ["b1"]})
    assert returned.status_code == 200 and returned.json()["status"] == "returned", returned.text
    assert (await live.http.get("/v1/users/ada/loans")).json()["books"] == ["b2"]


async def test_each_accepted_lend_is_in_the_loans_at_once(live: LiveApi, start_worker: StartWorker) -> None:
    await start_worker()
    for n in range(5):
        lent = await live.http.post("/v1/lends?wait=10", json={"user_id": "bob", "book_ids": [f"book-{n}"]})
        assert lent.status_code == 200, lent.text
        loans = (await live.http.get("/v1/users/bob/loans")).json()["books"]
        assert f"book-{n}" in loans


async def test_a_denied_lend_is_409_with_the_reason_and_the_skipped_books(
    live: LiveApi, start_worker: StartWorker
) -> None:
    await start_worker()
    assert (await live.http.post("/v1/lends?wait=10", json={"user_id": "ada", "book_ids": ["b1"]})).status_code == 200

    denied = await live.http.post("/v1/lends?wait=10", json={"user_id": "bob", "book_ids": ["b1"]})

    body = problem(denied, 409, "denied")
    assert body["skipped"] == ["b1"] and body["event"]["status"] == "denied"
    assert body["detail"] == body["event"]["reason"] != ""
    assert body["instance"] == f"/v1/requests/lend/{body['request_id']}"


async def test_a_request_the_worker_rejects_is_422_with_its_event(
    api_settings: ApiSettings, redis: Redis, start_worker: StartWorker
) -> None:
    # The API still checks against the defaults (50 books): the worker allows 2.
    async with serving(api_settings.replace(limits_refresh_s=3600)) as live:
        await start_worker(max_books_per_request=2)
        rejected = await live.http.post("/v1/lends?wait=10", json={"user_id": "ada", "book_ids": ["b1", "b2", "b3"]})

    body = problem(rejected, 422, "rejected")
    assert body["event"]["status"] == "rejected" and "at most 2" in body["detail"]


async def test_a_failed_request_is_502_with_the_dead_letter_reason(live: LiveApi, start_worker: StartWorker) -> None:
    await start_worker(shelving_fail_rate=1.0, max_deliveries=1)

    failed = await live.http.post("/v1/lends?wait=10", json={"user_id": "ada", "book_ids": ["b1"]})

    body = problem(failed, 502, "request-failed")
    assert body["event"]["status"] == "failed"
    assert "processing failed" in body["detail"] and "ShelvingUnavailable" in body["detail"]


async def test_no_outcome_in_time_is_504_and_the_request_stays_queued(live: LiveApi, redis: Redis, keys: Keys) -> None:
    response = await live.http.post("/v1/lends?wait=0.3", json={"user_id": "ada", "book_ids": ["b1"]})

    body = problem(response, 504, "outcome-timeout")
    where = f"/v1/requests/lend/{body['request_id']}"
    assert response.headers["location"] == body["location"] == where
    assert f"GET {where}" in body["detail"]
    assert await redis.xlen(keys.lend_requests) == 1
    assert live.api.tail.waiters == 0


async def test_a_poll_with_wait_gets_the_outcome_when_a_worker_comes(live: LiveApi, start_worker: StartWorker) -> None:
    queued = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
    where = queued.headers["location"]

    async def worker_later() -> None:
        await asyncio.sleep(0.3)
        await start_worker()

    starting = asyncio.create_task(worker_later())
    outcome = await live.http.get(f"{where}?wait=10")
    await starting

    assert outcome.status_code == 200 and outcome.json()["status"] == "accepted", outcome.text


@pytest.mark.parametrize(
    "query",
    [
        "wait=0",
        "wait=-1",
        "wait=30.5",
        "wait=abc",
        "wait=nan",
        "wait=inf",
        "wait=",
        "wait",
        "wait=5&wait=abc",
        "w%61it=x",
    ],
)
async def test_a_wait_out_of_range_is_422_and_queues_nothing(
    live: LiveApi, redis: Redis, keys: Keys, query: str
) -> None:
    response = await live.http.post(f"/v1/lends?{query}", json={"user_id": "ada", "book_ids": ["b1"]})

    body = problem(response, 422, "invalid-parameter")
    assert "wait" in body["detail"]
    assert await queued_count(redis, keys) == 0
    # Read as the request's location reads it.
    problem(await live.http.get(f"/v1/requests/lend/1-0?{query}"), 422, "invalid-parameter")


# -- bad input: 4xx problems, never a 500, nothing queued ----------------------------------

HUGE = b'{"user_id": "ada", "book_ids": ["' + b"x" * 70_000 + b'"]}'


@pytest.mark.parametrize(
    ("body", "status", "name", "detail"),
    [
        (b"", 400, "malformed-body", "not valid JSON"),
        (b"{not json", 400, "malformed-body", "not valid JSON"),
        (b'{"user_id": "\\ud800", "book_ids": ["b1"]}', 400, "malformed-body", "surrogate"),
        (b"\xff\xfe", 400, "malformed-body", "not valid JSON"),
        (b"[]", 422, "invalid-request", "JSON object"),
        (b'"ada"', 422, "invalid-request", "JSON object"),
        (b'{"book_ids": ["b1"]}', 422, "invalid-request", "missing field user_id"),
        (b'{"user_id": "ada"}', 422, "invalid-request", "missing field book_ids"),
        (b'{"user_id": 7, "book_ids": ["b1"]}', 422, "invalid-request", "user_id must be a string, not a number"),
        (b'{"user_id": null, "book_ids": ["b1"]}', 422, "invalid-request", "not null"),
        (b'{"user_id": "ada", "book_ids": "b1"}', 422, "invalid-request", "array of strings, not a string"),
        (b'{"user_id": "ada", "book_ids": {"b": 1}}', 422, "invalid-request", "not an object"),
        (b'{"user_id": "ada", "book_ids": ["b1", true]}', 422, "invalid-request", "book_ids[1] must be a string"),
        (b'{"user_id": "ada", "book_ids": []}', 422, "invalid-request", "book_ids is empty"),
        (b'{"user_id": "ada", "book_ids": ["a,b"]}', 422, "invalid-request", "contains a comma"),
        (b'{"user_id": "ada lovelace", "book_ids": ["b1"]}', 422, "invalid-request", "whitespace"),
        (b'{"user_id": "", "book_ids": ["b1"]}', 422, "invalid-request", "user_id is empty"),
        (b'{"user_id": "ada", "book_ids": ["b\\u0000"]}', 422, "invalid-request", "control"),
        (b'{"user_id": "ada", "book_ids": ["' + b"x" * 129 + b'"]}', 422, "invalid-request", "129 characters"),
        (HUGE, 413, "body-too-large", "65536"),
    ],
)
async def test_a_bad_body_is_a_4xx_problem_and_queues_nothing(
    live: LiveApi, redis: Redis, keys: Keys, body: bytes, status: int, name: str, detail: str
) -> None:
    for path in ("/v1/lends", "/v1/returns?wait=1"):
        response = await live.http.post(path, content=body, headers={"Content-Type": "application/json"})

        assert detail in problem(response, status, name)["detail"]
    assert await queued_count(redis, keys) == 0


async def test_more_books_than_the_workers_allow_is_422(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(max_books_per_request=2)
    await asyncio.sleep(0.5)  # the API reads the published limits every 0.2 s here

    response = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1", "b2", "b3", "b2"]})

    assert "3 distinct books requested (at most 2 per request)" in problem(response, 422, "invalid-request")["detail"]
    assert await queued_count(redis, keys) == 0


async def test_limits_lost_by_redis_keep_their_last_values_until_published_again(
    live: LiveApi, redis: Redis, keys: Keys
) -> None:
    await redis.hset(keys.config, mapping=xadd_fields(Limits(max_books_per_request=2).fields()))
    await live.api.refresh_limits()
    await redis.delete(keys.config)  # Redis restarted without its data
    await live.api.refresh_limits()

    response = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1", "b2", "b3"]})

    assert "(at most 2 per request)" in problem(response, 422, "invalid-request")["detail"]
    assert not live.api.limits_published


async def test_a_huge_chunked_body_is_413(live: LiveApi, redis: Redis, keys: Keys) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    response = await live.http.post("/v1/lends", content=chunks())

    assert "over 65536 bytes" in problem(response, 413, "body-too-large")["detail"]
    assert await queued_count(redis, keys) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nContent-Length: many\r\n\r\n",
        b"POST /v1/lends HTTP/1.1\r\nHost api\r\n\r\n",
    ],
    ids=["not-a-request-line", "bad-content-length", "header-without-colon"],
)
async def test_a_request_that_is_not_http_is_a_400_problem_and_the_connection_closes(
    live: LiveApi, redis: Redis, keys: Keys, raw: bytes
) -> None:
    status, headers, body = await raw_exchange(live, raw)

    assert status == "HTTP/1.1 400 Bad Request"
    detail = str(closing_problem(headers, body, 400, "malformed-http")["detail"])
    assert detail.startswith("the request is not valid HTTP/1.1: ") and "Invalid HTTP request received" not in detail
    assert await queued_count(redis, keys) == 0
    # The server goes on serving.
    assert (await live.http.get("/v1/books/b1")).status_code == 200


@pytest.mark.parametrize("where", ["headers", "url", "whole-url", "whole-head"])
async def test_a_request_head_over_64_kib_is_a_431_problem_and_the_connection_closes(
    live: LiveApi, redis: Redis, keys: Keys, where: str
) -> None:
    """uvicorn alone reads a head without end: one connection grew the API by 160 MB."""
    if where == "headers":  # and no end to them in sight
        raw = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\n"
    elif where == "url":  # without end
        raw = b"GET /v1/books/" + b"b" * 70_000
    elif where == "whole-url":  # a whole request, with a URL too long for the URL parser
        raw = b"GET /v1/books/" + b"b" * 70_000 + b" HTTP/1.1\r\nHost: api\r\n\r\n"
    else:  # a whole request whose head may come in one read (it was served)
        head = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nX-Filler: " + b"a" * 100_000 + b"\r\n"
        raw = head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    status, headers, body = await raw_exchange(live, raw)

    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert "over 65536 bytes" in str(closing_problem(headers, body, 431, "head-too-large")["detail"])
    assert await queued_count(redis, keys) == 0
    assert (await live.http.get("/v1/books/b1")).status_code == 200


HEAD = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "limit", "said"),
    [
        # Half a head, then nothing ("slowloris").
        (b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nX-Slow: 1", "head_timeout_s", "headers did not arrive"),
        # A head promising 100 bytes of body, then none or less.
        (HEAD, "body_timeout_s", "body did not arrive"),
        (HEAD + b'{"user_id": "ada", ', "body_timeout_s", "body did not arrive"),
    ],
    ids=["half-a-head", "no-body", "half-a-body"],
)
async def test_a_request_that_does_not_come_in_time_is_a_408_problem(
    live: LiveApi, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, raw: bytes, limit: str, said: str
) -> None:
    """Without the timeouts such a connection stayed open for ever."""
    monkeypatch.setattr(ApiHttpProtocol, limit, 0.5)
    started = time.monotonic()

    status, headers, body = await raw_exchange(live, raw)

    assert status == "HTTP/1.1 408 Request Timeout"
    assert f"{said} within 0.5 s" in str(closing_problem(headers, body, 408, "request-timeout")["detail"])
    assert 0.4 < time.monotonic() - started < 4
    assert await queued_count(redis, keys) == 0
    assert (await live.http.get("/v1/books/b1")).status_code == 200


BODY = b'{"user_id": "ada", "book_ids": ["b1"]}'


@pytest.mark.parametrize(
    ("raw", "half_close"),
    [
        (b"Content-Length: 200\r\n\r\n" + BODY, False),
        (b"Content-Length: 200\r\n\r\n" + BODY, True),
        (b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(BODY), BODY), False),  # no last chunk
    ],
    ids=["closed", "half-closed", "chunked-without-its-end"],
)
async def test_a_body_cut_off_by_the_client_going_away_is_not_queued(
    live: LiveApi, redis: Redis, keys: Keys, raw: bytes, half_close: bool
) -> None:
    """What came is a whole JSON request, but the client never finished sending it: it
    got no answer, and would retry (without an Idempotency-Key, a second request)."""
    reader, writer = await raw_connection(live)
    writer.write(b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n" + raw)
    await writer.drain()
    await asyncio.sleep(0.2)  # the API has read it all
    if half_close:
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"", "no answer to a request cut off"
    writer.close()
    await writer.wait_closed()

    await asyncio.sleep(0.5)
    assert await queued_count(redis, keys) == 0
    assert (await live.http.get("/v1/books/b1")).status_code == 200


async def test_a_body_that_comes_in_parts_within_the_time_is_queued(
    live: LiveApi, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiHttpProtocol, "body_timeout_s", 2.0)
    body = b'{"user_id": "ada", "book_ids": ["b1"]}'
    head = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)

    answer = await send_in_two(live, head + body[:10], body[10:], pause_s=0.3)

    assert answer.startswith(b"HTTP/1.1 202 Accepted")
    assert await queued_count(redis, keys) == 1


async def half_closed(live: LiveApi, raw: bytes) -> bytes:
    """Send ``raw``, then half-close the connection (``shutdown(SHUT_WR)``, as ``nc -N``
    does); what the server answered until it closed the connection."""
    reader, writer = await raw_connection(live)
    try:
        writer.write(raw)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def lend_post(body: bytes, query: bytes = b"") -> bytes:
    return b"POST /v1/lends%s HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n%s" % (query, len(body), body)


async def test_a_request_sent_whole_before_a_half_close_is_answered(live: LiveApi, redis: Redis, keys: Keys) -> None:
    answer = await half_closed(live, lend_post(b'{"user_id": "ada", "book_ids": ["b1"]}'))

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202 Accepted") and b"connection: close" in head.lower(), answer
    assert await stream_entries(redis, keys.lend_requests) == [(json.loads(body)["request_id"], ANY)]


async def test_a_request_waited_for_and_the_ones_pipelined_before_it_are_answered_after_a_half_close(
    live: LiveApi, start_worker: StartWorker
) -> None:
    await start_worker()
    first = lend_post(b'{"user_id": "ada", "book_ids": ["b1"]}')
    last = lend_post(b'{"user_id": "bob", "book_ids": ["b2"]}', b"?wait=10")

    answer = await half_closed(live, first + last)

    assert answer.startswith(b"HTTP/1.1 202 Accepted"), answer
    assert answer.count(b"HTTP/1.1 200 OK") == 1 and b'"status":"accepted"' in answer, answer


async def test_a_request_cut_off_by_a_half_close_is_not_queued(live: LiveApi, redis: Redis, keys: Keys) -> None:
    whole = lend_post(b'{"user_id": "ada", "book_ids": ["b1"]}')

    answer = await half_closed(live, whole[:-5])

    assert answer == b""
    await asyncio.sleep(0.3)
    assert await queued_count(redis, keys) == 0


async def test_the_body_timeout_spares_a_pipelined_request_waiting_its_turn(
    live: LiveApi, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiHttpProtocol, "body_timeout_s", 0.5)
    body = b'{"user_id": "ada", "book_ids": ["b1"]}'
    head = b"POST /v1/lends%s HTTP/1.1\r\nHost: api\r\n%sContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    first = head % (b"?wait=1.5", b"") + body

    # No worker: the first waits its whole 1.5 s; the second's body is read only then.
    answer = await send_in_two(live, first + head % (b"", b"Connection: close\r\n") + body[:10], body[10:], pause_s=1.0)

    assert answer.startswith(b"HTTP/1.1 504 ")
    assert answer.count(b"HTTP/1.1 202 Accepted") == 1
    assert await queued_count(redis, keys) == 2


async def test_a_body_held_back_for_100_continue_gets_its_whole_time_after_the_continue(
    live: LiveApi, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender of ``Expect: 100-continue`` waits for ``100 Continue``, which comes when
    its request's turn comes: the body's time counts from then, not from the head."""
    monkeypatch.setattr(ApiHttpProtocol, "body_timeout_s", 1.0)
    body = b'{"user_id": "ada", "book_ids": ["b1"]}'
    first = b"POST /v1/lends?wait=2.5 HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nConnection: close\r\nExpect: 100-continue\r\n"
    second += b"Content-Length: %d\r\n\r\n" % len(body)
    reader, writer = await raw_connection(live)
    try:
        # No worker: the first waits its whole 2.5 s (two and a half body timeouts).
        writer.write(first + second)
        answered = await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 100 Continue\r\n\r\n"), 10)
        await asyncio.sleep(0.7)  # most of a period, in whatever phase the timer is
        writer.write(body)
        answered += await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()

    assert answered.startswith(b"HTTP/1.1 504 ")
    assert answered.count(b"HTTP/1.1 202 Accepted") == 1, answered
    assert await queued_count(redis, keys) == 2


async def test_a_connection_beyond_max_clients_gets_a_503_problem_at_once(api_settings: ApiSettings) -> None:
    async with serving(api_settings.replace(max_clients=3)) as live:
        held = [await raw_connection(live) for _ in range(3)]
        try:
            await wait_until(lambda: len(live.server.server_state.connections) == 3)

            status, headers, body = await raw_exchange(live, b"GET /v1/books/b1 HTTP/1.1\r\nHost: api\r\n\r\n")
        finally:
            for _reader, writer in held:
                writer.close()

        assert status == "HTTP/1.1 503 Service Unavailable" and headers["retry-after"] == "1"
        assert "3 connections" in str(closing_problem(headers, body, 503, "too-many-connections")["detail"])
        await wait_until(lambda: not live.server.server_state.connections)
        assert (await live.http.get("/v1/books/b1")).status_code == 200


@pytest.mark.parametrize(
    ("soft", "pool", "clients"),
    [(1024, 512, 480), (1024, 64, 896), (256, 512, 96), (100, 512, 18), (50, 512, 16), (65536, 512, 10_000)],
)
def test_the_default_client_limit_leaves_file_descriptors_for_redis(
    monkeypatch: pytest.MonkeyPatch, soft: int, pool: int, clients: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, 1 << 20))

    assert ApiSettings(max_connections=pool).client_limit() == clients
    assert ApiSettings(max_connections=pool, max_clients=7).client_limit() == 7


async def test_a_connection_that_sends_nothing_is_closed_without_a_word(
    live: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiHttpProtocol, "head_timeout_s", 0.5)
    reader, writer = await raw_connection(live)
    try:
        assert await asyncio.wait_for(reader.read(), 4) == b""
    finally:
        writer.close()


async def test_the_timeouts_spare_a_request_being_answered_and_the_next_one(
    live: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiHttpProtocol, "head_timeout_s", 0.5)
    monkeypatch.setattr(ApiHttpProtocol, "body_timeout_s", 0.5)
    # No worker: the request waits its whole 1.5 s, three times the head and body timeouts.
    waited = await live.http.post("/v1/lends?wait=1.5", json={"user_id": "ada", "book_ids": ["b1"]})
    assert problem(waited, 504, "outcome-timeout")
    # The same kept-alive connection serves the next request.
    assert (await live.http.get("/v1/books/b1")).status_code == 200


async def test_a_head_and_a_body_of_64_kib_read_together_are_not_a_head_too_large(
    live: LiveApi, redis: Redis, keys: Keys
) -> None:
    body = b'{"user_id": "ada", "book_ids": ["b1"]}'.ljust(65_000)
    raw = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    status, _, _ = await raw_exchange(live, raw)

    assert status == "HTTP/1.1 202 Accepted"
    assert await queued_count(redis, keys) == 1


async def test_the_head_limit_is_per_request_on_a_kept_alive_connection(live: LiveApi) -> None:
    pad = {"X-Pad": "p" * 1_000}
    for _ in range(100):  # 100 KiB of heads on one connection
        assert (await live.http.get("/v1/books/b1", headers=pad)).status_code == 200


async def test_the_fastapi_routes_serve_submissions_as_the_fast_path_does(
    api_settings: ApiSettings, redis: Redis, keys: Keys
) -> None:
    """The routes that document the submissions in OpenAPI answer as ``Submissions`` does
    (the served application never reaches them)."""
    client, tail_client = make_client(api_settings.redis_url), make_client(api_settings.redis_url)
    api = Api(api_settings, client, tail_client)
    app = build_app(api)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as http,
        ):
            queued = await http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
            invalid = await http.post("/v1/returns?wait=1", json={"user_id": "ada", "book_ids": []})
            timeout = await http.post("/v1/returns?wait=0.2", json={"user_id": "ada", "book_ids": ["b1"]})
    finally:
        await tail_client.aclose()
        await client.aclose()

    assert queued.status_code == 202 and queued.headers["location"].startswith("/v1/requests/lend/")
    problem(invalid, 422, "invalid-request")
    problem(timeout, 504, "outcome-timeout")
    assert await queued_count(redis, keys) == 2


# -- idempotency ---------------------------------------------------------------------------


async def test_concurrent_retries_with_one_key_queue_one_request(live: LiveApi, redis: Redis, keys: Keys) -> None:
    body = {"user_id": "ada", "book_ids": ["b1"]}
    headers = {"Idempotency-Key": "order-42"}

    responses = await asyncio.gather(*(live.http.post("/v1/lends", json=body, headers=headers) for _ in range(20)))

    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["request_id"] for r in responses}) == 1
    assert len({r.headers["location"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
    assert await redis.xlen(keys.lend_requests) == 1


async def test_a_retry_after_the_outcome_gets_the_same_outcome(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    body = {"user_id": "ada", "book_ids": ["b1"]}
    headers = {"Idempotency-Key": "order-43"}

    first = await live.http.post("/v1/lends?wait=10", json=body, headers=headers)
    await forget_recent(live, first.json()["event_id"])
    retried = await asyncio.gather(*(live.http.post("/v1/lends?wait=10", json=body, headers=headers) for _ in range(5)))
    plain = await live.http.post("/v1/lends", json=body, headers=headers)

    assert first.status_code == 200, first.text
    assert [(r.status_code, r.json()) for r in retried] == [(200, first.json())] * 5
    assert (plain.status_code, plain.json()["request_id"]) == (202, first.json()["request_id"])
    assert await redis.xlen(keys.lend_requests) == 1
    assert (await live.http.get("/v1/users/ada/loans")).json()["books"] == ["b1"]


async def test_a_key_reused_for_another_request_is_422(live: LiveApi, redis: Redis, keys: Keys) -> None:
    headers = {"Idempotency-Key": "order-44"}
    assert (await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]}, headers=headers)).is_success

    for path, body in [
        ("/v1/lends", {"user_id": "ada", "book_ids": ["b2"]}),
        ("/v1/lends", {"user_id": "bob", "book_ids": ["b1"]}),
        ("/v1/returns", {"user_id": "ada", "book_ids": ["b1"]}),
    ]:
        problem(await live.http.post(path, json=body, headers=headers), 422, "idempotency-key-reused")
    assert await queued_count(redis, keys) == 1


@pytest.mark.parametrize("coding", ["gzip", "identity, gzip", "br"])
async def test_a_compressed_body_is_415_and_queues_nothing(
    live: LiveApi, redis: Redis, keys: Keys, coding: str
) -> None:
    body = gzip.compress(b'{"user_id": "ada", "book_ids": ["b1"]}')

    response = await live.http.post("/v1/lends", content=body, headers={"Content-Encoding": coding})

    assert coding in problem(response, 415, "unsupported-encoding")["detail"]
    assert await queued_count(redis, keys) == 0


async def test_a_body_in_a_transfer_coding_other_than_chunked_is_415(live: LiveApi, redis: Redis, keys: Keys) -> None:
    body = b'{"user_id": "ada", "book_ids": ["b1"]}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = b"POST /v1/lends HTTP/1.1\r\nHost: api\r\nConnection: close\r\nTransfer-Encoding: %s\r\n\r\n"

    status, _, answer = await raw_exchange(live, head % b"gzip, chunked" + chunked)
    assert status == "HTTP/1.1 415 Unsupported Media Type" and b"unsupported-encoding" in answer
    assert await queued_count(redis, keys) == 0
    # Plain chunks, and an identity Content-Encoding, are read.
    assert (await raw_exchange(live, head % b"chunked" + chunked))[0] == "HTTP/1.1 202 Accepted"
    identity = await live.http.post("/v1/lends", content=body, headers={"Content-Encoding": "identity"})
    assert identity.status_code == 202


async def test_an_idempotency_key_given_twice_is_400(live: LiveApi, redis: Redis, keys: Keys) -> None:
    response = await live.http.post(
        "/v1/lends",
        json={"user_id": "ada", "book_ids": ["b1"]},
        headers=[("Idempotency-Key", "first"), ("Idempotency-Key", "second")],
    )

    assert "more than once" in problem(response, 400, "invalid-idempotency-key")["detail"]
    assert await queued_count(redis, keys) == 0
    assert await redis.exists(keys.idempotency("first"), keys.idempotency("second")) == 0


@pytest.mark.parametrize("key", [b"has space", b"x" * 256, "ünïcode".encode()])
async def test_an_unusable_idempotency_key_is_400(live: LiveApi, redis: Redis, keys: Keys, key: bytes) -> None:
    response = await live.http.post(
        "/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]}, headers={b"Idempotency-Key": key}
    )

    problem(response, 400, "invalid-idempotency-key")
    assert await queued_count(redis, keys) == 0


# -- a request's outcome -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/requests/lend/1-0", "/v1/requests/borrow/1-0", "/v1/requests/lend/abc"])
async def test_an_unknown_request_is_404(live: LiveApi, path: str) -> None:
    problem(await live.http.get(path), 404, "no-such-request")


async def test_a_request_id_with_leading_zeros_names_the_same_request(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Redis reads ``007-0`` as ``7-0``: so does the API (it compared the text, and
    answered ``pending`` until a 410)."""
    request_id = await send(redis, keys, "lend", "ada", ["b1"])
    padded = f"000{request_id}".replace("-", "-00")

    pending = (await live.http.get(f"/v1/requests/lend/{padded}")).json()
    await start_worker()
    waited = await live.http.get(f"/v1/requests/lend/{padded}", params={"wait": 10})
    await forget_recent(live, waited.json()["event_id"])
    looked_up = await live.http.get(f"/v1/requests/lend/{padded}")

    assert pending == {"request_id": request_id, "action": "lend", "status": "pending"}
    assert (waited.status_code, waited.json()["request_id"], waited.json()["status"]) == (200, request_id, "accepted")
    assert looked_up.json() == waited.json()


async def test_an_outcome_beyond_the_lookup_is_410(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    request_id = await send(redis, keys, "lend", "ada", ["b1"])
    event = await event_for(redis, keys, "lend", request_id)
    await forget_recent(live, event.event_id)
    assert (await live.http.get(f"/v1/requests/lend/{request_id}")).json()["event_id"] == event.event_id

    await redis.xdel(keys.events, event.event_id)  # trimmed away

    problem(await live.http.get(f"/v1/requests/lend/{request_id}"), 410, "outcome-unavailable")


async def test_an_outcome_is_found_when_its_entry_is_trimmed(
    live: LiveApi, redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    request_id = await send(redis, keys, "return", "ada", ["b1"])
    await forget_recent(live, (await event_for(redis, keys, "return", request_id)).event_id)
    await redis.xdel(keys.return_requests, request_id)

    outcome = await live.http.get(f"/v1/requests/return/{request_id}")

    assert outcome.json()["status"] == "denied", outcome.text  # ada holds no b1


# -- the read model ------------------------------------------------------------------------


async def test_where_a_book_is(api_settings: ApiSettings, redis: Redis, keys: Keys) -> None:
    await redis.hset(keys.lent_books, "lent/one", "ada")
    await redis.sadd(keys.storage, "stored")
    async with serving(api_settings.replace(token=TOKEN)) as live:
        answers = {
            book: (await live.http.get(f"/v1/books/{book}")).json() for book in ("lent/one", "stored", "elsewhere")
        }
        as_operator = (await live.http.get("/v1/books/lent/one", headers=OPERATOR)).json()
        wrong = await live.http.get("/v1/books/lent/one", headers={"Authorization": "Bearer nope"})

    assert answers == {
        "lent/one": {"book_id": "lent/one", "where": "lent"},
        "stored": {"book_id": "stored", "where": "in storage"},
        "elsewhere": {"book_id": "elsewhere", "where": "on the shelves"},
    }
    assert as_operator == {"book_id": "lent/one", "where": "lent", "user_id": "ada"}
    problem(wrong, 401, "unauthorized")


@pytest.mark.parametrize("path", ["/v1/books/a,b", "/v1/users/a%20b/loans", "/v1/users/a,b/loans"])
async def test_an_invalid_id_in_a_path_is_422(live: LiveApi, path: str) -> None:
    problem(await live.http.get(path), 422, "invalid-parameter")


async def test_no_loans_is_an_empty_list(live: LiveApi) -> None:
    assert (await live.http.get("/v1/users/nobody/loans")).json() == {"user_id": "nobody", "books": []}


# -- the router, the documentation, unexpected errors --------------------------------------


async def test_the_router_answers_with_problems(live: LiveApi) -> None:
    problem(await live.http.get("/v1/nothing-here"), 404, "not-found")
    not_allowed = problem(await live.http.get("/v1/lends"), 405, "method-not-allowed")
    assert "GET" in not_allowed["detail"]
    assert (await live.http.delete("/v1/requests/lend/1-0")).headers["allow"] == "GET"


async def test_head_of_an_endpoint_is_its_get_without_the_body(live: LiveApi, redis: Redis, keys: Keys) -> None:
    await redis.sadd(keys.storage, "b1")
    for path in ("/v1/books/b1", "/v1/users/ada/loans", "/", "/openapi.json", "/v1/books/a,b"):
        got, head = await live.http.get(path), await live.http.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["content-length"] == str(len(got.content)), path
    # An event stream never ends: neither would its HEAD.
    assert (await live.http.head("/v1/events")).headers["allow"] == "GET"


async def test_a_trailing_slash_is_a_404_problem_not_a_redirect_to_the_clients_host(live: LiveApi) -> None:
    for method, path in [("GET", "/v1/users/ada/loans/"), ("POST", "/v1/lends/")]:
        response = await live.http.request(method, path, headers={"Host": "evil.example"})
        problem(response, 404, "not-found")
        assert "location" not in response.headers


@pytest.mark.parametrize("path", ["/v1/books/%ff", "/v1/users/ada%C3/loans", "/v1/requests/lend/%80"])
async def test_a_path_that_is_not_utf8_is_a_problem_not_another_id(live: LiveApi, path: str) -> None:
    """The server decodes a bad escape into U+FFFD: the API answered about that id."""
    status, headers, body = await raw_exchange(
        live, f"GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n".encode()
    )

    assert status == "HTTP/1.1 422 Unprocessable Entity" and headers["content-type"] == "application/problem+json"
    assert json.loads(body)["detail"] == "the path is not valid UTF-8 once its %-escapes are decoded"
    assert json.loads(body)["instance"] == path


async def test_a_query_string_that_is_not_utf8_is_a_problem_not_another_user(live: LiveApi) -> None:
    raw = b"GET /v1/events?user_id=ada%ff HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    status, _, body = await raw_exchange(live, raw)

    assert status == "HTTP/1.1 422 Unprocessable Entity"
    assert json.loads(body)["detail"] == "the query string is not valid UTF-8 once its %-escapes are decoded"


async def test_a_path_with_an_escaped_replacement_character_is_served(live: LiveApi) -> None:
    response = await live.http.get("/v1/books/%EF%BF%BD")
    assert (response.status_code, response.json()["book_id"]) == (200, "\ufffd")


async def test_a_websocket_upgrade_is_served_as_plain_http(live: LiveApi) -> None:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with capture_logs():
        response = await live.http.get("/v1/books/b1", headers={**headers, "Sec-WebSocket-Version": "13"})
    assert response.status_code == 200 and response.json()["book_id"] == "b1"


async def test_openapi_docs_and_problem_types(live: LiveApi) -> None:
    spec = (await live.http.get("/openapi.json")).json()
    assert {"/v1/lends", "/v1/returns", "/v1/requests/{action}/{request_id}", "/v1/events", "/v1/status"} <= set(
        spec["paths"]
    )
    lends = spec["paths"]["/v1/lends"]["post"]
    assert lends["requestBody"]["content"]["application/json"]["schema"]["required"] == ["user_id", "book_ids"]
    assert {"202", "200", "409", "413", "422", "502", "504"} <= set(lends["responses"])
    assert "swagger" in (await live.http.get("/docs")).text.lower()

    for name, kind in PROBLEMS.items():
        assert (await live.http.get(f"/problems/{name}")).json()["status"] == kind.status
    problem(await live.http.get("/problems/nonsense"), 404, "not-found")


def test_the_readme_lists_every_problem_type() -> None:
    readme = (ROOT / "README.md").read_text()
    for kind in PROBLEMS.values():
        assert f"| `{kind.uri}` | {kind.status} | {kind.meaning} |" in readme, kind.name


async def test_an_unexpected_error_is_a_500_problem_logged_with_its_traceback(
    api_settings: ApiSettings, redis: Redis
) -> None:
    async def broken() -> None:
        raise RuntimeError("secret internals")

    async with serving(api_settings, extra_routes={"/broken": broken}) as live:
        with capture_logs() as logs:
            response = await live.http.get("/broken")

    body = problem(response, 500, "internal-error")
    assert "secret" not in response.text and "Traceback" not in response.text, body
    (logged,) = [log for log in logs if log["event"] == "unexpected error"]
    assert logged["path"] == "/broken" and logged["exc_info"] is True


# -- Redis failing -------------------------------------------------------------------------


async def test_redis_refusing_the_request_is_503_with_its_reason(live: LiveApi, redis: Redis, keys: Keys) -> None:
    await redis.xadd(keys.lend_requests, {"f": "v"}, id=MAX_ID)
    await redis.xdel(keys.lend_requests, MAX_ID)
    await redis.set(keys.return_requests, "not a stream")

    full = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
    wrong_type = await live.http.post("/v1/returns", json={"user_id": "ada", "book_ids": ["b1"]})

    assert "exhausted" in problem(full, 503, "redis-refused")["detail"]
    assert "WRONGTYPE" in problem(wrong_type, 503, "redis-refused")["detail"]
    assert not raw_entries(await redis.xrange(keys.lend_requests))


async def test_no_file_descriptor_for_redis_is_a_503_not_a_500(live: LiveApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a Redis connection can fail with the process out of file descriptors (an
    OSError that redis-py does not wrap): the submission says Redis is unavailable."""

    async def out_of_files(*_args: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(live.api, "submitter", out_of_files)

    response = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})

    assert "may have been queued" in problem(response, 503, "redis-unavailable")["detail"]


async def test_redis_gone_is_503_and_the_api_comes_back_with_it(api_settings: ApiSettings, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    try:
        async with serving(api_settings.replace(redis_url=server.url)) as live:
            server.stop()
            with capture_logs():
                gone = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
                loans = await live.http.get("/v1/users/ada/loans")
            body = problem(gone, 503, "redis-unavailable")
            assert "may have been queued" in body["detail"] and gone.headers["retry-after"] == "1"
            problem(loans, 503, "redis-unavailable")

            server.start()
            back = await live.http.post("/v1/lends", json={"user_id": "ada", "book_ids": ["b1"]})
            assert back.status_code == 202, back.text
    finally:
        server.stop()


# -- operator endpoints --------------------------------------------------------------------


async def test_operator_endpoints_are_off_without_a_token(live: LiveApi) -> None:
    for method, path in [("GET", "/v1/status"), ("GET", "/v1/dead-letters"), ("POST", "/v1/dead-letters/1-0/retry")]:
        response = await live.http.request(method, path, headers=OPERATOR)
        assert "LENDING_API_TOKEN" in problem(response, 404, "operator-endpoints-off")["detail"]


@pytest.fixture
async def operated(api_settings: ApiSettings, redis: Redis) -> AsyncIterator[LiveApi]:
    async with serving(api_settings.replace(token=TOKEN)) as live:
        yield live


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
)
async def test_operator_endpoints_refuse_a_missing_or_wrong_token(operated: LiveApi, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/status"), ("GET", "/v1/dead-letters"), ("POST", "/v1/dead-letters/1-0/retry")]:
        response = await operated.http.request(method, path, headers=headers)
        problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_status_is_the_status_snapshot(operated: LiveApi, namespace: str, start_worker: StartWorker) -> None:
    await start_worker()

    status = (await operated.http.get("/v1/status", headers=OPERATOR)).json()

    assert status["namespace"] == namespace
    assert [w["worker_id"] for w in status["workers"]] == ["w1"]
    assert status["api"]["tail"]["connected"] is True


async def test_dead_letters_are_listed_and_retried(operated: LiveApi, redis: Redis, keys: Keys) -> None:
    letter = decoded(
        await redis.xadd(
            keys.dead_letters,
            {"stream": keys.lend_requests, "request_id": "1-0", "action": "lend", "user_id": "ada", "book_ids": "b1"},
        )
    )
    foreign = decoded(await redis.xadd(keys.dead_letters, {"stream": "elsewhere", "user_id": "ada"}))

    listed = (await operated.http.get("/v1/dead-letters", headers=OPERATOR)).json()["dead_letters"]
    retried = await operated.http.post(f"/v1/dead-letters/{letter}/retry", headers=OPERATOR)

    assert [item["id"] for item in listed] == [letter, foreign]
    assert retried.status_code == 202, retried.text
    body = retried.json()
    assert body["action"] == "lend" and retried.headers["location"] == f"/v1/requests/lend/{body['request_id']}"
    assert await stream_entries(redis, keys.lend_requests) == [
        (body["request_id"], {"user_id": "ada", "book_ids": "b1"})
    ]
    problem(await operated.http.post(f"/v1/dead-letters/{letter}/retry", headers=OPERATOR), 404, "no-such-dead-letter")
    problem(await operated.http.post("/v1/dead-letters/nonsense/retry", headers=OPERATOR), 404, "no-such-dead-letter")
    problem(
        await operated.http.post(f"/v1/dead-letters/{foreign}/retry", headers=OPERATOR),
        409,
        "dead-letter-not-retryable",
    )
    problem(await operated.http.get("/v1/dead-letters?count=0", headers=OPERATOR), 422, "invalid-parameter")


# -- shutting down -------------------------------------------------------------------------


async def test_a_signal_answers_the_waiters_at_once(api_settings: ApiSettings, redis: Redis) -> None:
    async with serving(api_settings) as live:
        waiting = asyncio.create_task(live.http.post("/v1/lends?wait=30", json={"user_id": "ada", "book_ids": ["b1"]}))
        await wait_until(lambda: live.api.tail.waiters, interval_s=0.01)
        live.server.handle_sig(signal.SIGTERM)
        response = await asyncio.wait_for(waiting, 5)

    detail = problem(response, 504, "outcome-timeout")["detail"]
    assert detail.startswith("the API is shutting down; the request stays queued"), detail
