"""Settings: one frozen value built from environment variables and command-line flags.

This is the only module that reads the environment. Every option has one row
in ``OPTIONS``: its environment variable (PROTOCOL.md §4), the matching flag,
its parser and its default; ``--help`` and validation both come from there.
A bad value is a ``ConfigError`` whose message is one line an operator can act on.
It grows by one row per setting: the table is the one place each is described.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line for the operator."""


@attrs.frozen
class Settings:
    """Everything the gateway can be told. Built by ``load_settings``."""

    database_url: str | None = None
    data_dir: Path = Path(".gateway")
    public_host: str = "0.0.0.0"
    public_port: int = 8080
    internal_host: str = "127.0.0.1"
    internal_port: int = 8081
    jwt_secret: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key_file: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_require_exp: bool = True
    jwt_leeway_s: float = 30.0
    internal_tokens: tuple[str, ...] = ()
    heartbeat_s: float = 30.0
    hello_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    app_ping: bool = True
    ws_compress: bool = False
    max_frame_bytes: int = 4 * 1024 * 1024
    max_inflight_calls_per_device: int = 64
    max_devices_per_user: int = 32
    max_connections: int = 50_000
    max_hello_pending_per_user: int = 8
    bad_frames_per_minute: int = 30
    shutdown_timeout_s: float = 10.0
    instance_id: str = ""
    run_resume_s: float = 30.0
    # Several processes on one PostgreSQL (PROTOCOL.md §5).
    workers: int = 1
    advertise_url: str | None = None  # None: computed from the internal listener
    instance_ttl_s: float = 15.0
    # Beyond the contract, set by `serve --workers N` for each worker: an extra
    # internal listener of its own (0: an ephemeral port) that its siblings
    # reach it at, and SO_REUSEPORT on the shared listeners.
    peer_port: int | None = None
    reuse_port: bool = False
    parent_pid: int | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_level: str = "info"
    log_format: str | None = None  # None: json, or console when stdout is a terminal
    auto_migrate: bool = True
    # Tuning knobs beyond the contract (documented in the README).
    event_batch_max: int = 10_000
    event_queue_max: int = 20_000
    event_queue_max_bytes: int = 64 * 1024 * 1024
    subscriber_buffer: int = 1000
    retention_days: float = 30.0  # 0: keep every run
    # Handed to us by systemd; read here so no other module touches the environment.
    notify_socket: str | None = None
    watchdog_usec: str | None = None
    watchdog_pid: str | None = None

    @property
    def dev_mode(self) -> bool:
        """No database configured: embedded PostgreSQL and generated dev secrets."""
        return self.database_url is None

    @property
    def tls(self) -> bool:
        """The public listener speaks TLS (both files set; ``validate`` allows no half)."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def uses_symmetric_jwt(self) -> bool:
        return any(alg in SYMMETRIC_ALGORITHMS for alg in self.jwt_algorithms)


@attrs.frozen
class Secrets:
    """The secrets in force: configured, or generated for dev mode (``gateway.dev.devmode``)."""

    jwt_secret: str | None
    internal_tokens: tuple[str, ...]


SETTINGS = web.AppKey("settings", Settings)


# ---------------------------------------------------------------- parsers


def _text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be a port number 0-65535")
    return port


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def positive_seconds(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return number


def _retention_days(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number of days, 0 (keep everything) or more")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _algorithms(value: str) -> tuple[str, ...]:
    algorithms = _csv(value)
    if not algorithms:
        raise ValueError("must name at least one algorithm")
    known = SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
    for alg in algorithms:
        if alg not in known:
            raise ValueError(f"unknown algorithm {alg!r} (allowed: {', '.join(sorted(known))})")
    return algorithms


def _networks(value: str) -> tuple[IPNetwork, ...]:
    networks = []
    for part in _csv(value):
        try:
            # strict=False: 10.0.0.7/8 means 10.0.0.0/8, as operators tend to write it.
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or CIDR network") from None
    if not networks:
        raise ValueError("must name at least one address or network")
    return tuple(networks)


def _url(value: str) -> str:
    value = _text(value).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return lowered

    return parse


@attrs.frozen
class Option:
    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def described(self) -> str:
        """The help text with the default, taken from ``Settings`` (written once, there)."""
        default = DEFAULT_SHOWN.get(self.field)
        if default is None:
            value = attrs.fields_dict(Settings)[self.field].default
            if value is None or value == () or value == "":
                return self.help
            if isinstance(value, bool):
                default = str(value).lower()
            elif isinstance(value, float):
                default = f"{value:g}"
            elif isinstance(value, tuple):
                default = ",".join(str(v) for v in value)
            else:
                default = str(value)
        return f"{self.help} (default: {default})"


OPTIONS: tuple[Option, ...] = (
    Option("database_url", "GATEWAY_DATABASE_URL", _text,
           "PostgreSQL DSN; unset = embedded PostgreSQL in the data dir (dev mode)", secret=True),
    Option("data_dir", "GATEWAY_DATA_DIR", lambda v: Path(_text(v)),
           "embedded database and dev secrets"),
    Option("public_host", "GATEWAY_PUBLIC_HOST", _text, "device listener address"),
    Option("public_port", "GATEWAY_PUBLIC_PORT", _port, "device listener port"),
    Option("internal_host", "GATEWAY_INTERNAL_HOST", _text, "internal API address"),
    Option("internal_port", "GATEWAY_INTERNAL_PORT", _port, "internal API port"),
    Option("jwt_secret", "GATEWAY_JWT_SECRET", _text,
           "device JWT shared secret (HS*); required outside dev mode", secret=True),
    Option("jwt_algorithms", "GATEWAY_JWT_ALGORITHMS", _algorithms,
           "comma-separated allow-list"),
    Option("jwt_public_key_file", "GATEWAY_JWT_PUBLIC_KEY_FILE", lambda v: Path(_text(v)),
           "PEM public key for RS*/ES*/PS*/EdDSA tokens"),
    Option("jwt_audience", "GATEWAY_JWT_AUDIENCE", _text, "required aud claim"),
    Option("jwt_issuer", "GATEWAY_JWT_ISSUER", _text, "required iss claim"),
    Option("jwt_require_exp", "GATEWAY_JWT_REQUIRE_EXP", _bool, "tokens must carry exp"),
    Option("jwt_leeway_s", "GATEWAY_JWT_LEEWAY_S", _non_negative_float,
           "clock leeway for exp/nbf/iat, seconds"),
    Option("internal_tokens", "GATEWAY_INTERNAL_TOKENS", _csv,
           "comma-separated service tokens; required outside dev mode", secret=True),
    Option("heartbeat_s", "GATEWAY_HEARTBEAT_S", positive_seconds,
           "WebSocket heartbeat, seconds: a peer silent to pings is dropped within 1.5 x this"),
    Option("hello_timeout_s", "GATEWAY_HELLO_TIMEOUT_S", positive_seconds,
           "time allowed for device_hello, seconds"),
    Option("header_timeout_s", "GATEWAY_HEADER_TIMEOUT_S", positive_seconds,
           "time a new connection has to send its first request's headers, seconds "
           "(both listeners)"),
    Option("app_ping", "GATEWAY_APP_PING", _bool,
           "send legacy {type: ping} frames every heartbeat"),
    Option("ws_compress", "GATEWAY_WS_COMPRESS", _bool,
           "negotiate permessage-deflate (costs ~100 KB per device); the frame limit "
           "then applies to the inflated message"),
    Option("max_frame_bytes", "GATEWAY_MAX_FRAME_BYTES", positive_int,
           "largest frame accepted, bytes"),
    Option("max_inflight_calls_per_device", "GATEWAY_MAX_INFLIGHT_CALLS_PER_DEVICE",
           positive_int, "concurrent tool calls per device"),
    Option("max_devices_per_user", "GATEWAY_MAX_DEVICES_PER_USER", positive_int,
           "devices one user may hold"),
    Option("max_connections", "GATEWAY_MAX_CONNECTIONS", positive_int,
           "device sockets per process"),
    Option("max_hello_pending_per_user", "GATEWAY_MAX_HELLO_PENDING_PER_USER", positive_int,
           "sockets of one user upgraded but not yet past device_hello"),
    Option("bad_frames_per_minute", "GATEWAY_BAD_FRAMES_PER_MINUTE", positive_int,
           "bad frames tolerated per device per minute"),
    Option("shutdown_timeout_s", "GATEWAY_SHUTDOWN_TIMEOUT_S", positive_seconds,
           "drain budget on SIGTERM, seconds"),
    Option("instance_id", "GATEWAY_INSTANCE_ID", _text,
           "stable id of this process"),
    Option("run_resume_s", "GATEWAY_RUN_RESUME_S", _non_negative_float,
           "seconds a device has to reconnect and resume its running runs; 0 fails them at "
           "once"),
    Option("workers", "GATEWAY_WORKERS", positive_int,
           "gateway processes this command runs, sharing both ports (SO_REUSEPORT)"),
    Option("advertise_url", "GATEWAY_ADVERTISE_URL", _url,
           "URL of this process's internal API as other processes reach it"),
    Option("instance_ttl_s", "GATEWAY_INSTANCE_TTL_S", positive_seconds,
           "a process whose heartbeat is older than this is dead, seconds"),
    Option("peer_port", "GATEWAY_PEER_PORT", _port,
           "an extra internal listener only for sibling processes (set per worker)"),
    Option("reuse_port", "GATEWAY_REUSE_PORT", _bool,
           "bind the public and internal ports with SO_REUSEPORT (set per worker)"),
    Option("parent_pid", "GATEWAY_PARENT_PID", positive_int,
           "drain and exit when this process is gone (set per worker)"),
    Option("tls_cert_file", "GATEWAY_TLS_CERT_FILE", lambda v: Path(_text(v)),
           "PEM certificate chain: the public listener speaks TLS (re-read on SIGHUP)"),
    Option("tls_key_file", "GATEWAY_TLS_KEY_FILE", lambda v: Path(_text(v)),
           "PEM private key of GATEWAY_TLS_CERT_FILE"),
    Option("trusted_proxies", "GATEWAY_TRUSTED_PROXIES", _networks,
           "comma-separated addresses/CIDRs whose X-Forwarded-For/Forwarded is believed"),
    Option("log_level", "GATEWAY_LOG_LEVEL", _choice(*LOG_LEVELS), "debug|info|warning|error"),
    Option("log_format", "GATEWAY_LOG_FORMAT", _choice(*LOG_FORMATS),
           "json|console"),
    Option("auto_migrate", "GATEWAY_AUTO_MIGRATE", _bool, "apply migrations when serving"),
    Option("event_batch_max", "GATEWAY_EVENT_BATCH_MAX", positive_int,
           "events per database write at most"),
    Option("event_queue_max", "GATEWAY_EVENT_QUEUE_MAX", positive_int,
           "events waiting for the database before devices are paused"),
    Option("event_queue_max_bytes", "GATEWAY_EVENT_QUEUE_MAX_BYTES", positive_int,
           "bytes of events waiting for the database before devices are paused"),
    Option("subscriber_buffer", "GATEWAY_SUBSCRIBER_BUFFER", positive_int,
           "live events buffered per slow reader before it re-reads the database"),
    Option("retention_days", "GATEWAY_RETENTION_DAYS", _retention_days,
           "finished runs and their events are removed this many days after they end; "
           "0 keeps everything"),
)

# Defaults that ``Settings`` computes rather than states.
DEFAULT_SHOWN = {
    "instance_id": "<hostname>:<public port>",
    "log_format": "json; console on a terminal",
    "advertise_url": "http://<internal host>:<internal port>",
}

SYSTEMD_VARIABLES = {
    "notify_socket": "NOTIFY_SOCKET",
    "watchdog_usec": "WATCHDOG_USEC",
    "watchdog_pid": "WATCHDOG_PID",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; flags default to None so the environment shows through."""
    group = parser.add_argument_group("settings (each flag overrides its environment variable)")
    for option in OPTIONS:
        group.add_argument(
            option.flag,
            dest=option.field,
            default=None,
            metavar=option.env,
            help=option.described,
        )


def load_settings(
    environ: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
    *,
    hostname: Callable[[], str] = socket.gethostname,
) -> Settings:
    """Build and validate settings; flags win over the environment."""
    flags = flags or {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.field)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None or raw.strip() == "":
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if option.secret else repr(raw)
            raise ConfigError(f"{source}={shown}: {exc}") from None
    for field, variable in SYSTEMD_VARIABLES.items():
        if environ.get(variable):
            values[field] = environ[variable]
    settings = Settings(**values)
    if not settings.instance_id:
        settings = attrs.evolve(
            settings, instance_id=f"{hostname()}:{settings.public_port}"
        )
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Cross-field rules; raises ConfigError."""
    asymmetric = [a for a in settings.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS]
    if asymmetric and settings.jwt_public_key_file is None:
        raise ConfigError(
            f"GATEWAY_JWT_ALGORITHMS includes {asymmetric[0]}: set GATEWAY_JWT_PUBLIC_KEY_FILE"
        )
    if settings.jwt_public_key_file is not None and not settings.jwt_public_key_file.is_file():
        raise ConfigError(
            f"GATEWAY_JWT_PUBLIC_KEY_FILE={settings.jwt_public_key_file}: no such file"
        )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError(
            "GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE: set both (TLS) or neither (plain)"
        )
    for variable, path in (("GATEWAY_TLS_CERT_FILE", settings.tls_cert_file),
                           ("GATEWAY_TLS_KEY_FILE", settings.tls_key_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{variable}={path}: no such file")
    if not settings.dev_mode:
        if settings.uses_symmetric_jwt and settings.jwt_secret is None:
            raise ConfigError(
                "GATEWAY_JWT_SECRET is required when GATEWAY_DATABASE_URL is set"
            )
        if not settings.internal_tokens:
            raise ConfigError(
                "GATEWAY_INTERNAL_TOKENS is required when GATEWAY_DATABASE_URL is set"
            )
    if settings.jwt_secret is not None and len(settings.jwt_secret) < 16:
        raise ConfigError("GATEWAY_JWT_SECRET is too short: use at least 16 characters")
    if any(len(token) < 16 for token in settings.internal_tokens):
        raise ConfigError("GATEWAY_INTERNAL_TOKENS: each token needs at least 16 characters")
    if (
        settings.public_port != 0
        and settings.public_port == settings.internal_port
        and settings.public_host == settings.internal_host
    ):
        raise ConfigError("GATEWAY_PUBLIC_PORT and GATEWAY_INTERNAL_PORT must differ")


def flags_from_namespace(namespace: argparse.Namespace) -> dict[str, str | None]:
    """The settings flags given on the command line (None where absent)."""
    return {option.field: getattr(namespace, option.field, None) for option in OPTIONS}


def redacted_summary(settings: Settings) -> dict[str, Any]:
    """Settings safe to log at start-up: secrets shown only as set/unset."""
    summary: dict[str, Any] = {}
    secret_fields = {option.field for option in OPTIONS if option.secret}
    for field in attrs.fields(Settings):
        value = getattr(settings, field.name)
        if field.name in secret_fields:
            summary[field.name] = "set" if value else "unset"
        elif isinstance(value, Path):
            summary[field.name] = str(value)
        elif field.name == "trusted_proxies":
            summary[field.name] = [str(network) for network in value]
        else:
            summary[field.name] = value
    return summary


def describe(options: Sequence[Option] = OPTIONS) -> str:
    """The environment variables, for --help epilogues."""
    return "\n".join(f"  {o.env:<40} {o.described}" for o in options)
