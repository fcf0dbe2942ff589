"""GATEWAY_TLS_CERT_FILE / GATEWAY_TLS_KEY_FILE: validated at load, and what a bad pair says.

The handshakes themselves (wss://, an untrusting client, SIGHUP) are in
tests/e2e/test_tls.py against the real process.
"""

from __future__ import annotations

import io
import ssl
from pathlib import Path

import pytest
import structlog
from certs import Ca, make_ca, make_server_cert

from gateway.config import ConfigError, Secrets, load_settings
from gateway.dev.devmode import print_banner
from gateway.http.tls import ServerTls, TlsError, server_context


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    return make_ca(tmp_path)


def test_both_files_make_a_tls_listener(ca: Ca, tmp_path: Path) -> None:
    pair = make_server_cert(ca, tmp_path)
    settings = load_settings({"GATEWAY_TLS_CERT_FILE": str(pair.cert_file),
                              "GATEWAY_TLS_KEY_FILE": str(pair.key_file)})
    assert settings.tls
    assert (settings.tls_cert_file, settings.tls_key_file) == (pair.cert_file, pair.key_file)
    assert not load_settings({}).tls


@pytest.mark.parametrize("given", ["GATEWAY_TLS_CERT_FILE", "GATEWAY_TLS_KEY_FILE"])
def test_one_file_without_the_other_is_refused(ca: Ca, tmp_path: Path, given: str) -> None:
    pair = make_server_cert(ca, tmp_path)
    with pytest.raises(ConfigError, match="set both"):
        load_settings({given: str(pair.cert_file)})


def test_a_missing_file_is_refused_at_load(ca: Ca, tmp_path: Path) -> None:
    pair = make_server_cert(ca, tmp_path)
    with pytest.raises(ConfigError, match=r"GATEWAY_TLS_KEY_FILE=.*nope.key: no such file"):
        load_settings({"GATEWAY_TLS_CERT_FILE": str(pair.cert_file),
                       "GATEWAY_TLS_KEY_FILE": str(tmp_path / "nope.key")})


def test_the_context_is_a_modern_server_context(ca: Ca, tmp_path: Path) -> None:
    pair = make_server_cert(ca, tmp_path)
    context = server_context(pair.cert_file, pair.key_file)
    assert context.protocol is ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION


def test_a_certificate_that_is_not_pem_is_one_line(ca: Ca, tmp_path: Path) -> None:
    pair = make_server_cert(ca, tmp_path)
    pair.cert_file.write_text("not a certificate\n")
    with pytest.raises(TlsError) as caught:
        server_context(pair.cert_file, pair.key_file)
    assert "not a usable PEM certificate chain" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_key_of_another_certificate_is_refused(ca: Ca, tmp_path: Path) -> None:
    first = make_server_cert(ca, tmp_path, "first")
    second = make_server_cert(ca, tmp_path, "second")
    with pytest.raises(TlsError, match="matching key"):
        server_context(first.cert_file, second.key_file)


def test_an_encrypted_key_is_refused_without_a_prompt(ca: Ca, tmp_path: Path) -> None:
    """OpenSSL would ask for the passphrase on the terminal; a service cannot answer."""
    pair = make_server_cert(ca, tmp_path, password=b"passphrase")
    with pytest.raises(TlsError, match="encrypted"):
        server_context(pair.cert_file, pair.key_file)


def test_an_unreadable_pair_at_start_is_a_config_error(ca: Ca, tmp_path: Path) -> None:
    pair = make_server_cert(ca, tmp_path)
    settings = load_settings({"GATEWAY_TLS_CERT_FILE": str(pair.cert_file),
                              "GATEWAY_TLS_KEY_FILE": str(pair.key_file)})
    pair.key_file.write_text("garbage\n")
    with pytest.raises(ConfigError, match="GATEWAY_TLS_CERT_FILE/GATEWAY_TLS_KEY_FILE"):
        ServerTls.from_settings(settings)


def test_a_bad_pair_on_reload_keeps_the_context_and_logs_one_error(
    ca: Ca, tmp_path: Path
) -> None:
    pair = make_server_cert(ca, tmp_path)
    settings = load_settings({"GATEWAY_TLS_CERT_FILE": str(pair.cert_file),
                              "GATEWAY_TLS_KEY_FILE": str(pair.key_file)})
    tls = ServerTls.from_settings(settings)
    assert tls is not None
    live = tls.context
    other = make_server_cert(ca, tmp_path, "other")
    pair.key_file.write_bytes(other.key_file.read_bytes())  # a renewal half-copied
    with structlog.testing.capture_logs() as logs:
        assert tls.reload() is False
    assert tls.context is live
    assert [(e["event"], e["log_level"]) for e in logs] == [("tls_reload_failed", "error")]
    assert "matching key" in logs[0]["error"]
    pair.key_file.write_bytes(other.key_file.read_bytes())
    pair.cert_file.write_bytes(other.cert_file.read_bytes())
    with structlog.testing.capture_logs() as logs:
        assert tls.reload() is True
    assert [e["event"] for e in logs] == ["tls_reloaded"]
    assert logs[0]["subject"] == "CN=other"


@pytest.mark.parametrize("tls", [True, False])
def test_the_dev_banner_shows_the_scheme_devices_must_use(
    ca: Ca, tmp_path: Path, tls: bool
) -> None:
    env = {"GATEWAY_DATA_DIR": str(tmp_path)}
    if tls:
        pair = make_server_cert(ca, tmp_path)
        env |= {"GATEWAY_TLS_CERT_FILE": str(pair.cert_file),
                "GATEWAY_TLS_KEY_FILE": str(pair.key_file)}
    out = io.StringIO()
    print_banner(load_settings(env), Secrets(jwt_secret="dev-secret-0123456789abcdef-0123456789",
                                             internal_tokens=()),
                 public_port=8443, internal_port=8081, out=out)
    scheme = "wss" if tls else "ws"
    assert f"WebSocket: {scheme}://127.0.0.1:8443/api/v1/ws/device?token=" in out.getvalue()
