"""The device WebSocket as a device author meets it (PROTOCOL.md §1).

Real gateway, real PostgreSQL, real sockets: each test plays one or more
devices against ``make_gateway``/``gateway`` (tests/conftest.py) and, where a
call is involved, a sibling service on the internal API.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from harness import WS_PATH, Device, Harness, mint

MakeGateway = Callable[..., Awaitable[Harness]]

# A plain GET that looks like a WebSocket handshake: the refusal comes back as
# an ordinary HTTP response whose body we can read.
UPGRADE_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
}


def upgrade_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    return {**UPGRADE_HEADERS, "Sec-WebSocket-Key": key, **(extra or {})}


async def handshake_refusal(
    gateway: Harness, *, token: str | None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Status and body text of a refused handshake (never upgraded)."""
    params = {} if token is None else {"token": token}
    async with gateway.public.get(WS_PATH, params=params,
                                  headers=upgrade_headers(headers)) as response:
        return response.status, await response.text()


async def handshake_status(
    gateway: Harness, *, token: str | None, headers: dict[str, str] | None = None
) -> int:
    """The HTTP status a real WebSocket client sees when the handshake is refused."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        ws = await gateway.public.ws_connect(
            WS_PATH, params={} if token is None else {"token": token}, headers=headers)
        await ws.close()
    return refused.value.status


async def close_of(ws: aiohttp.ClientWebSocketResponse,
                   timeout: float = 5.0) -> tuple[int | None, str]:
    """Read (skipping frames) until the socket closes; the close code and reason.

    The bound is ours, not receive(timeout=): aiohttp restarts that timeout
    after every ping it answers, so it never fires under a short heartbeat.
    """
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                # The code of the close frame itself: aiohttp's client turns its own
                # close_code into 1006 when its close reply cannot be written, which
                # happens when the server drops the TCP connection right after its
                # close frame (aiohttp does that when another task is reading).
                return msg.data, msg.extra or ""
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return ws.close_code, ""


async def hello_close(gateway: Harness, first: dict[str, Any] | str | bytes,
                      ) -> tuple[int | None, str, list[Any]]:
    """Open a socket, send ``first`` as its first frame; the close and any frames seen."""
    ws = await gateway.connect()
    device = Device(ws, "user-1", "?")
    await device.send(first)
    seen: list[Any] = []
    async with asyncio.timeout(5.0):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                # The code of the close frame itself: aiohttp's client turns its own
                # close_code into 1006 when its close reply cannot be written, which
                # happens when the server drops the TCP connection right after its
                # close frame (aiohttp does that when another task is reading).
                return msg.data, msg.extra or "", seen
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return ws.close_code, "", seen
            seen.append(msg.data)


async def assert_quiet(device: Device, seconds: float) -> None:
    """No frame arrives for ``seconds`` while the client keeps answering transport pings.

    (aiohttp's receive(timeout=) restarts its timeout after each ping it
    answers, so with a short heartbeat the overall bound has to be ours.)
    """
    try:
        async with asyncio.timeout(seconds):
            msg = await device.ws.receive()
    except TimeoutError:
        return
    raise AssertionError(f"expected no frame, got {msg!r}")


async def assert_alive(device: Device) -> None:
    """The connection still answers: a ping gets a pong as the very next frame."""
    await device.send({"type": "ping"})
    frame = await device.recv()
    assert frame == {"type": "pong"}, frame


async def presence(gateway: Harness, user_id: str) -> list[dict[str, Any]]:
    status, body = await gateway.api("GET", f"/devices?user_id={user_id}")
    assert status == 200, body
    devices: list[dict[str, Any]] = body["devices"]
    return devices


def start_call(gateway: Harness, body: dict[str, Any]) -> asyncio.Task[tuple[int, Any]]:
    return asyncio.create_task(gateway.api("POST", "/tool-calls", body))


async def answer_next_call(device: Device, result: Any) -> dict[str, Any]:
    call = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": call["id"], "result": result})
    return call


# ---------------------------------------------------------------- §1.1 handshake auth


async def test_token_in_query_is_accepted(gateway: Harness) -> None:
    """A device that puts its JWT in ?token= is upgraded and can say hello."""
    ws = await gateway.public.ws_connect(WS_PATH, params={"token": mint("user-1")})
    device = Device(ws, "user-1", "d1")
    await device.send({"type": "device_hello", "device_id": "d1"})
    ack = await device.recv()
    assert ack["type"] == "hello_ack", ack


async def test_token_in_bearer_header_is_accepted(gateway: Harness) -> None:
    """A non-browser device may send its JWT as Authorization: Bearer instead."""
    ws = await gateway.public.ws_connect(
        WS_PATH, headers={"Authorization": f"Bearer {mint('user-1')}"})
    device = Device(ws, "user-1", "d1")
    await device.send({"type": "device_hello", "device_id": "d1"})
    ack = await device.recv()
    assert ack["type"] == "hello_ack", ack
    assert [d["device_id"] for d in await presence(gateway, "user-1")] == ["d1"]


def _alg_none() -> str:
    return jwt.encode({"sub": "user-1", "exp": int(time.time()) + 600}, None, algorithm="none")


REFUSED_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "empty": lambda: "",
    "garbage": lambda: "not-a-jwt-at-all",
    "three_garbage_parts": lambda: "aaaa.bbbb.cccc",
    "wrong_secret": lambda: mint("user-1", secret="another-secret-0123456789abcdef-x"),
    "expired": lambda: mint("user-1", ttl_s=-300),
    "no_exp": lambda: mint("user-1", exp=None),
    "no_sub": lambda: mint(None),  # type: ignore[arg-type]
    "empty_sub": lambda: mint(""),
    "blank_sub": lambda: mint("   "),
    "numeric_sub": lambda: mint(12345),  # type: ignore[arg-type]
    "list_sub": lambda: mint(["user-1"]),  # type: ignore[arg-type]
    "alg_none": _alg_none,
    "alg_outside_allow_list": lambda: mint("user-1", algorithm="HS512"),
}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 case
@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
async def test_bad_token_is_refused_with_401_before_upgrade(gateway: Harness, case: str) -> None:
    """Each bad token gets HTTP 401 {"error":"unauthorized","detail":...}, never a socket."""
    token = REFUSED_TOKENS[case]()
    status = await handshake_status(gateway, token=token)
    assert status == 401, case
    status, text = await handshake_refusal(gateway, token=token)
    assert status == 401, text
    body = orjson.loads(text)
    assert body["error"] == "unauthorized", body
    assert isinstance(body["detail"], str) and body["detail"], body
    if token:
        assert token not in text, text
    assert len(gateway.svc.registry) == 0


async def test_bad_bearer_token_is_refused_and_not_echoed(gateway: Harness) -> None:
    """The Authorization header path refuses the same way and keeps the token out of the body."""
    token = mint("user-1", secret="another-secret-0123456789abcdef-x")
    headers = {"Authorization": f"Bearer {token}"}
    assert await handshake_status(gateway, token=None, headers=headers) == 401
    status, text = await handshake_refusal(gateway, token=None, headers=headers)
    assert status == 401, text
    assert orjson.loads(text)["error"] == "unauthorized", text
    assert token not in text, text
    for part in token.split("."):
        assert part not in text, text


async def test_refusal_reasons_are_distinguishable(gateway: Harness) -> None:
    """The detail tells a device author what is wrong (expired vs. bad signature vs. no exp)."""
    details = {}
    for case in ("expired", "wrong_secret", "no_exp", "missing"):
        status, text = await handshake_refusal(gateway, token=REFUSED_TOKENS[case]())
        assert status == 401, text
        details[case] = orjson.loads(text)["detail"]
    assert len(set(details.values())) == len(details), details
    assert "expired" in details["expired"], details
    assert "exp" in details["no_exp"], details


async def test_token_without_exp_accepted_when_not_required(make_gateway: MakeGateway) -> None:
    """GATEWAY_JWT_REQUIRE_EXP=false: a token with no exp connects and never expires."""
    gateway = await make_gateway(jwt_require_exp=False)
    device = await gateway.device("user-1", "d1", token=mint("user-1", exp=None))
    assert device.hello_ack is not None
    conn = gateway.svc.registry.get("user-1", "d1")
    assert conn is not None and conn.expires_at is None
    await assert_alive(device)


async def test_exp_not_required_still_refuses_an_expired_token(make_gateway: MakeGateway) -> None:
    """Optional exp does not mean ignored exp: an expired token is still refused."""
    gateway = await make_gateway(jwt_require_exp=False)
    status, text = await handshake_refusal(gateway, token=mint("user-1", ttl_s=-300))
    assert status == 401, text


AUDIENCE = "device-gateway"
ISSUER = "https://auth.example.test"


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"aud": AUDIENCE}, True),
        ({"aud": [AUDIENCE, "other"]}, True),
        ({"aud": "someone-else"}, False),
        ({}, False),
    ],
    ids=["right", "right_in_list", "wrong", "missing"],
)
async def test_audience_is_checked_when_configured(
    make_gateway: MakeGateway, claims: dict[str, Any], accepted: bool
) -> None:
    """With GATEWAY_JWT_AUDIENCE set, only tokens for that audience connect."""
    gateway = await make_gateway(jwt_audience=AUDIENCE)
    token = mint("user-1", **claims)
    if accepted:
        device = await gateway.device("user-1", "d1", token=token)
        assert device.hello_ack is not None
    else:
        status, text = await handshake_refusal(gateway, token=token)
        assert status == 401, text
        assert orjson.loads(text)["error"] == "unauthorized", text


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [({"iss": ISSUER}, True), ({"iss": "https://evil.example.test"}, False), ({}, False)],
    ids=["right", "wrong", "missing"],
)
async def test_issuer_is_checked_when_configured(
    make_gateway: MakeGateway, claims: dict[str, Any], accepted: bool
) -> None:
    """With GATEWAY_JWT_ISSUER set, only tokens from that issuer connect."""
    gateway = await make_gateway(jwt_issuer=ISSUER)
    token = mint("user-1", **claims)
    if accepted:
        device = await gateway.device("user-1", "d1", token=token)
        assert device.hello_ack is not None
    else:
        status, text = await handshake_refusal(gateway, token=token)
        assert status == 401, text


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_other_allowed_algorithm_is_accepted(make_gateway: MakeGateway) -> None:
    """The allow-list is a list: HS512 connects when GATEWAY_JWT_ALGORITHMS lists it."""
    gateway = await make_gateway(jwt_algorithms=("HS256", "HS512"))
    device = await gateway.device("user-1", "d1",
                                  token=mint("user-1", algorithm="HS512"))
    assert device.hello_ack is not None


async def test_plain_get_without_upgrade_is_400(gateway: Harness) -> None:
    """An authenticated request that is not a WebSocket upgrade gets 400 bad_request."""
    async with gateway.public.get(WS_PATH, params={"token": mint("user-1")}) as response:
        text = await response.text()
        assert response.status == 400, text
    assert orjson.loads(text)["error"] == "bad_request", text
    assert gateway.svc.sockets == 0


async def test_over_capacity_is_refused_with_503(make_gateway: MakeGateway) -> None:
    """GATEWAY_MAX_CONNECTIONS sockets held: the next handshake gets 503 over_capacity."""
    gateway = await make_gateway(max_connections=1)
    held = await gateway.device("user-1", "d1")
    assert await handshake_status(gateway, token=mint("user-2")) == 503
    status, text = await handshake_refusal(gateway, token=mint("user-2"))
    assert status == 503, text
    assert orjson.loads(text)["error"] == "over_capacity", text
    await held.close()
    await gateway.wait_for(lambda: gateway.svc.sockets == 0)
    again = await gateway.device("user-2", "d2")
    assert again.hello_ack is not None


async def test_draining_gateway_refuses_with_503(gateway: Harness) -> None:
    """While the gateway drains, a handshake gets 503 shutting_down (and no upgrade)."""
    gateway.svc.draining = True
    assert await handshake_status(gateway, token=mint("user-1")) == 503
    status, text = await handshake_refusal(gateway, token=mint("user-1"))
    assert status == 503, text
    assert orjson.loads(text)["error"] == "shutting_down", text


# ---------------------------------------------------------------- §1.2 hello


async def test_hello_is_answered_with_hello_ack(gateway: Harness) -> None:
    """hello_ack carries a uuid connection_id, the heartbeat setting and the server time."""
    before = dt.datetime.now(dt.UTC)
    device = await gateway.device("user-1", "d1", ["agent-a"])
    ack = device.hello_ack
    assert ack is not None
    assert set(ack) >= {"type", "connection_id", "heartbeat_s", "server_time"}, ack
    assert str(uuid.UUID(ack["connection_id"])) == ack["connection_id"], ack
    assert ack["heartbeat_s"] == gateway.settings.heartbeat_s, ack
    server_time = dt.datetime.fromisoformat(ack["server_time"])
    assert server_time.tzinfo is not None, ack
    assert before - dt.timedelta(seconds=5) <= server_time <= before + dt.timedelta(seconds=5)
    devices = await presence(gateway, "user-1")
    assert devices == [{
        "user_id": "user-1", "device_id": "d1", "agent_ids": ["agent-a"],
        "connection_id": ack["connection_id"], "connected_at": devices[0]["connected_at"],
    }], devices


async def test_hello_ack_reports_a_configured_heartbeat(make_gateway: MakeGateway) -> None:
    """heartbeat_s in hello_ack follows GATEWAY_HEARTBEAT_S, fractions included."""
    gateway = await make_gateway(heartbeat_s=12.5)
    device = await gateway.device("user-1", "d1")
    assert device.hello_ack is not None
    assert device.hello_ack["heartbeat_s"] == 12.5, device.hello_ack


async def test_no_hello_within_timeout_closes_1008(make_gateway: MakeGateway) -> None:
    """A device that says nothing after the upgrade is closed with 1008."""
    gateway = await make_gateway(hello_timeout_s=0.3)
    ws = await gateway.connect()
    code, reason = await close_of(ws)
    assert code == 1008, (code, reason)
    assert reason, "a short close reason is expected"
    await gateway.wait_for(lambda: gateway.svc.sockets == 0)


async def test_hello_timeout_holds_under_a_short_heartbeat(make_gateway: MakeGateway) -> None:
    """A silent device that answers transport pings is still closed 1008 at the hello timeout."""
    gateway = await make_gateway(hello_timeout_s=0.5, heartbeat_s=0.2)
    ws = await gateway.connect()
    code, reason = await close_of(ws, timeout=4)
    assert code == 1008, (code, reason)


async def test_hello_timeout_holds_for_a_pinging_client(make_gateway: MakeGateway) -> None:
    """A client sending its own keep-alive pings but no hello is closed 1008 at the timeout."""
    gateway = await make_gateway(hello_timeout_s=0.5)
    ws = await gateway.public.ws_connect(WS_PATH, params={"token": mint("user-1")},
                                         heartbeat=0.1)
    code, reason = await close_of(ws, timeout=4)
    assert code == 1008, (code, reason)


BAD_HELLOS: dict[str, dict[str, Any] | str | bytes] = {
    "not_json": "hello there",
    "not_an_object": '["device_hello", "d1"]',
    "json_string": '"device_hello"',
    "no_type": {"device_id": "d1"},
    "wrong_first_type": {"type": "ping"},
    "tool_result_first": {"type": "tool_result", "id": "x", "result": 1},
    "binary_first_frame": b'{"type": "device_hello", "device_id": "d1"}',
    "device_id_missing": {"type": "device_hello"},
    "device_id_null": {"type": "device_hello", "device_id": None},
    "device_id_empty": {"type": "device_hello", "device_id": ""},
    "device_id_number": {"type": "device_hello", "device_id": 42},
    "device_id_object": {"type": "device_hello", "device_id": {"id": "d1"}},
    "device_id_257_chars": {"type": "device_hello", "device_id": "x" * 257},
    "device_id_nul": {"type": "device_hello", "device_id": "dev\x00ice"},
    "device_id_tab": {"type": "device_hello", "device_id": "dev\tice"},
    "device_id_del": {"type": "device_hello", "device_id": "dev\x7fice"},
    "device_id_c1_nel": {"type": "device_hello", "device_id": "dev\x85ice"},
    "device_id_spaces": {"type": "device_hello", "device_id": "    "},
    "device_id_unicode_spaces": {"type": "device_hello", "device_id": "\u00a0\u2003\u3000"},
    "agent_ids_string": {"type": "device_hello", "device_id": "d1", "agent_ids": "agent-a"},
    "agent_ids_object": {"type": "device_hello", "device_id": "d1", "agent_ids": {"a": 1}},
    "agent_ids_257": {"type": "device_hello", "device_id": "d1",
                      "agent_ids": [f"agent-{i}" for i in range(257)]},
    "agent_id_control_char": {"type": "device_hello", "device_id": "d1",
                              "agent_ids": ["agent-a", "agent\x01b"]},
    "agent_id_number": {"type": "device_hello", "device_id": "d1", "agent_ids": [7]},
    "agent_id_empty": {"type": "device_hello", "device_id": "d1", "agent_ids": [""]},
    "agent_id_too_long": {"type": "device_hello", "device_id": "d1", "agent_ids": ["a" * 257]},
}


@pytest.mark.parametrize("case", list(BAD_HELLOS))
async def test_bad_first_frame_closes_1008(gateway: Harness, case: str) -> None:
    """Anything but a valid device_hello as the first frame closes the socket with 1008."""
    code, reason, seen = await hello_close(gateway, BAD_HELLOS[case])
    assert code == 1008, (code, reason, seen)
    assert reason, "a short close reason is expected"
    assert all(b"hello_ack" not in (s if isinstance(s, bytes) else s.encode()) for s in seen), seen
    assert len(gateway.svc.registry) == 0
    assert await presence(gateway, "user-1") == []


@pytest.mark.parametrize(
    "device_id",
    ["Mac-mini von Jürgen", "設備-1", "📱 phone", "host.example.com:MAC-00:1A:2B", "x" * 256,
     "  padded id  "],
    ids=["german", "cjk", "emoji", "host_and_mac", "256_chars", "padded"],
)
async def test_printable_device_ids_are_accepted_verbatim(gateway: Harness,
                                                          device_id: str) -> None:
    """Machine ids and host names with any printable characters are kept exactly."""
    device = await gateway.device("user-1", device_id, ["agent-ü", "代理"])
    assert device.hello_ack is not None
    devices = await presence(gateway, "user-1")
    assert [(d["device_id"], d["agent_ids"]) for d in devices] == [
        (device_id, ["agent-ü", "代理"])], devices


async def test_agent_ids_are_optional(gateway: Harness) -> None:
    """A hello without agent_ids is fine; the device simply advertises no agents."""
    device = await gateway.device("user-1", "d1")
    assert device.hello_ack is not None
    devices = await presence(gateway, "user-1")
    assert devices[0]["agent_ids"] == [], devices


async def test_256_agent_ids_are_accepted(gateway: Harness) -> None:
    """The agent_ids limit is inclusive: exactly 256 ids connect."""
    agents = [f"agent-{i}" for i in range(256)]
    device = await gateway.device("user-1", "d1", agents)
    assert device.hello_ack is not None
    assert (await presence(gateway, "user-1"))[0]["agent_ids"] == agents


async def test_repeated_hello_updates_agents_and_is_acked(gateway: Harness) -> None:
    """A later hello with the same device_id replaces agent_ids and gets a new hello_ack."""
    device = await gateway.device("user-1", "d1", ["agent-a"])
    assert device.hello_ack is not None
    await device.send({"type": "device_hello", "device_id": "d1", "agent_ids": ["agent-b"]})
    ack = await device.recv()
    assert ack["type"] == "hello_ack", ack
    assert ack["connection_id"] == device.hello_ack["connection_id"], ack
    assert (await presence(gateway, "user-1"))[0]["agent_ids"] == ["agent-b"]


@pytest.mark.parametrize(
    "hello",
    [{"type": "device_hello", "device_id": "d2"},
     {"type": "device_hello", "device_id": "d1", "agent_ids": "agent-b"}],
    ids=["other_device_id", "bad_agent_ids"],
)
async def test_repeated_hello_that_changes_identity_is_a_bad_frame(
    gateway: Harness, hello: dict[str, Any]
) -> None:
    """A later hello naming another device, or with bad fields, is refused; the socket stays."""
    device = await gateway.device("user-1", "d1", ["agent-a"])
    await device.send(hello)
    error = await device.recv()
    assert error["type"] == "error" and error["code"] == "bad_frame", error
    assert error["ref"] == "device_hello", error
    await assert_alive(device)
    devices = await presence(gateway, "user-1")
    assert [(d["device_id"], d["agent_ids"]) for d in devices] == [("d1", ["agent-a"])], devices


# ---------------------------------------------------------------- per-user device limit


async def test_device_limit_per_user_closes_4002(make_gateway: MakeGateway) -> None:
    """With GATEWAY_MAX_DEVICES_PER_USER=2, a third device is closed 4002 too_many_devices."""
    gateway = await make_gateway(max_devices_per_user=2)
    await gateway.device("user-1", "d1")
    await gateway.device("user-1", "d2")
    ws = await gateway.connect(mint("user-1"))
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "d3"}).decode())
    code, reason = await close_of(ws)
    assert (code, reason) == (4002, "too_many_devices")
    assert sorted(d["device_id"] for d in await presence(gateway, "user-1")) == ["d1", "d2"]


async def test_device_limit_allows_reconnect_of_a_known_device(make_gateway: MakeGateway) -> None:
    """At the limit, a reconnect of an already-registered device_id replaces it instead."""
    gateway = await make_gateway(max_devices_per_user=2)
    first = await gateway.device("user-1", "d1")
    await gateway.device("user-1", "d2")
    again = await gateway.device("user-1", "d1")
    assert again.hello_ack is not None
    assert (await close_of(first.ws))[0] == 4000
    assert sorted(d["device_id"] for d in await presence(gateway, "user-1")) == ["d1", "d2"]


async def test_device_limit_counts_per_user(make_gateway: MakeGateway) -> None:
    """One user at the limit does not stop another user's devices."""
    gateway = await make_gateway(max_devices_per_user=1)
    await gateway.device("user-1", "d1")
    other = await gateway.device("user-2", "d1")
    assert other.hello_ack is not None


# ---------------------------------------------------------------- §1.3 replacement


async def test_second_connection_replaces_the_first(gateway: Harness) -> None:
    """Same (user, device): the old socket closes 4000 replaced; the new one gets the calls."""
    old = await gateway.device("user-1", "d1")
    new = await gateway.device("user-1", "d1")
    assert old.hello_ack is not None and new.hello_ack is not None
    assert old.hello_ack["connection_id"] != new.hello_ack["connection_id"]
    code, reason = await close_of(old.ws)
    assert (code, reason) == (4000, "replaced")

    # Let the old connection's cleanup run to its end before looking.
    await gateway.wait_for(lambda: gateway.svc.sockets == 1)
    devices = await presence(gateway, "user-1")
    assert [d["connection_id"] for d in devices] == [new.hello_ack["connection_id"]], devices

    call = start_call(gateway, {"user_id": "user-1", "device_id": "d1", "tool": "echo",
                                "args": {"n": 1}})
    await answer_next_call(new, {"n": 1})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert body["result"] == {"n": 1}, body


async def test_call_pending_on_a_replaced_connection_fails_at_once(gateway: Harness) -> None:
    """A call waiting on the old socket fails device_disconnected when it is replaced."""
    old = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "slow", "timeout_s": 30})
    await old.recv_type("tool_call")
    new = await gateway.device("user-1", "d1")
    status, body = await asyncio.wait_for(call, 5)
    assert status == 503, body
    assert body["error"] == "device_disconnected", body
    await assert_alive(new)


# ---------------------------------------------------------------- isolation


async def _foreign_result_is_refused(gateway: Harness, intruder: Device) -> None:
    owner = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "device_id": "d1", "tool": "read",
                                "timeout_s": 10})
    sent = await owner.recv_type("tool_call")
    await intruder.send({"type": "tool_result", "id": sent["id"], "result": "forged"})
    error = await intruder.recv()
    assert error["type"] == "error", error
    assert (error["code"], error["ref"]) == ("unknown_call", "tool_result"), error
    await intruder.send({"type": "tool_progress", "id": sent["id"]})
    error = await intruder.recv()
    assert (error["code"], error["ref"]) == ("unknown_call", "tool_progress"), error

    conn = gateway.svc.registry.get("user-1", "d1")
    assert conn is not None and sent["id"] in conn.calls
    assert not conn.calls[sent["id"]].future.done(), "the intruder resolved someone else's call"
    assert not call.done()

    await owner.send({"type": "tool_result", "id": sent["id"], "result": "genuine"})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert (body["result"], body["device_id"]) == ("genuine", "d1"), body


async def test_other_device_of_same_user_cannot_answer_a_call(gateway: Harness) -> None:
    """A tool_result for a call sent to another device of the same user is unknown_call."""
    intruder = await gateway.device("user-1", "d2")
    await _foreign_result_is_refused(gateway, intruder)


async def test_other_users_device_cannot_answer_a_call(gateway: Harness) -> None:
    """A tool_result for another user's call is unknown_call and resolves nothing."""
    intruder = await gateway.device("user-2", "d1")
    await _foreign_result_is_refused(gateway, intruder)


async def test_result_for_nonexistent_call_is_unknown_call(gateway: Harness) -> None:
    """An id nobody issued gets the same unknown_call as someone else's id (no probing)."""
    device = await gateway.device("user-1", "d1")
    for call_id in (str(uuid.uuid4()), "nope"):
        await device.send({"type": "tool_result", "id": call_id, "result": 1})
        error = await device.recv()
        assert (error["type"], error["code"], error["ref"]) == (
            "error", "unknown_call", "tool_result"), error
    await assert_alive(device)


async def test_result_after_the_call_finished_is_unknown_call(gateway: Harness) -> None:
    """A second tool_result for an already answered call is refused, not double-delivered."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "echo"})
    sent = await answer_next_call(device, "first")
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["result"]) == (200, "first"), body
    await device.send({"type": "tool_result", "id": sent["id"], "result": "second"})
    error = await device.recv()
    assert error["code"] == "unknown_call", error


# ---------------------------------------------------------------- §1.4 frames


async def test_tool_call_frame_and_result_round_trip(gateway: Harness) -> None:
    """tool_call carries id, tool, args, timeout_ms; the result reaches the HTTP caller."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "fs.read",
                                "args": {"path": "/tmp/x"}, "timeout_s": 7})
    sent = await device.recv_type("tool_call")
    assert sent["tool"] == "fs.read" and sent["args"] == {"path": "/tmp/x"}, sent
    assert sent["timeout_ms"] == 7000, sent
    result = {"text": "hällo", "lines": [1, 2.5, None, True], "nested": {"deep": []}}
    await device.send({"type": "tool_result", "id": sent["id"], "result": result})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert body == {"call_id": sent["id"], "device_id": "d1", "ok": True, "result": result}


async def test_tool_result_without_result_reads_as_null(gateway: Harness) -> None:
    """A tool with nothing to return may send neither result nor error: result is null."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "noop"})
    sent = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": sent["id"]})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert body["ok"] is True and body["result"] is None, body


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("disk full", {"code": "tool_error", "message": "disk full"}),
        ({"code": "ENOENT", "message": "no such file"},
         {"code": "ENOENT", "message": "no such file"}),
    ],
    ids=["string_error", "object_error"],
)
async def test_tool_error_reaches_the_caller(gateway: Harness, error: Any,
                                             expected: dict[str, str]) -> None:
    """A failed tool answers 200 ok=false with {"code","message"}; a string becomes tool_error."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "fs.write"})
    sent = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": sent["id"], "error": error})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert body == {"call_id": sent["id"], "device_id": "d1", "ok": False, "error": expected}


async def test_tool_progress_keeps_a_call_alive_past_its_timeout(gateway: Harness) -> None:
    """Each tool_progress restarts timeout_s: a call reporting every 0.3 s outlives 0.5 s."""
    device = await gateway.device("user-1", "d1")
    started = time.monotonic()
    call = start_call(gateway, {"user_id": "user-1", "tool": "build", "timeout_s": 0.5,
                                "max_timeout_s": 5})
    sent = await device.recv_type("tool_call")
    for step in range(4):
        await asyncio.sleep(0.3)
        await device.send({"type": "tool_progress", "id": sent["id"],
                           "progress": step / 4, "message": f"step {step}"})
        await assert_alive(device)  # no error frame came back for the progress
    assert not call.done()
    await device.send({"type": "tool_result", "id": sent["id"], "result": "built"})
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200, body
    assert body["result"] == "built", body
    assert time.monotonic() - started > 0.5


async def test_tool_progress_never_extends_past_max_timeout(gateway: Harness) -> None:
    """Progress cannot keep a call forever: at max_timeout_s it is 504 and tool_cancel is sent."""
    device = await gateway.device("user-1", "d1")
    started = time.monotonic()
    call = start_call(gateway, {"user_id": "user-1", "tool": "spin", "timeout_s": 0.3,
                                "max_timeout_s": 0.8})
    sent = await device.recv_type("tool_call")
    cancel: dict[str, Any] | None = None
    while cancel is None:
        assert time.monotonic() - started < 5, "no tool_cancel"
        await device.send({"type": "tool_progress", "id": sent["id"], "progress": 0.5})
        try:
            frame = await device.recv(timeout=0.15)
        except TimeoutError:
            continue
        if frame["type"] == "tool_cancel":
            cancel = frame
        else:  # progress that raced the timeout
            assert frame["type"] == "error" and frame["code"] == "unknown_call", frame
    assert cancel == {"type": "tool_cancel", "id": sent["id"], "reason": "timeout"}, cancel
    status, body = await asyncio.wait_for(call, 5)
    assert status == 504, body
    assert body["error"] == "timeout", body
    assert time.monotonic() - started >= 0.7


async def test_call_without_progress_times_out_with_504(gateway: Harness) -> None:
    """No answer within timeout_s: the caller gets 504 and the device a tool_cancel."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "hang", "timeout_s": 0.3})
    sent = await device.recv_type("tool_call")
    cancel = await device.recv_type("tool_cancel")
    assert cancel["id"] == sent["id"], cancel
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["error"]) == (504, "timeout"), body


async def test_ping_is_answered_with_pong(gateway: Harness) -> None:
    """{"type":"ping"} from the device gets exactly {"type":"pong"}."""
    device = await gateway.device("user-1", "d1")
    await device.send({"type": "ping"})
    msg = await device.ws.receive(timeout=5)
    assert orjson.loads(msg.data) == {"type": "pong"}, msg


async def test_pong_gets_no_reply(gateway: Harness) -> None:
    """A legacy pong is accepted silently: the next frame is the answer to a later ping."""
    device = await gateway.device("user-1", "d1")
    await device.send({"type": "pong"})
    await device.send({"type": "pong", "extra": "ignored"})
    await assert_alive(device)


async def test_unknown_type_is_ignored(gateway: Harness) -> None:
    """Frames of types the gateway does not know yet get no reply and keep the socket."""
    device = await gateway.device("user-1", "d1")
    await device.send({"type": "telemetry_v2", "cpu": 0.3})
    await device.send({"type": ""})
    await assert_alive(device)


async def test_unknown_fields_are_ignored(gateway: Harness) -> None:
    """Extra fields on known frames are ignored (forward compatibility)."""
    device = await gateway.device("user-1", "d1")
    await device.send({"type": "ping", "sent_at": 123, "client": {"v": "9.9"}})
    assert await device.recv() == {"type": "pong"}


@pytest.mark.parametrize("frame_type", ["agent_data", "agent_complete"])
@pytest.mark.parametrize("run_id", ["not-a-uuid", "00000000-0000-4000-8000-000000000000"])
async def test_frame_for_unknown_run_is_unknown_run(gateway: Harness, frame_type: str,
                                                    run_id: str) -> None:
    """A run frame naming a run this device was not given gets unknown_run; socket stays."""
    device = await gateway.device("user-1", "d1", ["agent-a"])
    await device.send({"type": frame_type, "run_id": run_id, "data": {"x": 1}})
    error = await device.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "unknown_run",
                                                            frame_type), error
    await assert_alive(device)


# ---------------------------------------------------------------- auth_refresh and expiry


def _short_token(sub: str, seconds: float) -> tuple[str, float]:
    exp = time.time() + seconds
    return mint(sub, exp=exp), exp


async def test_auth_refresh_extends_the_connection(make_gateway: MakeGateway) -> None:
    """A refreshed token for the same sub keeps the connection past the original exp."""
    gateway = await make_gateway(jwt_leeway_s=0)
    token, exp = _short_token("user-1", 1.2)
    device = await gateway.device("user-1", "d1", token=token)
    await device.send({"type": "auth_refresh", "token": mint("user-1", ttl_s=3600)})
    await assert_alive(device)  # no auth_refresh_rejected in between
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.4)
    await assert_alive(device)
    assert not device.ws.closed


async def test_auth_refresh_for_another_sub_is_rejected(make_gateway: MakeGateway) -> None:
    """A token for another user is auth_refresh_rejected; the socket still closes 4001 at exp."""
    gateway = await make_gateway(jwt_leeway_s=0)
    token, exp = _short_token("user-1", 1.2)
    device = await gateway.device("user-1", "d1", token=token)
    foreign = mint("user-2", ttl_s=3600)
    await device.send({"type": "auth_refresh", "token": foreign})
    error = await device.recv()
    assert (error["type"], error["code"], error["ref"]) == (
        "error", "auth_refresh_rejected", "auth_refresh"), error
    assert foreign not in error["message"], error
    await device.send({"type": "auth_refresh", "token": "garbage"})
    error = await device.recv()
    assert error["code"] == "auth_refresh_rejected", error
    code, reason = await close_of(device.ws)
    assert code == 4001, (code, reason)
    assert time.time() >= exp - 0.1, "closed before the original exp"


async def test_token_expiry_closes_4001(make_gateway: MakeGateway) -> None:
    """Without auth_refresh, the connection closes with 4001 once exp passes."""
    gateway = await make_gateway(jwt_leeway_s=0)
    token, exp = _short_token("user-1", 1.2)
    device = await gateway.device("user-1", "d1", token=token)
    code, reason = await close_of(device.ws)
    assert (code, reason) == (4001, "token expired")
    assert time.time() >= exp - 0.1, "closed before exp"
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0)


# ---------------------------------------------------------------- bad input


BAD_FRAMES: dict[str, tuple[dict[str, Any] | str | bytes, str | None]] = {
    "invalid_json": ("{not json", None),
    "truncated_json": ('{"type": "ping"', None),
    "array": ("[1, 2, 3]", None),
    "string": ('"ping"', None),
    "number": ("42", None),
    "null": ("null", None),
    "no_type": ({"id": "x"}, None),
    "type_number": ({"type": 5}, None),
    "type_null": ({"type": None}, None),
    "type_list": ({"type": ["ping"]}, None),
    "binary": (b'{"type": "ping"}', None),
    "binary_garbage": (b"\x00\xff\xfe", None),
    "tool_result_no_id": ({"type": "tool_result", "result": 1}, "tool_result"),
    "tool_result_empty_id": ({"type": "tool_result", "id": "", "result": 1}, "tool_result"),
    "tool_result_numeric_id": ({"type": "tool_result", "id": 7, "result": 1}, "tool_result"),
    "tool_result_bad_error": ({"type": "tool_result", "id": "c", "error": 5}, "tool_result"),
    "tool_result_bad_error_code": (
        {"type": "tool_result", "id": "c", "error": {"code": 5, "message": "m"}}, "tool_result"),
    "tool_progress_no_id": ({"type": "tool_progress"}, "tool_progress"),
    "tool_progress_text_progress": (
        {"type": "tool_progress", "id": "c", "progress": "half"}, "tool_progress"),
    "tool_progress_bool_progress": (
        {"type": "tool_progress", "id": "c", "progress": True}, "tool_progress"),
    "tool_progress_numeric_message": (
        {"type": "tool_progress", "id": "c", "message": 5}, "tool_progress"),
    "agent_data_seq_text": (
        {"type": "agent_data", "run_id": "r", "data": {}, "seq": "x"}, "agent_data"),
    "agent_data_no_run_id": ({"type": "agent_data", "data": {}}, "agent_data"),
    "agent_data_no_data": ({"type": "agent_data", "run_id": "r"}, "agent_data"),
    "agent_data_nul_in_data": (
        {"type": "agent_data", "run_id": "r", "data": {"t": "a\x00b"}}, "agent_data"),
    "agent_complete_bad_status": (
        {"type": "agent_complete", "run_id": "r", "status": "done"}, "agent_complete"),
    "agent_complete_bad_errors": (
        {"type": "agent_complete", "run_id": "r", "errors": "boom"}, "agent_complete"),
    "auth_refresh_no_token": ({"type": "auth_refresh"}, "auth_refresh"),
    "auth_refresh_numeric_token": ({"type": "auth_refresh", "token": 1}, "auth_refresh"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frame_is_answered_and_connection_stays(gateway: Harness, case: str) -> None:
    """Malformed input gets {"type":"error","code":"bad_frame","ref":...}; pings still work."""
    frame, ref = BAD_FRAMES[case]
    device = await gateway.device("user-1", "d1")
    await device.send(frame)
    error = await device.recv()
    assert error["type"] == "error", error
    assert (error["code"], error["ref"]) == ("bad_frame", ref), error
    assert isinstance(error["message"], str) and error["message"], error
    await assert_alive(device)


async def test_too_many_bad_frames_close_1008(make_gateway: MakeGateway) -> None:
    """More bad frames per minute than GATEWAY_BAD_FRAMES_PER_MINUTE: closed with 1008."""
    gateway = await make_gateway(bad_frames_per_minute=3)
    device = await gateway.device("user-1", "d1")
    for _ in range(3):
        await device.send("garbage")
        assert (await device.recv())["code"] == "bad_frame"
    await assert_alive(device)  # at the limit, not over it
    await device.send("garbage")
    code, reason = await close_of(device.ws)
    assert code == 1008, (code, reason)
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0)


async def test_ownership_refusals_do_not_count_as_abuse(make_gateway: MakeGateway) -> None:
    """unknown_call answers are not bad frames: a device is not closed for late results."""
    gateway = await make_gateway(bad_frames_per_minute=3)
    device = await gateway.device("user-1", "d1")
    for _ in range(10):
        await device.send({"type": "tool_result", "id": str(uuid.uuid4()), "result": None})
        assert (await device.recv())["code"] == "unknown_call"
    await assert_alive(device)


async def test_garbage_flood_leaves_everything_healthy(make_gateway: MakeGateway) -> None:
    """300+ garbage frames: each answered, the device and its neighbours keep working."""
    gateway = await make_gateway(bad_frames_per_minute=1000)
    bystander = await gateway.device("user-2", "b1")
    device = await gateway.device("user-1", "d1")
    garbage: list[dict[str, Any] | str | bytes] = [
        "{", "[]", "null", b"\x00\x01", {"type": 1}, {"type": "tool_result"},
        {"type": "tool_progress", "id": "x", "progress": "p"},
        {"type": "agent_data", "run_id": "r", "data": 1, "seq": "x"},
        '{"type": "ping", "x": NaN}', "x" * 500,
    ]
    frames = [garbage[i % len(garbage)] for i in range(320)]
    for frame in frames:
        await device.send(frame)
    for i in range(len(frames)):
        error = await device.recv()
        assert error["type"] == "error" and error["code"] == "bad_frame", (i, error)
    await assert_alive(device)

    call = start_call(gateway, {"user_id": "user-1", "tool": "echo", "args": {}})
    await answer_next_call(device, "still here")
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["result"]) == (200, "still here"), body

    async with gateway.public.get("/healthz") as response:
        assert response.status == 200, await response.text()
    await assert_alive(bystander)
    call = start_call(gateway, {"user_id": "user-2", "tool": "echo"})
    await answer_next_call(bystander, "fine")
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["result"]) == (200, "fine"), body


async def test_oversized_frame_closes_1009(make_gateway: MakeGateway) -> None:
    """A frame larger than GATEWAY_MAX_FRAME_BYTES closes the socket with 1009."""
    gateway = await make_gateway(max_frame_bytes=1024)
    device = await gateway.device("user-1", "d1")
    await device.send({"type": "ping", "pad": "x" * 900})  # under the limit: fine
    assert await device.recv() == {"type": "pong"}
    await device.send({"type": "ping", "pad": "x" * 2000})
    code, reason = await close_of(device.ws)
    assert code == 1009, (code, reason)
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0)


async def test_oversized_hello_closes_1009(make_gateway: MakeGateway) -> None:
    """The frame limit holds from the first frame: an oversized hello closes with 1009."""
    gateway = await make_gateway(max_frame_bytes=1024)
    code, _, seen = await hello_close(gateway, {"type": "device_hello", "device_id": "d1",
                                                "agent_ids": ["a" * 200] * 10})
    assert code == 1009, (code, seen)
    assert len(gateway.svc.registry) == 0


# ---------------------------------------------------------------- liveness


async def test_peer_that_stops_answering_pings_is_dropped(make_gateway: MakeGateway) -> None:
    """A device that never answers WebSocket pings is dropped and leaves presence."""
    gateway = await make_gateway(heartbeat_s=0.3)
    ws = await gateway.public.ws_connect(WS_PATH, params={"token": mint("user-1")},
                                         autoping=False)
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "mute"}).decode())
    await gateway.wait_for(lambda: gateway.svc.registry.get("user-1", "mute") is not None)
    # Never read again: pings pile up unanswered.
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0, timeout=3)
    assert await presence(gateway, "user-1") == []
    await gateway.wait_for(lambda: gateway.svc.sockets == 0, timeout=3)
    await ws.close()


async def test_responsive_peer_stays_connected(make_gateway: MakeGateway) -> None:
    """A device whose client answers WebSocket pings stays connected across many intervals."""
    gateway = await make_gateway(heartbeat_s=0.3)
    device = await gateway.device("user-1", "d1")
    await assert_quiet(device, 1.2)  # reading lets aiohttp answer the pings
    assert not device.ws.closed
    await assert_alive(device)
    assert [d["device_id"] for d in await presence(gateway, "user-1")] == ["d1"]


async def test_legacy_app_ping_frames_are_sent(make_gateway: MakeGateway) -> None:
    """GATEWAY_APP_PING=true: devices receive {"type":"ping"} every heartbeat interval."""
    gateway = await make_gateway(app_ping=True, heartbeat_s=0.3)
    device = await gateway.device("user-1", "d1")
    assert await device.recv(timeout=3) == {"type": "ping"}
    assert await device.recv(timeout=3) == {"type": "ping"}


async def test_app_ping_can_be_turned_off(make_gateway: MakeGateway) -> None:
    """GATEWAY_APP_PING=false: no {"type":"ping"} frames, only transport pings."""
    gateway = await make_gateway(app_ping=False, heartbeat_s=0.3)
    device = await gateway.device("user-1", "d1")
    await assert_quiet(device, 0.8)
    await assert_alive(device)


# ---------------------------------------------------------------- disconnect


async def test_disconnect_mid_call_fails_the_call_at_once(gateway: Harness) -> None:
    """A device that goes away mid-call: the caller gets 503 device_disconnected, not a wait."""
    device = await gateway.device("user-1", "d1")
    call = start_call(gateway, {"user_id": "user-1", "tool": "slow", "timeout_s": 30})
    await device.recv_type("tool_call")
    await device.close()
    status, body = await asyncio.wait_for(call, 5)
    assert status == 503, body
    assert (body["error"], body.get("device_id")) == ("device_disconnected", "d1"), body
    assert await presence(gateway, "user-1") == []


async def test_call_to_an_offline_device_is_404(gateway: Harness) -> None:
    """After a device left, calls to it are 404 device_offline."""
    device = await gateway.device("user-1", "d1")
    await device.close()
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0)
    status, body = await gateway.api("POST", "/tool-calls",
                                     {"user_id": "user-1", "device_id": "d1", "tool": "x"})
    assert (status, body["error"]) == (404, "device_offline"), body


async def test_one_device_leaving_leaves_the_others(gateway: Harness) -> None:
    """A user's other devices stay registered and callable when one disconnects."""
    leaving = await gateway.device("user-1", "d1")
    staying = await gateway.device("user-1", "d2")
    await leaving.close()
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 1)
    assert [d["device_id"] for d in await presence(gateway, "user-1")] == ["d2"]
    call = start_call(gateway, {"user_id": "user-1", "tool": "echo"})
    await answer_next_call(staying, "ok")
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["device_id"]) == (200, "d2"), body


# ---------------------------------------------------------------- seed compatibility


async def _seed_device(ws: aiohttp.ClientWebSocketResponse, seen: list[dict[str, Any]]) -> None:
    """The field's Electron loop: answer tool_call and ping, ignore every other type."""
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        frame = orjson.loads(msg.data)
        seen.append(frame)
        if frame.get("type") == "tool_call":
            await ws.send_str(orjson.dumps({
                "type": "tool_result", "id": frame["id"],
                "result": {"tool": frame["tool"], "echo": frame["args"]},
            }).decode())
        elif frame.get("type") == "ping":
            await ws.send_str(orjson.dumps({"type": "pong"}).decode())


async def test_seed_style_device_works_unchanged(make_gateway: MakeGateway) -> None:
    """A device written for the old endpoint (?token=, hello, tool_result, pong) just works."""
    gateway = await make_gateway(app_ping=True, heartbeat_s=0.3)
    ws = await gateway.public.ws_connect(f"{WS_PATH}?token={mint('user-1')}")
    # The seed device sends hello and goes straight to its loop: it never waits for an ack.
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "electron-1",
                                    "agent_ids": ["assistant"]}).decode())
    seen: list[dict[str, Any]] = []
    loop = asyncio.create_task(_seed_device(ws, seen))
    try:
        await gateway.wait_for(lambda: gateway.svc.registry.get("user-1", "electron-1")
                               is not None)
        status, body = await asyncio.wait_for(gateway.api(
            "POST", "/tool-calls", {"user_id": "user-1", "tool": "screenshot",
                                    "args": {"scale": 2}}), 5)
        assert status == 200, body
        assert body["result"] == {"tool": "screenshot", "echo": {"scale": 2}}, body
        await gateway.wait_for(lambda: any(f["type"] == "ping" for f in seen), timeout=3)
        await asyncio.sleep(0.4)  # a heartbeat or two of pongs
        assert not ws.closed
        types = [f["type"] for f in seen]
        assert types[0] == "hello_ack", types
        assert "error" not in types, seen
    finally:
        await ws.close()
        await loop


async def test_device_sending_frames_before_reading_the_ack(gateway: Harness) -> None:
    """Frames sent right behind the hello (before the ack is read) are served in order."""
    ws = await gateway.connect(mint("user-1"))
    device = Device(ws, "user-1", "d1")
    await device.send({"type": "device_hello", "device_id": "d1"})
    await device.send({"type": "ping"})
    await device.send({"type": "pong"})
    await device.send({"type": "ping"})
    assert (await device.recv())["type"] == "hello_ack"
    assert await device.recv() == {"type": "pong"}
    assert await device.recv() == {"type": "pong"}


async def test_text_frame_with_invalid_utf8_is_a_bad_frame(gateway: Harness) -> None:
    """A text frame that is not UTF-8 is unreadable input: bad_frame, the socket stays."""
    device = await gateway.device("user-1", "d1")
    await device.ws.send_frame(b'{"type": "ping", "x": "\xed\xa0\x80"}', aiohttp.WSMsgType.TEXT)
    error = await device.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_frame", None), error
    await assert_alive(device)
