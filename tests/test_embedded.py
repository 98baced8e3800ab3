"""The embedded default: workers with no Redis configured, run as real processes.

Each test moves the default URL to a free port (``LENDING_EMBEDDED_PORT``) and gives
its workers a fresh data dir, so it never meets a Redis on 6379 or another test's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lending.keys import LENDING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, Found, PidFile, classify, data_dir_lock, free_port, read_pid_file

from .support import ROOT, event_for, wait_until

READY = "Ready to process events..."
STARTING = "starting the embedded redis-server"
STOPPED = "embedded redis-server stopped"
SHARING = "sharing the embedded redis-server"
ADOPTING = "adopting an orphaned embedded redis-server"
WAITING = "waiting for the embedded redis-server lock"


def quick_client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def port_open(port: int) -> bool:
    try:
        with quick_client(port) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Launched:
    """A ``main.py`` process; its stdout and log go to files that can be read at any time."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 20.0, *, in_log: bool = True) -> None:
        """Until ``text`` shows in its log (or stdout); fail if the process exits first."""
        source = self.err if in_log else self.out
        deadline = time.monotonic() + timeout_s
        while text not in source.read_text(errors="replace"):
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode} before {text!r}:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout_s} s:\n{self.log[-3000:]}")
            time.sleep(0.02)

    def wait_ready(self) -> Launched:
        self.wait_for(READY, in_log=False)
        return self

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (unless it already exited) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 15.0) -> int:
        """The exit code; SIGKILL and fail if it does not exit in time."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker did not exit within {timeout_s} s:\n{self.log[-3000:]}")


@dataclass
class EmbeddedDefault:
    """Workers on the embedded default, moved to ``port``, with their data in ``data_dir``."""

    port: int
    data_dir: Path
    logs_dir: Path
    namespace: str
    launched: list[Launched] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def launch(self, worker_id: str, *args: str, own_group: bool = False, **env: str) -> Launched:
        """``main.py WORKER_ID`` with no Redis configured; ``own_group``: in a process group of
        its own, as a shell puts a foreground job."""
        base = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("LENDING_")}
        base.update(
            PYTHONUNBUFFERED="1",
            LENDING_EMBEDDED_PORT=str(self.port),
            LENDING_NAMESPACE=self.namespace,
            LENDING_DATA_DIR=str(self.data_dir),
            **env,
        )
        name = f"{worker_id}-{len(self.launched)}"
        out, err = self.logs_dir / f"{name}.out", self.logs_dir / f"{name}.log"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), worker_id, *args],
                cwd=ROOT,
                env=base,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=own_group,
            )
        launched = Launched(proc, out, err)
        self.launched.append(launched)
        return launched

    def start(self, worker_id: str, *args: str, own_group: bool = False, **env: str) -> Launched:
        return self.launch(worker_id, *args, own_group=own_group, **env).wait_ready()

    def client(self) -> Redis:
        return make_client(self.url)

    def cleanup(self) -> None:
        for worker in self.launched:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        # A server left behind (the test failed, or a worker was killed) is found by its port.
        try:
            with quick_client(self.port) as client:
                pid = int(client.info("server")["process_id"])
        except redis.ConnectionError:
            return
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def default(tmp_path: Path, namespace: str) -> Iterator[EmbeddedDefault]:
    (tmp_path / "logs").mkdir()
    setup = EmbeddedDefault(free_port(), tmp_path / "data", tmp_path / "logs", namespace)
    yield setup
    setup.cleanup()


async def in_flight(client: Redis, keys: Keys) -> bool:
    """Has a worker read a lend request and not yet finished it?"""
    try:
        pending = int((await client.xpending(keys.lend_requests, LENDING_GROUP))["pending"])
    except redis.ResponseError:  # NOGROUP: no worker has created the group yet
        return False
    return pending == 1 and await client.xlen(keys.events) == 0


# -- Ctrl-C -------------------------------------------------------------------------


async def test_ctrl_c_finishes_the_work_releases_the_id_and_then_stops_the_server(
    default: EmbeddedDefault, keys: Keys
) -> None:
    worker = default.start("w1", own_group=True, LENDING_SHELVING_LATENCY_MS="1500")
    get_books = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "get_books.py"),
            "--redis-url",
            default.url,
            "--namespace",
            default.namespace,
            "request",
            "Salvatore",
            "ofmiceandmen",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = default.client()
    try:
        await wait_until(lambda: in_flight(client, keys), timeout_s=10, interval_s=0.02)
    finally:
        await client.aclose()

    # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
    os.killpg(worker.proc.pid, signal.SIGINT)
    code = worker.wait()
    out, err = get_books.communicate(timeout=15)

    log = worker.log
    assert code == 0, log
    assert "could not release the worker id" not in log, log
    assert log.index("worker stopped") < log.index(STOPPED), "the server must stop last"
    assert not port_open(default.port), "the owner left its server running"
    assert (get_books.returncode, out.split()[:1]) == (0, ["ACCEPTED"]), (out, err)

    # The id was released: the same id starts again at once, without --force.
    default.start("w1")
    client = default.client()
    try:
        event = await event_for(client, keys, "lend", out.split()[1], timeout_s=1)
        assert event.status == "accepted"
        assert await client.xlen(keys.events) == 1
    finally:
        await client.aclose()


# -- several workers, orphans -------------------------------------------------------


async def test_a_second_worker_shares_the_server_which_its_owner_stops(default: EmbeddedDefault) -> None:
    owner = default.start("w1")
    sharer = default.start("w2")

    assert sharer.stop() == 0, sharer.log
    assert SHARING in sharer.log and f"owner_pid={owner.proc.pid}" in sharer.log, sharer.log
    assert STARTING not in sharer.log and STOPPED not in sharer.log, sharer.log
    assert port_open(default.port), "a worker that shares the server stopped it"

    assert owner.stop() == 0, owner.log
    assert STOPPED in owner.log, owner.log
    assert not port_open(default.port)
    assert read_pid_file(default.data_dir) is None


async def test_an_orphaned_server_is_adopted_and_stopped_by_its_new_owner(default: EmbeddedDefault) -> None:
    first = default.start("w1")
    started = read_pid_file(default.data_dir)
    first.proc.kill()  # kill -9: no clean-up, the server stays behind without an owner
    first.proc.wait()
    assert port_open(default.port)

    second = default.start("w2")
    adopted = read_pid_file(default.data_dir)
    assert second.stop() == 0, second.log

    assert ADOPTING in second.log and f"dead_owner_pid={first.proc.pid}" in second.log, second.log
    assert STOPPED in second.log, second.log
    assert not port_open(default.port), "the adopting worker left the orphan running"
    assert started is not None and started.owner_pid == first.proc.pid
    assert adopted == PidFile(server_pid=started.server_pid, owner_pid=second.proc.pid, port=default.port)
    assert read_pid_file(default.data_dir) is None


async def test_a_redis_without_our_pid_file_is_someone_elses_and_is_left_running(
    default: EmbeddedDefault, tmp_path: Path
) -> None:
    theirs = EmbeddedRedis(tmp_path / "theirs", port=default.port, persistent=False)
    theirs.start()
    try:
        worker = default.start("w1")
        assert worker.stop() == 0, worker.log
        assert STARTING not in worker.log and SHARING not in worker.log and ADOPTING not in worker.log, worker.log
        assert port_open(default.port), "the worker stopped a server it did not start"
        assert read_pid_file(default.data_dir) is None
    finally:
        theirs.stop()


async def test_workers_starting_together_start_one_server(default: EmbeddedDefault) -> None:
    # Holding the data dir's lock lines both workers up at "is a server answering?".
    with data_dir_lock(default.data_dir):
        workers = [default.launch("w1"), default.launch("w2")]
        deadline = time.monotonic() + 20
        while not all(WAITING in worker.log for worker in workers):
            assert not port_open(default.port), "a worker started a server while another process held the lock"
            assert time.monotonic() < deadline, [worker.log for worker in workers]
            time.sleep(0.05)

    for worker in workers:
        worker.wait_ready()
    logs = [worker.log for worker in workers]
    assert sorted((STARTING in log, SHARING in log) for log in logs) == [(False, True), (True, False)], logs
    sharer, owner = sorted(workers, key=lambda worker: STARTING in worker.log)
    assert sharer.stop() == 0 and owner.stop() == 0
    assert not port_open(default.port)


# -- the decision -------------------------------------------------------------------

OURS = PidFile(server_pid=100, owner_pid=200, port=6379)


@pytest.mark.parametrize(
    ("pid_file", "answering", "server_pid", "owner_alive", "found"),
    [
        pytest.param(None, False, None, False, Found.NOTHING, id="nothing-answers"),
        pytest.param(OURS, False, None, False, Found.NOTHING, id="stale-pid-file"),
        pytest.param(None, True, 100, False, Found.FOREIGN, id="no-pid-file"),
        pytest.param(OURS, True, 101, True, Found.FOREIGN, id="another-server-on-the-port"),
        pytest.param(OURS, True, None, True, Found.FOREIGN, id="server-hides-its-pid"),
        pytest.param(OURS, True, 100, True, Found.SHARED, id="owner-alive"),
        pytest.param(OURS, True, 100, False, Found.ORPHAN, id="owner-dead"),
    ],
)
def test_classify(
    pid_file: PidFile | None, answering: bool, server_pid: int | None, owner_alive: bool, found: Found
) -> None:
    assert classify(pid_file, answering, server_pid, owner_alive) is found


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        pytest.param(OURS.render(), OURS, id="round-trip"),
        pytest.param("server_pid=100\nowner_pid=2", None, id="torn"),
        pytest.param("12345\n", None, id="a-plain-pid-file"),
        pytest.param("", None, id="empty"),
    ],
)
def test_pid_file_parse(text: str, parsed: PidFile | None) -> None:
    assert PidFile.parse(text) == parsed
