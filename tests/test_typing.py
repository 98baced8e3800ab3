"""The package, the simulator and the tests type-check under mypy --strict (see pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from .support import ROOT


def test_mypy_strict_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
