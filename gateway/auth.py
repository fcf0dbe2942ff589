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

from gateway.config import ASYMMETRIC_ALGORITHMS, Settings

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

    def _key_for(self, algorithm: str) -> str:
        # Each algorithm family gets only its own key, so a public key can never
        # be used as an HMAC secret (the classic algorithm-confusion attack).
        key = self.public_key if algorithm in ASYMMETRIC_ALGORITHMS else self.secret
        if key is None:
            raise AuthError(f"algorithm {algorithm} is not configured")
        return key

    def verify(self, token: str) -> DeviceClaims:
        if not token:
            raise AuthError("missing token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise AuthError("token algorithm not allowed")
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
