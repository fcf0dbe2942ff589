"""Dev mode: secrets generated once into the data directory, and the start-up banner."""

from __future__ import annotations

import os
import secrets as token_source
import sys
from pathlib import Path
from typing import TextIO

import orjson

from gateway.auth import mint_device_token
from gateway.config import Secrets, Settings

SECRETS_FILE = "dev-secrets.json"
BANNER_TOKEN_TTL_S = 24 * 3600


def _load_or_create(data_dir: Path) -> dict[str, str]:
    path = data_dir / SECRETS_FILE
    if path.exists():
        stored = orjson.loads(path.read_bytes())
        if isinstance(stored, dict):
            return {str(k): str(v) for k, v in stored.items()}
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    generated = {
        "jwt_secret": token_source.token_urlsafe(32),
        "internal_token": token_source.token_urlsafe(32),
    }
    # Created 0600 from the start: the secret is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps(generated, option=orjson.OPT_INDENT_2))
    return generated


def resolve_secrets(settings: Settings) -> Secrets:
    """Configured secrets as given; in dev mode the missing ones come from the data dir."""
    jwt_secret = settings.jwt_secret
    tokens = settings.internal_tokens
    if settings.dev_mode and (
        (jwt_secret is None and settings.uses_symmetric_jwt) or not tokens
    ):
        generated = _load_or_create(settings.data_dir)
        if jwt_secret is None and settings.uses_symmetric_jwt:
            jwt_secret = generated["jwt_secret"]
        if not tokens:
            tokens = (generated["internal_token"],)
    return Secrets(jwt_secret=jwt_secret, internal_tokens=tokens)


def print_banner(
    settings: Settings, secrets: Secrets, *, public_port: int, internal_port: int,
    out: TextIO = sys.stderr,
) -> None:
    """Human-readable dev credentials, on stderr so stdout stays one JSON log per line."""
    host = "127.0.0.1" if settings.public_host in ("0.0.0.0", "::") else settings.public_host
    lines = ["", "Device gateway is running in dev mode (embedded PostgreSQL)."]
    if secrets.jwt_secret is not None:
        algorithm = next(a for a in settings.jwt_algorithms if a.startswith("HS"))
        token = mint_device_token(
            secret=secrets.jwt_secret, subject="dev-user", ttl_s=BANNER_TOKEN_TTL_S,
            algorithm=algorithm, audience=settings.jwt_audience, issuer=settings.jwt_issuer)
        lines += [
            f"  device token (user dev-user, 24 h): {token}",
            f"  WebSocket: ws://{host}:{public_port}/api/v1/ws/device?token={token}",
            "  simulator: python run_gateway.py device --device-id laptop-1",
        ]
    if secrets.internal_tokens:
        lines += [
            f"  service token: {secrets.internal_tokens[0]}",
            f"  curl -s -H 'Authorization: Bearer {secrets.internal_tokens[0]}' "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"user_id\": \"dev-user\", \"tool\": \"echo\", \"args\": {{\"hi\": 1}}}}' "
            f"http://{settings.internal_host}:{internal_port}/internal/v1/tool-calls",
        ]
    lines.append(f"  secrets: {settings.data_dir / SECRETS_FILE} (mode 0600)")
    lines.append("")
    print("\n".join(lines), file=out, flush=True)
