"""TLS for the public listener: one server context, its certificate re-read on SIGHUP.

The listener keeps the same ``ssl.SSLContext`` for its whole life, and every
new connection is wrapped with it at accept time; a connection already
established holds its own copy of the certificate. So a reload loads the new
pair into that same context: the next handshake presents it, devices already
connected are untouched. The new pair is first loaded into a scratch context,
because ``load_cert_chain`` installs the certificate before it checks the key:
a bad pair loaded straight into the live context would leave it half replaced.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import attrs
import structlog
from cryptography import x509

from gateway.config import ConfigError, Settings

log = structlog.get_logger(__name__)


class TlsError(Exception):
    """The certificate or key cannot be used; the message is one line for the operator."""


def _no_passphrase() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal, and a
    # service has nobody to answer it.
    raise TlsError("the key is encrypted: give an unencrypted key (mode 0600)")


def _load(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except TlsError:
        raise
    except ssl.SSLError as exc:
        # e.g. "[SSL] PEM lib": not PEM, or "KEY_VALUES_MISMATCH": the key is another one's.
        raise TlsError(f"{cert_file} / {key_file}: not a usable PEM certificate chain "
                       f"and matching key ({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsError(f"{exc.filename or cert_file}: {exc.strerror or exc}") from None


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A modern server context (TLS 1.2+, no compression) holding the pair."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Already in Python's defaults; stated because CRIME-style attacks need it off.
    context.options |= ssl.OP_NO_COMPRESSION
    _load(context, cert_file, key_file)
    return context


def certificate_summary(cert_file: Path) -> dict[str, str]:
    """Subject and expiry of the first certificate in the file, for the log line."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return {}
    return {"subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.astimezone(dt.UTC).isoformat()}


@attrs.define(eq=False)
class ServerTls:
    """The public listener's context and where its pair is re-read from."""

    cert_file: Path
    key_file: Path
    context: ssl.SSLContext

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        """None when TLS is not configured; a bad pair is a ConfigError (exit 2)."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        try:
            context = server_context(settings.tls_cert_file, settings.tls_key_file)
        except TlsError as exc:
            raise ConfigError(f"GATEWAY_TLS_CERT_FILE/GATEWAY_TLS_KEY_FILE: {exc}") from None
        log.info("tls_loaded", **certificate_summary(settings.tls_cert_file))
        return cls(settings.tls_cert_file, settings.tls_key_file, context)

    def reload(self) -> bool:
        """Re-read the pair for new connections; a bad one keeps the old (one error line)."""
        try:
            server_context(self.cert_file, self.key_file)  # the check, off the live context
            _load(self.context, self.cert_file, self.key_file)
        except TlsError as exc:
            log.error("tls_reload_failed", error=str(exc), kept="the previous certificate")
            return False
        log.info("tls_reloaded", **certificate_summary(self.cert_file))
        return True


def reload_on_sighup(tls: ServerTls | None) -> None:
    """SIGHUP handler: systemd's ExecReload. Without TLS there is nothing to re-read,
    and the signal must not end the process (its default action would)."""
    if tls is None:
        log.info("sighup_ignored", reason="no TLS configured: nothing to re-read")
        return
    tls.reload()
