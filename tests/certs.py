"""Test certificates: a private CA and server certificates it signs, as PEM files.

``make_ca(dir)`` and ``make_server_cert(ca, dir, name)`` write files a test can
hand to the gateway (GATEWAY_TLS_*), to nginx, or to a client's trust store
(``client_context(ca)``). Each server certificate names localhost and
127.0.0.1 and carries a distinct serial, so a test can tell which one a
handshake presented. Import as ``from certs import ...``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@attrs.frozen
class Ca:
    cert_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@attrs.frozen
class ServerCert:
    cert_file: Path
    key_file: Path
    serial: int


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path,
               password: bytes | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "gateway-test-ca") -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / f"{name}.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(cert_file, cert, key)


def make_server_cert(ca: Ca, directory: Path, name: str = "server",
                     password: bytes | None = None) -> ServerCert:
    """A leaf for localhost / 127.0.0.1 signed by ``ca``; files ``<name>.crt`` / ``.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_file = directory / f"{name}.crt"
    key_file = directory / f"{name}.key"
    # The chain as servers are given it: the leaf, then the issuer.
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca.cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_file, password)
    return ServerCert(cert_file, key_file, serial)


def client_context(ca: Ca | None) -> ssl.SSLContext:
    """A client that trusts ``ca`` only (None: the system's store, which does not know it)."""
    if ca is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(ca.cert_file))


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> int:
    """The serial of the certificate the server presented on this connection."""
    assert ssl_object is not None, "not a TLS connection"
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
