"""Operations routes on the public listener (PROTOCOL.md §2.4) and the access log's redaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp import web
from harness import WS_PATH, Harness, mint
from pg import dsn_with_database, quote_ident
from yarl import URL

from gateway.app import build_public_app
from gateway.logs import AccessLogger, redact_url


async def status_of(gateway: Harness, path: str) -> tuple[int, Any]:
    response = await gateway.public.get(path)
    return response.status, await response.json()


async def test_healthz_answers_while_the_process_lives(gateway: Harness) -> None:
    assert await status_of(gateway, "/healthz") == (200, {"status": "ok"})


async def test_readyz_is_200_when_the_database_answers(gateway: Harness) -> None:
    status, body = await status_of(gateway, "/readyz")
    assert status == 200, body
    assert body["status"] == "ready"


async def test_readyz_is_503_while_draining(gateway: Harness) -> None:
    """A load balancer stops sending devices as soon as the drain begins."""
    gateway.svc.draining = True
    try:
        status, body = await status_of(gateway, "/readyz")
    finally:
        gateway.svc.draining = False
    assert (status, body["status"]) == (503, "draining")
    # /healthz is about the process, not about taking traffic.
    assert (await status_of(gateway, "/healthz"))[0] == 200


@contextlib.asynccontextmanager
async def database_unreachable(database_url: str) -> AsyncIterator[None]:
    """Every session of the test database is ended and no new one is allowed, until exit."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(database_url).path.lstrip("/"))
    admin = await asyncpg.connect(dsn_with_database(database_url, "postgres"))
    try:
        await admin.execute(f"ALTER DATABASE {quote_ident(name)} ALLOW_CONNECTIONS false")
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name)
            yield
        finally:
            # Restored whatever happened, so the fixture can drop the database.
            await admin.execute(f"ALTER DATABASE {quote_ident(name)} ALLOW_CONNECTIONS true")
    finally:
        await admin.close()


async def readyz_until(gateway: Harness, wanted: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /readyz until it answers ``wanted`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await status_of(gateway, "/readyz")
        if status == wanted:
            return dict(body)
        assert time.monotonic() < deadline, f"/readyz stayed {status}: {body}"
        await asyncio.sleep(0.05)


async def test_readyz_follows_the_database_away_and_back(
    gateway: Harness, database_url: str
) -> None:
    """503 while the database refuses sessions, 200 again once it accepts them."""
    assert (await status_of(gateway, "/readyz"))[0] == 200
    async with database_unreachable(database_url):
        body = await readyz_until(gateway, 503)
        assert body["status"] == "database_unavailable", body
        # It stays unready, whichever pooled connection the next probe gets.
        for _ in range(3):
            assert (await status_of(gateway, "/readyz"))[0] == 503
    body = await readyz_until(gateway, 200)
    assert body["status"] == "ready"
    errors = gateway.svc.metrics.registry.get_sample_value(
        "gateway_db_errors_total", {"operation": "readyz"})
    assert errors is not None and errors >= 1


def test_redact_url_blanks_the_token_and_keeps_the_rest() -> None:
    secret = mint("user-1")
    redacted = redact_url(URL(f"/api/v1/ws/device?token={secret}&v=2"))
    assert secret not in redacted
    assert redacted == "/api/v1/ws/device?token=REDACTED&v=2"
    assert redact_url(URL("/readyz")) == "/readyz"
    assert "s3cr3t" not in redact_url(URL("/x?Token=s3cr3t"))


@contextlib.asynccontextmanager
async def access_logged_client(gateway: Harness) -> AsyncIterator[aiohttp.ClientSession]:
    """The gateway's public app served as the real process serves it: an AppRunner with
    its access logger (and without the test server's handler cancellation, which would
    cut a WebSocket handler off before its access line is written)."""
    runner = web.AppRunner(build_public_app(gateway.svc), access_log_class=AccessLogger)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as session:
            yield session
    finally:
        await runner.cleanup()


async def logged(logs: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The first captured access log line with ``fields`` (aiohttp writes it after the
    response, so a client can see the answer a moment before the line exists)."""
    deadline = time.monotonic() + 5
    while True:
        for entry in logs:
            if entry["event"] == "http_request" and fields.items() <= entry.items():
                return entry
        assert time.monotonic() < deadline, "\n".join(map(repr, logs))
        await asyncio.sleep(0.01)


@pytest.fixture
def access_log_at_info() -> Iterator[None]:
    """aiohttp only calls an access logger whose stdlib logger is enabled for INFO."""
    logger = logging.getLogger("aiohttp.access")
    before = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(before)


async def test_access_log_lines_never_carry_the_token(
    gateway: Harness, access_log_at_info: None
) -> None:
    """A device's ?token= shows in the access log as REDACTED, accepted or refused."""
    good, bad = mint("user-1"), mint("user-1", secret="another-secret-0123456789abcdefgh")
    async with access_logged_client(gateway) as client:
        with structlog.testing.capture_logs() as logs:
            refused = await client.get(WS_PATH, params={"token": bad})
            assert refused.status == 401
            ws = await client.ws_connect(WS_PATH, params={"token": good})
            await ws.send_json({"type": "device_hello", "device_id": "d1"})
            assert (await ws.receive_json())["type"] == "hello_ack"
            await ws.close()
            # The upgrade's line is written once its handler has returned.
            await logged(logs, status=101)
    lines = [e for e in logs if e["event"] == "http_request"]
    assert {e["status"] for e in lines} == {401, 101}, lines
    for line in lines:
        assert line["path"] == f"{WS_PATH}?token=REDACTED", line
    text = repr(logs)
    assert good not in text and bad not in text


async def test_access_log_redacts_a_token_in_any_path(
    gateway: Harness, access_log_at_info: None
) -> None:
    """Even a token sent where none belongs (a probe of /readyz) is blanked."""
    async with access_logged_client(gateway) as client:
        with structlog.testing.capture_logs() as logs:
            response = await client.get("/readyz", params={"token": "leaky-0123456789"})
            assert response.status == 200
            line = await logged(logs, status=200)
    assert line["path"] == "/readyz?token=REDACTED"
