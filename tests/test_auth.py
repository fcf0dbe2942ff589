"""Device JWT verification, service tokens (PROTOCOL.md §1.1, §2) and settings validation (§4).

Unit tests: no database, no sockets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import (
    AuthError,
    DeviceAuthenticator,
    ServiceTokens,
    bearer_token,
    hmac_key_shortfall,
)
from gateway.config import ConfigError, Settings, load_settings

SECRET = "unit-test-jwt-secret-" + "0123456789abcdef" * 3  # 64+ bytes: fine for HS512 too
TOKEN_A = "service-token-aaaaaaaaaaaaaaaa"
TOKEN_B = "service-token-bbbbbbbbbbbbbbbb"


# ---------------------------------------------------------------- helpers


def now() -> int:
    return int(time.time())


def claims(**overrides: Any) -> dict[str, Any]:
    """sub user-1, valid for an hour; a claim given as None is left out."""
    values: dict[str, Any] = {"sub": "user-1", "iat": now(), "exp": now() + 3600}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def hs256(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def authenticator(secret: str | None = SECRET, **settings: Any) -> DeviceAuthenticator:
    return DeviceAuthenticator.from_settings(Settings(**settings), secret=secret)


def refusal(auth: DeviceAuthenticator, token: str) -> str:
    """The reason ``token`` is refused (fails the test if it is accepted)."""
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    return str(info.value)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, HMAC-SHA256-signed with ``key`` (unsigned when None).

    PyJWT refuses to produce the malicious tokens we need (a PEM used as an
    HMAC secret, alg none variants), so we build them ourselves.
    """
    signing_input = (f"{b64url(json.dumps(header).encode())}."
                     f"{b64url(json.dumps(payload).encode())}")
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def rsa_public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(public_pem(rsa_key))
    return path


# ---------------------------------------------------------------- HS256


def test_valid_hs256_token_is_accepted() -> None:
    """A token signed with the shared secret yields the user id from sub."""
    verified = authenticator().verify(hs256(sub="user-42"))
    assert verified.user_id == "user-42"


def test_token_signed_with_another_secret_is_refused() -> None:
    reason = refusal(authenticator(), hs256(secret="some-other-secret-0123456789abcd"))
    assert "signature" in reason


@pytest.mark.parametrize("secret", [
    '{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}',
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
])
def test_a_secret_pyjwt_would_refuse_on_every_token_stops_the_start(secret: str) -> None:
    """The secret is checked once, at start-up: one clear line, not a refused fleet."""
    with pytest.raises(ConfigError, match="GATEWAY_JWT_SECRET"):
        authenticator(secret=secret)


def test_every_allowed_hmac_algorithm_verifies_with_the_once_checked_secret() -> None:
    auth = authenticator(jwt_algorithms=("HS256", "HS384", "HS512"))
    for alg in ("HS256", "HS384", "HS512"):
        token = jwt.encode(claims(sub=f"user-{alg}"), SECRET, algorithm=alg)
        assert auth.verify(token).user_id == f"user-{alg}"
        assert "signature" in refusal(auth, jwt.encode(claims(), SECRET + "x", algorithm=alg))


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9"])
def test_malformed_tokens_are_refused(token: str) -> None:
    assert refusal(authenticator(), token)


# ---------------------------------------------------------------- algorithms


def test_alg_none_is_refused() -> None:
    """An unsigned token (alg none, any spelling) is never accepted."""
    auth = authenticator()
    pyjwt_none = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    assert "not allowed" in refusal(auth, pyjwt_none)
    for alg in ("none", "None", "NONE", "nOnE"):
        token = handmade_token({"alg": alg, "typ": "JWT"}, claims(), key=None)
        assert refusal(auth, token), alg


def test_algorithm_outside_the_allow_list_is_refused() -> None:
    """HS512 with the right secret is still refused when only HS256 is allowed (and vice versa)."""
    hs512 = jwt.encode(claims(), SECRET, algorithm="HS512")
    assert "not allowed" in refusal(authenticator(), hs512)
    only_hs384 = authenticator(jwt_algorithms=("HS384",))
    assert "not allowed" in refusal(only_hs384, hs256())


def test_token_without_alg_header_is_refused() -> None:
    token = handmade_token({"typ": "JWT"}, claims(), key=SECRET.encode())
    assert refusal(authenticator(), token)


def test_rs256_token_is_accepted_with_the_public_key_file(
    rsa_key: rsa.RSAPrivateKey, rsa_public_key_file: Path
) -> None:
    """RS256 with GATEWAY_JWT_PUBLIC_KEY_FILE: tokens from the private key's holder pass."""
    auth = authenticator(secret=None, jwt_algorithms=("RS256",),
                         jwt_public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(sub="rsa-user"), private_pem(rsa_key), algorithm="RS256")
    assert auth.verify(token).user_id == "rsa-user"


def test_rs256_token_from_another_key_is_refused(rsa_public_key_file: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = authenticator(secret=None, jwt_algorithms=("RS256",),
                         jwt_public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(), private_pem(other), algorithm="RS256")
    assert "signature" in refusal(auth, token)


def test_hs256_token_is_refused_when_only_rs256_is_allowed(rsa_public_key_file: Path) -> None:
    auth = authenticator(jwt_algorithms=("RS256",), jwt_public_key_file=rsa_public_key_file)
    assert "not allowed" in refusal(auth, hs256())


def test_public_key_used_as_hmac_secret_is_refused(rsa_public_key_file: Path) -> None:
    """Algorithm confusion: with HS256 and RS256 both allowed, an HS256 token whose HMAC key is
    the (public!) RSA key PEM is refused."""
    pem = rsa_public_key_file.read_bytes()
    auth = authenticator(jwt_algorithms=("HS256", "RS256"),
                         jwt_public_key_file=rsa_public_key_file)
    header = {"alg": "HS256", "typ": "JWT"}
    # Control: the hand-made signing is right, so the refusal below is about the key.
    assert auth.verify(handmade_token(header, claims(), SECRET.encode())).user_id == "user-1"
    for key in (pem, pem.strip(), pem.decode().rstrip("\n").encode()):
        assert refusal(auth, handmade_token(header, claims(), key))


def test_public_key_as_hmac_secret_is_refused_without_a_shared_secret(
    rsa_public_key_file: Path,
) -> None:
    """With HS256 allowed but no secret configured, no HS256 token is accepted at all."""
    pem = rsa_public_key_file.read_bytes()
    auth = authenticator(secret=None, jwt_algorithms=("RS256", "HS256"),
                         jwt_public_key_file=rsa_public_key_file)
    assert refusal(auth, handmade_token({"alg": "HS256"}, claims(), pem))


def test_es256_token_is_accepted(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "ec-public.pem"
    path.write_bytes(public_pem(ec_key))
    auth = authenticator(secret=None, jwt_algorithms=("ES256",), jwt_public_key_file=path)
    token = jwt.encode(claims(sub="ec-user"), private_pem(ec_key), algorithm="ES256")
    assert auth.verify(token).user_id == "ec-user"
    forged = jwt.encode(claims(sub="ec-user"),
                        private_pem(ec.generate_private_key(ec.SECP256R1())), algorithm="ES256")
    assert refusal(auth, forged)


# ---------------------------------------------------------------- aud / iss


def test_audience_is_checked_when_configured() -> None:
    auth = authenticator(jwt_audience="device-gateway")
    assert auth.verify(hs256(aud="device-gateway")).user_id == "user-1"
    assert auth.verify(hs256(aud=["billing", "device-gateway"])).user_id == "user-1"
    assert "audience" in refusal(auth, hs256(aud="billing"))
    assert "aud" in refusal(auth, hs256())  # missing


def test_audience_is_not_checked_when_not_configured() -> None:
    assert authenticator().verify(hs256(aud="anything")).user_id == "user-1"


def test_issuer_is_checked_when_configured() -> None:
    auth = authenticator(jwt_issuer="https://login.example")
    assert auth.verify(hs256(iss="https://login.example")).user_id == "user-1"
    assert "issuer" in refusal(auth, hs256(iss="https://evil.example"))
    assert "iss" in refusal(auth, hs256())  # missing


def test_issuer_is_not_checked_when_not_configured() -> None:
    assert authenticator().verify(hs256(iss="whoever")).user_id == "user-1"


# ---------------------------------------------------------------- exp, leeway, sub


def test_exp_is_required_by_default() -> None:
    assert "exp" in refusal(authenticator(), hs256(exp=None))


def test_exp_can_be_made_optional() -> None:
    """GATEWAY_JWT_REQUIRE_EXP=false: a token without exp is accepted and never expires."""
    verified = authenticator(jwt_require_exp=False).verify(hs256(exp=None))
    assert verified.user_id == "user-1"
    assert verified.expires_at is None


def test_expired_token_is_refused_even_when_exp_is_optional() -> None:
    auth = authenticator(jwt_require_exp=False, jwt_leeway_s=0)
    assert "expired" in refusal(auth, hs256(exp=now() - 10))


def test_leeway_is_honoured() -> None:
    """exp 10 s ago passes with the default 30 s leeway; 60 s ago does not; none with leeway 0."""
    assert authenticator().verify(hs256(exp=now() - 10)).user_id == "user-1"
    assert "expired" in refusal(authenticator(), hs256(exp=now() - 60))
    assert "expired" in refusal(authenticator(jwt_leeway_s=0), hs256(exp=now() - 2))


def test_not_yet_valid_token_is_refused() -> None:
    assert refusal(authenticator(jwt_leeway_s=0), hs256(nbf=now() + 600))


@pytest.mark.parametrize("leeway", [0.0, 30.0, 5.5])
def test_expires_at_is_exp_plus_leeway(leeway: float) -> None:
    """The connection closes at exp + leeway, so that is what expires_at says."""
    exp = now() + 600
    verified = authenticator(jwt_leeway_s=leeway).verify(hs256(exp=exp))
    assert verified.expires_at == exp + leeway


@pytest.mark.parametrize("sub", [None, "", "   ", 42, ["user-1"], {"id": "user-1"}, True],
                         ids=["missing", "empty", "blank", "int", "list", "object", "bool"])
def test_sub_must_be_a_non_empty_string(sub: Any) -> None:
    token = jwt.encode({**claims(), "sub": sub} if sub is not None else claims(sub=None),
                       SECRET, algorithm="HS256")
    assert refusal(authenticator(), token)


def test_refusal_reasons_never_contain_the_token(
    rsa_key: rsa.RSAPrivateKey, rsa_public_key_file: Path
) -> None:
    """Error messages are logged and sent to devices: no token, nor any part of one."""
    hs = authenticator(jwt_audience="gw", jwt_issuer="iss", jwt_leeway_s=0)
    rs = authenticator(jwt_algorithms=("HS256", "RS256"), jwt_public_key_file=rsa_public_key_file)
    cases = [
        (hs, hs256(secret="wrong-secret-0123456789abcdefghij", aud="gw", iss="iss")),
        (hs, hs256(aud="other", iss="iss")),
        (hs, hs256(aud="gw", iss="other")),
        (hs, hs256(aud="gw", iss="iss", exp=now() - 100)),
        (hs, hs256(aud="gw", iss="iss", exp=None)),
        (hs, hs256(aud="gw", iss="iss", sub="")),
        (hs, hs256(aud="gw", iss="iss", nbf=now() + 600)),
        (hs, jwt.encode(claims(), SECRET, algorithm="HS512")),
        (hs, handmade_token({"alg": "none"}, claims(), None)),
        (hs, hs256(aud="gw", iss="iss")[:-3]),
        (hs, "garbage-token-value-that-is-not-a-jwt"),
        (rs, handmade_token({"alg": "HS256"}, claims(), rsa_public_key_file.read_bytes())),
        (rs, jwt.encode(claims(), private_pem(rsa.generate_private_key(65537, 2048)),
                        algorithm="RS256")),
    ]
    for auth, token in cases:
        reason = refusal(auth, token)
        assert token not in reason, reason
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in reason, reason


# ---------------------------------------------------------------- service tokens


def test_service_tokens_accept_every_configured_token() -> None:
    tokens = ServiceTokens.of([TOKEN_A, TOKEN_B])
    assert tokens.accepts(TOKEN_A)
    assert tokens.accepts(TOKEN_B)


@pytest.mark.parametrize("presented", ["", TOKEN_A[:-1], TOKEN_A + "a", TOKEN_A.upper(),
                                       f" {TOKEN_A}", "service-token", TOKEN_A + TOKEN_B])
def test_service_tokens_refuse_anything_else(presented: str) -> None:
    assert not ServiceTokens.of([TOKEN_A, TOKEN_B]).accepts(presented)


def test_no_configured_service_tokens_accept_nothing() -> None:
    tokens = ServiceTokens.of([])
    assert not tokens.accepts("")
    assert not tokens.accepts(TOKEN_A)


@pytest.mark.parametrize(("header", "expected"), [
    (f"Bearer {TOKEN_A}", TOKEN_A),
    (f"bearer {TOKEN_A}", TOKEN_A),
    (f"BEARER {TOKEN_A}", TOKEN_A),
    (f"Bearer  {TOKEN_A} ", TOKEN_A),
    (None, None),
    ("", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer    ", None),
    (f"Basic {TOKEN_A}", None),
    (f"Token {TOKEN_A}", None),
    (TOKEN_A, None),
    (f"Bearer{TOKEN_A}", None),
])
def test_bearer_token_reads_only_the_bearer_scheme(header: str | None,
                                                   expected: str | None) -> None:
    assert bearer_token(header) == expected


# ---------------------------------------------------------------- settings


PRODUCTION = {
    "GATEWAY_DATABASE_URL": "postgresql://gw:db-password-s3cr3t@db.internal/gateway",
    "GATEWAY_JWT_SECRET": SECRET,
    "GATEWAY_INTERNAL_TOKENS": f"{TOKEN_A},{TOKEN_B}",
}


def config_error(environ: dict[str, str], flags: dict[str, str | None] | None = None) -> str:
    """The ConfigError message for these settings; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ, flags, hostname=lambda: "host")
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def test_dev_mode_needs_no_secret_or_tokens() -> None:
    """Without GATEWAY_DATABASE_URL nothing is required: dev mode generates the secrets."""
    settings = load_settings({}, hostname=lambda: "host")
    assert settings.dev_mode
    assert settings.jwt_secret is None and settings.internal_tokens == ()


def test_production_settings_are_read_from_the_environment() -> None:
    settings = load_settings({**PRODUCTION, "GATEWAY_JWT_LEEWAY_S": "5",
                              "GATEWAY_JWT_ALGORITHMS": "HS256, HS512"}, hostname=lambda: "h")
    assert not settings.dev_mode
    assert settings.jwt_secret == SECRET
    assert settings.internal_tokens == (TOKEN_A, TOKEN_B)
    assert settings.jwt_leeway_s == 5.0
    assert settings.jwt_algorithms == ("HS256", "HS512")


@pytest.mark.parametrize(("variable", "value"), [
    ("GATEWAY_PUBLIC_PORT", "eighty"),
    ("GATEWAY_PUBLIC_PORT", "70000"),
    ("GATEWAY_INTERNAL_PORT", "-1"),
    ("GATEWAY_INTERNAL_PORT", "8081.5"),
])
def test_bad_port_is_a_one_line_error_naming_the_variable(variable: str, value: str) -> None:
    message = config_error({variable: value})
    assert variable in message and value in message, message


@pytest.mark.parametrize("value", ["HS256,XS999", "none", "HS256,none", "rs256", ","])
def test_unknown_algorithm_is_refused(value: str) -> None:
    """Only known algorithms may be configured; in particular never alg none."""
    message = config_error({"GATEWAY_JWT_ALGORITHMS": value})
    assert "GATEWAY_JWT_ALGORITHMS" in message, message


def test_asymmetric_algorithm_without_key_file_is_refused() -> None:
    message = config_error({"GATEWAY_JWT_ALGORITHMS": "RS256"})
    assert "GATEWAY_JWT_PUBLIC_KEY_FILE" in message, message


def test_missing_public_key_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    message = config_error({"GATEWAY_JWT_ALGORITHMS": "ES256",
                            "GATEWAY_JWT_PUBLIC_KEY_FILE": str(missing)})
    assert "GATEWAY_JWT_PUBLIC_KEY_FILE" in message and str(missing) in message, message


def test_rs256_settings_load_and_verify(rsa_key: rsa.RSAPrivateKey,
                                        rsa_public_key_file: Path) -> None:
    """From the environment to a working verifier: RS256 needs no shared secret."""
    environ = {**PRODUCTION, "GATEWAY_JWT_ALGORITHMS": "RS256",
               "GATEWAY_JWT_PUBLIC_KEY_FILE": str(rsa_public_key_file)}
    del environ["GATEWAY_JWT_SECRET"]
    settings = load_settings(environ, hostname=lambda: "h")
    auth = DeviceAuthenticator.from_settings(settings, secret=settings.jwt_secret)
    token = jwt.encode(claims(), private_pem(rsa_key), algorithm="RS256")
    assert auth.verify(token).user_id == "user-1"


@pytest.mark.parametrize("missing", ["GATEWAY_JWT_SECRET", "GATEWAY_INTERNAL_TOKENS"])
def test_database_url_requires_secret_and_tokens(missing: str) -> None:
    environ = {k: v for k, v in PRODUCTION.items() if k != missing}
    message = config_error(environ)
    assert missing in message, message
    assert "db-password-s3cr3t" not in message, message


@pytest.mark.parametrize(("variable", "value"), [
    ("GATEWAY_JWT_SECRET", "hunter2-short"),
    ("GATEWAY_INTERNAL_TOKENS", f"{TOKEN_A},tok-too-short"),
])
def test_bad_secret_values_are_not_shown_in_the_error(variable: str, value: str) -> None:
    message = config_error({**PRODUCTION, variable: value})
    assert variable in message, message
    for secret in [*value.split(","), "db-password-s3cr3t", SECRET]:
        assert secret not in message, message


def test_other_errors_do_not_show_secrets() -> None:
    message = config_error({**PRODUCTION, "GATEWAY_PUBLIC_PORT": "x"})
    for secret in ("db-password-s3cr3t", SECRET, TOKEN_A, TOKEN_B):
        assert secret not in message, message


@pytest.mark.parametrize(("variable", "value"), [
    ("GATEWAY_JWT_REQUIRE_EXP", "maybe"),
    ("GATEWAY_JWT_LEEWAY_S", "-1"),
    ("GATEWAY_HEARTBEAT_S", "0"),
    ("GATEWAY_MAX_FRAME_BYTES", "0"),
    ("GATEWAY_LOG_LEVEL", "loud"),
])
def test_other_bad_values_name_their_variable(variable: str, value: str) -> None:
    assert variable in config_error({variable: value})


def test_flags_override_the_environment() -> None:
    settings = load_settings({"GATEWAY_PUBLIC_PORT": "8000", "GATEWAY_JWT_LEEWAY_S": "5"},
                             {"public_port": "9000", "jwt_leeway_s": None},
                             hostname=lambda: "h")
    assert settings.public_port == 9000
    assert settings.jwt_leeway_s == 5.0  # a flag left unset lets the environment show through


def test_bad_flag_value_names_the_flag() -> None:
    message = config_error({"GATEWAY_PUBLIC_PORT": "8000"}, {"public_port": "nine"})
    assert "--public-port" in message, message


def test_instance_id_defaults_to_hostname_and_public_port() -> None:
    assert load_settings({}, hostname=lambda: "gw-7").instance_id == "gw-7:8080"
    assert load_settings({"GATEWAY_PUBLIC_PORT": "9443"},
                         hostname=lambda: "gw-7").instance_id == "gw-7:9443"
    assert load_settings({}, {"public_port": "7000"},
                         hostname=lambda: "gw-7").instance_id == "gw-7:7000"


def test_configured_instance_id_is_used_as_given() -> None:
    settings = load_settings({"GATEWAY_INSTANCE_ID": "blue-1"}, hostname=lambda: "gw-7")
    assert settings.instance_id == "blue-1"


@pytest.mark.parametrize(("secret", "algorithms", "wanted"), [
    ("s" * 32, ("HS256",), None),
    ("s" * 31, ("HS256",), 32),
    ("s" * 40, ("HS256", "HS512"), 64),
    ("s" * 64, ("HS512",), None),
    ("é" * 16, ("HS256",), None),  # bytes count, not characters: 32 bytes
    ("s" * 16, ("RS256",), None),  # no HMAC in use
    (None, ("HS256",), None),
])
def test_hmac_key_shortfall_follows_rfc_7518(secret: str | None, algorithms: tuple[str, ...],
                                             wanted: int | None) -> None:
    assert hmac_key_shortfall(secret, algorithms) == wanted
