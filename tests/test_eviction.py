"""An evicting Redis would silently delete requests and books: the worker refuses
``allkeys-*`` (unless told it may lose data), warns about ``volatile-*``, checks again
on every reconnect, and ``status``/``check`` show the policy.

Each test runs its own redis-server, started with the policy it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from lending.keys import Keys
from lending.ops.acl import worker_user_rules
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.redis.eviction import judge, read_policy
from lending.settings import Settings
from lending.worker import Worker

from .support import ROOT, event_for, process_env, run_command, send, start_worker_process, stop_process, wait_until

StartRedis = Callable[..., EmbeddedRedis]


# -- the decision (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "allow_data_loss", "level"),
    [
        ("noeviction", False, "ok"),
        ("noeviction", True, "ok"),
        ("volatile-lru", False, "warn"),
        ("volatile-lfu", False, "warn"),
        ("volatile-random", False, "warn"),
        ("volatile-ttl", False, "warn"),
        ("allkeys-lru", False, "refuse"),
        ("allkeys-lfu", False, "refuse"),
        ("allkeys-random", False, "refuse"),
        ("allkeys-lru", True, "warn"),
        ("some-future-policy", False, "warn"),
        (None, False, "warn"),  # INFO refused: the policy could not be read
    ],
)
def test_the_verdict_on_each_policy(policy: str | None, allow_data_loss: bool, level: str) -> None:
    verdict = judge(policy, allow_data_loss)

    assert verdict.level == level
    assert (verdict.message == "") == (level == "ok")
    if level != "ok":
        assert (policy or "could not check") in verdict.message


def test_a_refusal_names_the_risk_and_the_only_way_around_it() -> None:
    message = judge("allkeys-lru").message
    assert "losing requests and books" in message and "--allow-eviction-data-loss" in message
    assert "heartbeats" in judge("volatile-lru").message


# -- reading the policy ---------------------------------------------------------------


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """Start private redis-servers with extra arguments (``start_redis("--maxmemory-policy", "allkeys-lru")``)."""
    servers: list[EmbeddedRedis] = []

    def start(*args: str) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path / f"redis-{len(servers)}", port=free_port(), persistent=False, extra_args=args)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def admin() -> AsyncIterator[Callable[[EmbeddedRedis], Redis]]:
    """Clients for the tests' own commands (CONFIG SET, CLIENT KILL, ACL SETUSER)."""
    clients: list[Redis] = []

    def connect(server: EmbeddedRedis) -> Redis:
        clients.append(make_client(server.url))
        return clients[-1]

    yield connect
    for client in clients:
        await client.aclose()


async def test_the_policy_is_read_from_info_memory(
    start_redis: StartRedis, admin: Callable[[EmbeddedRedis], Redis]
) -> None:
    client = admin(start_redis("--maxmemory-policy", "volatile-ttl"))
    assert await read_policy(client) == "volatile-ttl"


async def test_info_refused_by_acl_or_disabled_reads_as_unknown(
    start_redis: StartRedis, admin: Callable[[EmbeddedRedis], Redis]
) -> None:
    server = start_redis()
    await run_command(admin(server), "ACL", "SETUSER", "no-info", "on", ">pw", "~*", "+@all", "-info")
    without_info = make_client(server.url.replace("//", "//no-info:pw@"))
    try:
        assert await read_policy(without_info) is None  # NOPERM
    finally:
        await without_info.aclose()
    assert await read_policy(admin(start_redis("--rename-command", "INFO", ""))) is None  # unknown command


# -- the worker ----------------------------------------------------------------------


def test_a_worker_refuses_to_start_on_allkeys_eviction(start_redis: StartRedis, namespace: str) -> None:
    server = start_redis("--maxmemory-policy", "allkeys-lru")

    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "w1"],
        cwd=ROOT,
        env=process_env(server.url, namespace),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1, result
    assert "Ready" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "allkeys-lru" in lines[0] and "losing requests and books" in lines[0], lines[0]
    assert "--allow-eviction-data-loss" in lines[0]


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--allow-eviction-data-loss",), {}), ((), {"LENDING_ALLOW_EVICTION_DATA_LOSS": "1"})],
    ids=["flag", "env"],
)
def test_the_data_loss_flag_lets_it_start_with_a_warning(
    start_redis: StartRedis, namespace: str, args: tuple[str, ...], env: dict[str, str]
) -> None:
    server = start_redis("--maxmemory-policy", "allkeys-lru")

    proc = start_worker_process("w1", server.url, namespace, *args, **env)
    code, _, log = stop_process(proc)

    assert code == 0, log
    warnings = [line for line in log.splitlines() if "allkeys-lru" in line]
    assert len(warnings) == 1 and "warning" in warnings[0] and "accepted by" in warnings[0], log


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Worker, asyncio.Task[int], Redis]]:
    """An in-process worker on ``settings.redis_url``; yields it once it consumes."""
    assert settings.redis_url is not None
    client = make_client(settings.redis_url)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: task.done() or worker.healthy(), timeout_s=10)
        yield worker, task, client
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await client.aclose()


async def reconnect_and_serve(admin: Redis, keys: Keys, request: int) -> None:
    """Drop every worker connection, then wait until a request is served again."""
    await admin.client_kill_filter(_type="normal")  # not this admin connection
    entry = await send(admin, keys, "lend", f"user-{request}", [f"book-{request}"])
    assert (await event_for(admin, keys, "lend", entry)).status == "accepted"
    await asyncio.sleep(0.3)  # the shelving consumer has reconnected too by now


async def test_a_volatile_policy_is_warned_about_once_not_on_every_reconnect(
    start_redis: StartRedis, admin: Callable[[EmbeddedRedis], Redis], settings: Settings, keys: Keys
) -> None:
    server = start_redis("--maxmemory-policy", "volatile-lru")
    with capture_logs() as logs:
        async with running(settings.replace(redis_url=server.url)) as (_, task, _client):
            for n in range(2):
                await reconnect_and_serve(admin(server), keys, n)
            assert not task.done()

    warnings = [log for log in logs if "volatile-lru" in log["event"]]
    assert [log["log_level"] for log in warnings] == ["warning"], logs


async def test_info_refused_is_said_once_and_the_worker_serves(
    start_redis: StartRedis, admin: Callable[[EmbeddedRedis], Redis], settings: Settings, keys: Keys
) -> None:
    server = start_redis()
    client = admin(server)
    await run_command(
        client, "ACL", "SETUSER", "svc", "reset", "on", ">pw", *worker_user_rules(keys.namespace), "-info"
    )
    with capture_logs() as logs:
        async with running(settings.replace(redis_url=server.url.replace("//", "//svc:pw@"))) as (_, task, _c):
            for n in range(2):
                await reconnect_and_serve(client, keys, n)
            assert not task.done()

    unchecked = [log for log in logs if "could not check" in log["event"]]
    assert len(unchecked) == 1, logs


async def test_a_reconnect_onto_an_evicting_redis_stops_the_worker_with_exit_code_1(
    start_redis: StartRedis, admin: Callable[[EmbeddedRedis], Redis], settings: Settings, keys: Keys
) -> None:
    server = start_redis()
    client = admin(server)
    with capture_logs() as logs:
        async with running(settings.replace(redis_url=server.url)) as (_, task, _c):
            # As if a failover or a restart brought the worker to a server that evicts.
            await client.config_set("maxmemory-policy", "allkeys-lru")
            await client.client_kill_filter(_type="normal")

            assert await asyncio.wait_for(task, 10) == 1

    errors = [log for log in logs if log["log_level"] == "error"]
    assert len(errors) == 1 and "allkeys-lru" in errors[0]["event"], logs
    assert not await client.exists(keys.worker(settings.worker_id))  # it stopped cleanly: id given back


# -- status and check ------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "warned"), [("noeviction", False), ("allkeys-lru", True)])
def test_status_and_check_show_the_policy(start_redis: StartRedis, namespace: str, policy: str, warned: bool) -> None:
    url = start_redis("--maxmemory-policy", policy).url

    def lending(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lending", *args, "--redis-url", url, "--namespace", namespace],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    outputs: dict[str, str] = {}
    for command in ("status", "check"):
        as_json, as_text = lending(command, "--json"), lending(command)
        assert (as_json.returncode, as_text.returncode) == (0, 0), (as_json, as_text)  # an empty namespace is clean
        assert json.loads(as_json.stdout)["maxmemory_policy"] == policy
        outputs[command] = as_text.stdout

    assert f"maxmemory-policy  {policy}" in outputs["status"]
    assert f"maxmemory-policy: {policy}" in outputs["check"]
    for text in outputs.values():
        assert any(line.strip().startswith("warning:") and policy in line for line in text.splitlines()) is warned, text
