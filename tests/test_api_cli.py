"""The ``api`` command as a process, and ``get_books.py --api URL`` through it: the same
output and exit codes as through Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from lending.domain.streamids import MAX_ID
from lending.keys import Keys
from lending.redis.embedded import free_port

from .api_support import start_api_process
from .conftest import StartWorker
from .support import ROOT, run_get_books, run_python, stop_process

StartApi = Callable[..., str]


@pytest.fixture
def start_api(redis_url: str, namespace: str) -> Iterator[StartApi]:
    """Start ``python -m lending api`` processes (``start_api(*args, **env)``: their URL);
    each is stopped with SIGTERM at the end, and must exit 0."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> str:
        proc, url = start_api_process(redis_url, namespace, *args, **env)
        started.append(proc)
        return url

    yield start
    for proc in started:
        code, _out, err = stop_process(proc)
        assert code == 0, err[-2000:]


async def get_books(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """get_books.py in a thread: this event loop goes on running the in-process worker."""
    return await asyncio.to_thread(run_get_books, redis_url, namespace, *args)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = stderr.strip().splitlines()
    return line


async def test_outcomes_and_exit_codes_through_the_api(
    redis_url: str, namespace: str, start_worker: StartWorker, start_api: StartApi
) -> None:
    await start_worker(max_books_per_request=3)
    url = start_api()

    lent = await get_books(redis_url, namespace, "--api", url, "request", "Salvatore", "ofmiceandmen")
    denied = await get_books(redis_url, namespace, "--api", url, "request", "Antirez", "ofmiceandmen")
    returned = await get_books(redis_url, namespace, "--api", url, "return", "Salvatore", "ofmiceandmen", "--json")
    too_many = await get_books(redis_url, namespace, "--api", url, "request", "Antirez", "a", "b", "c", "d")
    queued = await get_books(redis_url, namespace, "--api", url, "request", "Antirez", "b1", "--no-wait")

    assert lent.returncode == 0 and lent.stdout.startswith("ACCEPTED ") and "books=ofmiceandmen" in lent.stdout
    assert denied.returncode == 1 and denied.stdout.startswith("DENIED ") and "skipped=ofmiceandmen" in denied.stdout
    event = json.loads(returned.stdout)
    assert returned.returncode == 0 and (event["status"], event["books"]) == ("returned", ["ofmiceandmen"])
    assert set(event) == {"request_id", "action", "user_id", "status", "books", "skipped", "reason", "event_id"}
    assert too_many.returncode == 2 and "at most 3 per request" in one_line(too_many.stderr), too_many
    assert "nothing was queued" in too_many.stderr
    assert queued.returncode == 0 and queued.stdout.startswith("QUEUED "), queued


async def test_a_request_too_big_for_the_api_exits_2(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, start_api: StartApi
) -> None:
    url = start_api()
    books = [f"book-{n:05}" for n in range(8_000)]  # a body over 64 KiB

    result = await get_books(redis_url, namespace, "--api", url, "request", "Salvatore", *books)

    assert result.returncode == 2, result
    assert "over 65536" in one_line(result.stderr) or "65536" in one_line(result.stderr)
    assert "nothing was queued" in result.stderr
    assert await redis.xlen(keys.lend_requests) == 0


async def test_invalid_ids_exit_2_before_anything_is_sent(redis_url: str, namespace: str) -> None:
    result = await get_books(redis_url, namespace, "--api", "http://127.0.0.1:1", "request", "a,b", "book")
    assert result.returncode == 2 and "contains a comma" in result.stderr


async def test_a_failed_request_exits_4(
    redis_url: str, namespace: str, start_worker: StartWorker, start_api: StartApi
) -> None:
    await start_worker(shelving_fail_rate=1.0, max_deliveries=1)
    url = start_api()

    failed = await get_books(redis_url, namespace, "--api", url, "request", "Salvatore", "ofmiceandmen")

    assert failed.returncode == 4 and failed.stdout.startswith("FAILED "), failed


async def test_no_outcome_in_time_exits_3(redis_url: str, namespace: str, start_api: StartApi) -> None:
    url = start_api()  # and no worker

    result = await get_books(redis_url, namespace, "--api", url, "--timeout", "1.5", "request", "Salvatore", "b1")

    assert result.returncode == 3, result
    assert "stays queued" in one_line(result.stderr)


async def test_an_unreachable_api_exits_5(redis_url: str, namespace: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = await get_books(redis_url, namespace, "--api", url, "request", "Salvatore", "b1")

    assert result.returncode == 5, result
    line = one_line(result.stderr)
    assert line.startswith(f"error: cannot reach the API at {url}") and "nothing was queued" in line


class NotTheApi:
    """A loopback HTTP server answering every request with one fixed status and JSON body:
    something else than the API listening at the URL."""

    def __init__(self, status: int, body: object) -> None:
        self.answer = json.dumps(body).encode()
        self.status = status

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (self.status, len(self.answer), self.answer)
            )
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"event_id": "1-0", "status": "accepted", "books": 5}),
        (200, {"request_id": "1-0", "status": "accepted", "books": [1, 2]}),
        (200, {"request_id": "1-0", "status": "lent", "books": []}),
        (409, {"type": "/problems/denied", "event": {"skipped": 3}}),
        (409, {"type": "/problems/denied", "event": "no"}),
        (202, [1, 2]),
        (202, {"x": 1}),
        (202, {"request_id": "soon"}),
        (504, {"type": "/problems/outcome-timeout"}),
    ],
)
async def test_an_answer_not_shaped_as_the_apis_exits_5_with_one_line(
    redis_url: str, namespace: str, status: int, body: object
) -> None:
    async with NotTheApi(status, body) as url:
        result = await get_books(redis_url, namespace, "--api", url, "request", "ada", "b1", "--timeout", "3")

    assert result.returncode == 5, result
    line = one_line(result.stderr)
    assert line.startswith(f"error: the API at {url} answered {status} with "), line
    assert result.stdout == ""


async def test_redis_refusing_the_request_exits_6(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, start_api: StartApi
) -> None:
    url = start_api()
    await redis.xadd(keys.lend_requests, {"f": "v"}, id=MAX_ID)
    await redis.xdel(keys.lend_requests, MAX_ID)

    result = run_get_books(redis_url, namespace, "request", "Salvatore", "b1", LENDING_API_URL=url)

    assert result.returncode == 6, result
    assert one_line(result.stderr).startswith("error: Redis refused the request: ")


@pytest.mark.parametrize("token", ["sécret", " padded", "padded ", "two words", "tab\tinside"])
def test_an_operator_token_no_header_can_carry_is_refused_at_start(redis_url: str, namespace: str, token: str) -> None:
    proc = run_python(redis_url, namespace, "-m", "lending", "api", "--port", "0", LENDING_API_TOKEN=token)

    assert proc.returncode == 2, proc
    assert "LENDING_API_TOKEN must be printable ASCII without spaces" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_api_refuses_to_start_without_redis(namespace: str) -> None:
    proc = run_python(f"redis://127.0.0.1:{free_port()}", namespace, "-m", "lending", "api", "--port", "0")
    assert proc.returncode == 1 and one_line(proc.stderr).startswith("error: cannot reach Redis"), proc


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("taken", "address already in use"),
        ("192.0.2.1", "cannot assign requested address"),  # TEST-NET-1: no host has it
        ("nohost.invalid", "no such host"),
    ],
)
def test_the_api_refuses_an_address_it_cannot_serve_before_reaching_redis(
    redis_url: str, namespace: str, where: str, said: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = ("127.0.0.1", taken.getsockname()[1]) if where == "taken" else (where, free_port())
        proc = run_python(redis_url, namespace, "-m", "lending", "api", "--host", host, "--port", str(port))

    assert proc.returncode == 1, proc
    line = one_line(proc.stderr)
    assert line.startswith(f"error: cannot serve the API on {host}:{port}: {said}"), line
    assert line.endswith("(--host, --port)"), line
    assert "API started" not in proc.stderr + proc.stdout  # refused before it went to Redis


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_ipv6_api_names_its_url_with_brackets(redis_url: str, namespace: str) -> None:
    proc, url = start_api_process(redis_url, namespace, "--host", "::1")
    try:
        assert url.startswith("http://[::1]:")
        assert httpx.get(f"{url}/v1/books/b1", timeout=10).status_code == 200
    finally:
        stop_process(proc)


def test_the_other_commands_do_not_load_the_web_stack() -> None:
    code = "import sys, lending.cli; print(sorted(m for m in ('fastapi', 'uvicorn', 'httpx') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip() == "[]", proc
