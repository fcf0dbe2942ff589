"""The shipped systemd unit and environment template stay valid and in step."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "device-gateway.service"
ENV_EXAMPLE = DEPLOY / "gateway.env.example"

# The configuration contract of PROTOCOL.md §4, copied rather than read: CI
# checks out this repository alone, without the shared spec folder next to it.
PROTOCOL_VARIABLES = frozenset(
    {
        "GATEWAY_DATABASE_URL",
        "GATEWAY_AUTO_MIGRATE",
        "GATEWAY_DATA_DIR",
        "GATEWAY_PUBLIC_HOST",
        "GATEWAY_PUBLIC_PORT",
        "GATEWAY_INTERNAL_HOST",
        "GATEWAY_INTERNAL_PORT",
        "GATEWAY_JWT_SECRET",
        "GATEWAY_JWT_ALGORITHMS",
        "GATEWAY_JWT_PUBLIC_KEY_FILE",
        "GATEWAY_JWT_AUDIENCE",
        "GATEWAY_JWT_ISSUER",
        "GATEWAY_JWT_REQUIRE_EXP",
        "GATEWAY_JWT_LEEWAY_S",
        "GATEWAY_INTERNAL_TOKENS",
        "GATEWAY_HEARTBEAT_S",
        "GATEWAY_HELLO_TIMEOUT_S",
        "GATEWAY_APP_PING",
        "GATEWAY_WS_COMPRESS",
        "GATEWAY_MAX_FRAME_BYTES",
        "GATEWAY_MAX_INFLIGHT_CALLS_PER_DEVICE",
        "GATEWAY_MAX_DEVICES_PER_USER",
        "GATEWAY_MAX_CONNECTIONS",
        "GATEWAY_BAD_FRAMES_PER_MINUTE",
        "GATEWAY_SHUTDOWN_TIMEOUT_S",
        "GATEWAY_INSTANCE_ID",
        "GATEWAY_RUN_RESUME_S",
        "GATEWAY_WORKERS",
        "GATEWAY_ADVERTISE_URL",
        "GATEWAY_INSTANCE_TTL_S",
        "GATEWAY_TLS_CERT_FILE",
        "GATEWAY_TLS_KEY_FILE",
        "GATEWAY_TRUSTED_PROXIES",
        "GATEWAY_LOG_LEVEL",
        "GATEWAY_LOG_FORMAT",
    }
)
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0

# Targets a unit depends on implicitly (DefaultDependencies=yes); verify loads
# them, so the scratch root must provide them.
_DEFAULT_DEPENDENCIES = ("sysinit.target", "basic.target", "shutdown.target")
_DEPENDENCY_KEYS = ("Wants", "Requires", "After", "Before", "WantedBy", "RequiredBy")

_TIMESPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Key → values of a unit file (all sections; keys here are unique across them)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _timespan_seconds(value: str) -> float:
    """A systemd time span ("20", "20s", "1min 30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    assert "".join(n + u for n, u in parts) == value.replace(" ", ""), f"not a time span: {value!r}"
    return sum(float(number) * _TIMESPAN_UNITS[unit] for number, unit in parts)


def _env_assignments(text: str) -> dict[str, str]:
    """Active (uncommented) KEY=value lines of an EnvironmentFile."""
    pairs = (line.partition("=") for line in text.splitlines())
    return {k.strip(): v for k, sep, v in pairs if sep and not k.lstrip().startswith(("#", ";"))}


def test_env_example_names_every_protocol_variable() -> None:
    named = set(re.findall(r"^[#;]?\s*(GATEWAY_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert sorted(PROTOCOL_VARIABLES - named) == [], "missing from gateway.env.example"
    # A misspelt name would be silently ignored by the gateway in production.
    assert sorted(named - PROTOCOL_VARIABLES) == [], "not in PROTOCOL.md §4"


def test_env_example_is_a_valid_environment_file() -> None:
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        # systemd takes everything after "=" literally: an unquoted space or a
        # trailing "# comment" would end up inside the value.
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*=\S+", line), f"line {number}: {line!r}"


def test_env_example_secrets_are_placeholders() -> None:
    active = _env_assignments(ENV_EXAMPLE.read_text())
    for name in ("GATEWAY_DATABASE_URL", "GATEWAY_JWT_SECRET", "GATEWAY_INTERNAL_TOKENS"):
        assert "REPLACE" in active[name], f"{name} must be an obvious placeholder"


def test_stop_timeout_exceeds_shutdown_drain() -> None:
    settings = _unit_settings(UNIT.read_text())
    (timeout_stop,) = settings["TimeoutStopSec"]
    drain = DEFAULT_SHUTDOWN_TIMEOUT_S
    # If the template ever sets a drain budget, that is the one deployed.
    configured = _env_assignments(ENV_EXAMPLE.read_text()).get("GATEWAY_SHUTDOWN_TIMEOUT_S")
    if configured is not None:
        drain = float(configured)
    assert _timespan_seconds(timeout_stop) > drain, (
        f"TimeoutStopSec={timeout_stop} must exceed the {drain:g} s drain (else SIGKILL mid-drain)"
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    settings = _unit_settings(text)

    # A scratch root, so verify neither needs /opt/device-gateway installed nor
    # depends on the host's units: the Exec* programs and every unit the
    # gateway names exist there as stubs.
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT.name).write_text(text)
    for key in ("ExecStart", "ExecReload"):  # each command's program, as a stub
        executable = settings[key][0].split()[0].lstrip("-@:+!")
        _stub_executable(root / executable.lstrip("/"))
    named = {u for key in _DEPENDENCY_KEYS for v in settings.get(key, []) for u in v.split()}
    for unit in named | set(_DEFAULT_DEPENDENCIES):
        (unit_dir / unit).write_text("[Unit]\nDescription=stub\n")

    # Control: a trivially valid unit in the same root. If that fails, verify
    # cannot work in this environment (old systemd without --root, sandbox),
    # which says nothing about our unit.
    _stub_executable(root / "probe")
    (unit_dir / "probe.service").write_text("[Service]\nType=oneshot\nExecStart=/probe\n")
    probe = _verify(tool, root, "probe.service")
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {probe.stdout.strip()!r}")
    environment_noise = set(probe.stdout.splitlines())

    result = _verify(tool, root, UNIT.name)
    # verify exits 0 on "Unknown key ..., ignoring" and similar: any output
    # that the control run did not also print is a finding.
    findings = [
        line
        for line in result.stdout.splitlines()
        if line.strip() and line not in environment_noise
    ]
    assert result.returncode == 0 and findings == [], result.stdout


def _stub_executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)


def _verify(tool: str, root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "verify", f"--root={root}", "--recursive-errors=no", unit],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
