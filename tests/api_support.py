"""Running the API for tests: in this process on uvicorn (a free port), or as a
``python -m lending api`` process; reading its answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from lending.api.app import build_app
from lending.api.config import ApiSettings
from lending.api.problems import PROBLEM_MEDIA_TYPE
from lending.api.server import READY_MESSAGE, ApiServer, api_server
from lending.api.state import Api
from lending.redis.connection import make_client

from .support import start_ready_process, wait_until


@dataclass
class LiveApi:
    """An API served by uvicorn in this process, and an HTTP client of it."""

    api: Api
    server: ApiServer
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: ApiSettings, *, extra_routes: Mapping[str, Any] | None = None) -> AsyncIterator[LiveApi]:
    """Serve ``settings`` (on a free port) until leaving; ``extra_routes`` (path → endpoint)
    are added to the application, for errors no real endpoint makes."""
    client = make_client(settings.redis_url)
    tail_client = make_client(settings.redis_url, max_connections=2)
    api = Api(settings, client, tail_client)
    app = build_app(api)
    for path, endpoint in (extra_routes or {}).items():
        app.add_api_route(path, endpoint, response_model=None)
    server = api_server(app, api, settings.replace(port=0), handle_signals=False)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done())
        if task.done():
            task.result()  # raise its error
            raise AssertionError("the API stopped at start")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield LiveApi(api, server, http)
    finally:
        server.should_exit = True
        api.release_all()
        await asyncio.wait_for(task, 15)
        await tail_client.aclose()
        await client.aclose()


def problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    """The problem details of ``response``, checked to be of kind ``name`` with ``status``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE, response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{name}", body
    assert body["status"] == status and body["title"] and body["detail"], body
    return body


def start_api_process(redis_url: str, namespace: str, *args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m lending api --port 0`` as a child process: the process, and the URL from
    its ready line."""
    command = [sys.executable, "-m", "lending", "api", "--port", "0", *args]
    proc, line = start_ready_process(command, redis_url, namespace, READY_MESSAGE, **env)
    return proc, line.split()[-1]


async def raw_connection(live: LiveApi) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection of its own to the live API, for bytes no HTTP client would send."""
    host, port = live.server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def send_in_two(live: LiveApi, first: bytes, rest: bytes, *, pause_s: float) -> bytes:
    """Send ``first``, then ``rest`` ``pause_s`` later; what the server answered until it
    closed the connection."""
    reader, writer = await raw_connection(live)
    try:
        writer.write(first)
        await asyncio.sleep(pause_s)
        writer.write(rest)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def raw_exchange(live: LiveApi, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``raw`` bytes on a connection of its own; the status line, headers and body of
    the answer, read until the server closes the connection."""
    reader, writer = await raw_connection(live)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], dict(line.lower().split(": ", 1) for line in lines[1:]), body


def closing_problem(headers: dict[str, str], body: bytes, status: int, name: str) -> dict[str, object]:
    """The problem of a raw answer that closes its connection, checked to be ``name``."""
    assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    found: dict[str, object] = json.loads(body)
    assert found["type"] == f"/problems/{name}" and found["status"] == status, found
    return found
