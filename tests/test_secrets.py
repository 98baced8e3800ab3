"""Secrets stay secret: no command prints the password of a Redis URL, whatever fails.

Every command is run against URLs that answer nowhere (plain, cluster, several cluster
seeds, a password in the query string), and all it writes, on stdout and stderr, is
searched for the password.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from lending.redaction import redact
from lending.redis.embedded import free_port

from .support import ROOT, process_env

PASSWORD = "S3CRET-pa55"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://lending:S3CRET@h:6379/0", "redis://lending:***@h:6379/0"),
        ("rediss://:S3CRET@h:6379", "rediss://:***@h:6379"),
        ("redis://S3CRET@h:6379", "redis://***@h:6379"),
        ("redis+cluster://u:S3CRET@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
        ("rediss+cluster://u:p@ss:S3CRET@h1:1", "rediss+cluster://u:***@h1:1"),
        ("cannot reach Redis at redis://u:S3CRET@h:1: refused", "cannot reach Redis at redis://u:***@h:1: refused"),
        ("redis://h:1/0?password=S3CRET&db=1", "redis://h:1/0?password=***&db=1"),
        ("two: redis://a:S3CRET@h:1 and redis://b:S3CRET@k:2", "two: redis://a:***@h:1 and redis://b:***@k:2"),
        ("redis://h:6379", "redis://h:6379"),
        ("no url here, just a@b", "no url here, just a@b"),
    ],
)
def test_redact_hides_every_password(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert "S3CRET" not in redact(text)


def _urls() -> list[str]:
    """URLs with the password at which nothing answers."""
    dead = [free_port() for _ in range(3)]
    return [
        f"redis://lending:{PASSWORD}@127.0.0.1:{dead[0]}",
        f"redis+cluster://lending:{PASSWORD}@127.0.0.1:{dead[1]}",
        f"rediss+cluster://lending:{PASSWORD}@127.0.0.1:{dead[1]},127.0.0.1:{dead[2]}",
        f"redis://127.0.0.1:{dead[0]}/0?password={PASSWORD}",
    ]


COMMANDS = [
    [str(ROOT / "main.py"), "w1"],
    [str(ROOT / "main.py"), "w1", "--log-format", "json"],
    [str(ROOT / "get_books.py"), "request", "ada", "b1", "--timeout", "5"],
    [str(ROOT / "get_books.py"), "return", "ada", "b1", "--no-wait", "--json", "--timeout", "5"],
    ["-m", "lending", "status"],
    ["-m", "lending", "status", "--json"],
    ["-m", "lending", "check"],
    ["-m", "lending", "dead-letters", "list"],
    ["-m", "lending", "dead-letters", "retry", "--all"],
    ["-m", "lending", "api", "--port", "0"],
]


def test_no_command_prints_the_password_of_an_unreachable_url() -> None:
    runs = []
    for url in _urls():
        for command in COMMANDS:
            proc = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                env=process_env(url, "secrets"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            runs.append((url, command, proc))
    failed = []
    for url, command, proc in runs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, (url, command, out, err)
        if PASSWORD in out + err:
            failed.append(f"{' '.join(command[:3])} with {url.split('@')[-1]}:\n{out}{err}")
    assert not failed, "the password was printed:\n" + "\n".join(failed)


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_log_lines_and_their_tracebacks_show_no_password(log_format: str) -> None:
    """Whatever a log call is given (a field, an exception's message), the line is redacted."""
    program = f"""
import structlog
from lending.logs import configure_logging
configure_logging({log_format!r}, "info")
log = structlog.get_logger()
url = "redis+cluster://lending:{PASSWORD}@h1:1,h2:2"
log.warning("connecting", url=url)
try:
    raise ValueError(f"bad seed in {{url}}")
except ValueError:
    log.exception("failed")
"""
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert "lending:***@h1:1,h2:2" in proc.stderr and "ValueError" in proc.stderr, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
