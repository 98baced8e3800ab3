"""Least privilege: the users that ``python -m lending acl`` prints (the API's with
``--api-user``), applied as printed, on a private Redis 7 and on the default test server (Redis 6.2 unless
``REDIS_URL`` says otherwise, with the rules printed for it).

The service runs the worker without SCAN or SELECT; the sender hands requests in
through the inbox and reads their outcomes, and can neither forge, trim, delete nor
block anything, nor read the library's state or others' requests; the operator runs
``status``, ``check`` and ``dead-letters list`` and writes nothing; the HTTP API serves
every endpoint and cannot change lending state. A missing permission is one line naming
the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from lending.api.config import ApiSettings
from lending.cli import main as lending_main
from lending.client import submit, wait_for_event
from lending.domain.streamids import MAX_ID
from lending.keys import LENDING_GROUP, Keys
from lending.ops import monitoring, retention
from lending.ops.acl import redis_cli_argument
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.embedded import free_port, redis_cli_path
from lending.redis.scripts import Scripts
from lending.settings import Settings
from lending.worker import Worker

from .api_support import serving
from .support import (
    ROOT,
    all_events,
    decoded,
    http_get,
    process_env,
    run_command,
    start_worker_process,
    stop_process,
    stream_entries,
    wait_until,
    xadd_fields,
)


@dataclass(frozen=True)
class Server:
    """A Redis to apply the users on: an admin client, its URL, its major version."""

    admin: Redis
    url: str
    major: int


@dataclass(frozen=True)
class Users:
    """The URLs of the printed users (the API's included)."""

    service: str
    sender: str
    operator: str
    api: str
    names: tuple[str, ...]


@pytest.fixture(params=["redis7", "default"])
async def server(request: pytest.FixtureRequest, redis_url: str, keys: Keys) -> AsyncIterator[Server]:
    url = request.getfixturevalue("redis7_url") if request.param == "redis7" else redis_url
    admin = make_client(url)
    major = int(str((await admin.info("server"))["redis_version"]).split(".")[0])
    try:
        yield Server(admin, url, major)
    finally:
        async for key in admin.scan_iter(match=keys.pattern("*"), count=1000):
            await admin.delete(key)
        await admin.aclose()


@pytest.fixture
async def users(server: Server, namespace: str) -> AsyncIterator[Users]:
    """The users ``python -m lending acl`` prints for ``server``, created as printed."""
    made = await create_printed_users(server, namespace)
    yield made
    await server.admin.acl_deluser(*made.names)


def with_user(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


def print_acl(server: Server, namespace: str, names: tuple[str, str, str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m lending acl`` for ``server``'s version: the four users ``names`` (service,
    sender, operator, API)."""
    version = "7" if server.major >= 7 else "6.2"
    named = ["--service-user", names[0], "--sender-user", names[1], "--operator-user", names[2], "--api-user", names[3]]
    return subprocess.run(
        [sys.executable, "-m", "lending", "acl", "--namespace", namespace, "--redis", version, *named],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


async def create_printed_users(server: Server, namespace: str) -> Users:
    suffix, password = uuid.uuid4().hex[:8], uuid.uuid4().hex
    names = (f"lending-{suffix}", f"get-books-{suffix}", f"operator-{suffix}", f"api-{suffix}")
    printed = print_acl(server, namespace, names)
    lines = printed.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["ACL", "SETUSER", name] for name in names], printed.stdout
    for line in lines:
        assert await run_command(server.admin, *line.replace("<password>", password).split()) == b"OK", line
    service, sender, operator, api = (with_user(server.url, name, password) for name in names)
    return Users(service, sender, operator, api, names)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, url: str, **overrides: Any) -> AsyncIterator[Worker]:
    """An in-process worker connected as the user of ``url``."""
    client = make_client(url)
    worker = Worker(settings.replace(redis_url=url, **overrides), client, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.05)
        if task.done():
            task.result()  # raise its error
        yield worker
    finally:
        worker.stop()
        assert await asyncio.wait_for(task, 15) == 0
        await client.aclose()


Attempt = Callable[[], Awaitable[object]]


async def refused(attempts: list[Attempt]) -> None:
    """Each attempt is refused for want of a permission."""
    for attempt in attempts:
        with pytest.raises(NoPermissionError):
            await attempt()


def lending(url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m lending ARGS`` with ``url`` as REDIS_URL."""
    return subprocess.run(
        [sys.executable, "-m", "lending", *args],
        cwd=ROOT,
        env=process_env(url, namespace),
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(run: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The command failed with ``code`` and one line on stderr naming ``words``."""
    assert run.returncode == code and run.stdout == "", run
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr and all(w in run.stderr for w in words), run.stderr


async def test_printed_users_run_the_worker_get_books_and_the_operators_tools(
    server: Server, users: Users, keys: Keys, namespace: str
) -> None:
    # A worker that died without releasing its id: the next one removes it from the set.
    await server.admin.sadd(keys.workers, "ghost")
    letter = decoded(await server.admin.xadd(keys.dead_letters, {"stream": keys.lend_requests, "error": "boom"}))
    port = free_port()
    worker = start_worker_process("w1", users.service, namespace, "--metrics-port", str(port))
    try:
        for action, expected in (("request", "ACCEPTED"), ("return", "RETURNED"), ("request", "ACCEPTED")):
            got = lending(users.sender, namespace, "get-books", action, "ada", "b1")
            assert got.returncode == 0 and got.stdout.startswith(expected), got
        queued = lending(users.sender, namespace, "get-books", "request", "bob", "b2", "--no-wait")
        assert queued.returncode == 0 and queued.stdout.startswith("QUEUED "), queued
        # Past the inbox's bounds: an invalid request (2), as through XADD or the API.
        too_many = lending(users.sender, namespace, "get-books", "request", "bob", *(f"b{n}" for n in range(1001)))
        one_line_error(too_many, 2, "the inbox refused the request", "nothing was queued")

        # The worker's metrics come from reads the service user may do (no SCAN).
        async def books_lent() -> bool:
            return "lending_books_lent 2.0" in (await http_get(port, "/metrics"))[1]

        await wait_until(books_lent, timeout_s=15)

        checked = lending(users.operator, namespace, "check", "--wait-quiescent", "10")
        assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked
        status = lending(users.operator, namespace, "status", "--json")
        assert status.returncode == 0, status
        shown = json.loads(status.stdout)
        assert [w["worker_id"] for w in shown["workers"]] == ["w1"] and shown["books_lent"] == 2, shown
        assert shown["maxmemory_policy"] is not None, shown
        listed = lending(users.operator, namespace, "dead-letters", "list")
        assert listed.returncode == 0 and listed.stdout.startswith(letter), listed
        # A violation too (a user whose count disagrees is read again, with their books).
        await server.admin.incr(keys.user_count("ada"))
        violated = lending(users.operator, namespace, "check")
        assert violated.returncode == 1 and "count-matches-lent-books" in violated.stdout, violated
    finally:
        code, _, err = stop_process(worker)
    assert code == 0 and "Traceback" not in err and "no permission" not in err, err
    assert await server.admin.smembers(keys.workers) == set()


async def test_the_sender_can_only_hand_in_requests_and_read_events(
    server: Server, users: Users, keys: Keys, settings: Settings
) -> None:
    queued = decoded(await server.admin.xadd(keys.lend_requests, {"user_id": "eve", "book_ids": "b9"}))
    sender = make_client(users.sender)
    try:
        async with running_worker(settings, users.service):
            request_id, after = await submit(sender, keys, "lend", "ada", ["b1"])
            event = await wait_for_event(sender, keys, "lend", request_id, after, 10)
            assert event is not None and event.status == "accepted", event
            lend = {"user_id": "ada", "book_ids": "b2"}
            forged = {"request_id": request_id, "action": "lend", "status": "denied"}
            attempts: list[Attempt] = [
                lambda: sender.xadd(keys.events, xadd_fields(forged)),
                lambda: sender.xadd(keys.events, {"f": "v"}, maxlen=0),
                lambda: sender.xadd(keys.lend_requests, xadd_fields(lend), maxlen=0),
                lambda: sender.xadd(keys.lend_requests, xadd_fields(lend), id=MAX_ID),
                lambda: sender.xdel(keys.lend_requests, queued),
                lambda: sender.xdel(keys.events, event.event_id),
                lambda: sender.xtrim(keys.lend_requests, maxlen=0),
                lambda: sender.xtrim(keys.events, maxlen=0),
                lambda: sender.xrange(keys.lend_requests),
                lambda: sender.xread({keys.lend_requests: "0-0"}),
                lambda: sender.xreadgroup(LENDING_GROUP, "mallory", {keys.lend_requests: ">"}),
                lambda: sender.hgetall(keys.lent_books),
                lambda: sender.lrange(keys.inbox, 0, -1),
                lambda: sender.lpop(keys.inbox),
                lambda: sender.delete(keys.inbox),
                lambda: sender.delete(keys.events),
                lambda: sender.sadd(keys.storage, "stolen"),
                lambda: sender.scan(),
            ]
            if server.major >= 7:
                # Functions run with the caller's permissions: none is a way around them.
                attempts.append(lambda: run_command(sender, "FCALL", "any", 1, keys.lend_requests))
                # Redis 6.2 has no write-only keys: there RPUSH reaches any key of the sender.
                attempts.append(lambda: sender.rpush(keys.events, "x"))
                attempts.append(lambda: sender.rpush(keys.receipt("0" * 32), "x"))
            await refused(attempts)

            # Nothing was forged, wiped, trimmed, deleted or blocked: the queued request
            # is there and answered, and requests are still taken.
            assert [e for e, _ in await stream_entries(server.admin, keys.lend_requests, queued, queued)] == [queued]
            again, after = await submit(sender, keys, "return", "ada", ["b1"])
            returned = await wait_for_event(sender, keys, "return", again, after, 10)
            assert returned is not None and returned.status == "returned", returned
            eve = await wait_for_event(sender, keys, "lend", queued, "0-0", 10)
            assert eve is not None and eve.status == "accepted", eve
        assert await server.admin.xlen(keys.events) == 3
        assert not await server.admin.sismember(keys.storage, "stolen")
    finally:
        await sender.aclose()


async def test_a_request_handed_in_while_no_worker_runs_waits_in_the_inbox(
    server: Server, users: Users, keys: Keys, namespace: str, settings: Settings
) -> None:
    waiting = lending(users.sender, namespace, "get-books", "request", "ada", "b1", "--timeout", "1")
    assert waiting.returncode == 3 and waiting.stdout == "", waiting
    assert waiting.stderr.startswith("no worker took the lend request from the inbox within 1 s;"), waiting.stderr
    assert await server.admin.llen(keys.inbox) == 1
    async with running_worker(settings, users.service):
        await wait_until(lambda: server.admin.xlen(keys.events), timeout_s=10)
    assert await server.admin.llen(keys.inbox) == 0
    [event] = await all_events(server.admin, keys)
    assert (event.user_id, event.status) == ("ada", "accepted"), event


async def test_the_operator_reads_and_writes_nothing(server: Server, users: Users, keys: Keys, namespace: str) -> None:
    letter = decoded(await server.admin.xadd(keys.dead_letters, {"stream": keys.lend_requests, "user_id": "ada"}))
    for action in ("retry", "purge"):
        denied = lending(users.operator, namespace, "dead-letters", action, "--all")
        one_line_error(denied, 1, "no permission", "'evalsha'" if action == "retry" else "'xdel'")
    operator = make_client(users.operator)
    try:
        await refused(
            [
                lambda: operator.xadd(keys.lend_requests, {"user_id": "ada", "book_ids": "b1"}),
                lambda: operator.delete(keys.dead_letters),
                lambda: operator.set(keys.events_trimmed_to, "0-0"),
                lambda: operator.hset(keys.lent_books, "b1", "mallory"),
                lambda: operator.rpush(keys.inbox, "x"),
                lambda: operator.config_get("requirepass"),
                lambda: operator.get("{other}:storage"),
            ]
        )
    finally:
        await operator.aclose()
    assert await server.admin.xlen(keys.dead_letters) == 1
    assert letter


async def test_the_api_user_serves_every_endpoint_and_changes_no_lending_state(
    server: Server, users: Users, keys: Keys, namespace: str, settings: Settings
) -> None:
    operator = {"Authorization": "Bearer secret-token"}
    letter = decoded(
        await server.admin.xadd(
            keys.dead_letters,
            {"stream": keys.lend_requests, "request_id": "1-0", "action": "lend", "user_id": "eve", "book_ids": "b7"},
        )
    )
    api_settings = ApiSettings(redis_url=users.api, namespace=namespace, token="secret-token", keep_alive_s=0.3)
    async with running_worker(settings, users.service), serving(api_settings) as live:
        http = live.http
        lent = await http.post("/v1/lends?wait=10", json={"user_id": "ada", "book_ids": ["b1"]})
        assert lent.status_code == 200 and lent.json()["status"] == "accepted", lent.text
        key = {"Idempotency-Key": "k1"}
        first = await http.post("/v1/returns", json={"user_id": "ada", "book_ids": ["b1"]}, headers=key)
        again = await http.post("/v1/returns", json={"user_id": "ada", "book_ids": ["b1"]}, headers=key)
        assert first.status_code == 202 and again.status_code == 202, (first.text, again.text)
        assert first.json()["request_id"] == again.json()["request_id"]
        polled = await http.get(f"{first.headers['location']}?wait=10")
        assert polled.status_code == 200 and polled.json()["status"] == "returned", polled.text
        reads: dict[str, Callable[[Any], bool]] = {
            f"/v1/requests/lend/{lent.json()['request_id']}": lambda body: body["status"] == "accepted",
            "/v1/users/ada/loans": lambda body: body["books"] == [],
            "/v1/books/b1": lambda body: body["where"] != "lent",
            "/v1/dashboard": lambda body: body["status_error"] is None and len(body["status"]["workers"]) == 1,
            "/v1/status": lambda body: [w["worker_id"] for w in body["workers"]] == ["w1"],
            "/v1/dead-letters": lambda body: [d["id"] for d in body["dead_letters"]] == [letter],
        }
        for path, expected in reads.items():
            answer = await http.get(path, headers=operator)
            assert answer.status_code == 200 and expected(answer.json()), (path, answer.text)
        async with http.stream("GET", "/v1/events", headers={"Last-Event-ID": "0-0"}) as events:
            assert events.status_code == 200
            async for line in events.aiter_lines():
                if line.startswith("data: "):
                    break
        retried = await http.post(f"/v1/dead-letters/{letter}/retry", headers=operator)
        assert retried.status_code == 202, retried.text

    api = make_client(users.api)
    try:
        forged = {"request_id": "1-0", "action": "lend", "status": "denied"}
        attempts: list[Attempt] = [
            lambda: api.hset(keys.lent_books, "b1", "mallory"),
            lambda: api.sadd(keys.storage, "stolen"),
            lambda: api.delete(keys.events),
            lambda: api.xack(keys.lend_requests, LENDING_GROUP, "1-0"),
            lambda: api.xgroup_destroy(keys.lend_requests, LENDING_GROUP),
            lambda: api.xtrim(keys.lend_requests, maxlen=0),
            lambda: api.config_get("requirepass"),
            lambda: api.get("{other}:storage"),
        ]
        if server.major >= 7:
            # Redis 6.2 has no read-only keys: there XADD and SET reach any key of the API.
            attempts.append(lambda: api.xadd(keys.events, xadd_fields(forged)))
            attempts.append(lambda: api.set(keys.user_count("ada"), 0))
            attempts.append(lambda: api.xdel(keys.events, "1-0"))
        await refused(attempts)
    finally:
        await api.aclose()
    assert await server.admin.xlen(keys.events) == 3  # the lend, the return, the retried letter
    assert not await server.admin.sismember(keys.storage, "stolen")


async def test_a_missing_permission_is_one_line_naming_the_command(
    server: Server, users: Users, namespace: str
) -> None:
    # The service user may not SCAN: status (which counts users at their limit) says so.
    one_line_error(lending(users.service, namespace, "status"), 1, "no permission", "'scan'")
    one_line_error(lending(users.sender, namespace, "check"), 1, "no permission", "'hgetall'")
    one_line_error(lending(users.sender, namespace, "dead-letters", "list"), 1, "no permission", "'xrange'")
    # get_books keeps its exit code for a refusal (6).
    one_line_error(lending(users.operator, namespace, "get-books", "request", "ada", "b1"), 6, "'xrevrange'")


async def test_service_user_trims_refreshes_metrics_dead_letters_and_never_scans(
    server: Server, users: Users, keys: Keys, settings: Settings
) -> None:
    async with running_worker(settings, users.service, shelving_fail_rate=1.0, max_deliveries=1) as worker:
        entry, after = await submit(server.admin, keys, "lend", "ada", ["b1"])
        event = await wait_for_event(server.admin, keys, "lend", entry, after, 10)
        assert event is not None and event.status == "failed", event
        client = make_client(users.service)
        try:
            await retention.trim(client, keys, events_maxlen=10)
            await monitoring.refresh(worker.metrics, client, keys)
            assert await server.admin.xlen(keys.dead_letters) == 1
            await refused(
                [
                    lambda: client.scan(),
                    lambda: run_command(client, "SELECT", 1),
                    lambda: client.config_get("*"),
                    lambda: client.get("{other}:storage"),
                    lambda: client.flushall(),
                ]
            )
        finally:
            await client.aclose()


async def test_service_user_can_remove_dead_consumers(server: Server, users: Users, keys: Keys) -> None:
    await ensure_group(server.admin, keys.lend_requests, LENDING_GROUP)
    await server.admin.xgroup_createconsumer(keys.lend_requests, LENDING_GROUP, "gone")
    client = make_client(users.service)
    try:
        removed = await retention.forget_dead_consumers(client, Scripts().forget_consumers, keys)
    finally:
        await client.aclose()
    assert removed == {keys.lend_requests: ["gone"]}


async def test_glob_characters_of_a_namespace_give_no_access_to_others(server: Server) -> None:
    namespace = f"lib-{uuid.uuid4().hex[:6]}?"
    made = await create_printed_users(server, namespace)
    try:
        for url in (made.service, made.operator):
            client = make_client(url)
            try:
                assert await client.get(Keys(namespace).storage) is None  # its own keys: fine
                with pytest.raises(NoPermissionError):
                    await client.get(Keys(namespace[:-1] + "X").storage)
            finally:
                await client.aclose()
    finally:
        await server.admin.acl_deluser(*made.names)


async def test_acl_for_redis_6_2_says_what_it_cannot_prevent() -> None:
    printed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "lending", "acl", "--redis", "6.2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert printed.returncode == 0 and "%R~" not in printed.stdout and "%W~" not in printed.stdout, printed
    assert printed.stderr.startswith("# Redis 6.2") and "{lending}:events" in printed.stderr, printed.stderr
    assert all(line.startswith("ACL SETUSER ") for line in printed.stdout.splitlines())


@pytest.mark.parametrize(
    ("extra", "users"),
    [
        ([], ["lending", "get-books", "lending-operator"]),
        (["--api-user", "front"], ["lending", "get-books", "lending-operator", "front"]),
    ],
)
def test_acl_prints_three_users_and_the_apis_on_request(extra: list[str], users: list[str]) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "lending", "acl", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert [line.split()[2] for line in printed.stdout.splitlines()] == users, printed.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # Printed as "ACL SETUSER  reset on ...", redis-cli would make a user named "reset".
        (["--service-user", ""], "Invalid value for '--service-user': user name '' must be non-empty"),
        (["--api-user", ""], "Invalid value for '--api-user': user name '' must be non-empty"),
        (["--sender-user", "get books"], "without whitespace or control characters"),
        (["--operator-user", "ops\nACL"], "without whitespace or control characters"),
        # Every client that does not authenticate would be left with one role's rights.
        (["--service-user", "default"], "'default' is Redis's user for every connection that does not authenticate"),
        (["--operator-user", "default"], "'default' is Redis's user for every connection that does not authenticate"),
        # The second ACL SETUSER would reset the user the first one made.
        (["--service-user", "x", "--sender-user", "x"], "--service-user and --sender-user both name user 'x'"),
        (["--api-user", "lending"], "--service-user and --api-user both name user 'lending'"),
        (["--namespace", "lib\nACL"], "Invalid value for '--namespace'"),
        # Redis refuses a key pattern with a space, however redis-cli is given it.
        (["--namespace", "a b"], "namespace 'a b' holds whitespace, which Redis refuses in an ACL key pattern"),
    ],
)
def test_acl_refuses_names_that_would_garble_or_undo_its_commands(args: list[str], said: str) -> None:
    result = CliRunner().invoke(lending_main, ["acl", *args])

    assert result.exit_code == 2 and result.stdout == "", result.output
    assert said in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("odd", ["it's", 'say"hi"', "back\\slash?"])
async def test_printed_commands_piped_into_redis_cli_limit_each_user_to_an_odd_namespace(
    server: Server, odd: str
) -> None:
    cli = redis_cli_path()
    if cli is None or not server.url.startswith("redis://"):
        pytest.skip("needs redis-cli and a redis:// server")
    namespace, suffix, password = f"lib-{uuid.uuid4().hex[:6]}-{odd}", uuid.uuid4().hex[:8], uuid.uuid4().hex
    names = (f"lending-{suffix}", f"get-books-{suffix}", f"operator-{suffix}", f"api-{suffix}")
    printed = print_acl(server, namespace, names)
    try:
        piped = subprocess.run(
            [cli, "-u", server.url],
            input=printed.stdout.replace("<password>", password),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert piped.stdout.split() == ["OK"] * 4, (printed.stdout, piped)
        user = await server.admin.acl_getuser(names[0])
        assert user is not None and isinstance(user["keys"], list)
        granted = [decoded(key) for key in user["keys"]]
        pattern = Keys(namespace).pattern("*")
        assert granted in ([f"~{pattern}"], [pattern]), granted  # as Redis 7 and 6.2 show it
        service = make_client(with_user(server.url, names[0], password))
        try:
            assert await service.get(Keys(namespace).storage) is None
            with pytest.raises(NoPermissionError):
                await service.get(Keys("lending").storage)
        finally:
            await service.aclose()
    finally:
        await server.admin.acl_deluser(*names)


@pytest.mark.parametrize(
    ("argument", "printed"),
    [
        ("~{lending}:*", "~{lending}:*"),
        (r"~{lib\?}:*", r"~{lib\?}:*"),
        ("~{it's}:*", '"~{it\'s}:*"'),
        ('~{say"hi"}:*', r'"~{say\"hi\"}:*"'),
        (r"~{a\"b}:*", r'"~{a\\\"b}:*"'),
        ("", '""'),
        ("a\nb", r'"a\x0ab"'),
    ],
)
def test_an_argument_is_printed_as_it_is_unless_redis_cli_would_split_it(argument: str, printed: str) -> None:
    assert redis_cli_argument(argument) == printed
