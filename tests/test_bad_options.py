"""A mistyped option of any command is one line saying what is wrong and exit 2 (a
usage error), never a traceback: Redis URLs the client cannot use, namespaces that
cannot name one, numbers that are not finite, an --api that is not an HTTP URL."""

from __future__ import annotations

import subprocess

import pytest
from redis.asyncio import Redis

from lending.keys import Keys
from lending.redis.embedded import free_port
from lending.redis.urls import url_problem
from simulator.cli import NumberList

from .support import run_get_books, run_python

COMMANDS = {
    "worker": ["main.py", "w1"],
    "get-books": ["get_books.py", "request", "ada", "b1"],
    "api": ["-m", "lending", "api", "--port", "0"],
    "status": ["-m", "lending", "status"],
    "check": ["-m", "lending", "check"],
    "dead-letters": ["-m", "lending", "dead-letters", "list"],
    "simulator-run": ["-m", "simulator", "run", "--requests", "1"],
    "simulator-bench": ["-m", "simulator", "bench"],
}


def run(args: list[str], redis_url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    """``args`` run with this Python, given --redis-url and --namespace (the simulator reads
    no environment variable for them; its benchmark makes its own namespaces); stopped
    after 60 s, should one start serving."""
    bench = args[:3] == COMMANDS["simulator-bench"]
    options = ["--redis-url", redis_url] + ([] if bench else ["--namespace", namespace])
    return run_python(redis_url, namespace, *args, *options, timeout_s=60)


def usage_error(result: subprocess.CompletedProcess[str], option: str) -> str:
    """The one error line of a usage error about ``option``, checked."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: Invalid value for '{option}'"), result.stderr
    return line


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://redis.example:6379", "is not a Redis URL: it must start with redis://"),
        ("localhost:6379", "is not a Redis URL"),
        ("redis://127.0.0.1:99999", "Port out of range"),
        ("redis://127.0.0.1:0", "port 0 names no server"),
        ("redis://[::1", "Invalid IPv6 URL"),
        ("redis://127.0.0.1:6379/lending", "the path must be a database number"),
        ("redis://127.0.0.1:6379/?sockettimeout=5", "an option Redis clients do not take: 'sockettimeout'"),
        ("redis://127.0.0.1:6379/?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:6379/?socket_timeout=0", "socket_timeout must be a number of seconds, more than 0"),
        ("redis://127.0.0.1:6379/?socket_connect_timeout=-1", "socket_connect_timeout must be a number of seconds"),
        ("redis://127.0.0.1:6379/?socket_timeout=nan", "socket_timeout must be a number of seconds"),
        ("redis://127.0.0.1:6379/?health_check_interval=-5", "health_check_interval must be a number of seconds, 0 or"),
        ("redis+cluster://a:7000,,b:7001", "an empty seed"),
        ("redis+cluster://a:70000", "no valid port"),
        ("rediss://127.0.0.1:6380/?ssl_cert_reqs=CERT_NONE", "Invalid SSL Certificate Requirements Flag"),
        # Replies in other shapes (XREADGROUP a map) or as text: the worker would fail on each.
        ("redis://127.0.0.1:6379/?protocol=3", "the query option protocol is not supported"),
        ("redis://127.0.0.1:6379/?decode_responses=true", "the query option decode_responses is not supported"),
        # redis-py's asyncio client keeps the value as a string: "no" turns decoding on too.
        ("redis://127.0.0.1:6379/?decode_responses=no", "the query option decode_responses is not supported"),
    ],
)
def test_an_unusable_redis_url_is_named_with_the_reason(url: str, said: str) -> None:
    problem = url_problem(url)
    assert problem is not None and said in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://:p%40ss@127.0.0.1:6380/0",
        "rediss://user:secret@host:6380/0?ssl_cert_reqs=required",
        "redis://[::1]:6379/15?socket_timeout=5&protocol=2",
        "unix:///var/run/redis.sock?db=2",
        "rediss+cluster://user:secret@a:7000,[::1]:7001",
        "REDIS://127.0.0.1:6379/0",
    ],
)
def test_a_usable_redis_url_passes(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_every_command_answers_an_unusable_redis_url_with_a_usage_error(command: list[str], namespace: str) -> None:
    result = run(command, "redis://lender:hunter2@127.0.0.1:99999", namespace)

    line = usage_error(result, "--redis-url")
    assert "Port out of range" in line
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        ("worker", ""),
        ("worker", "a}b"),
        ("get-books", "{lending}"),
        ("api", " lending"),
        ("simulator-run", "a{b"),
        # A control character would split the lines naming its keys (logs, printed ACL rules).
        ("worker", "a\nb"),
        ("status", "lib\x1b[2J"),
        ("simulator-run", "a\tb"),
    ],
)
def test_a_namespace_that_cannot_name_one_is_a_usage_error(command: str, bad: str, redis_url: str) -> None:
    line = usage_error(run(COMMANDS[command], redis_url, bad), "--namespace")
    assert "must be non-empty, without braces or outer spaces" in line


@pytest.mark.parametrize(
    ("args", "option", "said"),
    [
        (["--timeout", "nan"], "--timeout", "is not a finite number"),
        (["--timeout", "inf"], "--timeout", "is not in the range"),
        (["--timeout", "1e308"], "--timeout", "is not in the range"),
        (["--api", "localhost:8080"], "--api", "must be http://HOST[:PORT]"),
        (["--api", "ftp://library"], "--api", "must be http://HOST[:PORT]"),
        (["--api", "http://library:99999"], "--api", "Port out of range"),
        (["--api", "http://library:8080/?debug=1"], "--api", "without port 0, query or fragment"),
    ],
)
async def test_get_books_refuses_an_unusable_timeout_or_api_url_and_queues_nothing(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, args: list[str], option: str, said: str
) -> None:
    result = run_get_books(redis_url, namespace, *args, "request", "ada", "b1")

    assert said in usage_error(result, option)
    assert await redis.xlen(keys.lend_requests) == 0


@pytest.mark.parametrize("folder", ["", " "])
def test_an_empty_data_dir_is_a_usage_error_not_the_current_folder(folder: str, namespace: str) -> None:
    result = run(["main.py", "w1", "--data-dir", folder], f"redis://127.0.0.1:{free_port()}", namespace)

    assert "must name a folder" in usage_error(result, "--data-dir")


def test_a_number_that_is_not_finite_is_a_usage_error(redis_url: str, namespace: str) -> None:
    result = run(["-m", "lending", "status", "--check", "--max-pending-age", "nan"], redis_url, namespace)

    assert "is not a finite number" in usage_error(result, "--max-pending-age")


@pytest.mark.parametrize(
    ("args", "option", "said"),
    [
        (["--workers", "1,x"], "--workers", "'x' is not a number"),
        (["--workers", "0"], "--workers", "at least 1"),
        (["--rates", "500,nan"], "--rates", "'nan' must be a finite number"),
    ],
)
def test_the_benchmark_refuses_a_list_that_is_not_numbers(
    args: list[str], option: str, said: str, redis_url: str, namespace: str
) -> None:
    result = run(["-m", "simulator", "bench", *args], redis_url, namespace)

    assert said in usage_error(result, option)


def test_the_benchmark_reads_its_lists() -> None:
    workers = NumberList(int, minimum=1)
    rates = NumberList(float, minimum=0.1)

    assert workers.convert("1,2, 4", None, None) == (1, 2, 4)
    assert workers.convert("", None, None) == ()  # no drain
    assert rates.convert("200,0.5", None, None) == (200.0, 0.5)


# -- bytes that are not UTF-8, host names, numbers past what Redis takes --------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["request", "ada", "b\udcff"], "BOOKS..."),  # how Python keeps the byte 0xFF of an argument
        (["request", "a\udcffa", "b1"], "USER"),
        (["--no-wait", "return", "ada", "\udcfe"], "BOOKS..."),
    ],
)
async def test_an_id_that_is_not_utf8_is_a_usage_error_and_queues_nothing(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, args: list[str], option: str
) -> None:
    result = run_get_books(redis_url, namespace, *args)

    assert "is not valid UTF-8" in usage_error(result, option)
    assert await redis.xlen(keys.lend_requests) + await redis.xlen(keys.return_requests) == 0


def test_a_consumer_that_is_not_utf8_is_a_usage_error(redis_url: str, namespace: str) -> None:
    result = run(["-m", "lending", "status", "--pending", "w\udcff"], redis_url, namespace)

    assert "is not valid UTF-8" in usage_error(result, "--pending")


@pytest.mark.parametrize(
    ("command", "option", "host"),
    [
        (["-m", "lending", "api", "--port", "0", "--host"], "--host", "a" * 64),  # a label is 63 at most
        (["-m", "lending", "api", "--port", "0", "--host"], "--host", "a..b"),
        (["main.py", "w1", "--metrics-port", "0", "--metrics-host"], "--metrics-host", "a" * 64),
        (["get_books.py", "--api"], "--api", "http://a..b:8080"),
    ],
)
def test_a_host_name_that_cannot_be_looked_up_is_a_usage_error(
    command: list[str], option: str, host: str, redis_url: str, namespace: str
) -> None:
    tail = ["request", "ada", "b1"] if command[0] == "get_books.py" else []
    result = run([*command, host, *tail], redis_url, namespace)

    assert "is not a host name" in usage_error(result, option)


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["-m", "lending", "api", "--port", "0", "--host"], "--host"),
        (["main.py", "w1", "--metrics-port", "0", "--metrics-host"], "--metrics-host"),
    ],
)
def test_an_empty_address_to_listen_on_is_a_usage_error_not_every_address(
    command: list[str], option: str, redis_url: str, namespace: str
) -> None:
    result = run([*command, ""], redis_url, namespace)

    assert "to listen on every address, say so: 0.0.0.0" in usage_error(result, option)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--worker-ttl-ms", "9223372036854775807"),  # Redis refused it as a TTL: a traceback
        ("--claim-idle-ms", "86400001"),
        ("--events-maxlen", "99999999999999999999"),
        ("--concurrency", "0"),
    ],
)
def test_a_worker_number_out_of_its_range_is_a_usage_error(
    option: str, value: str, redis_url: str, namespace: str
) -> None:
    assert "is not in the range" in usage_error(run(["main.py", "w1", option, value], redis_url, namespace), option)
