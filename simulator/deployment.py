"""The processes a simulation runs: its own redis-server (optional) and worker processes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lending.redis.embedded import EmbeddedRedis, free_port
from lending.worker import READY_MESSAGE
from simulator.reaper import Reaper

MAIN = Path(__file__).resolve().parent.parent / "main.py"


@dataclass
class WorkerProcess:
    worker_id: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        return self.stdout.exists() and READY_MESSAGE in self.stdout.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class Deployment:
    """Redis and ``workers`` worker processes for one namespace. They end with this
    process, even when it is killed (``Reaper``).

    :param redis_url: an existing Redis; ``None`` starts a private redis-server on a free
        loopback port, its data in a temporary folder (append-only, ``appendfsync``).
    :param worker_args: extra ``main.py`` options for every worker.
    :param worker_env: extra environment for every worker (e.g. shelving chaos).
    :param redis_args: extra ``redis-server`` options for the private server (e.g.
        ``--maxmemory``); only without ``redis_url``.
    """

    def __init__(
        self,
        namespace: str,
        *,
        redis_url: str | None = None,
        workers: int = 0,
        worker_args: tuple[str, ...] = (),
        worker_env: dict[str, str] | None = None,
        appendfsync: str = "everysec",
        redis_args: tuple[str, ...] = (),
        keep_dir: bool = False,
    ) -> None:
        if redis_url is not None and redis_args:
            raise ValueError("redis-server options need the deployment's own Redis (no redis_url)")
        self.namespace = namespace
        self.workers_wanted = workers
        self.worker_args = worker_args
        self.worker_env = worker_env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="lending-sim-"))
        self.keep_dir = keep_dir
        self.reaper = Reaper()
        self.redis: EmbeddedRedis | None = None
        if redis_url is None:
            self.redis = EmbeddedRedis(
                self.dir / "redis",
                port=free_port(),
                appendfsync=appendfsync,
                extra_args=redis_args,
                process_group=self.reaper.group,
            )
        self.redis_url = redis_url or self.redis.url  # type: ignore[union-attr]
        self.workers: dict[str, WorkerProcess] = {}
        self.kills = 0
        self.redis_restarts = 0
        self.pauses = 0
        # Workers stopped by pause_random_worker and not continued yet. Pauses are made and
        # ended on the event loop, stop() runs in a thread: the lock keeps the list whole.
        self._paused: list[WorkerProcess] = []
        self._paused_lock = threading.Lock()
        self._stopping = False

    def start(self, ready_timeout_s: float = 30.0) -> None:
        if self.redis is not None:
            self.redis.start()
        for n in range(1, self.workers_wanted + 1):
            self.spawn(f"sim-{n}")
        self.wait_ready(ready_timeout_s)

    def spawn(self, worker_id: str) -> WorkerProcess:
        out = self.dir / f"{worker_id}.out"
        err = self.dir / f"{worker_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LENDING_")}
        env.update(self.worker_env, REDIS_URL=self.redis_url, LENDING_NAMESPACE=self.namespace, PYTHONUNBUFFERED="1")
        with out.open("wb") as stdout, err.open("ab") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(MAIN), worker_id, "--force", *self.worker_args],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                process_group=self.reaper.group,
            )
        worker = WorkerProcess(worker_id, process, out, err)
        self.workers[worker_id] = worker
        return worker

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(w.ready() for w in self.workers.values()):
            dead = [w for w in self.workers.values() if not w.alive and not w.ready()]
            if dead:
                raise RuntimeError(f"worker {dead[0].worker_id} exited: {dead[0].stderr.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers not ready in time")
            time.sleep(0.05)

    def kill_random_worker(self, rng: random.Random) -> str | None:
        """SIGKILL a random worker and start it again under the same id."""
        if not self.workers or self._stopping:
            return None
        worker = self.workers[rng.choice(sorted(self.workers))]
        worker.process.kill()
        worker.process.wait()
        self.kills += 1
        self.spawn(worker.worker_id)
        return worker.worker_id

    def pause_random_worker(self, rng: random.Random) -> WorkerProcess | None:
        """SIGSTOP a random live worker that is not paused already; ``resume`` continues it.

        A paused worker may still be killed (SIGKILL ends a stopped process too); resuming
        it afterwards does nothing, and its restarted successor is never stopped by it.
        """
        with self._paused_lock:
            if self._stopping:
                return None
            candidates = [
                w for _, w in sorted(self.workers.items()) if w.alive and not any(w is p for p in self._paused)
            ]
            if not candidates:
                return None
            worker = rng.choice(candidates)
            worker.process.send_signal(signal.SIGSTOP)  # a no-op if it died meanwhile
            self._paused.append(worker)
            self.pauses += 1
            return worker

    def resume(self, worker: WorkerProcess) -> None:
        """SIGCONT a worker paused by ``pause_random_worker``, unless it was resumed or died."""
        with self._paused_lock:
            if not any(worker is p for p in self._paused):
                return
            self._paused = [p for p in self._paused if p is not worker]
            # Popen.send_signal skips a process it has reaped and ignores one that is gone:
            # continuing a worker killed meanwhile is harmless.
            worker.process.send_signal(signal.SIGCONT)

    def resume_all(self) -> None:
        """Continue every paused worker (at the end of a run, however it ends)."""
        with self._paused_lock:
            paused = list(self._paused)
        for worker in paused:
            self.resume(worker)

    def restart_redis(self) -> None:
        """SIGKILL the private redis-server and start it again on the same port and data."""
        if self.redis is None:
            raise RuntimeError("cannot restart a Redis the simulator did not start")
        self.redis.kill()
        self.redis.start()
        self.redis_restarts += 1

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers.values() if w.alive]

    def stop(self) -> None:
        with self._paused_lock:
            self._stopping = True  # no new pause from here on
        self.resume_all()  # a stopped worker would not act on SIGTERM
        for worker in self.workers.values():
            if worker.alive:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                worker.process.wait(15)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        if self.redis is not None:
            self.redis.stop()
        self.reaper.close()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0
