"""GATEWAY_TRUSTED_PROXIES: which address logs use behind a reverse proxy, and who cannot lie.

The parsers and the hop walk on their own, then a gateway (real sockets) whose
device and access log lines carry the address a trusted proxy names, and the
peer's own address when the peer is not trusted.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from harness import WS_PATH, Harness
from multidict import CIMultiDict
from test_ops import access_log_at_info, access_logged_client, logged

from gateway.config import ConfigError, IPNetwork, load_settings
from gateway.proxies import forwarded_client, forwarded_for, parse_address, x_forwarded_for

__all__ = ["access_log_at_info"]  # a fixture, used by name


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def addr(text: str) -> Any:
    return ipaddress.ip_address(text)


# ---------------------------------------------------------------- setting


def test_trusted_proxies_are_parsed_as_networks() -> None:
    settings = load_settings({"GATEWAY_TRUSTED_PROXIES": "127.0.0.1, 10.1.2.3/8,::1"})
    assert settings.trusted_proxies == nets("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert load_settings({}).trusted_proxies == ()


@pytest.mark.parametrize("value", ["10.0.0.0/33", "proxy.internal", "127.0.0.1,nope", " , "])
def test_a_bad_trusted_proxy_entry_is_one_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_TRUSTED_PROXIES": value})
    assert str(caught.value).startswith("GATEWAY_TRUSTED_PROXIES=")
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.60", "192.0.2.60"),
    (" 192.0.2.60:4711 ", "192.0.2.60"),
    ("2001:db8:cafe::17", "2001:db8:cafe::17"),
    ('"[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("::ffff:127.0.0.5", "127.0.0.5"),
])
def test_addresses_with_ports_brackets_and_quotes(text: str, expected: str) -> None:
    assert parse_address(text) == addr(expected)


@pytest.mark.parametrize("text", ["unknown", "_hidden", "", "[::1", "[::1]x", "1.2.3.4.5",
                                  "example.com:80"])
def test_what_is_not_an_address_is_none(text: str) -> None:
    assert parse_address(text) is None


def test_forwarded_header_per_rfc_7239() -> None:
    value = ('for=192.0.2.43;proto=https, For="[2001:db8:cafe::17]:4711";by=10.0.0.1, '
             'for=unknown, proto=http, for=_hidden, for="198.51.100.17;x=\\"a,b\\""')
    assert forwarded_for(value) == [addr("192.0.2.43"), addr("2001:db8:cafe::17"),
                                    None, None, None, None]


def test_x_forwarded_for_entries() -> None:
    assert x_forwarded_for("203.0.113.7, 10.0.0.2 ,garbage") == [
        addr("203.0.113.7"), addr("10.0.0.2"), None]


# ---------------------------------------------------------------- which hop


PROXY = "10.0.0.1"
TRUSTED = nets("10.0.0.0/24")


def client(peer: str | None, trusted: tuple[IPNetwork, ...] = TRUSTED,
           **headers: str) -> str | None:
    multi: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        for line in value.split("\n"):
            multi.add(name.replace("_", "-"), line)
    return forwarded_client(peer, multi, trusted)


def test_an_untrusted_peer_cannot_name_another_address() -> None:
    assert client("198.51.100.9", X_Forwarded_For="203.0.113.7") == "198.51.100.9"
    assert client("198.51.100.9", Forwarded="for=203.0.113.7") == "198.51.100.9"
    assert client(PROXY, (), X_Forwarded_For="203.0.113.7") == PROXY


def test_the_first_untrusted_hop_from_the_right_is_the_client() -> None:
    # The client wrote 6.6.6.6 itself; the proxy appended what it saw.
    assert client(PROXY, X_Forwarded_For="6.6.6.6, 203.0.113.7") == "203.0.113.7"
    # Two trusted proxies in a row are both skipped.
    assert client(PROXY, X_Forwarded_For="6.6.6.6, 203.0.113.7, 10.0.0.2") == "203.0.113.7"
    # Repeated header lines are one list, in order.
    assert client(PROXY, X_Forwarded_For="6.6.6.6\n203.0.113.7") == "203.0.113.7"
    assert client(PROXY, Forwarded="for=6.6.6.6, for=203.0.113.7;proto=https") == "203.0.113.7"


def test_every_hop_trusted_gives_the_leftmost() -> None:
    assert client(PROXY, X_Forwarded_For="10.0.0.3, 10.0.0.2") == "10.0.0.3"


def test_an_entry_that_is_no_address_stops_at_the_proxy_before_it() -> None:
    assert client(PROXY, X_Forwarded_For="203.0.113.7, unknown") == PROXY
    assert client(PROXY, X_Forwarded_For="203.0.113.7, garbage, 10.0.0.2") == "10.0.0.2"
    assert client(PROXY, Forwarded="for=_hidden") == PROXY
    assert client(PROXY, Forwarded="proto=https") == PROXY


def test_x_forwarded_for_wins_over_a_forwarded_header() -> None:
    """nginx appends to X-Forwarded-For; a client's own Forwarded must not be believed."""
    assert client(PROXY, X_Forwarded_For="203.0.113.7",
                  Forwarded="for=6.6.6.6") == "203.0.113.7"


def test_no_header_from_a_trusted_proxy_is_the_proxy() -> None:
    assert client(PROXY) == PROXY
    assert client(None, X_Forwarded_For="203.0.113.7") is None


# ---------------------------------------------------------------- in the gateway


@contextlib.contextmanager
def captured_with_context() -> Iterator[list[dict[str, Any]]]:
    """capture_logs, plus the context a connection binds (user_id, remote, device_id)."""
    capture = structlog.testing.LogCapture()
    before = structlog.get_config()["processors"]
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=before)


async def connected_line(gateway: Harness, headers: dict[str, str]) -> dict[str, Any]:
    with captured_with_context() as logs:
        ws = await gateway.connect(headers=headers)
        await ws.send_json({"type": "device_hello", "device_id": "d1"})
        assert (await ws.receive_json())["type"] == "hello_ack"
        await ws.close()
    return next(e for e in logs if e["event"] == "device_connected")


async def test_a_device_behind_a_trusted_proxy_is_logged_with_its_own_address(
    make_gateway: Any,
) -> None:
    gateway = await make_gateway(trusted_proxies=nets("127.0.0.1"))
    line = await connected_line(gateway, {"X-Forwarded-For": "203.0.113.7"})
    assert line["remote"] == "203.0.113.7", line
    with structlog.testing.capture_logs() as logs:
        refused = await gateway.public.get(WS_PATH, params={"token": "bad"},
                                           headers={"Forwarded": "for=198.51.100.4"})
        assert refused.status == 401
    assert [e["remote"] for e in logs if e["event"] == "device_auth_refused"] == [
        "198.51.100.4"]


async def test_a_device_that_sends_the_header_itself_is_logged_as_itself(
    gateway: Harness,
) -> None:
    line = await connected_line(gateway, {"X-Forwarded-For": "203.0.113.7"})
    assert line["remote"] == "127.0.0.1", line


async def test_the_access_log_names_the_client_behind_a_trusted_proxy(
    make_gateway: Any, access_log_at_info: None
) -> None:
    gateway = await make_gateway(trusted_proxies=nets("127.0.0.0/8"))
    async with access_logged_client(gateway) as session:
        with structlog.testing.capture_logs() as logs:
            response = await session.get(
                "/healthz", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.7, 127.0.0.9"})
            assert response.status == 200
            line = await logged(logs, status=200)
    assert line["remote"] == "203.0.113.7", line
