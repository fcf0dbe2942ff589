"""Native TLS on the real process: wss:// straight to the gateway (PROTOCOL.md §4).

A client trusting the test's CA connects and works; one that does not fails
the handshake; SIGHUP after a renewal is seen by the next connection while a
device connected before stays up; a bad renewal keeps the certificate in use;
a pair that does not load at start-up is one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
from certs import Ca, ServerCert, client_context, make_ca, make_server_cert, peer_serial
from harness import Device

from e2e.proc import (
    GatewayProcess,
    connect_device,
    database_env,
    mint_token,
    run_command,
    running_gateway,
)

pytestmark = pytest.mark.e2e


def tls_env(database_url: str, pair: ServerCert) -> dict[str, str]:
    return database_env(database_url, GATEWAY_TLS_CERT_FILE=str(pair.cert_file),
                        GATEWAY_TLS_KEY_FILE=str(pair.key_file))


def serial_of(device: Device) -> int:
    return peer_serial(device.ws.get_extra_info("ssl_object"))


async def device_on(session: aiohttp.ClientSession, proc: GatewayProcess, device_id: str
                    ) -> Device:
    return await connect_device(session, proc.ws_url, token=mint_token("u1"),
                                user_id="u1", device_id=device_id)


async def still_up(device: Device) -> None:
    await device.send({"type": "ping"})
    await device.recv_type("pong")


def renew(live: ServerCert, new: ServerCert) -> None:
    """What certbot's deploy hook does: new bytes at the configured paths."""
    live.key_file.write_bytes(new.key_file.read_bytes())
    live.cert_file.write_bytes(new.cert_file.read_bytes())


async def test_wss_with_a_trusted_ca_and_sighup_renewal(database_url: str, tmp_path: Path
                                                        ) -> None:
    ca = make_ca(tmp_path)
    live = make_server_cert(ca, tmp_path, "live")
    first_serial = live.serial
    renewed = make_server_cert(ca, tmp_path, "renewed")
    trusting = client_context(ca)
    with running_gateway(tls_env(database_url, live), log_dir=tmp_path,
                         client_ssl=trusting) as proc:
        assert proc.ws_url.startswith("wss://")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)
                                         ) as session:
            old = await device_on(session, proc, "before-renewal")
            assert serial_of(old) == first_serial
            version = old.ws.get_extra_info("ssl_object").version()
            assert version in ("TLSv1.2", "TLSv1.3"), version

            renew(live, renewed)
            proc.signal(signal.SIGHUP)
            await asyncio.to_thread(proc.wait_for_event, "tls_reloaded")
            new = await device_on(session, proc, "after-renewal")
            assert serial_of(new) == renewed.serial
            await still_up(old)  # the renewal dropped nobody
            assert serial_of(old) == first_serial

            # A renewal gone wrong: the next handshake still gets the last good pair.
            live.cert_file.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
            proc.signal(signal.SIGHUP)
            await asyncio.to_thread(proc.wait_for_event, "tls_reload_failed")
            third = await device_on(session, proc, "after-bad-renewal")
            assert serial_of(third) == renewed.serial
            await still_up(old)
            await still_up(new)
        code, _ = proc.stop()
    assert code == 0, proc.describe()
    failed = [line for line in proc.log_lines() if line["event"] == "tls_reload_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error", failed


async def test_a_client_that_does_not_trust_the_ca_fails_the_handshake(
    database_url: str, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    pair = make_server_cert(ca, tmp_path)
    other_ca = make_ca(tmp_path, "someone-else")
    with running_gateway(tls_env(database_url, pair), log_dir=tmp_path,
                         client_ssl=client_context(ca)) as proc:
        for context in (client_context(None), client_context(other_ca)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)
                                             ) as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.ws_connect(proc.ws_url, params={"token": mint_token("u1")})
        # Plain ws:// to a TLS listener is no WebSocket either.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.ws_connect(proc.ws_url.replace("wss://", "ws://"),
                                         params={"token": mint_token("u1")})
        assert "device_connected" not in proc.events()
        code, _ = proc.stop()
    assert code == 0, proc.describe()


@pytest.mark.parametrize("damage", ["garbage_cert", "other_key", "key_missing_setting"])
def test_a_pair_that_does_not_load_is_one_line_and_exit_2(
    database_url: str, tmp_path: Path, damage: str
) -> None:
    ca: Ca = make_ca(tmp_path)
    pair = make_server_cert(ca, tmp_path)
    env = tls_env(database_url, pair)
    if damage == "garbage_cert":
        pair.cert_file.write_text("garbage\n")
    elif damage == "other_key":
        env["GATEWAY_TLS_KEY_FILE"] = str(make_server_cert(ca, tmp_path, "other").key_file)
    else:
        del env["GATEWAY_TLS_KEY_FILE"]
    result = run_command(["serve"], env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("configuration error: GATEWAY_TLS_"), lines
    assert "Traceback" not in result.stdout + result.stderr


def test_the_client_context_checks_the_host() -> None:
    """The test's trusting client is a real verifier (so the handshake tests can fail)."""
    context = client_context(None)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
