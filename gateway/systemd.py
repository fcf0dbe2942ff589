"""The sd_notify protocol: tell systemd we are ready, alive, or stopping.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent
to the unix socket named by ``NOTIFY_SOCKET`` (``@name`` is the abstract
namespace). It is small enough that a dependency would cost more than it saves.

This module never reads the environment: the settings module reads
``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` and passes them in, so
tests and callers decide what the process "sees".
"""

from __future__ import annotations

import errno
import os
import socket

import attrs
import structlog

# notify() runs on the event loop. pid 1 drains its socket with a large buffer,
# so a send never waits in practice; if it ever does (pid 1 stalled), losing one
# message is better than freezing every device connection behind it.
_SEND_TIMEOUT_S = 1.0


@attrs.define
class SystemdNotifier:
    """Sends sd_notify messages; every call is a no-op outside systemd.

    Mutable on purpose (not a frozen value): it owns one datagram socket, opened
    on first use and released by :meth:`close`, and remembers which failures it
    has already logged. Nothing here raises: a broken notify channel must not
    take the gateway down with it; systemd's own start and watchdog timeouts
    notice a silent service anyway.
    """

    socket_path: str | None
    _sock: socket.socket | None = attrs.field(default=None, init=False, repr=False)
    _logged_failures: set[str] = attrs.field(factory=set, init=False, repr=False)

    @classmethod
    def watchdog_interval(
        cls, watchdog_usec: str | None, watchdog_pid: str | None, own_pid: int
    ) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog applies.

        Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so one
        late ping does not get the service killed. ``WATCHDOG_PID`` set to
        another process means the watchdog belongs to it (we are a child that
        inherited the environment), so we must not ping.
        """
        if not watchdog_usec or not _is_decimal(watchdog_usec):
            return None
        usec = int(watchdog_usec)
        if usec == 0:
            return None
        if watchdog_pid and (not _is_decimal(watchdog_pid) or int(watchdog_pid) != own_pid):
            return None
        return usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: startup finished, both listeners accept connections."""
        self._send_with_status("READY=1", status)

    def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: the drain has begun, so systemd shows "deactivating"."""
        self._send_with_status("STOPPING=1", status)

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the event loop is alive; resets systemd's watchdog timer."""
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        """``STATUS=...``: free text shown by ``systemctl status``."""
        self.notify(_status_line(text))

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (``KEY=VALUE`` each) as one datagram; never raises.

        Lines are sent as given; values that may contain a newline must be
        cleaned by the caller (the helpers above do it for STATUS).
        """
        if not self.socket_path or not lines:
            return
        address = _socket_address(self.socket_path)
        if address is None:
            self._log_failure("unsupported_address", "NOTIFY_SOCKET is not a unix socket path")
            return
        # "replace": a lone surrogate in a status text must not turn into an
        # exception on the shutdown path.
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            sock = self._socket()
            sock.sendto(payload, address)
        except OSError as exc:
            # errno names (ENOENT, ECONNREFUSED, EAGAIN...) tell the operator
            # what is wrong; a timeout carries no errno, hence the class name.
            self._log_failure(errno.errorcode.get(exc.errno or 0, type(exc).__name__), str(exc))

    def close(self) -> None:
        """Release the socket. A later notify() opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_with_status(self, first: str, status: str | None) -> None:
        if status is None:
            self.notify(first)
        else:
            self.notify(first, _status_line(status))

    def _socket(self) -> socket.socket:
        # One socket for the process lifetime: the watchdog pings every few
        # seconds and a socket per ping would be churn for nothing. It stays
        # unconnected (sendto) so a NOTIFY_SOCKET recreated by systemd still
        # works.
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        return self._sock

    def _log_failure(self, kind: str, error: str) -> None:
        # Once per kind: the watchdog ping repeats every few seconds and would
        # otherwise flood the journal with the same line.
        if kind in self._logged_failures:
            return
        self._logged_failures.add(kind)
        structlog.get_logger(__name__).warning(
            "systemd_notify_failed", kind=kind, error=error, socket=self.socket_path
        )


def _status_line(text: str) -> str:
    # A newline would end the assignment and let the rest of the text be read
    # as another one (e.g. a device-supplied string smuggling in READY=1).
    return "STATUS=" + " ".join(text.splitlines())


def _socket_address(path: str) -> bytes | None:
    # Bytes, not str: an abstract name may hold any byte, and os.fsencode keeps
    # a path round-trip exact whatever the locale.
    raw = os.fsencode(path)
    if raw.startswith(b"@"):
        return b"\0" + raw[1:]
    if raw.startswith(b"/"):
        return raw
    # systemd 253+ can also hand out vsock: addresses; not used on our hosts.
    return None


def _is_decimal(text: str) -> bool:
    # int() alone would also accept " 30", "+30", "3_0" and non-ASCII digits,
    # none of which systemd ever writes.
    return text.isascii() and text.isdigit()
