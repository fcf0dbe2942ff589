"""``gateway.http.admission`` on a real listener: connections counted while held,
shed past the budget, dropped past the header deadline, and the count back to
zero once they are gone (tests/e2e/test_hostile_process.py drives the whole
process at its open-file limit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.http.admission import Admission

HEADER_TIMEOUT_S = 0.3


async def ok(request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Admission, int]]:
    admission = Admission(header_timeout_s=HEADER_TIMEOUT_S, max_held=3)
    server = web.Server(ok)
    admission.attach(server)
    tcp = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    yield admission, port
    tcp.close()
    await server.shutdown(1.0)
    await tcp.wait_closed()


async def wait_for(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_held_connections_are_counted_and_the_count_returns_to_zero(
        listener: tuple[Admission, int]) -> None:
    admission, port = listener
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/") as response:
            assert await response.text() == "ok"
        await wait_for(lambda: admission.held == 1)  # kept alive after its request
        assert admission._awaiting == {}  # past its first request: no timer, no entry
    await wait_for(lambda: admission.held == 0)


async def test_past_the_budget_connections_are_shed_and_never_counted(
        listener: tuple[Admission, int]) -> None:
    admission, port = listener
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await wait_for(lambda: admission.held == 3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b""  # dropped as it arrived
    writer.close()
    await wait_for(lambda: not admission._shedding)
    assert admission.held == 3
    # The silent ones never sent a request line: dropped at the header deadline.
    for silent_reader, _ in silent:
        assert await asyncio.wait_for(silent_reader.read(), 5.0) == b""
    await wait_for(lambda: admission.held == 0 and not admission._awaiting)
    for _, silent_writer in silent:
        silent_writer.close()
