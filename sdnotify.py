"""systemd's notify protocol (sd_notify) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

Under a unit with Type=notify, systemd sets $NOTIFY_SOCKET; each call sends one datagram of
newline-separated KEY=VALUE pairs to it. Off systemd (no $NOTIFY_SOCKET) every call is a cheap
no-op that returns False. A send error never raises: it is logged once at WARNING and the call
returns False. Stdlib only; imports nothing from the project.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Talks to the service manager through $NOTIFY_SOCKET.

    `environ` defaults to os.environ and is read once, at construction. Thread-safe: every
    method may be called from any thread (one socket, sends serialised by a lock).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # '@name' is a socket in the abstract namespace: its address starts with a NUL byte.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when $NOTIFY_SOCKET is set (running under systemd with a notify socket)."""
        return bool(self._address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None when no watchdog
        is set for this process ($WATCHDOG_USEC unset/invalid, or $WATCHDOG_PID names another
        process)."""
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def notify(self, *pairs: str) -> bool:
        """Send the KEY=VALUE `pairs` as one datagram ("\\n"-joined). True when it was sent;
        False off systemd or on a send error (logged once, never raised)."""
        if not self._address or not pairs:
            return False
        data = "\n".join(pairs).encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
                return True
            except OSError as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if not self._warned:
                    self._warned = True
                    log.warning("cannot notify systemd at %s: %s (further failures are not logged)",
                                self._address.replace("\0", "@"), exc)
                return False

    def ready(self, status: str) -> bool:
        """Start-up is complete (READY=1), with a human-readable STATUS= line."""
        return self.notify("READY=1", _status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows (STATUS=)."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping (WATCHDOG=1): send at least every `watchdog_interval_s` seconds."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """The service is shutting down (STOPPING=1)."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the socket (a later call opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str) -> str:
    # A newline would start a new KEY=VALUE pair: keep the status on one line.
    return "STATUS=" + " ".join(str(text).splitlines())
