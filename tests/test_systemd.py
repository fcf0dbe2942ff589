"""sd_notify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from gateway.systemd import SystemdNotifier

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="sd_notify needs unix domain sockets"
)


@pytest.fixture
def notifier(listener: tuple[socket.socket, str]) -> Iterator[SystemdNotifier]:
    n = SystemdNotifier(listener[1])
    yield n
    n.close()


def test_ready_with_status(listener: tuple[socket.socket, str], notifier: SystemdNotifier) -> None:
    notifier.ready(status="serving on :8080 and :8081")
    assert listener[0].recv(4096) == b"READY=1\nSTATUS=serving on :8080 and :8081"


def test_ready_without_status(
    listener: tuple[socket.socket, str], notifier: SystemdNotifier
) -> None:
    notifier.ready()
    assert listener[0].recv(4096) == b"READY=1"


def test_stopping(listener: tuple[socket.socket, str], notifier: SystemdNotifier) -> None:
    notifier.stopping()
    notifier.stopping(status="draining 3 devices")
    assert listener[0].recv(4096) == b"STOPPING=1"
    assert listener[0].recv(4096) == b"STOPPING=1\nSTATUS=draining 3 devices"


def test_watchdog(listener: tuple[socket.socket, str], notifier: SystemdNotifier) -> None:
    notifier.watchdog()
    notifier.watchdog()
    assert listener[0].recv(4096) == b"WATCHDOG=1"
    assert listener[0].recv(4096) == b"WATCHDOG=1"


def test_status_cannot_inject_assignments(
    listener: tuple[socket.socket, str], notifier: SystemdNotifier
) -> None:
    notifier.status("device said\nREADY=1")
    assert listener[0].recv(4096) == b"STATUS=device said READY=1"


def test_notify_sends_lines_as_one_datagram(
    listener: tuple[socket.socket, str], notifier: SystemdNotifier
) -> None:
    notifier.notify("STATUS=migrating", "EXTEND_TIMEOUT_USEC=60000000")
    assert listener[0].recv(4096) == b"STATUS=migrating\nEXTEND_TIMEOUT_USEC=60000000"


def test_close_then_notify_again(
    listener: tuple[socket.socket, str], notifier: SystemdNotifier
) -> None:
    notifier.watchdog()
    notifier.close()
    notifier.close()
    notifier.stopping()
    assert listener[0].recv(4096) == b"WATCHDOG=1"
    assert listener[0].recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_namespace() -> None:
    name = f"device-gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        notifier = SystemdNotifier("@" + name)
        try:
            notifier.ready(status="up")
            notifier.watchdog()
        finally:
            notifier.close()
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("socket_path", [None, ""])
def test_not_under_systemd_is_a_no_op(socket_path: str | None) -> None:
    notifier = SystemdNotifier(socket_path)
    with structlog.testing.capture_logs() as logs:
        notifier.ready(status="up")
        notifier.watchdog()
        notifier.status("x")
        notifier.stopping()
        notifier.close()
    assert logs == []


def test_missing_socket_does_not_raise_and_warns_once(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"))
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    assert [(e["event"], e["log_level"], e["kind"]) for e in logs] == [
        ("systemd_notify_failed", "warning", "ENOENT")
    ]


def test_socket_nobody_listens_on_does_not_raise(tmp_path: Path) -> None:
    # systemd gone but its socket file left behind: ECONNREFUSED, not ENOENT.
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    notifier = SystemdNotifier(str(path))
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.ready()
    notifier.close()
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]


def test_unsupported_address_does_not_raise() -> None:
    notifier = SystemdNotifier("vsock:2:1234")
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
    assert [(e["event"], e["kind"]) for e in logs] == [
        ("systemd_notify_failed", "unsupported_address")
    ]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        pytest.param(None, None, None, id="unset"),
        pytest.param("", None, None, id="empty"),
        pytest.param("30000000", None, 15.0, id="30s-no-pid"),
        pytest.param("30000000", "", 15.0, id="30s-empty-pid"),
        pytest.param("30000000", "4242", 15.0, id="30s-our-pid"),
        pytest.param("30000000", "4243", None, id="pid-mismatch"),
        pytest.param("30000000", "not-a-pid", None, id="pid-garbage"),
        pytest.param("0", None, None, id="zero"),
        pytest.param("thirty", None, None, id="garbage"),
        pytest.param("-30000000", None, None, id="negative"),
        pytest.param("30s", None, None, id="with-unit"),
        pytest.param("1500000", "4242", 0.75, id="fractional"),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    assert SystemdNotifier.watchdog_interval(usec, pid, own_pid=4242) == expected
