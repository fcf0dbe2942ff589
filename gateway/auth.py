"""Device JWT verification (PyJWT) and service-token checks.

Errors carry a reason safe to show a client and to log; no message ever
contains the token itself.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from typing import Any

import attrs
import jwt
from aiohttp import web
from jwt.algorithms import HMACAlgorithm

from gateway.config import ASYMMETRIC_ALGORITHMS, ConfigError, Settings

# RFC 7518 §3.2: an HMAC key at least as long as the hash's output.
HMAC_KEY_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def hmac_key_shortfall(secret: str | None, algorithms: Iterable[str]) -> int | None:
    """The key length RFC 7518 asks of ``secret`` for these algorithms, if it is shorter.

    Not refused: the devices in the field hold tokens signed with the secret
    they have, so a short one is a start-up warning, not an error.
    """
    if secret is None:
        return None
    wanted = max((HMAC_KEY_MIN_BYTES.get(a, 0) for a in algorithms), default=0)
    return wanted if len(secret.encode()) < wanted else None


class AuthError(Exception):
    """The token was refused; ``str(exc)`` is a short, token-free reason."""


class _CheckedOnceHMAC(HMACAlgorithm):
    """HMAC whose secret was checked once, when the gateway started.

    PyJWT's ``prepare_key`` checks an HMAC secret on every verify (not PEM,
    SSH or DER, not a JWK: regexes and a JSON parse), which was a third of a
    hello's token cost in a reconnect storm. The secret is fixed for the
    process; any other key still gets PyJWT's whole check.
    """

    def __init__(self, hash_alg: Any, secret: bytes) -> None:
        super().__init__(hash_alg)
        self.secret = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self.secret:
            return self.secret
        return super().prepare_key(key)


def _hmac_key(algorithm: str, secret: str) -> jwt.PyJWK:
    """``secret`` as a key bound to ``algorithm``, its check already done."""
    key = jwt.PyJWK({"kty": "oct", "k": jwt.utils.base64url_encode(secret.encode()).decode()},
                    algorithm=algorithm)
    pyjwts = key.Algorithm  # PyJWT's own algorithm for this name: its hash (HS256: SHA-256, …)
    assert isinstance(pyjwts, HMACAlgorithm), algorithm
    try:
        checked = _CheckedOnceHMAC(pyjwts.hash_alg, key.key)
    except jwt.InvalidKeyError as exc:
        raise ConfigError(f"GATEWAY_JWT_SECRET cannot be an HMAC secret: {exc}") from None
    key.Algorithm, key.key = checked, checked.secret
    return key


@attrs.frozen
class DeviceClaims:
    """What the gateway keeps of a verified device token."""

    user_id: str
    expires_at: float | None  # unix time of `exp`, None when the token has none


@attrs.frozen
class DeviceAuthenticator:
    """Verifies device JWTs against the configured keys and allow-list."""

    algorithms: tuple[str, ...]
    secret: str | None
    public_key: str | None
    audience: str | None
    issuer: str | None
    require_exp: bool
    leeway_s: float
    _hmac_keys: dict[str, jwt.PyJWK] = attrs.field(init=False, repr=False)

    @_hmac_keys.default
    def _prepare_hmac_keys(self) -> dict[str, jwt.PyJWK]:
        if self.secret is None:
            return {}
        return {a: _hmac_key(a, self.secret) for a in self.algorithms if a in HMAC_KEY_MIN_BYTES}

    @classmethod
    def from_settings(cls, settings: Settings, *, secret: str | None) -> DeviceAuthenticator:
        public_key = None
        if settings.jwt_public_key_file is not None:
            public_key = settings.jwt_public_key_file.read_text()
        return cls(
            algorithms=settings.jwt_algorithms,
            secret=secret,
            public_key=public_key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            require_exp=settings.jwt_require_exp,
            leeway_s=settings.jwt_leeway_s,
        )

    def _key_for(self, algorithm: str) -> str | jwt.PyJWK:
        # Each algorithm family gets only its own key, so a public key can never
        # be used as an HMAC secret (the classic algorithm-confusion attack).
        key: str | jwt.PyJWK | None
        if algorithm in ASYMMETRIC_ALGORITHMS:
            key = self.public_key
        else:
            key = self._hmac_keys.get(algorithm)
        if key is None:
            raise AuthError(f"algorithm {algorithm} is not configured")
        return key

    def verify(self, token: str) -> DeviceClaims:
        if not token:
            raise AuthError("missing token")
        if len(self.algorithms) == 1:
            # One algorithm allowed: its key is known without reading the header
            # first (decode refuses any other alg as InvalidAlgorithmError).
            algorithm = self.algorithms[0]
        else:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                raise AuthError("malformed token") from None
            named = header.get("alg")
            if not isinstance(named, str) or named not in self.algorithms:
                raise AuthError("token algorithm not allowed")
            algorithm = named
        required = ["sub", "exp"] if self.require_exp else ["sub"]
        options: Any = {"require": required, "verify_aud": self.audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key_for(algorithm),
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.PyJWTError:
            raise AuthError("token invalid") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError("token sub must be a non-empty string")
        exp = claims.get("exp")
        if exp is None:
            return DeviceClaims(user_id=subject, expires_at=None)
        # RFC 7519 §2: a NumericDate is a JSON number. PyJWT also takes "9999999999"
        # (and true), which the expiry timer would then never fire for.
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError("token exp must be a number")
        return DeviceClaims(user_id=subject, expires_at=float(exp) + self.leeway_s)


def mint_device_token(
    *, secret: str, subject: str, ttl_s: float, algorithm: str = "HS256",
    audience: str | None = None, issuer: str | None = None,
) -> str:
    """A device JWT signed with the shared secret (dev mode, tests, the simulator)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl_s)}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)


@attrs.frozen
class ServiceTokens:
    """Accepted bearer tokens of sibling services (several, for rotation)."""

    tokens: tuple[bytes, ...]

    @classmethod
    def of(cls, tokens: Iterable[str]) -> ServiceTokens:
        return cls(tuple(token.encode() for token in tokens))

    def accepts(self, presented: str) -> bool:
        candidate = presented.encode()
        # Compare against every token, so timing reveals neither which one
        # matched nor how many there are.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


AUTHENTICATOR = web.AppKey("device_authenticator", DeviceAuthenticator)
