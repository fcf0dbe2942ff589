"""The internal HTTP API's envelope (PROTOCOL.md §2): service tokens, input checks,
JSON errors, presence, and what is (not) served on which listener."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from harness import OTHER_SERVICE_TOKEN, SERVICE_TOKEN, Harness

from gateway.auth import ServiceTokens
from gateway.http.envelope import envelope

SOME_RUN = str(uuid.uuid4())
TOOL_CALL = {"user_id": "user-1", "tool": "echo"}

# Every route of the internal API, with a body that would be valid where one is needed.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/devices?user_id=user-1", None),
    ("POST", "/tool-calls", TOOL_CALL),
    ("POST", "/runs", {"user_id": "user-1", "agent_id": "a1"}),
    ("GET", "/runs?user_id=user-1", None),
    ("GET", f"/runs/{SOME_RUN}", None),
    ("GET", f"/runs/{SOME_RUN}/events", None),
    ("POST", f"/runs/{SOME_RUN}/cancel", None),
    ("GET", "/no-such-route", None),  # no probing of routes without a token either
]


def auth(token: str = SERVICE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- service tokens


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param(auth("not-the-service-token-at-all"), id="wrong-token"),
        pytest.param(auth(SERVICE_TOKEN[:-1]), id="prefix-of-token"),
        pytest.param(auth(SERVICE_TOKEN + "x"), id="token-plus-suffix"),
        pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
        pytest.param({"Authorization": f"Basic {SERVICE_TOKEN}"}, id="basic-scheme"),
        pytest.param({"Authorization": f"Token {SERVICE_TOKEN}"}, id="token-scheme"),
        pytest.param({"Authorization": SERVICE_TOKEN}, id="no-scheme"),
        pytest.param({"X-Service-Token": SERVICE_TOKEN}, id="other-header"),
    ],
)
async def test_requests_without_a_valid_service_token_get_401_on_every_route(
    gateway: Harness, headers: dict[str, str]
) -> None:
    """Missing token, wrong token or wrong scheme: 401 {"error": "unauthorized"} everywhere."""
    for method, path, body in ROUTES:
        status, answer = await gateway.api(method, path, body, token=None, headers=headers)
        assert status == 401, (method, path, answer)
        assert answer["error"] == "unauthorized", (method, path, answer)
        assert answer["detail"], answer


async def test_unauthorized_tool_call_never_reaches_the_device(gateway: Harness) -> None:
    """A refused caller cannot make a device do anything."""
    device = await gateway.device("user-1", "d1")
    status, body = await gateway.api("POST", "/tool-calls", TOOL_CALL, token="wrong-token")
    assert status == 401, body
    await device.expect_silence()


@pytest.mark.parametrize("token", [SERVICE_TOKEN, OTHER_SERVICE_TOKEN],
                         ids=["current", "rotated"])
async def test_every_configured_service_token_is_accepted(gateway: Harness, token: str) -> None:
    """Several tokens may be configured at once (rotation): each one works."""
    status, body = await gateway.api("GET", "/devices?user_id=user-1", token=token)
    assert status == 200, body
    status, body = await gateway.api("POST", "/tool-calls", TOOL_CALL, token=token)
    assert status == 404, body  # authorised; just no device online
    assert body["error"] == "device_offline", body


async def test_scheme_is_case_insensitive(gateway: Harness) -> None:
    """'bearer' works like 'Bearer' (HTTP auth schemes are case-insensitive)."""
    status, body = await gateway.api("GET", "/devices?user_id=user-1", token=None,
                                     headers={"Authorization": f"bearer {SERVICE_TOKEN}"})
    assert status == 200, body


# ---------------------------------------------------------------- 400 bad_request


def _body(**fields: Any) -> bytes:
    return orjson.dumps({**TOOL_CALL, **fields})


def _without(name: str) -> bytes:
    return orjson.dumps({k: v for k, v in TOOL_CALL.items() if k != name})


BAD_TOOL_CALLS = [
    # (id, raw body, a word the detail must contain)
    ("non-json", b"{this is not json", "JSON"),
    ("empty-body", b"", "object"),
    ("json-array", b'[{"user_id": "user-1", "tool": "echo"}]', "object"),
    ("json-string", b'"user-1"', "object"),
    ("json-null", b"null", "object"),
    ("missing-user_id", _without("user_id"), "user_id"),
    ("user_id-null", _body(user_id=None), "user_id"),
    ("user_id-number", _body(user_id=42), "user_id"),
    ("user_id-empty", _body(user_id=""), "user_id"),
    ("user_id-whitespace", _body(user_id="   "), "user_id"),
    ("user_id-nul", _body(user_id="user\x00-1"), "user_id"),
    ("user_id-newline", _body(user_id="user-1\n"), "user_id"),
    ("user_id-del", _body(user_id="user\x7f"), "user_id"),
    ("user_id-c1", _body(user_id="user\x85"), "user_id"),
    ("user_id-too-long", _body(user_id="u" * 257), "user_id"),
    ("device_id-number", _body(device_id=7), "device_id"),
    ("device_id-control", _body(device_id="d\x01"), "device_id"),
    ("missing-tool", _without("tool"), "tool"),
    ("tool-number", _body(tool=5), "tool"),
    ("tool-list", _body(tool=["echo"]), "tool"),
    ("tool-empty", _body(tool=""), "tool"),
    ("tool-whitespace", _body(tool="   "), "tool"),
    ("tool-too-long", _body(tool="t" * 257), "tool"),
    ("args-list", _body(args=[1, 2]), "args"),
    ("args-string", _body(args="x=1"), "args"),
    ("args-number", _body(args=1), "args"),
    ("timeout_s-zero", _body(timeout_s=0), "timeout_s"),
    ("timeout_s-negative", _body(timeout_s=-1), "timeout_s"),
    ("timeout_s-string", _body(timeout_s="5"), "timeout_s"),
    ("timeout_s-true", _body(timeout_s=True), "timeout_s"),
    ("timeout_s-huge", _body(timeout_s=1e9), "timeout_s"),
    ("timeout_s-object", _body(timeout_s={"s": 5}), "timeout_s"),
    ("max_timeout_s-below-timeout_s", _body(timeout_s=10, max_timeout_s=5), "max_timeout_s"),
    ("max_timeout_s-zero", _body(max_timeout_s=0), "max_timeout_s"),
    ("max_timeout_s-string", _body(max_timeout_s="60"), "max_timeout_s"),
    ("max_timeout_s-huge", _body(max_timeout_s=1e12), "max_timeout_s"),
]


@pytest.mark.parametrize(("raw", "mentions"), [(raw, word) for _, raw, word in BAD_TOOL_CALLS],
                         ids=[case for case, _, _ in BAD_TOOL_CALLS])
async def test_malformed_tool_call_is_400_with_a_clear_detail(
    gateway: Harness, raw: bytes, mentions: str
) -> None:
    """A malformed request is 400 bad_request naming what is wrong; no device is called."""
    device = await gateway.device("user-1", "d1")
    status, body = await gateway.api("POST", "/tool-calls", raw=raw,
                                     headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert body["error"] == "bad_request", body
    assert mentions in body["detail"], body
    await device.expect_silence(0.05)


async def test_body_larger_than_max_frame_bytes_is_413(make_gateway: Any) -> None:
    """A body over GATEWAY_MAX_FRAME_BYTES is 413 with a JSON {"error": ...} body."""
    gateway: Harness = await make_gateway(max_frame_bytes=2048)
    device = await gateway.device("user-1", "d1")
    big = {**TOOL_CALL, "args": {"blob": "x" * 4096}}
    async with gateway.internal.post("/internal/v1/tool-calls", json=big,
                                     headers=auth()) as response:
        body = await response.json()
        assert response.status == 413, body
        assert response.content_type == "application/json"
    assert body["error"] == "payload_too_large", body
    assert body["detail"], body
    await device.expect_silence()


async def test_body_within_max_frame_bytes_is_accepted(make_gateway: Any) -> None:
    """The size limit is the configured one, not a smaller default: 1.5 KiB of 2 KiB passes."""
    gateway: Harness = await make_gateway(max_frame_bytes=2048)
    device = await gateway.device("user-1", "d1")
    task = asyncio.create_task(gateway.api(
        "POST", "/tool-calls", {**TOOL_CALL, "args": {"blob": "x" * 1500}}))
    call = await device.recv_type("tool_call")
    assert len(call["args"]["blob"]) == 1500
    await device.send({"type": "tool_result", "id": call["id"], "result": "ok"})
    status, body = await asyncio.wait_for(task, 5)
    assert status == 200, body


# ---------------------------------------------------------------- 404 / 405


@pytest.mark.parametrize("path", ["/internal/v1/no-such-route", "/nothing-here",
                                  "/internal/v1/devices/extra"])
async def test_unknown_route_is_404_json(gateway: Harness, path: str) -> None:
    """An unknown path answers 404 with the same JSON error shape as everything else."""
    async with gateway.internal.get(path, headers=auth()) as response:
        assert response.status == 404, await response.text()
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"] == "not_found", body
    assert "detail" in body, body


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/internal/v1/tool-calls", {"POST"}),
    ("DELETE", "/internal/v1/devices", {"GET", "HEAD"}),
    ("PUT", "/internal/v1/runs", {"GET", "HEAD", "POST"}),
    ("GET", f"/internal/v1/runs/{SOME_RUN}/cancel", {"POST"}),
])
async def test_wrong_method_is_405_json_with_allow(gateway: Harness, method: str,
                                                  path: str, allowed: set[str]) -> None:
    """A known path with the wrong method: 405 JSON, and the Allow header says what works."""
    async with gateway.internal.request(method, path, headers=auth()) as response:
        assert response.status == 405, await response.text()
        assert response.content_type == "application/json"
        body = await response.json()
        allow = response.headers.get("Allow", "")
    assert body["error"] == "method_not_allowed", body
    assert set(allow.split(",")) == allowed, allow


# ---------------------------------------------------------------- presence


async def test_devices_lists_the_users_connected_devices(gateway: Harness) -> None:
    """GET /devices?user_id= gives {user_id, device_id, agent_ids, connection_id, connected_at}
    for each of that user's devices, and nobody else's."""
    before = dt.datetime.now(dt.UTC)
    d1 = await gateway.device("user-1", "d1", agent_ids=["a1", "a2"])
    d2 = await gateway.device("user-1", "d2")
    await gateway.device("user-2", "d3", agent_ids=["a1"])
    status, body = await gateway.api("GET", "/devices?user_id=user-1")
    assert status == 200, body
    devices = {d["device_id"]: d for d in body["devices"]}
    assert set(devices) == {"d1", "d2"}, body
    for device in body["devices"]:
        assert set(device) == {"user_id", "device_id", "agent_ids", "connection_id",
                               "connected_at"}, device
        assert device["user_id"] == "user-1", device
        connected_at = dt.datetime.fromisoformat(device["connected_at"])
        assert connected_at.tzinfo is not None, device
        assert before - dt.timedelta(seconds=1) <= connected_at <= dt.datetime.now(dt.UTC)
    assert devices["d1"]["agent_ids"] == ["a1", "a2"]
    assert devices["d2"]["agent_ids"] == []
    assert d1.hello_ack and devices["d1"]["connection_id"] == d1.hello_ack["connection_id"]
    assert d2.hello_ack and devices["d2"]["connection_id"] == d2.hello_ack["connection_id"]


async def test_devices_of_a_user_without_devices_is_an_empty_list(gateway: Harness) -> None:
    await gateway.device("user-2", "d1")
    status, body = await gateway.api("GET", "/devices?user_id=user-1")
    assert status == 200, body
    assert body == {"devices": []}


async def test_disconnected_device_leaves_the_listing(gateway: Harness) -> None:
    """Presence follows the sockets: a closed device is no longer listed."""
    await gateway.device("user-1", "stays")
    leaving = await gateway.device("user-1", "leaves")
    await leaving.close()
    await gateway.wait_for(lambda: gateway.svc.registry.get("user-1", "leaves") is None)
    status, body = await gateway.api("GET", "/devices?user_id=user-1")
    assert status == 200, body
    assert [d["device_id"] for d in body["devices"]] == ["stays"], body


async def test_later_hello_updates_listed_agent_ids(gateway: Harness) -> None:
    """A device that re-sends device_hello with new agents is listed with them."""
    device = await gateway.device("user-1", "d1", agent_ids=["a1"])
    await device.send({"type": "device_hello", "device_id": "d1", "agent_ids": ["a2", "a3"]})
    await device.recv_type("hello_ack")
    status, body = await gateway.api("GET", "/devices?user_id=user-1")
    assert status == 200, body
    assert body["devices"][0]["agent_ids"] == ["a2", "a3"], body


@pytest.mark.parametrize(("query", "mentions"), [
    ("", "user_id"),
    ("?device_id=d1", "user_id"),
    ("?user_id=", "user_id"),
    ("?user_id=u%00x", "user_id"),
    ("?user_id=%20%20", "user_id"),
])
async def test_devices_without_a_valid_user_id_is_400(gateway: Harness, query: str,
                                                      mentions: str) -> None:
    status, body = await gateway.api("GET", f"/devices{query}")
    assert status == 400, body
    assert body["error"] == "bad_request", body
    assert mentions in body["detail"], body


# ---------------------------------------------------------------- listeners, request ids, health


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/internal/v1/devices?user_id=u"),
    ("POST", "/internal/v1/tool-calls"),
    ("POST", "/internal/v1/runs"),
    ("GET", "/internal/v1/runs?user_id=u"),
])
async def test_internal_api_is_not_served_on_the_public_listener(
    gateway: Harness, method: str, path: str
) -> None:
    """The public listener answers 404 for internal routes, even with a valid service token."""
    for headers in ({}, auth()):
        async with gateway.public.request(method, path, headers=headers,
                                          json=TOOL_CALL if method == "POST" else None
                                          ) as response:
            assert response.status == 404, await response.text()


async def test_given_request_id_is_echoed(gateway: Harness) -> None:
    """X-Request-Id from the caller comes back, on success and on errors alike."""
    for path, expected in [("/internal/v1/devices?user_id=u", 200),
                           ("/internal/v1/devices", 400),
                           ("/internal/v1/nope", 404)]:
        async with gateway.internal.get(path, headers={**auth(), "X-Request-Id": "req-42"}
                                        ) as response:
            assert response.status == expected, await response.text()
            assert response.headers.get("X-Request-Id") == "req-42", path
    async with gateway.internal.get("/internal/v1/devices?user_id=u",
                                    headers={"X-Request-Id": "req-43"}) as response:
        assert response.status == 401
        assert response.headers.get("X-Request-Id") == "req-43"


async def test_request_id_is_generated_when_absent(gateway: Harness) -> None:
    """Without X-Request-Id (or with an unusable one) the gateway makes a fresh one per request."""
    seen = []
    for headers in ({}, {}, {"X-Request-Id": "r" * 500}):
        async with gateway.internal.get("/internal/v1/devices?user_id=u",
                                        headers={**auth(), **headers}) as response:
            assert response.status == 200, await response.text()
            request_id = response.headers.get("X-Request-Id", "")
        assert request_id and len(request_id) <= 128, request_id
        seen.append(request_id)
    assert len(set(seen)) == 3, seen


async def test_an_unexpected_error_is_a_json_500_logged_with_its_request_id(
        aiohttp_client: Any) -> None:
    """A handler that breaks answers {"error": "internal"} with the request id, and the
    log line carries the traceback; a token check still comes before any handler."""
    calls = []

    async def broken(request: web.Request) -> web.Response:
        calls.append(request.path)
        raise RuntimeError("the handler broke")

    app = web.Application()
    app.router.add_get("/broken", envelope(ServiceTokens.of([SERVICE_TOKEN]))(broken))
    client = await aiohttp_client(app)
    with structlog.testing.capture_logs() as logs:
        async with client.get("/broken", headers={**auth(), "X-Request-Id": "req-500"}
                              ) as response:
            assert response.status == 500
            assert await response.json() == {"error": "internal_error", "detail": "internal error"}
            assert response.headers["X-Request-Id"] == "req-500"
        async with client.get("/broken") as response:
            assert response.status == 401
            assert (await response.json())["error"] == "unauthorized"
            assert response.headers["X-Request-Id"]
    assert calls == ["/broken"]
    failed = [line for line in logs if line["event"] == "request_failed"]
    assert len(failed) == 1, logs
    assert failed[0]["path"] == "/broken" and isinstance(failed[0]["exc_info"], RuntimeError)


async def test_a_handler_failing_mid_stream_ends_the_connection_not_a_second_response(
        aiohttp_client: Any) -> None:
    """Once a streamed answer has started, an error cannot become a JSON 500: that would be
    written into the middle of the stream. The reader gets what was sent, then an error."""

    async def half_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"seq": 1}\n')
        raise RuntimeError("the stream broke")

    app = web.Application()
    app.router.add_get("/stream", envelope(ServiceTokens.of([SERVICE_TOKEN]))(half_stream))
    client = await aiohttp_client(app)
    received = b""
    async with client.get("/stream", headers=auth()) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert received == b'{"seq": 1}\n'


async def test_a_redirect_passes_through_with_its_request_id(aiohttp_client: Any) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_get("/moved", envelope(ServiceTokens.of([SERVICE_TOKEN]))(moved))
    client = await aiohttp_client(app)
    async with client.get("/moved", headers={**auth(), "X-Request-Id": "req-302"},
                          allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"
        assert response.headers["X-Request-Id"] == "req-302"


async def test_healthz_answers_200_on_the_public_listener(gateway: Harness) -> None:
    async with gateway.public.get("/healthz") as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["status"] == "ok", body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_arriving_in_pieces_is_read_whole(gateway: Harness, framing: str) -> None:
    """A body that is all there when the handler starts is taken from aiohttp's buffer;
    one still arriving (sent in pieces, or chunked) is waited for, and the call goes
    through with every byte of it."""
    device = await gateway.device("user-1", "d1")
    body = orjson.dumps({**TOOL_CALL, "args": {"blob": "y" * 3000}})
    port = gateway.internal.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        length = ("Transfer-Encoding: chunked" if framing == "chunked"
                  else f"Content-Length: {len(body)}")
        writer.write((f"POST /internal/v1/tool-calls HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {SERVICE_TOKEN}\r\n"
                      f"Content-Type: application/json\r\n{length}\r\n\r\n").encode())
        pieces = (body[:1000], body[1000:2000], body[2000:])
        for piece in pieces:
            if framing == "chunked":
                piece = b"%x\r\n%s\r\n" % (len(piece), piece)
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)  # the handler has started and waits for the rest
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        call = await device.recv_type("tool_call")
        assert call["args"]["blob"] == "y" * 3000
        await device.send({"type": "tool_result", "id": call["id"], "result": "whole"})
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()
