"""End-to-end tests of the two commands, run as real processes against real Redis.

``python main.py`` is started as a child process and driven with signals;
``python get_books.py`` is run to completion and judged by its output and exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.keys import LENDING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port

from .support import (
    ROOT,
    decoded,
    event_for,
    process_env,
    raw_entries,
    run_command,
    run_get_books,
    run_into_a_full_disk,
    run_python,
    send,
    stop_process,
    wait_until,
)

READY = "Ready to process events..."
ENTRY_ID = re.compile(r"\b\d+-\d+\b")


def text(value: object) -> str:
    """A reply value as text (the test clients answer bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def entries(redis: Redis, stream: str, start: str = "-", end: str = "+") -> list[tuple[str, dict[str, str]]]:
    """A stream's entries, decoded: [(entry id, {field: value})]."""
    raw: Any = await redis.xrange(stream, min=start, max=end)
    return [(text(entry_id), {text(k): text(v) for k, v in fields.items()}) for entry_id, fields in raw]


# -- process helpers --------------------------------------------------------------


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> bool:
    """``True`` once ``proc`` prints the ready line, ``False`` if it closes stdout (exits) first."""
    assert proc.stdout is not None  # started with stdout=PIPE
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            continue
        line = proc.stdout.readline()
        if READY in line:
            return True
        if line == "":
            return False
    raise AssertionError(f"no ready line and no exit within {timeout_s} s")


def reap(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> tuple[int, str, str]:
    """Wait for ``proc`` to exit by itself; SIGKILL it if it does not. (code, stdout, stderr)"""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out or "", err or ""


class Launch(Protocol):
    def __call__(
        self, worker_id: str, *args: str, env: Mapping[str, str] | None = None, **extra_env: str
    ) -> tuple[subprocess.Popen[str], bool]: ...


class Spawn(Protocol):
    def __call__(
        self, worker_id: str, *args: str, env: Mapping[str, str] | None = None, **extra_env: str
    ) -> subprocess.Popen[str]: ...


@pytest.fixture
def launch(redis_url: str, namespace: str) -> Iterator[Launch]:
    """Start ``main.py`` processes; returns (process, became ready). All are stopped at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(
        worker_id: str, *args: str, env: Mapping[str, str] | None = None, **extra_env: str
    ) -> tuple[subprocess.Popen[str], bool]:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), worker_id, *args],
            cwd=ROOT,
            env=dict(env) if env is not None else process_env(redis_url, namespace, **extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc, _wait_ready(proc)

    yield start
    for proc in started:
        stop_process(proc)


@pytest.fixture
def spawn(launch: Launch) -> Spawn:
    """Start a ``main.py`` process that must become ready."""

    def start(
        worker_id: str, *args: str, env: Mapping[str, str] | None = None, **extra_env: str
    ) -> subprocess.Popen[str]:
        proc, ready = launch(worker_id, *args, env=env, **extra_env)
        if not ready:
            code, _, err = reap(proc)
            raise AssertionError(f"worker {worker_id} exited with {code} before it was ready:\n{err[-3000:]}")
        return proc

    return start


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def processed_lines(log: str, request_id: str) -> list[str]:
    return [line for line in log.splitlines() if "processed" in line and f"request_id={request_id}" in line]


async def pending_count(redis: Redis, stream: str) -> int:
    try:
        return int((await redis.xpending(stream, LENDING_GROUP))["pending"])
    except ResponseError as exc:
        if "NOGROUP" in str(exc):  # the worker has not created its group yet
            return 0
        raise


async def events_of(redis: Redis, keys: Keys, action: str, request_id: str) -> int:
    return sum(
        1
        for _, fields in await entries(redis, keys.events)
        if (fields["request_id"], fields["action"]) == (request_id, action)
    )


# -- get_books.py -----------------------------------------------------------------


async def test_readme_walkthrough(redis_url: str, namespace: str, spawn: Spawn) -> None:
    worker = spawn("w1")
    lent = run_get_books(redis_url, namespace, "request", "Salvatore", "ofmiceandmen")
    again = run_get_books(redis_url, namespace, "request", "Salvatore", "ofmiceandmen")
    back = run_get_books(redis_url, namespace, "return", "Salvatore", "ofmiceandmen")
    code, _, log = stop_process(worker)

    assert (lent.returncode, lent.stdout.split()[0]) == (0, "ACCEPTED"), lent
    assert "ofmiceandmen" in lent.stdout
    assert (again.returncode, again.stdout.split()[0]) == (1, "DENIED"), again
    assert (back.returncode, back.stdout.split()[0]) == (0, "RETURNED"), back
    assert code == 0, log
    # One log line per processed request, with its id, user and status.
    for result, status in ((lent, "accepted"), (again, "denied"), (back, "returned")):
        request_id = result.stdout.split()[1]
        lines = processed_lines(log, request_id)
        assert len(lines) == 1, (request_id, log)
        assert "user=Salvatore" in lines[0] and f"status={status}" in lines[0], lines[0]
        assert "books=" in lines[0] and "duration" in lines[0], lines[0]


async def test_json_output_is_one_object_with_lists(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, spawn: Spawn
) -> None:
    spawn("w1")
    assert run_get_books(redis_url, namespace, "request", "other", "taken").returncode == 0

    result = run_get_books(redis_url, namespace, "--json", "request", "Salvatore", "free", "taken")

    assert result.returncode == 0, result
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    event = json.loads(result.stdout)
    assert event["status"] == "accepted"
    assert event["action"] == "lend"
    assert event["user_id"] == "Salvatore"
    assert event["books"] == ["free"]
    assert event["skipped"] == ["taken"]
    assert await entries(redis, keys.lend_requests, event["request_id"], event["request_id"])

    denied = run_get_books(redis_url, namespace, "--json", "request", "Salvatore", "taken")
    assert denied.returncode == 1, denied
    assert json.loads(denied.stdout)["books"] == []
    assert json.loads(denied.stdout)["skipped"] == ["taken"]


async def test_rejected_request_exits_2(redis: Redis, keys: Keys, redis_url: str, namespace: str, spawn: Spawn) -> None:
    # get_books refuses bad ids itself; the per-request limit only the service knows.
    spawn("w1", "--max-books-per-request", "1")
    result = run_get_books(redis_url, namespace, "request", "Salvatore", "ofmiceandmen", "dune")
    assert result.returncode == 2, result
    assert result.stdout.startswith("REJECTED"), result.stdout
    assert "at most 1 per request" in result.stdout
    assert await redis.hlen(keys.lent_books) == 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("request", "Salvatore"), id="no-books"),
        pytest.param(("borrow", "Salvatore", "ofmiceandmen"), id="bad-action"),
        pytest.param(("request",), id="no-user"),
    ],
)
async def test_usage_errors_exit_2(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, args: tuple[str, ...]
) -> None:
    result = run_get_books(redis_url, namespace, *args)
    assert result.returncode == 2, result
    assert "Usage" in result.stderr
    assert await redis.xlen(keys.lend_requests) == 0
    assert await redis.xlen(keys.return_requests) == 0


async def test_no_worker_times_out_and_request_stays_queued(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, spawn: Spawn
) -> None:
    started = time.monotonic()
    result = run_get_books(redis_url, namespace, "--timeout", "1", "request", "Salvatore", "ofmiceandmen")
    elapsed = time.monotonic() - started

    assert result.returncode == 3, result
    assert 1.0 <= elapsed < 6.0, elapsed
    message = result.stdout + result.stderr
    assert "stays queued" in message, message
    ids = ENTRY_ID.findall(message)
    assert ids, message
    request_id = ids[0]
    queued = await entries(redis, keys.lend_requests, request_id, request_id)
    assert [fields["user_id"] for _, fields in queued] == ["Salvatore"]

    # The queued request is processed once a worker starts (its group reads from ID 0).
    spawn("w1")
    event = await event_for(redis, keys, "lend", request_id)
    assert event.status == "accepted"


async def test_no_wait_prints_the_id_and_exits_0(redis: Redis, keys: Keys, redis_url: str, namespace: str) -> None:
    result = run_get_books(redis_url, namespace, "--no-wait", "request", "Salvatore", "ofmiceandmen")
    assert result.returncode == 0, result
    ids = ENTRY_ID.findall(result.stdout)
    assert ids, result.stdout
    assert await entries(redis, keys.lend_requests) == [(ids[0], {"user_id": "Salvatore", "book_ids": "ofmiceandmen"})]


async def test_failed_outcome_exits_4(redis: Redis, keys: Keys, redis_url: str, namespace: str, spawn: Spawn) -> None:
    spawn("w1", "--max-deliveries", "2", LENDING_SHELVING_FAIL_RATE="1")
    result = run_get_books(redis_url, namespace, "--timeout", "20", "request", "Salvatore", "ofmiceandmen")
    assert result.returncode == 4, result
    assert result.stdout.startswith("FAILED"), result.stdout
    request_id = result.stdout.split()[1]
    letters = await entries(redis, keys.dead_letters)
    assert [fields["request_id"] for _, fields in letters] == [request_id]
    assert await redis.hlen(keys.lent_books) == 0


async def test_get_books_redis_unreachable_exits_5(redis_url: str, namespace: str) -> None:
    url = f"redis://127.0.0.1:{closed_port()}"
    result = run_get_books(redis_url, namespace, "--redis-url", url, "request", "Salvatore", "ofmiceandmen")
    assert result.returncode == 5, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["main.py", "w1"],
        ["-m", "lending", "status"],
        ["-m", "lending", "check"],
        ["-m", "lending", "dead-letters", "list"],
        ["-m", "lending", "api", "--port", "0"],
        ["-m", "simulator", "run", "--requests", "1"],
        ["-m", "simulator", "bench"],
    ],
    ids=["worker", "status", "check", "dead-letters", "api", "simulator-run", "simulator-bench"],
)
async def test_a_url_of_something_that_is_not_redis_is_one_line_and_exit_1(
    redis_url: str, namespace: str, command: list[str]
) -> None:
    """An HTTP server where Redis was expected: the client's protocol error was a traceback."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"redis://127.0.0.1:{port}"
        result = await asyncio.to_thread(run_python, redis_url, namespace, *command, "--redis-url", url)
    finally:
        server.close()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot reach Redis at {url}: not a Redis server")


@pytest.mark.parametrize(
    "command",
    [["status", "--watch"], ["check", "--wait-quiescent", "60"]],
    ids=["status-watch", "check-wait"],
)
def test_redis_lost_while_a_tool_runs_is_one_line_and_exit_1(
    tmp_path: Path, namespace: str, command: list[str]
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    try:
        args = [sys.executable, "-m", "lending", *command, "--redis-url", server.url, "--namespace", namespace]
        if command[0] == "check":  # a request nobody processes: never quiescent
            redis_sync.Redis.from_url(server.url).xadd(
                Keys(namespace).lend_requests, {"user_id": "ada", "book_ids": "b1"}
            )
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # it has read once at least
        assert proc.poll() is None, proc.communicate()
        server.stop()
        _, err = proc.communicate(timeout=30)
    finally:
        server.stop()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: lost Redis at {server.url}"), err


async def test_ctrl_c_while_waiting_exits_130_and_names_the_queued_request(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    """No worker runs: the sender gives up waiting with Ctrl-C (it exited 1, "denied")."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "get_books.py"), "request", "Salvatore", "b1"],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    await wait_until(lambda: _queued(redis, keys))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)

    (request_id,) = [decoded(entry_id) for entry_id, _ in raw_entries(await redis.xrange(keys.lend_requests))]
    assert (proc.returncode, out) == (130, ""), (proc.returncode, err)
    assert err == f"interrupted: lend request {request_id} was queued; interrupting does not withdraw it\n"


def interrupt_while_importing(
    command: list[str], env: Mapping[str, str], *, ignored: bool = False
) -> tuple[int, str, str]:
    """Run ``python -X importtime COMMAND``, send SIGINT once it has imported a module of the
    package after ``lending.interrupts`` (so the entry script's first lines, which set the
    quiet handler, have run; the rest is still importing), and return (exit code, stdout,
    stderr). ``ignored``: started with SIGINT ignored."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", *command],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # -X importtime: a line as each module is imported
            module = line.rpartition("|")[2].strip()
            # Not lending.interrupts itself: its line comes before the handler is set, and
            # a signal then (a loaded CI machine) met Python's own handler.
            if module.startswith("lending.") and module != "lending.interrupts":
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()  # a worker the signal missed would run on
        proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("command", [["main.py", "w1"], ["get_books.py", "request", "ada", "b1"], ["-m", "lending"]])
def test_ctrl_c_while_the_tool_is_still_starting_exits_130_without_a_traceback(
    command: list[str], redis_url: str, namespace: str
) -> None:
    """Python was still importing the package: its own KeyboardInterrupt traceback."""
    code, _, err = interrupt_while_importing(command, process_env(redis_url, namespace))

    assert "lending.cli" in err, "the signal came after the imports: the test proves nothing"
    assert code == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_ctrl_c_ignored_by_whoever_started_the_tool_stays_ignored(redis_url: str, namespace: str) -> None:
    """A background job of a non-interactive shell starts with SIGINT ignored, as Python
    leaves it: the quiet Ctrl-C of the imports must not make it listen again."""
    code, out, _ = interrupt_while_importing(
        ["get_books.py", "--help"], process_env(redis_url, namespace), ignored=True
    )

    assert (code, out.startswith("Usage: get_books.py")) == (0, True)


def test_a_worker_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm(
    redis_url: str, namespace: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "w1"],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert _wait_ready(proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert proc.poll() is None, "SIGINT, ignored by whoever started it, stopped the worker"
        proc.send_signal(signal.SIGTERM)
        code, _, _ = reap(proc)
    finally:
        proc.kill()
        proc.wait()

    assert code == 0


async def _queued(redis: Redis, keys: Keys) -> bool:
    return bool(await redis.xlen(keys.lend_requests))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_an_outcome_that_cannot_be_printed_goes_to_stderr_with_its_exit_code(
    redis_url: str, namespace: str, spawn: Spawn
) -> None:
    """stdout full: the sender still learns the outcome (it exited 1, "denied", with a traceback)."""
    spawn("w1")

    result = run_into_a_full_disk(redis_url, namespace, str(ROOT / "get_books.py"), "request", "Salvatore", "b1")
    status = run_into_a_full_disk(redis_url, namespace, "-m", "lending", "status")

    assert result.returncode == 0, result
    assert re.fullmatch(
        r"error: cannot write to stdout \(No space left on device\): ACCEPTED \S+ books=b1\n", result.stderr
    )
    assert (status.returncode, status.stderr) == (1, "error: cannot write the output: No space left on device\n")


@pytest.mark.parametrize(
    ("command", "key", "kind"),
    [
        (["status"], "storage", "set"),
        (["status", "--check"], "workers", "set"),
        (["dead-letters", "list"], "dead_letters", "stream"),
    ],
)
async def test_a_key_of_the_wrong_type_is_one_line_naming_it_and_exit_1(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, command: list[str], key: str, kind: str
) -> None:
    name = getattr(keys, key)
    await redis.set(name, "not a " + kind)

    result = await asyncio.to_thread(run_python, redis_url, namespace, "-m", "lending", *command)

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert (
        result.stderr
        == f"error: Redis refused a command: {name} holds another type than a {kind}: move it away or delete it\n"
    )


async def test_a_users_key_of_the_wrong_type_is_one_line_pointing_at_check(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    await redis.sadd(keys.user_count("ada"), "1")

    result = await asyncio.to_thread(run_python, redis_url, namespace, "-m", "lending", "status")

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert "(python -m lending check names it)" in result.stderr and len(result.stderr.splitlines()) == 1


async def test_check_reports_a_key_of_the_wrong_type_as_a_violation_naming_it(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    await redis.set(keys.storage, "not a set")

    result = await asyncio.to_thread(run_python, redis_url, namespace, "-m", "lending", "check")

    assert (result.returncode, result.stderr) == (1, ""), result
    assert f"[keys-of-their-type] {keys.storage} holds a value of another type than a set" in result.stdout


async def test_worker_redis_unreachable_exits_1_with_one_line(redis_url: str, namespace: str) -> None:
    url = f"redis://127.0.0.1:{closed_port()}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "w1", "--redis-url", url],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result
    assert READY not in result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url.rsplit(":", 1)[1] in lines[0], lines[0]


@pytest.mark.parametrize(
    ("key", "make", "said"),
    [
        ("lend_requests", ("SET", "x"), "holds a string, not a stream"),
        ("shelving_returns", ("RPUSH", "x"), "holds a list, not a stream"),
        ("workers", ("SET", "x"), "holds another type than the service keeps in it"),
    ],
)
async def test_a_key_of_the_wrong_type_stops_the_worker_at_start_with_one_line_and_its_id_free(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, key: str, make: tuple[str, str], said: str
) -> None:
    command, value = make
    await run_command(redis, command, getattr(keys, key), value)

    result = await asyncio.to_thread(run_python, redis_url, namespace, str(ROOT / "main.py"), "w1")

    assert result.returncode == 1 and READY not in result.stdout, result
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert said in line and (key != "lend_requests" or keys.lend_requests in line), line
    assert await redis.exists(keys.worker("w1")) == 0  # another worker may take the id at once


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
async def test_a_worker_started_without_stdout_or_stderr_works_and_stops_cleanly(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, closed: str
) -> None:
    """Started with a standard stream closed (``>&-``), as some supervisors do: uvloop
    aborted as soon as a socket took the number 1, and printing "Ready" raised."""
    fd = 1 if closed == "stdout" else 2
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "w1"],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        stdout=subprocess.DEVNULL if fd == 2 else None,
        stderr=subprocess.PIPE if fd == 1 else None,
        # Closed in the child before it runs Python: os.close on a copy of the number.
        preexec_fn=lambda: os.close(fd),
        text=True,
    )
    try:
        await wait_until(lambda: redis.exists(keys.worker("w1")), timeout_s=15)
        lent = await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b1"]))
        assert lent.status == "accepted"
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=15)
    assert worker.returncode == 0, err


@pytest.mark.parametrize(
    ("command", "code"),
    [(["main.py", "w1"], 1), (["-m", "lending", "status"], 1), (["get_books.py", "request", "ada", "b1"], 5)],
)
@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda url: url.replace("redis://", "redis://nobody:S3CRET@"), "invalid username-password pair"),
        (lambda url: url + "/99", "DB index is out of range"),
    ],
    ids=["wrong password", "no such database"],
)
async def test_redis_refusing_the_connection_is_said_so_not_unreachable(
    redis_url: str, namespace: str, command: list[str], code: int, change: Callable[[str], str], said: str
) -> None:
    url = change(redis_url)
    result = await asyncio.to_thread(run_python, redis_url, namespace, *command, "--redis-url", url)

    assert result.returncode == code and "Traceback" not in result.stderr, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: Redis at ") and " refused the connection: " in line and said in line, line
    assert "S3CRET" not in line


# -- --help -----------------------------------------------------------------------

WORKER_OPTIONS = [
    "--redis-url",
    "--namespace",
    "--storage-capacity",
    "--max-books-per-user",
    "--max-books-per-request",
    "--claim-idle-ms",
    "--max-deliveries",
    "--dead-letters-maxlen",
    "--force",
    "--data-dir",
    "--log-format",
    "--log-level",
]
GET_BOOKS_OPTIONS = ["--redis-url", "--namespace", "--timeout", "--no-wait", "--json"]
FIXED_ENV = {"--redis-url": "REDIS_URL", "--namespace": "LENDING_NAMESPACE"}


def help_entries(text: str) -> dict[str, str]:
    """Each option of a click ``--help`` text -> its whole entry, whitespace collapsed."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if match:
            current = entries.setdefault(match.group(1), [])
            current.append(line)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in entries.items()}


@pytest.mark.parametrize(
    ("script", "options"),
    [
        pytest.param("main.py", WORKER_OPTIONS, id="main"),
        pytest.param("get_books.py", GET_BOOKS_OPTIONS, id="get_books"),
    ],
)
def test_help_documents_every_option_and_its_env_var(script: str, options: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result
    entries = help_entries(result.stdout)
    missing = [option for option in options if option not in entries]
    assert not missing, f"options missing from --help: {missing}\n{result.stdout}"
    without_env = [option for option in options if "env var:" not in entries[option]]
    assert not without_env, f"options whose env var --help does not give: {without_env}\n{result.stdout}"
    for option, env in FIXED_ENV.items():
        assert re.search(rf"env var: {env}\b", entries[option]), entries[option]


# -- the worker-id lock -----------------------------------------------------------


async def test_same_worker_id_refused_unless_forced(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, launch: Launch, spawn: Spawn
) -> None:
    first = spawn("w1", "--worker-ttl-ms", "1000")

    second, ready = launch("w1")
    code, _, err = reap(second)
    assert not ready and code == 1, err
    assert "Traceback" not in err
    message = err.strip().splitlines()
    assert len(message) == 1 and "w1" in message[0] and "--force" in message[0], err

    spawn("w1", "--force")
    # The first process notices it lost the id (at its next heartbeat) and stops:
    # two live processes never consume under one consumer name.
    try:
        first.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker whose id was taken over with --force kept running")
    result = run_get_books(redis_url, namespace, "request", "Salvatore", "ofmiceandmen")
    assert result.returncode == 0, result


async def test_killed_worker_id_free_again_after_ttl(redis: Redis, keys: Keys, launch: Launch, spawn: Spawn) -> None:
    # A TTL well above a Python start-up (~0.3 s) keeps the refusal below deterministic.
    ttl_s = 2.0
    worker = spawn("w1", "--worker-ttl-ms", str(int(ttl_s * 1000)))
    worker.kill()
    reap(worker)
    killed_at = time.monotonic()
    assert await redis.exists(keys.worker("w1"))

    refused, ready = launch("w1", "--worker-ttl-ms", "2000")
    code, _, err = reap(refused)
    assert not ready and code == 1, err

    async def id_free() -> bool:
        return not await redis.exists(keys.worker("w1"))

    await wait_until(id_free, timeout_s=ttl_s + 3)
    assert time.monotonic() - killed_at <= ttl_s + 1.0
    spawn("w1", "--worker-ttl-ms", "2000")


# -- signals ----------------------------------------------------------------------


async def test_sigterm_when_idle_exits_0_quickly_and_frees_the_id(redis: Redis, keys: Keys, spawn: Spawn) -> None:
    worker = spawn("w1")
    started = time.monotonic()
    code, _, err = stop_process(worker)
    assert code == 0, err
    assert time.monotonic() - started < 3.0
    assert not await redis.exists(keys.worker("w1"))
    spawn("w1")  # a clean exit gives the id back at once


async def wait_in_flight(redis: Redis, keys: Keys, request_id: str) -> None:
    """Wait until a worker has read ``request_id`` and not yet finished it."""

    async def read() -> bool:
        return await pending_count(redis, keys.lend_requests) == 1

    await wait_until(read, timeout_s=5, interval_s=0.02)
    assert await events_of(redis, keys, "lend", request_id) == 0, "finished before it could be interrupted"


async def test_sigterm_finishes_in_flight_requests(redis: Redis, keys: Keys, spawn: Spawn) -> None:
    worker = spawn("w1", LENDING_SHELVING_LATENCY_MS="1500")
    request_id = await send(redis, keys, "lend", "Salvatore", ["ofmiceandmen"])
    await wait_in_flight(redis, keys, request_id)

    signalled = time.monotonic()
    code, _, log = stop_process(worker, timeout_s=15)
    assert code == 0, log
    assert time.monotonic() - signalled < 10.0
    event = await event_for(redis, keys, "lend", request_id, timeout_s=1)
    assert event.status == "accepted"
    assert await events_of(redis, keys, "lend", request_id) == 1
    assert await pending_count(redis, keys.lend_requests) == 0
    assert len(processed_lines(log, request_id)) == 1, log


async def test_second_sigint_exits_at_once_and_work_resumes(redis: Redis, keys: Keys, spawn: Spawn) -> None:
    worker = spawn("w1", LENDING_SHELVING_LATENCY_MS="1500")
    request_id = await send(redis, keys, "lend", "Salvatore", ["ofmiceandmen"])
    await wait_in_flight(redis, keys, request_id)

    worker.send_signal(signal.SIGINT)
    await asyncio.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    code, _, log = reap(worker, timeout_s=5)
    assert time.monotonic() - signalled < 2.0, log
    assert code != 0, log
    assert await events_of(redis, keys, "lend", request_id) == 0
    pending = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, min="-", max="+", count=10)
    assert [(text(p["message_id"]), text(p["consumer"])) for p in pending] == [(request_id, "w1")]

    spawn("w1", "--force")
    event = await event_for(redis, keys, "lend", request_id)
    assert event.status == "accepted"
    await asyncio.sleep(1.0)  # a duplicate would show up by now
    assert await events_of(redis, keys, "lend", request_id) == 1
    assert await redis.hgetall(keys.lent_books) == {b"ofmiceandmen": b"Salvatore"}
    assert [key async for key in redis.scan_iter(match=keys.pattern("reservations:*"))] == []


# -- logs -------------------------------------------------------------------------


async def test_json_log_format(redis: Redis, keys: Keys, redis_url: str, namespace: str, spawn: Spawn) -> None:
    worker = spawn("w1", "--log-format", "json")
    result = run_get_books(redis_url, namespace, "request", "Salvatore", "ofmiceandmen")
    code, _, log = stop_process(worker)
    assert result.returncode == 0 and code == 0, (result, log)
    request_id = result.stdout.split()[1]

    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    processed = [r for r in records if r.get("request_id") == request_id and r.get("status")]
    assert len(processed) == 1, records
    assert processed[0]["user"] == "Salvatore"
    assert processed[0]["status"] == "accepted"


# -- the embedded default ---------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_embedded_redis_default(tmp_path: Path, namespace: str, launch: Launch) -> None:
    if port_open(6379):
        pytest.skip("something already listens on 127.0.0.1:6379; the embedded default cannot be tried")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("LENDING_")}
    env["PYTHONUNBUFFERED"] = "1"
    data_dir = tmp_path / "data"
    args = ("--namespace", namespace, "--data-dir", str(data_dir))
    servers: list[int] = []
    try:
        worker, ready = launch("w-embedded", *args, env=env)
        servers += children_of(worker.pid)
        if not ready:
            pytest.fail(f"worker on the embedded default did not start: {reap(worker)}")
        assert port_open(6379)

        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "get_books.py"),
                "--namespace",
                namespace,
                "request",
                "Salvatore",
                "ofmiceandmen",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0 and result.stdout.startswith("ACCEPTED"), result

        code, _, log = stop_process(worker)
        assert code == 0, log
        assert "starting the embedded redis-server" in log, log
        assert not port_open(6379), "the embedded redis-server still runs after the worker exited"

        worker, ready = launch("w-embedded", "--force", *args, env=env)
        servers += children_of(worker.pid)
        assert ready, reap(worker)
        client = make_client("redis://127.0.0.1:6379")
        try:
            keys = Keys(namespace)
            assert await client.hget(keys.lent_books, "ofmiceandmen") == b"Salvatore"
            assert await client.get(keys.user_count("Salvatore")) == b"1"
        finally:
            await client.aclose()
        code, _, log = stop_process(worker)
        assert code == 0, log
        assert not port_open(6379)
    finally:
        for pid in servers:  # only if a worker died without stopping its server
            try:
                if "redis-server" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                pass
