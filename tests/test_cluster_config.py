"""The §5 settings, and what ``serve --workers N`` hands each worker."""

from __future__ import annotations

import pytest

from gateway.app import advertise_url
from gateway.cluster.workers import check, worker_environment
from gateway.config import ConfigError, Secrets, load_settings

BASE = {"GATEWAY_DATABASE_URL": "postgresql://db/x", "GATEWAY_JWT_SECRET": "s" * 32,
        "GATEWAY_INTERNAL_TOKENS": "t" * 20}


def settings(**env: str) -> object:
    return load_settings({**BASE, **env}, hostname=lambda: "host")


def test_defaults() -> None:
    s = load_settings(BASE, hostname=lambda: "host")
    assert (s.workers, s.advertise_url, s.instance_ttl_s) == (1, None, 15.0)


@pytest.mark.parametrize(("variable", "value"), [
    ("GATEWAY_WORKERS", "0"), ("GATEWAY_WORKERS", "two"),
    ("GATEWAY_INSTANCE_TTL_S", "0"), ("GATEWAY_INSTANCE_TTL_S", "-1"),
    ("GATEWAY_ADVERTISE_URL", "10.0.0.7:8081"), ("GATEWAY_ADVERTISE_URL", "ftp://x"),
])
def test_bad_values_are_one_line_errors(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        settings(**{variable: value})


def test_advertise_url_is_kept_without_its_trailing_slash() -> None:
    s = load_settings({**BASE, "GATEWAY_ADVERTISE_URL": "http://gw-3.internal:8081/"})
    assert s.advertise_url == "http://gw-3.internal:8081"


def test_default_advertise_url_names_the_host_for_a_wildcard_listener() -> None:
    assert advertise_url("127.0.0.1", 8081) == "http://127.0.0.1:8081"
    assert advertise_url("0.0.0.0", 8081).endswith(":8081")
    assert "0.0.0.0" not in advertise_url("0.0.0.0", 8081)
    assert advertise_url("::1", 9) == "http://[::1]:9"


def test_workers_need_fixed_ports() -> None:
    s = load_settings({**BASE, "GATEWAY_WORKERS": "2", "GATEWAY_PUBLIC_PORT": "0"})
    with pytest.raises(ConfigError, match="fixed"):
        check(s)
    check(load_settings({**BASE, "GATEWAY_WORKERS": "2"}))


def test_each_worker_gets_its_identity_the_database_and_no_systemd_variables() -> None:
    s = load_settings({**BASE, "GATEWAY_INSTANCE_ID": "gw", "GATEWAY_WORKERS": "2",
                       "GATEWAY_ADVERTISE_URL": "http://x:1"})
    env = worker_environment(
        {"PATH": "/bin", "WATCHDOG_USEC": "1", "NOTIFY_SOCKET": "/run/systemd/notify",
         "GATEWAY_ADVERTISE_URL": "http://x:1"},
        s, Secrets("j" * 32, ("a" * 20, "b" * 20)), "postgresql://embedded/db",
        {"public_port": "9000", "workers": "2"}, number=2, notify_socket="/tmp/w.sock")
    assert env["GATEWAY_INSTANCE_ID"] == "gw/2"
    assert env["GATEWAY_WORKERS"] == "1"
    assert env["GATEWAY_PUBLIC_PORT"] == "9000"  # a flag given to the parent
    assert env["GATEWAY_DATABASE_URL"] == "postgresql://embedded/db"
    assert env["GATEWAY_INTERNAL_TOKENS"] == "a" * 20 + "," + "b" * 20
    assert env["NOTIFY_SOCKET"] == "/tmp/w.sock"
    assert "WATCHDOG_USEC" not in env and "GATEWAY_ADVERTISE_URL" not in env
    assert (env["GATEWAY_REUSE_PORT"], env["GATEWAY_PEER_PORT"]) == ("true", "0")
