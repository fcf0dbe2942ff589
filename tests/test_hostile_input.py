"""Hostile input from devices and callers (issue 11, items 5-11).

Each test plays the attacker against a real gateway (real PostgreSQL, real
sockets) or, where no socket is involved, against the unit that decides.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
from harness import JWT_SECRET, Harness, mint

from gateway.auth import AuthError, DeviceAuthenticator

MakeGateway = Callable[..., Awaitable[Harness]]


# ---------------------------------------------------------------- item 8: exp as a string


def _authenticator() -> DeviceAuthenticator:
    return DeviceAuthenticator(algorithms=("HS256",), secret=JWT_SECRET, public_key=None,
                               audience=None, issuer=None, require_exp=True, leeway_s=0)


@pytest.mark.parametrize("exp", ["9999999999", str(int(time.time()) + 3600), "1e10", True])
def test_a_token_whose_exp_is_not_a_number_is_refused(exp: object) -> None:
    """RFC 7519 §2: NumericDate is a JSON number. PyJWT reads "9999999999" as one,
    the expiry timer did not, so such a token never expired."""
    token = mint("user-1", exp=exp)
    with pytest.raises(AuthError):
        _authenticator().verify(token)


async def test_auth_refresh_with_a_string_exp_keeps_the_expiry(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(jwt_leeway_s=0)
    device = await gateway.device("user-1", "d1", token=mint("user-1", ttl_s=60))
    armed = next(iter(gateway.svc.registry)).expires_at
    assert armed is not None
    await device.send({"type": "auth_refresh",
                       "token": mint("user-1", exp=str(int(time.time()) + 7200))})
    error = await device.recv()
    assert (error["type"], error["code"]) == ("error", "auth_refresh_rejected"), error
    assert next(iter(gateway.svc.registry)).expires_at == armed
