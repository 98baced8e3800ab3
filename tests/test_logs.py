"""Logging can never break the service: a worker whose log reader is gone (a dead log
shipper, ``| head``) still starts, serves and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

import pytest
import structlog
from redis.asyncio import Redis

from lending.keys import Keys
from lending.logs import SafeStream
from lending.settings import Settings
from lending.worker import Worker

from .support import ROOT, process_env, start_worker_process, wait_until


@pytest.fixture
def reader_gone() -> Iterator[tuple[SafeStream, int]]:
    """A SafeStream over a pipe whose read end is closed; also the pipe's write fd."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with open(write_fd, "w") as raw:
        yield SafeStream(raw), write_fd


def test_writing_to_a_pipe_whose_reader_is_gone_raises_nothing(reader_gone: tuple[SafeStream, int]) -> None:
    stream, _ = reader_gone
    for _ in range(3):
        stream.write("a log line\n")
        stream.flush()


def test_once_the_reader_is_gone_output_goes_nowhere(reader_gone: tuple[SafeStream, int]) -> None:
    stream, write_fd = reader_gone
    stream.write("lost\n")
    stream.flush()
    # The descriptor now points to /dev/null: the interpreter's own flush at exit
    # succeeds too (a failing one would turn exit code 0 into 120).
    assert os.path.samefile(f"/proc/self/fd/{write_fd}", os.devnull)


def _pipe_is_gone(*_: object) -> NoReturn:
    raise BrokenPipeError(32, "Broken pipe")


async def test_a_signal_stops_the_worker_even_when_logging_raises(settings: Settings, redis: Redis) -> None:
    worker = Worker(settings, redis, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: task.done() or worker.healthy())
        saved = structlog.get_config()
        structlog.configure(processors=[_pipe_is_gone])  # any logging configuration may fail
        try:
            with pytest.raises(BrokenPipeError):
                worker.handle_sig(signal.SIGTERM)
        finally:
            structlog.configure(**saved)

        assert await asyncio.wait_for(task, 10) == 0
    finally:
        worker.stop()
        await asyncio.gather(task, return_exceptions=True)


def test_sigterm_stops_a_worker_whose_log_reader_is_gone(redis: Redis, redis_url: str, keys: Keys) -> None:
    proc = start_worker_process("w1", redis_url, keys.namespace)
    try:
        assert proc.stdout is not None and proc.stderr is not None  # both piped
        proc.stderr.close()  # the log shipper dies
        proc.stdout.close()

        proc.send_signal(signal.SIGTERM)

        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_whose_stdout_reader_is_gone_starts_and_stops(redis_url: str, keys: Keys) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody will read "Ready to process events..."
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "w1"],
        cwd=ROOT,
        env=process_env(redis_url, keys.namespace),
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_fd)
    try:
        log = _read_until(proc, "worker started", timeout_s=20)
        assert "worker started" in log, log

        proc.send_signal(signal.SIGTERM)

        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """stderr of ``proc`` until a line holds ``marker``, it closes, or ``timeout_s`` passed."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen and (remaining := deadline - time.monotonic()) > 0:
        if select.select([proc.stderr], [], [], remaining)[0]:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    return seen
