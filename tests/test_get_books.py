"""get_books.py when Redis fails it: stalls, refuses, dies, or is given ids it would reject.

Each case runs the real command against a real redis-server: the session's, or a
private one started for the test (stalled with SIGSTOP, limited with ``maxmemory``,
or killed), and judges the exit code, the one-line message and what was queued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lending.client import Invalid, NoOutcome, Progress, Refused, Unreachable, failure_outcome
from lending.domain.streamids import MAX_ID
from lending.errors import RedisUnavailable, RequestRefused
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port

from .support import ROOT, process_env, raw_entries, run_get_books, wait_until

# A Python start-up on a busy machine, on top of the --timeout a run may take.
START_UP_S = 3.0

PrivateRedis = Callable[..., EmbeddedRedis]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """Start throwaway redis-servers (``private_redis(*extra_args)``); resumed and stopped at the end."""
    started: list[EmbeddedRedis] = []

    def start(*extra_args: str) -> EmbeddedRedis:
        server = EmbeddedRedis(
            tmp_path / f"redis-{len(started)}", port=free_port(), persistent=False, extra_args=extra_args
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
        server.stop()


def stall(server: EmbeddedRedis) -> None:
    """Freeze the server: it keeps its port (connections are accepted) but answers nothing."""
    assert server.pid is not None  # started by the fixture
    os.kill(server.pid, signal.SIGSTOP)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def start_get_books(redis_url: str, namespace: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "get_books.py"), *args],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_queued(url: str, keys: Keys) -> None:
    """Until the lend request stream holds one entry."""
    client = make_client(url)
    try:
        await wait_until(lambda: client.xlen(keys.lend_requests), timeout_s=10, interval_s=0.02)
    finally:
        await client.aclose()


# -- Redis stalls: --timeout holds ----------------------------------------------------


async def test_redis_stalled_before_the_request_is_queued_exits_5_within_the_timeout(
    private_redis: PrivateRedis, namespace: str
) -> None:
    server = private_redis()
    stall(server)

    started = time.monotonic()
    result = run_get_books(server.url, namespace, "--timeout", "2", "request", "Salvatore", "ofmiceandmen")
    elapsed = time.monotonic() - started

    assert result.returncode == 5, result
    assert elapsed < 2 + START_UP_S, elapsed
    line = one_line(result.stderr)
    assert "did not answer within 2 s" in line and "nothing was queued" in line, line


async def test_redis_stalled_after_the_request_is_queued_exits_3_within_the_timeout(
    private_redis: PrivateRedis, namespace: str, keys: Keys
) -> None:
    server = private_redis()
    started = time.monotonic()
    get_books = start_get_books(server.url, namespace, "--timeout", "3", "request", "Salvatore", "ofmiceandmen")
    await wait_queued(server.url, keys)
    stall(server)  # while get_books waits for the outcome

    try:
        out, err = get_books.communicate(timeout=20)
    finally:
        get_books.kill()
    elapsed = time.monotonic() - started

    assert get_books.returncode == 3, (out, err)
    assert elapsed < 3 + START_UP_S, elapsed
    assert "stays queued" in one_line(err), err


# -- Redis refuses the request: exit 6 ------------------------------------------------


async def test_redis_out_of_memory_exits_6_with_the_reason(private_redis: PrivateRedis, namespace: str) -> None:
    server = private_redis("--maxmemory", "1", "--maxmemory-policy", "noeviction")

    result = run_get_books(server.url, namespace, "--timeout", "5", "request", "Salvatore", "ofmiceandmen")

    assert result.returncode == 6, result
    line = one_line(result.stderr)
    assert line.startswith("error: Redis refused the request: "), line
    assert "maxmemory" in line, line


async def test_request_stream_out_of_ids_exits_6_with_the_reason(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    await redis.xadd(keys.lend_requests, {"f": "v"}, id=MAX_ID)

    result = run_get_books(redis_url, namespace, "--timeout", "5", "request", "Salvatore", "ofmiceandmen")

    assert result.returncode == 6, result
    line = one_line(result.stderr)
    assert line.startswith("error: Redis refused the request: "), line
    assert "exhausted the last possible ID" in line, line
    assert await redis.xlen(keys.lend_requests) == 1


# -- Redis dies while get_books waits: exit 5 -----------------------------------------


async def test_redis_killed_while_waiting_exits_5_naming_the_queued_request(
    private_redis: PrivateRedis, namespace: str, keys: Keys
) -> None:
    server = private_redis()
    get_books = start_get_books(server.url, namespace, "--timeout", "30", "request", "Salvatore", "ofmiceandmen")
    await wait_queued(server.url, keys)
    client = make_client(server.url)
    try:
        [(request_id, _)] = raw_entries(await client.xrange(keys.lend_requests))
    finally:
        await client.aclose()
    server.kill()

    try:
        out, err = get_books.communicate(timeout=25)
    finally:
        get_books.kill()

    assert get_books.returncode == 5, (out, err)
    line = one_line(err)
    assert "lost Redis" in line and request_id in line, line


# -- ids the service would reject: exit 2, nothing queued ----------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param(("Salvatore", "ofmiceandmen,dune"), "contains a comma", id="comma-in-a-book"),
        pytest.param(("Salvatore", "ofmiceandmen", ""), "book id is empty", id="empty-book"),
        pytest.param(("Salva tore", "ofmiceandmen"), "contains whitespace", id="space-in-the-user"),
        pytest.param(("Salvatore", "x" * 129), "129 characters long", id="book-too-long"),
    ],
)
async def test_ids_the_service_would_reject_exit_2_and_queue_nothing(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, args: tuple[str, ...], reason: str
) -> None:
    result = run_get_books(redis_url, namespace, "--timeout", "1", "request", *args)

    assert result.returncode == 2, result
    assert reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await redis.xlen(keys.lend_requests) == 0


def test_help_documents_exit_code_6() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "get_books.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result
    assert "6 Redis refused the request" in " ".join(result.stdout.split()), result.stdout


# -- what a failure means, by how far the run got --------------------------------------

URL = "redis://127.0.0.1:6379"
NOT_SENT = Progress()
SENT = Progress(sent=True)
QUEUED = Progress(sent=True, request_id="1-0")
HANDED_IN = Progress(sent=True, handed_in=True)


@pytest.mark.parametrize(
    ("exc", "progress", "expired", "expected"),
    [
        pytest.param(
            TimeoutError(),
            NOT_SENT,
            True,
            Unreachable(f"Redis at {URL} did not answer within 2 s; nothing was queued"),
            id="stall-before",
        ),
        pytest.param(
            TimeoutError(),
            SENT,
            True,
            Unreachable(
                f"Redis at {URL} did not answer within 2 s; the request may have been queued (no id came back)"
            ),
            id="stall-while-queuing",
        ),
        pytest.param(TimeoutError(), QUEUED, True, NoOutcome("1-0"), id="stall-after"),
        pytest.param(TimeoutError(), HANDED_IN, True, NoOutcome(None), id="in-the-inbox"),
        pytest.param(
            RequestRefused("more than 1000 book ids"),
            HANDED_IN,
            False,
            Invalid("more than 1000 book ids", by="the inbox"),  # the request is at fault: exit 2
            id="refused-by-the-relay",
        ),
        pytest.param(
            RequestRefused("STREAMFULL {ns}:lend-requests has used up its entry IDs"),
            HANDED_IN,
            False,
            Refused("STREAMFULL {ns}:lend-requests has used up its entry IDs"),  # Redis's refusal: exit 6
            id="stream-full-behind-the-relay",
        ),
        pytest.param(
            RedisUnavailable(URL, "Connection refused"),
            NOT_SENT,
            False,
            Unreachable(f"cannot reach Redis at {URL}: Connection refused"),
            id="unreachable",
        ),
        pytest.param(
            RedisConnectionError("Connection closed by server."),
            QUEUED,
            False,
            Unreachable(f"lost Redis at {URL}: Connection closed by server; request 1-0 was queued"),
            id="lost-after",
        ),
        pytest.param(
            RedisTimeoutError("Timeout reading"),
            SENT,
            False,
            Unreachable(f"lost Redis at {URL}: Timeout reading; the request may have been queued"),
            id="socket-timeout-while-queuing",
        ),
        pytest.param(OutOfMemoryError("command not allowed"), SENT, False, Refused("command not allowed"), id="oom"),
        pytest.param(NoPermissionError("no permissions"), NOT_SENT, False, Refused("no permissions"), id="noperm"),
        pytest.param(ResponseError("WRONGTYPE"), SENT, False, Refused("WRONGTYPE"), id="wrongtype"),
    ],
)
def test_failure_outcome(exc: BaseException, progress: Progress, expired: bool, expected: object) -> None:
    assert failure_outcome(exc, progress, url=URL, timeout_s=2, expired=expired) == expected
