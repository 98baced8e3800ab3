"""Redis Cluster: namespaces on different masters, and a master failover under way.

A fixture builds a real cluster of 3 masters and 3 replicas from the embedded
redis-server binary on loopback ports (``redis-cli --cluster create``)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial

import httpx
import pytest
import redis

from lending.errors import RedisUnavailable
from lending.keys import Keys
from lending.ops import checker
from lending.redis.cluster import ClusterUrl, SlotOwner, cluster_client
from lending.redis.connection import make_client
from lending.redis.embedded import free_port, redis_cli_path, redis_server_path
from lending.settings import Settings
from lending.worker import Worker

from .api_support import start_api_process
from .support import (
    ROOT,
    all_events,
    event_for,
    process_env,
    run_get_books,
    send,
    start_worker_process,
    stop_process,
    wait_until,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[int]]]:
    cli = redis_cli_path()
    if cli is None:
        pytest.skip("no redis-cli to create a cluster with")
    folder = tmp_path_factory.mktemp("cluster")
    ports = [_cluster_port() for _ in range(6)]
    processes = []
    for port in ports:
        node = folder / str(port)
        node.mkdir()
        processes.append(
            subprocess.Popen(
                [
                    redis_server_path(),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--dir",
                    str(node),
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--logfile",
                    "redis.log",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:
            _wait(port, lambda c: bool(c.ping()))
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in ports:
            _wait(port, partial(_state_ok, port), timeout_s=30)
        yield f"redis+cluster://127.0.0.1:{ports[0]}", ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port < 55_000:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10_000))
                    return port
                except OSError:
                    pass


def _state_ok(port: int, _client: redis.Redis) -> bool:
    return b"cluster_state:ok" in _run_on(port, "CLUSTER", "INFO")


def _wait(port: int, predicate: Callable[[redis.Redis], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with redis.Redis(host="127.0.0.1", port=port) as client:
                if predicate(client):
                    return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("cluster did not come up")
        time.sleep(0.1)


async def namespaces_on_two_masters(url: str) -> tuple[str, str]:
    """Two fresh namespaces whose hash slots are served by different masters."""
    found: dict[tuple[str, int], str] = {}
    while len(found) < 2:
        namespace = f"lib-{uuid.uuid4().hex[:6]}"
        found.setdefault(await SlotOwner(url, namespace).master(), namespace)
    first, second = list(found.values())[:2]
    return first, second


@pytest.mark.parametrize(
    ("url", "seeds", "last_node_url"),
    [
        ("redis+cluster://127.0.0.1:7001", [("127.0.0.1", 7001)], "redis://127.0.0.1:7001"),
        ("redis+cluster://h1:7001,h2:7002", [("h1", 7001), ("h2", 7002)], "redis://h2:7002"),
        (
            "rediss+cluster://u:p%40ss@h1:7001,[::1]:7002/0",
            [("h1", 7001), ("::1", 7002)],
            "rediss://u:p%40ss@[::1]:7002/0",
        ),
        ("redis+cluster://:pw@h1,h2:7002?x=1", [("h1", 6379), ("h2", 7002)], "redis://:pw@h2:7002?x=1"),
    ],
)
def test_a_cluster_url_names_seed_nodes(url: str, seeds: list[tuple[str, int]], last_node_url: str) -> None:
    """Parsed once: every seed, and credentials, TLS, path and query for every node."""
    parsed = ClusterUrl.parse(url)
    assert list(parsed.seeds) == seeds
    assert parsed.node_url(*seeds[-1]) == last_node_url
    assert "pw" not in parsed.redacted and "p%40ss" not in parsed.redacted


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://lending:S3CRET@h1:7001,h2:x", "seed 'h2:x' has no valid port"),
        ("redis+cluster://lending:S3CRET@h1:7001,", "an empty seed"),
        ("redis+cluster://lending:S3CRET@h1:70000", "seed 'h1:70000' has no valid port"),
    ],
)
def test_a_malformed_seed_is_one_redacted_error(url: str, reason: str) -> None:
    with pytest.raises(RedisUnavailable) as raised:
        ClusterUrl.parse(url)
    assert reason in str(raised.value)
    assert "S3CRET" not in str(raised.value) and "lending:***@" in str(raised.value)


def test_every_command_takes_several_seeds_and_skips_a_dead_first_one(cluster: tuple[str, list[int]]) -> None:
    """Seeds ``dead,node,node`` with a password that every node knows: the worker,
    get_books, check, status and dead-letters all work, and never print the password."""
    _, ports = cluster
    for port in ports:
        _run_on(port, "ACL", "SETUSER", "seeds", "on", ">S3CRET-seeds", "~*", "&*", "+@all")
    seeds = ",".join(f"127.0.0.1:{port}" for port in (free_port(), ports[1], ports[2]))
    url = f"redis+cluster://seeds:S3CRET-seeds@{seeds}"
    namespace = f"lib-{uuid.uuid4().hex[:6]}"
    worker = start_worker_process("w1", url, namespace)
    outputs = []
    try:
        lent = run_get_books(url, namespace, "request", "ada", "book-1")
        outputs += [lent.stdout, lent.stderr]
        assert lent.returncode == 0 and lent.stdout.startswith("ACCEPTED"), lent.stdout + lent.stderr
        for command in (["status"], ["check"], ["dead-letters", "list"]):
            ran = subprocess.run(
                [sys.executable, "-m", "lending", *command],
                cwd=ROOT,
                env=process_env(url, namespace),
                capture_output=True,
                text=True,
                timeout=30,
            )
            outputs += [ran.stdout, ran.stderr]
            assert ran.returncode == 0, f"{command}: {ran.stdout}{ran.stderr}"
        assert "books lent        1" in outputs[2], outputs[2]
    finally:
        code, out, err = stop_process(worker)
    outputs += [out, err]
    assert code == 0, err
    assert not [o for o in outputs if "S3CRET" in o]


def test_a_malformed_seed_list_is_a_usage_error_naming_the_seed() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "lending", "status"],
        cwd=ROOT,
        env=process_env("redis+cluster://lending:S3CRET@127.0.0.1:1,127.0.0.1:x", "lib"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 2 and "Traceback" not in ran.stderr and "S3CRET" not in ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--redis-url' (env var: 'REDIS_URL'): "
        "redis+cluster://lending:***@127.0.0.1:1,127.0.0.1:x: "
        "seed '127.0.0.1:x' has no valid port (host:port, separated by commas)"
    )


async def test_two_namespaces_on_two_masters_survive_a_failover(cluster: tuple[str, list[int]]) -> None:
    url, _ = cluster
    namespaces = await namespaces_on_two_masters(url)
    running = []
    for namespace in namespaces:
        client, follow = await cluster_client(url, namespace)
        settings = Settings(worker_id="w1", redis_url=url, namespace=namespace, retry_base_ms=100)
        worker = Worker(settings, client, handle_signals=False, on_redis_error=follow)
        running.append((worker, asyncio.create_task(worker.run()), client))
    try:
        # get_books with the cluster URL, lending and returning in both namespaces.
        for namespace in namespaces:
            for action, expected in (("request", "ACCEPTED"), ("return", "RETURNED"), ("request", "ACCEPTED")):
                got = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, str(ROOT / "get_books.py"), action, "ada", "book-1"],
                    cwd=ROOT,
                    env=process_env(url, namespace),
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert got.returncode == 0 and got.stdout.startswith(expected), got.stdout + got.stderr

        # Fail over the first namespace's master to its replica, while requests flow.
        owner = SlotOwner(url, namespaces[0])
        old_master = await owner.master()
        keys = Keys(namespaces[0])
        client = running[0][2]
        before = [await send(client, keys, "lend", f"user-{n}", [f"b{n}"]) for n in range(5)]
        replica_port = _replica_of(old_master[1])
        await asyncio.to_thread(_run_on, replica_port, "CLUSTER", "FAILOVER")
        await wait_until(lambda: _moved(owner, old_master), timeout_s=20)

        # The worker follows the slot; requests sent before and after all get their event.
        new_master = await owner.master()
        fresh = redis.asyncio.Redis(host=new_master[0], port=new_master[1])
        try:
            after = [await send(fresh, keys, "lend", f"user-{n}", [f"c{n}"]) for n in range(5)]
            for entry in before + after:
                assert (await event_for(fresh, keys, "lend", entry, timeout_s=30)).status == "accepted"
            report = await checker.check(fresh, namespaces[0], wait_quiescent_s=10)
            assert report.clean and report.quiescent, report.violations
        finally:
            await fresh.aclose()
    finally:
        for worker, task, client in running:
            worker.stop()
            await asyncio.wait_for(task, 15)
            await client.aclose()


async def test_requests_are_answered_within_2_s_of_a_promotion(cluster: tuple[str, list[int]]) -> None:
    """Requests flow until a failover: each one sent before the replica's promotion has its
    event within 2 s of it, and the worker's heartbeat is renewed at once. (Entries that
    fail wait 2.5-5 s here, ``--retry-base-ms 5000``; a failover is no failure of theirs.)"""
    url, _ = cluster
    namespace = f"lib-{uuid.uuid4().hex[:6]}"
    keys = Keys(namespace)
    client, follow = await cluster_client(url, namespace)
    settings = Settings(
        worker_id="w1",
        redis_url=url,
        namespace=namespace,
        retry_base_ms=5_000,
        worker_ttl_ms=30_000,
        shelving_latency_ms=100,
    )
    worker = Worker(settings, client, handle_signals=False, on_redis_error=follow)
    running = asyncio.create_task(worker.run())
    host, port = await SlotOwner(url, namespace).master()
    replica_port = _replica_of(port)
    old, new = make_client(f"redis://{host}:{port}"), make_client(f"redis://127.0.0.1:{replica_port}")
    sent: list[str] = []

    async def traffic() -> None:
        # One request every 2 ms until the old master takes none (paused, then MOVED).
        while True:
            try:
                sent.append(await send(old, keys, "lend", f"user-{len(sent)}", [f"book-{len(sent)}"]))
            except redis.RedisError:
                return
            await asyncio.sleep(0.002)

    try:
        await wait_until(worker.healthy)
        sending = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        # Its next beat is 10 s away (a third of the TTL): a TTL of 30 s again soon after
        # the promotion means the heartbeat did not wait for it.
        await old.pexpire(keys.worker("w1"), 20_000)
        await asyncio.to_thread(_run_on, replica_port, "CLUSTER", "FAILOVER")
        promoted = await asyncio.to_thread(_promotion, replica_port)
        await asyncio.wait_for(sending, 10)
        await asyncio.sleep(max(0.0, promoted + 1.0 - time.time()))
        heartbeat_ttl_ms = await new.pttl(keys.worker("w1"))

        async def answered() -> dict[str, float]:
            events = {e.request_id: int(e.event_id.split("-")[0]) / 1000 for e in await all_events(new, keys)}
            return events if all(r in events for r in sent) else {}

        await wait_until(answered, timeout_s=15, interval_s=0.2)
        at = await answered()
        late = max(at[r] - promoted for r in sent)
        first_after = min((t for t in at.values() if t > promoted), default=promoted) - promoted
        print(f"{len(sent)} requests; after the promotion: first event {first_after:.3f} s, last {late:.3f} s")
        assert late < 2.0, f"a request sent before the promotion was answered {late:.2f} s after it"
        assert heartbeat_ttl_ms > 28_000, f"heartbeat not renewed after the promotion (TTL {heartbeat_ttl_ms} ms)"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 15)
        for c in (client, old, new):
            await c.aclose()


async def test_a_simulator_run_rides_out_a_failover(cluster: tuple[str, list[int]]) -> None:
    """``python -m simulator run`` on a cluster, the namespace's master failing over in the
    middle of its traffic: its sender, its event reader and its checker follow the slot."""
    url, _ = cluster
    namespace = f"sim-{uuid.uuid4().hex[:6]}"
    keys = Keys(namespace)
    host, port = await SlotOwner(url, namespace).master()
    replica_port = _replica_of(port)
    short_run = ["--duration", "4", "--workers", "1", "--rate", "50", "--users", "20", "--catalogue", "200"]
    simulation = subprocess.Popen(
        [sys.executable, "-m", "simulator", "run", "--redis-url", url, "--namespace", namespace, *short_run],
        cwd=ROOT,
        env=process_env(url, namespace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    master = make_client(f"redis://{host}:{port}")
    try:

        async def traffic_flows() -> bool:
            return sum([await master.xlen(stream) for stream in keys.request_streams]) >= 50

        await wait_until(traffic_flows, timeout_s=20)
        await asyncio.to_thread(_run_on, replica_port, "CLUSTER", "FAILOVER")
        await asyncio.to_thread(_promotion, replica_port)
        out, err = await asyncio.to_thread(simulation.communicate, timeout=60)
    finally:
        await master.aclose()
        if simulation.poll() is None:
            simulation.kill()
            simulation.communicate()
    assert simulation.returncode == 0, out + err[-3000:]
    assert "RESULT        OK" in out and "missing       0 (no event)" in out, out


def _promotion(port: int, timeout_s: float = 20.0) -> float:
    """Wait until the node on ``port`` is a master (``ROLE``); the wall-clock time it was seen so."""
    deadline = time.monotonic() + timeout_s
    with redis.Redis(host="127.0.0.1", port=port) as client:
        while client.execute_command("ROLE")[0] != b"master":
            if time.monotonic() > deadline:
                raise AssertionError(f"the replica on port {port} was not promoted")
            time.sleep(0.002)
    return time.time()


async def _moved(owner: SlotOwner, old: tuple[str, int]) -> bool:
    try:
        return await owner.master() != old
    except Exception:
        return False


def _run_on(port: int, *command: str) -> bytes:
    with redis.Redis(host="127.0.0.1", port=port) as client:
        return bytes(client.execute_command(*command))


def _replica_of(master_port: int, timeout_s: float = 40.0) -> int:
    """The port of a replica of that master that is in sync (replicas attach shortly
    after the cluster is created)."""
    node_id = _run_on(master_port, "CLUSTER", "MYID").decode()
    deadline = time.monotonic() + timeout_s
    while True:
        for line in _run_on(master_port, "CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            if "slave" in parts[2] and parts[3] == node_id and parts[7] == "connected":
                port = int(parts[1].split(":")[1].split("@")[0])
                with redis.Redis(host="127.0.0.1", port=port) as replica:
                    if replica.info("replication").get("master_link_status") == "up":
                        return port
        if time.monotonic() > deadline:
            raise AssertionError(f"no replica in sync with the master on port {master_port}")
        time.sleep(0.2)


async def test_the_api_follows_the_namespace_to_its_new_master(cluster: tuple[str, list[int]]) -> None:
    """The HTTP API on a cluster URL: after a failover its submissions, reads and events
    tail go to the promoted replica (the old master answers MOVED), within seconds."""
    url, _ = cluster
    namespace = f"lib-{uuid.uuid4().hex[:6]}"
    _host, port = await SlotOwner(url, namespace).master()
    replica_port = _replica_of(port)
    worker = start_worker_process("w1", url, namespace)
    api, base = start_api_process(url, namespace)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:

            async def lend(n: int) -> httpx.Response:
                return await http.post("/v1/lends?wait=5", json={"user_id": f"u{n}", "book_ids": [f"b{n}"]})

            before = await lend(0)
            assert before.status_code == 200 and before.json()["status"] == "accepted", before.text
            await asyncio.to_thread(_run_on, replica_port, "CLUSTER", "FAILOVER")
            promoted = await asyncio.to_thread(_promotion, replica_port)
            n = 1
            while (after := await lend(n)).status_code != 200:
                assert after.status_code == 503 and time.time() - promoted < 10, after.text
                n += 1
                await asyncio.sleep(0.1)
            assert after.json()["status"] == "accepted", after.text
            loans = await http.get(f"/v1/users/u{n}/loans")
            assert loans.json()["books"] == [f"b{n}"], loans.text
        print(f"the API queued and answered on the new master {time.time() - promoted:.2f} s after the promotion")
    finally:
        api_code, _, api_err = stop_process(api)
        worker_code, _, worker_err = stop_process(worker)
    assert api_code == 0 and "Traceback" not in api_err, api_err
    assert worker_code == 0, worker_err
