"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright,
loads ``GET /`` from a live API while the simulator sends traffic through a real Redis
to a real worker; the storage bins and the outcome tail change, and a screenshot is
saved as ``docs/dashboard.png`` (the README shows it).

Skipped, with the reason, when Chromium or Playwright is not installed (``.ci/run``
installs Debian's ``chromium``). Playwright never downloads a browser here: it drives
the system's.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from lending.api.config import ApiSettings

from .api_support import LiveApi, serving
from .conftest import StartWorker
from .support import ROOT, process_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # runs as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
#: What the test reads of the page: bins filled, the newest outcome's event id, updates received.
Figures = tuple[int, str, int]

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian's chromium package; .ci/run installs it)"
    ),
    pytest.mark.timeout(90),
]
async_playwright = pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed (pip install -e '.[test]')"
).async_playwright


@pytest.fixture
async def live(redis_url: str, namespace: str, redis: Redis) -> AsyncIterator[LiveApi]:
    # A one-minute window, so that the screenshot's charts show the run's seconds.
    async with serving(ApiSettings(redis_url=redis_url, namespace=namespace, dashboard_window_s=60)) as live:
        yield live


@pytest.fixture
def simulator(redis_url: str, namespace: str) -> Iterator[list[subprocess.Popen[str]]]:
    """Start ``python -m simulator run`` against the test's Redis by appending to the list;
    each one started is stopped (SIGTERM, it stops what it started) at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_the_dashboard_shows_the_storage_and_the_outcomes_changing(
    live: LiveApi,
    redis_url: str,
    namespace: str,
    start_worker: StartWorker,
    simulator: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    await start_worker(storage_capacity=30)
    problems: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(live.server.url + "/")

            async def figures() -> Figures:
                """Bins filled (as the page says, and as drawn), the newest outcome shown,
                updates received."""
                # Read in one go in the page: a snapshot arriving between two reads
                # would make them disagree.
                filled, drawn, newest, updates = await page.evaluate(
                    """() => [
                        document.querySelector("#bins").dataset.filled ?? null,
                        document.querySelectorAll("#bins .bin.filled").length,
                        document.querySelector("#outcomes").dataset.newest ?? "",
                        document.body.dataset.updates ?? "0",
                    ]"""
                )
                if filled is None:  # no snapshot drawn yet
                    return -1, "", 0
                assert drawn == int(filled), (drawn, filled)  # one square per bin: 30 bins
                return int(filled), str(newest), int(updates)

            async def until_figures(changed: Callable[[Figures], bool], timeout_s: float = 15.0) -> Figures:
                deadline = time.monotonic() + timeout_s
                while True:
                    now = await figures()
                    if changed(now):
                        return now
                    assert time.monotonic() < deadline, f"the page did not change: {now}"
                    await asyncio.sleep(0.2)

            before = await until_figures(lambda f: f[2] >= 1)
            assert before[:2] == (0, "")  # an empty storage, no outcome yet
            assert await page.locator("#bins .bin").count() == 30
            assert "w1" in await page.inner_text("#workers")

            simulator.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "simulator", "run", "--redis-url", redis_url),
                        *("--namespace", namespace, "--workers", "0", "--rate", "150", "--duration", "30"),
                        *("--users", "40", "--catalogue", "300", "--storage-capacity", "30"),
                    ],
                    cwd=ROOT,
                    env=process_env(redis_url, namespace),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
            during = await until_figures(lambda f: f[0] > 0 and f[1] != "")
            later = await until_figures(lambda f: f[1] != during[1] and f[2] >= during[2] + 2)
            assert later[0] > 0
            # The charts have a few seconds of traffic to draw, the tail its outcomes.
            await until_figures(lambda f: f[2] >= later[2] + 3)
            assert await page.locator("#rate-chart polyline.rate").count() == 1
            assert await page.locator("#outcomes tr").count() >= 10
            assert (await page.inner_text("#rate-now")) not in ("—", "0")

            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    assert problems == []  # no script error, nothing the Content-Security-Policy refused
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
